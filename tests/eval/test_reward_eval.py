"""`qlora eval` of tiny reward, ORPO and KTO adapters: their keys in eval.json and sections in eval.md."""

from __future__ import annotations

import json

import pytest

from qlora_platform.eval.run import run_eval
from qlora_platform.infer.load import load_for_inference
from qlora_platform.models.value_head import HEAD_FILE
from qlora_platform.train.methods import make_trainer
from tests.conftest import tiny_run_config, write_jsonl
from tests.train.test_dpo import WORDS, toy_pairs


def _quiet(*_args, **_kwargs) -> None:
    pass


def _train(tmp_path, tiny_model_dir, method: str, **overrides) -> dict:
    train, held = toy_pairs(tmp_path)
    cfg = tiny_run_config(
        tiny_model_dir,
        train,
        held,
        tmp_path / "run",
        **{"training.method": method, "alignment.beta": 0.5, "training.learning_rate": 1e-2, **overrides},
    )
    return make_trainer(cfg, log=_quiet).train()


def _eval(tmp_path, **kwargs) -> tuple[dict, str, list[str]]:
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
        **kwargs,
    )
    out = tmp_path / "run" / "eval"
    saved = json.loads((out / "eval.json").read_text())
    assert saved == json.loads(json.dumps(report))
    return saved, (out / "eval.md").read_text(), lines


def test_eval_of_a_reward_adapter_reports_its_holdout_accuracy_and_margin(tmp_path, tiny_model_dir):
    summary = _train(tmp_path, tiny_model_dir, "reward")
    adapter = tmp_path / "run" / "final_adapter"
    assert (adapter / HEAD_FILE).is_file()
    loaded = load_for_inference(adapter=str(adapter), log=_quiet, warm_up=False)  # the head file is no obstacle
    assert loaded.adapter == str(adapter) and loaded.cfg.training.method == "reward"
    saved, md, lines = _eval(tmp_path)
    reward = saved["reward"]
    assert reward["pairs"] == 4 and reward["dropped"] == 0
    # The reward model as training evaluated it on the same holdout, with the same 4-bit numerics.
    assert reward["accuracy"] == pytest.approx(summary["eval_reward_accuracy"])
    assert reward["margin"] == pytest.approx(summary["eval_margin"], abs=1e-3)
    assert reward["accuracy"] >= 0.75 and reward["margin"] > 0
    assert "perplexity" not in saved and "preference" not in saved
    assert sum("perplexity: skipped" in line for line in lines) == 1
    assert "## Reward model" in md and "| reward accuracy |" in md and "holdout perplexity" not in md


def test_eval_of_an_orpo_adapter_reports_the_preference_pairs(tmp_path, tiny_model_dir):
    _train(tmp_path, tiny_model_dir, "orpo", **{"training.max_steps": 6})
    saved, md, _ = _eval(tmp_path)
    pref = saved["preference"]
    assert pref["pairs"] == 4 and pref["accuracy"]["tuned"] > pref["accuracy"]["base"]
    assert pref["margin"]["tuned"] > pref["margin"]["base"]
    assert "| preference accuracy |" in md and "perplexity" not in saved


def test_eval_of_a_kto_adapter_on_kto_records_and_on_pairs(tmp_path, tiny_model_dir):
    _train(tmp_path, tiny_model_dir, "kto", **{"training.max_steps": 6})
    records = []
    for k, w in enumerate(WORDS[:4]):
        records.append({"prompt": f"Say {w}.", "completion": f"{w} {w} {w} done.", "label": True})
        records.append({"prompt": f"Say {w}.", "completion": f"{WORDS[(k + 3) % 8]} no.", "label": False})
    held = write_jsonl(tmp_path / "kto_eval.jsonl", records)
    saved, md, lines = _eval(tmp_path, eval_file=str(held))
    kto = saved["kto"]
    assert kto["desirable"] == 4 and kto["undesirable"] == 4
    # Tuned against the base, desirable completions gained and undesirable ones lost probability.
    assert kto["desirable_logratio"] > 0 > kto["undesirable_logratio"] and kto["margin"] > 1.0
    assert kto["accuracy"] == 1.0
    assert "## Desirable and undesirable completions (KTO)" in md and "perplexity" not in saved
    assert sum("perplexity: skipped" in line for line in lines) == 1

    saved, md, _ = _eval(tmp_path)  # the run's own holdout: preference pairs
    assert "kto" not in saved and saved["preference"]["accuracy"]["tuned"] >= saved["preference"]["accuracy"]["base"]
