"""`qlora eval` on a tiny GRPO adapter: the rl keys in eval.json, their section in eval.md, and reward
functions named by the run's config run only when built in or with --trust-remote-code."""

from __future__ import annotations

import json

import pytest

from qlora_platform.eval.rl import MAX_PROMPTS, rl_scores
from qlora_platform.eval.run import run_eval
from qlora_platform.infer.load import load_for_inference
from qlora_platform.train.methods import make_trainer
from tests.conftest import write_jsonl
from tests.train.test_rl import WORDS, eos_model_dir, restore_threads, rl_config  # noqa: F401 - fixtures


def test_eval_of_a_grpo_adapter_reports_rewards_and_kl(eos_model_dir, tmp_path):  # noqa: F811
    own = tmp_path / "my_reward.py"
    own.write_text("def short(prompts, completions):\n    return [-len(c.split()) / 10 for c in completions]\n")
    cfg = rl_config(
        eos_model_dir,
        tmp_path,
        "grpo",
        **{"alignment.reward_functions": f"[qlora_platform.models.rewards:brevity, {own}:short]"},
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
    adapter = str(tmp_path / "run" / "final_adapter")
    # More holdout prompts than the evaluation reads.
    held = [{"prompt": [{"role": "user", "content": f"Tell me {w} {i}."}]} for i in range(3) for w in WORDS]
    eval_file = str(write_jsonl(tmp_path / "held.jsonl", held))
    lines: list[str] = []
    report = run_eval(
        adapter,
        prompts=str(prompts),
        eval_file=eval_file,
        speed_runs=1,
        speed_tokens=2,
        log=lambda *a: lines.append(" ".join(map(str, a))),
    )
    saved = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert saved == json.loads(json.dumps(report))
    rl = saved["rl"]
    assert rl["prompts"] == MAX_PROMPTS and rl["max_new_tokens"] == 8
    # The tuned answers are shorter (brevity) and moved away from the base.
    assert rl["reward"]["tuned"] > rl["reward"]["base"] and rl["answer_tokens"]["tuned"] < rl["answer_tokens"]["base"]
    assert 0 < rl["kl"] < 4
    # The run's own file is not run without --trust-remote-code; the built-in function is.
    assert rl["reward_sources"] == ["qlora_platform.models.rewards:brevity"]
    assert len(rl["skipped"]) == 1 and "--trust-remote-code" in rl["skipped"][0]
    assert "perplexity" not in saved and saved["plots"] == []
    assert sum("perplexity: skipped" in line for line in lines) == 1
    md = (tmp_path / "run" / "eval" / "eval.md").read_text()
    assert "## Sampled answers (RL)" in md and "| mean reward |" in md and "Skipped reward sources" in md

    trusted = rl_scores(load_for_inference(adapter=adapter, log=lambda *_: None, warm_up=False), eval_file, True)
    assert trusted["skipped"] == [] and len(trusted["reward_sources"]) == 2
    # The same answers (same seed), scored by both functions: brevity plus -words / 10 is lower.
    assert trusted["answer_tokens"] == rl["answer_tokens"] and trusted["kl"] == pytest.approx(rl["kl"])
    assert trusted["reward"]["tuned"] < rl["reward"]["tuned"]


def test_the_reward_model_of_a_run_scores_its_answers_and_is_detached_after(eos_model_dir, tmp_path):  # noqa: F811
    from qlora_platform.models.reward_model import REWARD_ADAPTER
    from tests.train.test_grpo import short_answer_reward_model

    folder = short_answer_reward_model(eos_model_dir, tmp_path / "rm")
    overrides = {"alignment.reward_functions": "[]", "alignment.reward_adapter": str(folder), "training.max_steps": 1}
    cfg = rl_config(eos_model_dir, tmp_path / "rl", "ppo", **overrides)
    make_trainer(cfg, log=lambda *_: None).train()
    loaded = load_for_inference(
        adapter=str(tmp_path / "rl" / "run" / "final_adapter"), log=lambda *_: None, warm_up=False
    )
    rl = rl_scores(loaded, cfg.data.eval_file)
    assert rl["reward_sources"] == [f"reward model {folder}"] and rl["skipped"] == [] and rl["prompts"] == 2
    assert rl["reward"]["base"] is not None and rl["reward"]["tuned"] is not None
    assert REWARD_ADAPTER not in loaded.model.peft_config and loaded.model.active_adapter == "default"
