"""ORPO on the tiny random Llama: the loss against hand-computed values, learning, and the data-kind error."""

from __future__ import annotations

import math

import pytest
import torch

from qlora_platform.errors import UserError
from qlora_platform.models.scoring import sequence_logps
from qlora_platform.train.methods import make_trainer
from qlora_platform.train.orpo import ORPOTrainer, answer_tokens, orpo_metrics
from qlora_platform.train.preference import log_odds, orpo_loss
from tests.conftest import tiny_run_config, toy_task
from tests.train.test_dpo import toy_pairs
from tests.train.test_reward import bundled_run


def _quiet(*_args, **_kwargs) -> None:
    pass


@pytest.fixture
def orpo_cfg(tiny_model_dir, tmp_path):
    train, held = toy_pairs(tmp_path)
    return tiny_run_config(
        tiny_model_dir,
        train,
        held,
        tmp_path / "run",
        **{"training.method": "orpo", "alignment.beta": 0.5, "training.learning_rate": 1e-2},
    )


def _log_odds(m: float) -> float:
    return m - math.log(1 - math.exp(m))


def test_the_orpo_loss_equals_the_hand_computed_value():
    chosen, rejected = torch.tensor([-0.5, -3.0]), torch.tensor([-2.0, -1.0])
    losses, lo_chosen, lo_rejected = orpo_loss(chosen, rejected, beta=0.1)
    # log_odds(-0.5) = -0.5 - log(1 - e^-0.5) = 0.432752; log_odds(-2) = -1.854587
    assert lo_chosen[0].item() == pytest.approx(0.432752, abs=1e-5)
    assert lo_rejected[0].item() == pytest.approx(-1.854587, abs=1e-5)
    expected = [
        -c + 0.1 * math.log1p(math.exp(-(_log_odds(c) - _log_odds(r)))) for c, r in ((-0.5, -2.0), (-3.0, -1.0))
    ]
    assert losses[0].item() == pytest.approx(0.5 + 0.1 * 0.096702, abs=1e-5)
    assert torch.allclose(losses, torch.tensor(expected), atol=1e-5)
    stats = orpo_metrics(torch.stack([chosen, rejected], 1), beta=0.1)
    assert stats["reward_accuracy"] == 0.5 and stats["nll"] == pytest.approx(1.75)
    assert stats["loss"] == pytest.approx(sum(expected) / 2, abs=1e-5)


def test_log_odds_are_finite_near_certainty_and_far_from_it():
    x = torch.tensor([0.0, -1e-9, -1e-4, -0.69, -0.7, -80.0], requires_grad=True)
    out = log_odds(x)
    assert torch.isfinite(out).all()
    assert out[2].item() == pytest.approx(_log_odds(-1e-4), rel=1e-4)
    assert out[-1].item() == pytest.approx(-80.0)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_orpo_steps_raise_the_log_odds_margin(orpo_cfg):
    orpo_cfg.training.max_steps = 8
    trainer = make_trainer(orpo_cfg, log=_quiet)
    assert isinstance(trainer, ORPOTrainer)
    pad, tokens = trainer.tokenizer.pad_token_id, answer_tokens(trainer.train_examples)
    before = orpo_metrics(sequence_logps(trainer.model, trainer.train_examples, 4, pad) / tokens, 0.5)
    summary = trainer.train()
    after = orpo_metrics(sequence_logps(trainer.model, trainer.train_examples, 4, pad) / tokens, 0.5)
    assert after["margin"] > before["margin"] + 1.0 and after["reward_accuracy"] > 0.8
    assert after["nll"] < before["nll"] and after["loss"] < before["loss"]
    steps = [h for h in trainer.history if "margin" in h and "eval_loss" not in h]
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[-1]["margin"] > steps[0]["margin"]
    assert {"nll", "reward_accuracy", "chosen_log_odds", "rejected_log_odds"} <= steps[0].keys()
    assert summary["method"] == "orpo" and summary["eval_reward_accuracy"] is not None
    assert summary["eval_nll"] is not None and summary["eval_perplexity"] is None
    assert (trainer.out / "final_adapter" / "adapter_model.safetensors").is_file()


def test_an_sft_file_for_orpo_is_one_line_naming_the_fix(orpo_cfg, tmp_path):
    sft_train, _ = toy_task(tmp_path)
    orpo_cfg.data.train_file = str(sft_train)
    with pytest.raises(UserError) as err:
        make_trainer(orpo_cfg, log=_quiet)
    text = str(err.value)
    assert "holds SFT records" in text and "training.method orpo" in text and "\n" not in text


@pytest.mark.slow
def test_orpo_on_the_bundled_model_widens_the_log_odds_margin(tmp_path):
    first, last = bundled_run(tmp_path, "orpo", beta=0.1)
    # Step 1 scores its pairs before any update, step 2 after one.
    assert last["margin"] > first["margin"] + 0.5 and last["nll"] < first["nll"]
    assert last["chosen_log_odds"] > first["chosen_log_odds"]
