"""notebooks/quickstart.ipynb runs end to end (nbclient, this environment's kernel), so it cannot rot.

Its knobs keep the run short: 4 training steps on 128-token rows, 2 benchmark prompts, a holdout
of 8 sample pairs; the steps are the notebook's own (prepare, validate, train, eval, generate,
export a GGUF).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_platform.data.sample import build_sample_records
from qlora_platform.data.split import split_holdout
from qlora_platform.eval.keywords import DEFAULT_PROMPTS

pytestmark = pytest.mark.slow
NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"


def test_the_quickstart_notebook_runs(tmp_path, monkeypatch):
    import nbclient
    import nbformat

    bench = json.loads(Path(DEFAULT_PROMPTS).read_text())
    bench["prompts"], bench["generation"]["max_new_tokens"] = bench["prompts"][:2], 32
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    monkeypatch.setenv("QLORA_QUICKSTART_STEPS", "4")
    monkeypatch.setenv("QLORA_QUICKSTART_SEQ_LEN", "128")
    monkeypatch.setenv("QLORA_QUICKSTART_PROMPTS", str(tmp_path / "bench.json"))
    holdout = tmp_path / "holdout.jsonl"
    _, held = split_holdout(build_sample_records(), 0.1, 42)  # the split `qlora prepare --sample` makes
    holdout.write_text("".join(json.dumps(r) + "\n" for r in held[:8]))
    monkeypatch.setenv("QLORA_QUICKSTART_HOLDOUT", str(holdout))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit it clean"
    nbclient.NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    assert json.loads((tmp_path / "runs/quickstart/train_summary.json").read_text())["steps"] == 4
    assert json.loads((tmp_path / "runs/quickstart/eval/eval.json").read_text())["perplexity"]["examples"] == 8
    assert any((tmp_path / "exports/quickstart").glob("*Q8_0*.gguf"))
    shown = "".join(
        out.get("text", "") + json.dumps(out.get("data", {}))
        for cell in notebook.cells
        for out in cell.get("outputs", [])
    )
    assert "holdout perplexity" in shown and "export: done" in shown
