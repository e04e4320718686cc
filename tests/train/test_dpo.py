"""DPO on the tiny random Llama: the loss, the reference, learning, resume and the data-kind errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from qlora_platform.config import load_config, resume_keys
from qlora_platform.errors import UserError
from qlora_platform.models.scoring import sequence_logps
from qlora_platform.train.checkpoint import list_checkpoints
from qlora_platform.train.dpo import DPOTrainer
from qlora_platform.train.methods import make_trainer
from qlora_platform.train.preference import dpo_loss, preference_metrics
from qlora_platform.train.trainer import Trainer
from tests.conftest import assert_same_lora, interrupt_during, tiny_run_config, toy_task, write_jsonl

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


def pair(question: str, chosen: str, rejected: str) -> dict:
    return {"prompt": [{"role": "user", "content": question}], "chosen": chosen, "rejected": rejected}


def toy_pairs(folder: Path) -> tuple[Path, Path]:
    """Pairs whose chosen answer repeats the asked word and whose rejected one names another word."""
    train = [
        pair(f"Say {w} {i}.", f"{w} {w} {w} done.", f"{WORDS[(k + 3) % 8]} no.")
        for i in range(3)
        for k, w in enumerate(WORDS)
    ]
    held = [pair(f"Say {w}.", f"{w} {w} {w} done.", f"{WORDS[(k + 3) % 8]} no.") for k, w in enumerate(WORDS[:4])]
    return write_jsonl(folder / "pairs_train.jsonl", train), write_jsonl(folder / "pairs_eval.jsonl", held)


@pytest.fixture
def dpo_cfg(tiny_model_dir, tmp_path):
    train, held = toy_pairs(tmp_path)
    return tiny_run_config(
        tiny_model_dir,
        train,
        held,
        tmp_path / "run",
        **{"training.method": "dpo", "alignment.beta": 0.5, "training.learning_rate": 1e-2},
    )


def _quiet(*_args, **_kwargs) -> None:
    pass


def test_dpo_loss_equals_the_hand_computed_value():
    policy_chosen, policy_rejected = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    ref_chosen, ref_rejected = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
    losses, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.5)
    # pair 0: rewards 0.25 and -0.25, margin 0.5; pair 1: rewards -0.5 and 0.5, margin -1.
    assert torch.allclose(chosen, torch.tensor([0.25, -0.5])) and torch.allclose(rejected, torch.tensor([-0.25, 0.5]))
    expected = [math.log1p(math.exp(-0.5)), math.log1p(math.exp(1.0))]
    assert torch.allclose(losses, torch.tensor(expected), atol=1e-6)
    stats = preference_metrics(
        torch.stack([policy_chosen, policy_rejected], 1), torch.stack([ref_chosen, ref_rejected], 1), 0.5
    )
    assert stats["reward_accuracy"] == 0.5 and stats["margin"] == pytest.approx(-0.25)
    assert stats["loss"] == pytest.approx(sum(expected) / 2)


def test_at_step_zero_the_policy_is_the_reference(dpo_cfg):
    dpo_cfg.training.max_steps = 1
    trainer = make_trainer(dpo_cfg, log=_quiet)
    assert isinstance(trainer, DPOTrainer)
    # One step of 4 pairs: the reference is computed for the 4 pairs it trains on only.
    planned = ~trainer.reference[:, 0].isnan()
    assert int(planned.sum()) == 4
    pairs = [ex for ex, keep in zip(trainer.train_examples, planned) if keep]
    policy = sequence_logps(trainer.model, pairs, 4, trainer.tokenizer.pad_token_id)
    stats = preference_metrics(policy, trainer.reference[planned], dpo_cfg.alignment.beta)
    assert stats["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert stats["margin"] == pytest.approx(0.0, abs=1e-4)
    trainer.train()
    first = trainer.history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["margin"] == pytest.approx(0.0, abs=1e-4)
    assert {"reward_accuracy", "chosen_reward", "rejected_reward"} <= first.keys()
    logged = [json.loads(line) for line in (trainer.out / "train_log.jsonl").read_text().splitlines()]
    assert "reward_accuracy" in logged[0] and "eval_reward_accuracy" in logged[-1]


def test_dpo_steps_raise_the_reward_accuracy_and_margin(dpo_cfg):
    dpo_cfg.training.max_steps = 8
    trainer = make_trainer(dpo_cfg, log=_quiet)
    lora0 = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    summary = trainer.train()
    steps = [h for h in trainer.history if "reward_accuracy" in h]
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[-1]["margin"] > steps[0]["margin"] + 0.1
    assert not trainer.reference.isnan().any()  # 8 steps of 4 reach every one of the 24 pairs
    policy = sequence_logps(trainer.model, trainer.train_examples, 4, trainer.tokenizer.pad_token_id)
    after = preference_metrics(policy, trainer.reference, dpo_cfg.alignment.beta)
    assert after["reward_accuracy"] > 0.8 and after["margin"] > 0.1 and after["loss"] < math.log(2)
    assert any(not torch.equal(lora0[n], p) for n, p in trainer.model.named_parameters() if n in lora0)
    assert summary["method"] == "dpo" and summary["eval_perplexity"] is None
    assert summary["eval_reward_accuracy"] is not None
    assert (trainer.out / "final_adapter" / "adapter_model.safetensors").is_file()


def test_an_interrupted_dpo_run_resumes_where_it_stopped(dpo_cfg, tmp_path):
    straight = dpo_cfg.model_copy(deep=True)
    straight.output.dir = str(tmp_path / "straight")
    full = make_trainer(straight, log=_quiet)
    full.train()

    interrupted = interrupt_during(make_trainer(dpo_cfg, log=_quiet), call=5)
    with pytest.raises(UserError, match="interrupted at step 4/6.*--resume"):
        interrupted.train()
    assert [s for s, _ in list_checkpoints(dpo_cfg.output.dir)] == [3, 4]

    resumed = make_trainer(dpo_cfg, resume=True, log=_quiet)
    assert isinstance(resumed, DPOTrainer) and resumed.step == 4
    resumed.train()
    assert resumed.step == 6
    assert_same_lora(resumed.model, full.model)


def test_an_sft_file_for_dpo_is_one_line_naming_the_fix(dpo_cfg, tmp_path):
    sft_train, _ = toy_task(tmp_path)
    dpo_cfg.data.train_file = str(sft_train)
    with pytest.raises(UserError) as err:
        make_trainer(dpo_cfg, log=_quiet)
    text = str(err.value)
    assert "holds SFT records" in text and "--sample-preferences" in text and "\n" not in text


def test_a_pairs_file_for_sft_is_one_line_naming_the_fix(dpo_cfg):
    with pytest.raises(UserError, match="make_trainer"):
        Trainer(dpo_cfg, log=_quiet)  # the SFT trainer refuses a DPO config
    dpo_cfg.training.method = "sft"
    with pytest.raises(UserError) as err:
        make_trainer(dpo_cfg, log=_quiet)
    text = str(err.value)
    assert "holds preference pairs" in text and "training.method dpo" in text and "\n" not in text


def test_config_knows_the_methods():
    assert load_config(None, {}).training.method == "sft" and ("training", "method") in resume_keys()
    with pytest.raises(UserError, match="method") as err:
        load_config(None, {"training.method": "rlhf"})
    assert "grpo" in str(err.value) and "\n" not in str(err.value)  # names the methods there are
    with pytest.raises(UserError, match="data.packing"):
        load_config(None, {"training.method": "dpo", "data.packing": "true"})


@pytest.mark.parametrize("method", ["dpo", "reward", "orpo"])
def test_preference_methods_refuse_several_processes_in_one_line(dpo_cfg, monkeypatch, method):
    from types import SimpleNamespace

    import qlora_platform.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "pick_strategy", lambda *_: SimpleNamespace(world=2, is_main=True))
    dpo_cfg.training.method = method
    with pytest.raises(UserError) as err:
        make_trainer(dpo_cfg, log=_quiet)
    assert str(err.value) == f"training.method {method} runs in one process for now; drop --num-processes"
