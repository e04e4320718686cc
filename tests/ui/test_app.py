"""What the tabs show, read from the workspace: the loss curve as it is written, eval.md with its plots served."""

from __future__ import annotations

import json
import sys

from qlora_platform.ui.app import App, Options, chat_messages, loss_summary
from qlora_platform.ui.workspace import Workspace


def test_the_loss_curve_follows_the_newest_training_job(tmp_path):
    app = App(Options(Workspace(tmp_path)))
    assert app.loss_frame().empty and loss_summary(app.loss_frame()) == "No training run yet."
    app.jobs.program = [sys.executable, "-c", "pass"]
    app.jobs.start("train", [["train"]], {"run": "runs/a"})
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    records = [{"step": 1, "loss": 3.5}, {"step": 5, "loss": 2.25}, {"step": 5, "eval_loss": 2.5}]
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"step": 6, "lo'  # a line being written
    (run / "train_log.jsonl").write_text(text)
    frame = app.loss_frame()
    assert frame.to_dict("records") == [
        {"step": 1, "loss": 3.5, "series": "train"},
        {"step": 5, "loss": 2.25, "series": "train"},
        {"step": 5, "loss": 2.5, "series": "holdout"},
    ]
    assert loss_summary(frame) == "train loss 3.500 at step 1 -> 2.250 at step 5; holdout loss 2.500 at step 5"


def test_eval_md_shows_its_plots_inline(tmp_path):
    app = App(Options(Workspace(tmp_path)))
    adapter = tmp_path / "runs" / "a" / "final_adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    assert "no evaluation yet" in app.eval_report("runs/a/final_adapter")
    (adapter.parent / "eval").mkdir()
    (adapter.parent / "eval" / "loss.png").write_bytes(b"\x89PNG fake")
    (adapter.parent / "eval" / "eval.md").write_text(
        "# Evaluation\n\n![loss](loss.png)\n![gone](gone.png)\n![x](https://example.com/x.png)\n"
    )
    page = app.eval_report("runs/a/final_adapter")
    assert "![loss](data:image/png;base64,iVBORyBmYWtl)" in page  # no workspace file needs serving
    assert "![gone](gone.png)" in page and "![x](https://example.com/x.png)" in page


def test_chat_history_parts_become_text():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "json?"}]},
        {"role": "assistant", "content": {"type": "text", "text": "A format."}},
        {"role": "user", "content": "And dumps?"},
    ]
    assert chat_messages(history) == [
        {"role": "user", "content": "What is json?"},
        {"role": "assistant", "content": "A format."},
        {"role": "user", "content": "And dumps?"},
    ]
