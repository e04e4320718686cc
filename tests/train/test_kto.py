"""KTO on the tiny random Llama: the loss and KL estimate against hand-computed values, the mismatched
pairs, learning from pairs and from KTO records, and the one-line errors."""

from __future__ import annotations

import math

import pytest
import torch

from qlora_platform.data.tokenize import IGNORE
from qlora_platform.errors import UserError
from qlora_platform.models.scoring import rows_logps
from qlora_platform.train.kto import KTOTrainer, kl_estimate, kto_loss, mismatched, rotated
from qlora_platform.train.methods import make_trainer
from tests.conftest import tiny_run_config, toy_task, write_jsonl
from tests.train.test_dpo import WORDS, toy_pairs
from tests.train.test_reward import bundled_run


def _quiet(*_args, **_kwargs) -> None:
    pass


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.fixture
def kto_cfg(tiny_model_dir, tmp_path):
    train, held = toy_pairs(tmp_path)
    return tiny_run_config(
        tiny_model_dir,
        train,
        held,
        tmp_path / "run",
        **{"training.method": "kto", "alignment.beta": 0.5, "training.learning_rate": 1e-2},
    )


def test_the_kto_loss_equals_the_hand_computed_value():
    policy, reference = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-1.5, -1.0, -3.0])
    desirable = torch.tensor([True, False, True])
    losses, rewards = kto_loss(
        policy, reference, desirable, 0.2, beta=0.5, desirable_weight=1.0, undesirable_weight=2.0
    )
    # log-ratios 0.5, -1, 0; z = 0.2
    expected = [1 - _sigmoid(0.5 * (0.5 - 0.2)), 2 * (1 - _sigmoid(0.5 * (0.2 + 1.0))), 1 - _sigmoid(0.5 * -0.2)]
    assert torch.allclose(losses, torch.tensor(expected), atol=1e-6)
    assert losses[1].item() == pytest.approx(0.708688, abs=1e-5)
    assert torch.allclose(rewards, torch.tensor([0.25, -0.5, 0.0]))


def test_the_kl_estimate_is_the_clamped_mean_log_ratio_of_the_mismatched_pairs():
    assert kl_estimate(torch.tensor([-1.0, -1.0]), torch.tensor([-1.5, -1.5])).item() == pytest.approx(0.5)
    assert kl_estimate(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])).item() == 0.0  # mean -0.25
    policy = torch.tensor([-1.0], requires_grad=True)
    assert not kl_estimate(policy, torch.tensor([-2.0])).requires_grad
    assert kl_estimate(torch.zeros(0), torch.zeros(0)).item() == 0.0
    # Each completion goes with the next one's prompt, as TRL rotates them.
    assert rotated([3, 7, 9]) == [(3, 9), (7, 3), (9, 7)] and rotated([4]) == []


def test_a_mismatched_pair_is_one_prompt_with_another_completion():
    a = {"input_ids": [1, 2, 3, 10, 11], "labels": [IGNORE] * 3 + [10, 11], "prompt_len": 3}
    b = {"input_ids": [4, 5, 20, 21, 22], "labels": [IGNORE] * 2 + [20, 21, 22], "prompt_len": 2}
    assert mismatched(a, b, 96) == {"input_ids": [1, 2, 3, 20, 21, 22], "labels": [IGNORE] * 3 + [20, 21, 22]}
    assert mismatched(a, b, 5)["input_ids"] == [2, 3, 20, 21, 22]  # the prompt loses tokens from its left


def test_kto_steps_raise_the_desirable_reward_and_lower_the_undesirable_one(kto_cfg):
    kto_cfg.training.max_steps = 6
    trainer = make_trainer(kto_cfg, log=_quiet)
    assert isinstance(trainer, KTOTrainer)
    # 24 pairs give 48 completions, half desirable; 6 steps of 4 reach 24 of them.
    assert len(trainer.train_examples) == 48 and sum(ex["label"] for ex in trainer.train_examples) == 24
    planned = ~trainer.reference.isnan()
    assert int(planned.sum()) == 24 and len(trainer.kl_reference) == 24
    summary = trainer.train()
    examples = [ex for ex, keep in zip(trainer.train_examples, planned) if keep]
    policy = rows_logps(trainer.model, examples, 4, trainer.tokenizer.pad_token_id)
    ratio = policy - trainer.reference[planned]
    desirable = torch.tensor([ex["label"] for ex in examples])
    assert ratio[desirable].mean() > 1.0 and ratio[~desirable].mean() < -1.0
    steps = [h for h in trainer.history if "kl" in h and "eval_loss" not in h]
    assert steps[0]["loss"] == pytest.approx(0.5, abs=1e-3)  # policy = reference at step 0
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[-1]["margin"] > steps[0]["margin"] + 1.0
    assert summary["method"] == "kto" and summary["eval_margin"] > 0 and summary["eval_perplexity"] is None
    assert summary["eval_desirable_reward"] > summary["eval_undesirable_reward"]


def test_kto_trains_on_kto_records(kto_cfg, tmp_path):
    records = []
    for i in range(2):
        for k, w in enumerate(WORDS):
            good = k % 2 == 0  # unpaired: each prompt has one completion, desirable or not
            answer = f"{w} {w} {w} done." if good else f"{WORDS[(k + 3) % 8]} no."
            records.append({"prompt": f"Say {w} {i}.", "completion": answer, "label": good})
    kto_cfg.data.train_file = str(write_jsonl(tmp_path / "kto.jsonl", records))
    kto_cfg.training.max_steps = 4  # one epoch of the 16 completions
    trainer = make_trainer(kto_cfg, log=_quiet)
    assert len(trainer.train_examples) == 16 and sum(ex["label"] for ex in trainer.train_examples) == 8
    trainer.train()
    policy = rows_logps(trainer.model, trainer.train_examples, 4, trainer.tokenizer.pad_token_id)
    ratio = policy - trainer.reference
    desirable = torch.tensor([ex["label"] for ex in trainer.train_examples])
    assert ratio[desirable].mean() > 0.5 and ratio[~desirable].mean() < -0.5


def test_bad_kto_settings_and_data_are_one_line(kto_cfg, tmp_path):
    kto_cfg.training.batch_size = 1
    with pytest.raises(UserError, match="training.batch_size 2 or more") as err:
        make_trainer(kto_cfg, log=_quiet)
    assert "\n" not in str(err.value)
    kto_cfg.training.batch_size = 4
    sft_train, _ = toy_task(tmp_path)
    kto_cfg.data.train_file = str(sft_train)
    with pytest.raises(UserError) as err:
        make_trainer(kto_cfg, log=_quiet)
    assert "holds SFT records" in str(err.value) and "training.method kto" in str(err.value)
    bad = [{"prompt": "Say alpha.", "completion": "alpha", "label": "yes"}]
    kto_cfg.data.train_file = str(write_jsonl(tmp_path / "bad.jsonl", bad))
    with pytest.raises(UserError, match="bad.jsonl:1: 'label' must be true or false") as err:
        make_trainer(kto_cfg, log=_quiet)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_kto_on_the_bundled_model_favours_the_desirable_completions(tmp_path):
    first, last = bundled_run(tmp_path, "kto", beta=0.1)
    # Step 1 runs at the reference (every reward 0, loss 1 - sigmoid(0)); step 2 after one update.
    assert first["loss"] == pytest.approx(0.5, abs=1e-3) and first["margin"] == pytest.approx(0.0, abs=1e-3)
    assert last["loss"] < 0.45 and last["desirable_reward"] > 0 > last["undesirable_reward"]
