"""`qlora eval` on a tiny DPO adapter: the preference keys in eval.json and their section in eval.md."""

from __future__ import annotations

import json

from qlora_platform.eval.run import run_eval
from qlora_platform.train.methods import make_trainer
from tests.conftest import tiny_run_config
from tests.train.test_dpo import WORDS, toy_pairs


def test_eval_of_a_dpo_adapter_reports_preference_accuracy_and_margin(tmp_path, tiny_model_dir):
    train, held = toy_pairs(tmp_path)
    cfg = tiny_run_config(
        tiny_model_dir,
        train,
        held,
        tmp_path / "run",
        **{"training.method": "dpo", "alignment.beta": 0.5, "training.max_steps": 6},
    )
    make_trainer(cfg, log=lambda *_: None).train()
    prompts = tmp_path / "prompts.json"
    prompts.write_text(
        json.dumps(
            {
                "name": "say",
                "generation": {"max_new_tokens": 4},
                "prompts": [{"id": f"p{i}", "prompt": f"Say {w}.", "keywords": [w]} for i, w in enumerate(WORDS[:2])],
            }
        )
    )
    lines: list[str] = []
    report = run_eval(
        str(tmp_path / "run" / "final_adapter"),
        prompts=str(prompts),
        speed_runs=1,
        speed_tokens=2,
        log=lambda *a: lines.append(" ".join(map(str, a))),
    )
    saved = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert saved == json.loads(json.dumps(report))
    pref = saved["preference"]
    assert set(pref["accuracy"]) == {"base", "tuned"} and set(pref["margin"]) == {"base", "tuned"}
    assert pref["pairs"] == 4 and all(0 <= v <= 1 for v in pref["accuracy"].values())
    # Trained on the same kind of pairs, the tuning moves every pair towards its chosen answer and the
    # tuned model ranks more of them right than the base (whose ranking the answers' lengths skew).
    assert pref["implicit_reward"]["accuracy"] == 1.0 and pref["implicit_reward"]["margin"] > 0
    assert pref["accuracy"]["tuned"] > pref["accuracy"]["base"] and pref["margin"]["tuned"] > pref["margin"]["base"]
    assert "perplexity" not in saved and saved["plots"] == []
    assert sum("perplexity: skipped" in line for line in lines) == 1
    md = (tmp_path / "run" / "eval" / "eval.md").read_text()
    assert "## Preference pairs (DPO)" in md and "| preference accuracy |" in md and "holdout perplexity" not in md
