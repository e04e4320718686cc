"""GRPO: group-relative advantages and the clipped loss by hand, then learning on the tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qlora_platform.models.rollout import Rollout
from qlora_platform.train.grpo import GRPOTrainer, clipped_policy_loss, group_advantages, grpo_loss
from qlora_platform.train.methods import make_trainer
from qlora_platform.train.rl import RolloutBatch
from tests.conftest import write_jsonl
from tests.train.test_rl import WORDS, bundled_rl_config, eos_model_dir, restore_threads, rl_config  # noqa: F401 - fixtures


def _quiet(*_args, **_kwargs) -> None:
    pass


def test_group_advantages_equal_the_hand_computed_values():
    # Groups [1, 2] and [3, 3, ...]: mean 1.5, std (Bessel) sqrt(0.5); an equal group gets 0.
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 3.0]), group=2)
    s = math.sqrt(0.5) + 1e-4
    assert torch.allclose(adv, torch.tensor([-0.5 / s, 0.5 / s, 0.0, 0.0]), atol=1e-6)
    four = group_advantages(torch.tensor([0.0, 1.0, 2.0, 5.0]), group=4)  # mean 2, std sqrt(14/3)
    assert torch.allclose(four, (torch.tensor([0.0, 1.0, 2.0, 5.0]) - 2) / (math.sqrt(14 / 3) + 1e-4), atol=1e-6)


def test_the_clipped_policy_loss_takes_the_pessimistic_term():
    old = torch.zeros(4)
    logps = torch.log(torch.tensor([1.5, 1.5, 0.5, 1.1]))  # ratios 1.5, 1.5, 0.5, 1.1
    adv = torch.tensor([1.0, -1.0, -1.0, 2.0])
    loss, clipped = clipped_policy_loss(logps, old, adv, clip=0.2)
    # A > 0, ratio 1.5: clipped to 1.2 -> -1.2; A < 0, ratio 1.5: unclipped -> 1.5;
    # A < 0, ratio 0.5: clipped to 0.8 -> 0.8; within the range: -1.1 * 2.
    assert torch.allclose(loss, torch.tensor([-1.2, 1.5, 0.8, -2.2]), atol=1e-6)
    assert clipped.tolist() == [True, False, True, False]


def test_grpo_loss_at_ratio_one_is_minus_the_token_weighted_advantage_plus_the_kl():
    # Two prompts, two answers each; answer lengths 2, 1, 3, 3 of 3 columns.
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]])
    roll = Rollout(
        input_ids=torch.zeros(4, 5, dtype=torch.long),
        attention_mask=torch.ones(4, 5, dtype=torch.long),
        prompt_width=2,
        answer_mask=mask,
        prompt_ids=[[0, 0]] * 4,
        finished=torch.tensor([True, True, False, False]),
    )
    logps = torch.full((4, 3), -1.0, requires_grad=True)
    from qlora_platform.models.rollout import AnswerScores

    reference = torch.full((4, 3), -1.5)
    batch = RolloutBatch(
        roll=roll,
        rewards=torch.tensor([1.0, 0.0, 2.0, 2.0]),
        policy=AnswerScores(logps=logps * 1, hidden=None),
        reference=reference,
        group=2,
    )
    loss, stats = grpo_loss(batch, clip=0.2, kl_coef=0.1)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)  # advantages +a (2 tokens), -a (1 token), 0, 0 (6 tokens)
    kl = math.exp(-0.5) + 0.5 - 1
    assert float(loss.detach()) == pytest.approx((-(2 * a) + a) / 9 + 0.1 * kl, abs=1e-6)
    assert stats["clip_fraction"] == 0.0
    loss.backward()
    assert logps.grad[0, 2] == 0 and logps.grad[1, 1] == 0  # nothing after an answer's end


def test_grpo_steps_raise_the_mean_reward_with_a_bounded_kl(eos_model_dir, tmp_path):  # noqa: F811
    trainer = make_trainer(rl_config(eos_model_dir, tmp_path, "grpo"), log=_quiet)
    assert isinstance(trainer, GRPOTrainer)
    summary = trainer.train()
    steps = [h for h in trainer.history if "reward" in h]
    assert len(steps) == 4
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollout is the reference's
    # Brevity: answers that stop sooner (EOS) score higher, and they get shorter.
    before, after = (steps[0]["reward"] + steps[1]["reward"]) / 2, (steps[2]["reward"] + steps[3]["reward"]) / 2
    assert after > before + 0.03 and steps[-1]["answer_tokens"] < steps[0]["answer_tokens"] - 1
    assert all(0.0 <= h["kl"] < 4.0 for h in steps) and all(h["clip_fraction"] == 0.0 for h in steps)
    assert {"reward_std", "answer_tokens", "clip_fraction"} <= steps[0].keys()
    assert summary["method"] == "grpo" and summary["eval_reward"] is not None and summary["eval_kl"] >= 0
    logged = [json.loads(line) for line in (trainer.out / "train_log.jsonl").read_text().splitlines()]
    assert "reward" in logged[0] and "eval_reward" in logged[-1]
    assert (trainer.out / "final_adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_grpo_on_the_bundled_model_raises_the_reward_with_a_bounded_kl(tmp_path):
    trainer = make_trainer(bundled_rl_config(tmp_path, "grpo"), log=_quiet)
    trainer.train()
    steps = [h for h in trainer.history if "reward" in h]
    # Seen: rewards 0.836, 0.826, 0.898, 0.905; KL at most 1.04 per token; answers 10.1 -> 9.4 tokens.
    before, after = (steps[0]["reward"] + steps[1]["reward"]) / 2, (steps[2]["reward"] + steps[3]["reward"]) / 2
    assert after > before + 0.04 and steps[-1]["answer_tokens"] < steps[0]["answer_tokens"]
    assert all(h["kl"] < 2.0 for h in steps)


def short_answer_reward_model(model_dir, folder):
    """The final_adapter of a 3-step reward run on `model_dir` whose pairs prefer a short answer."""
    from tests.train.test_dpo import pair

    pairs = [pair(f"Say {w}.", "Yes.", f"{w} is a long answer that goes on and on about {w}.") for w in WORDS]
    cfg = rl_config(model_dir, folder, "reward", **{"training.max_steps": 3, "alignment.reward_functions": "[]"})
    cfg.data.train_file = str(write_jsonl(folder / "pairs.jsonl", pairs))
    cfg.data.eval_file = None
    make_trainer(cfg, log=_quiet).train()
    return folder / "run" / "final_adapter"


def test_grpo_with_a_reward_model_on_the_same_base(eos_model_dir, tmp_path):  # noqa: F811
    from qlora_platform.models.reward_model import REWARD_ADAPTER

    folder = short_answer_reward_model(eos_model_dir, tmp_path / "rm")
    cfg = rl_config(
        eos_model_dir,
        tmp_path / "rl",
        "grpo",
        **{"alignment.reward_functions": "[]", "alignment.reward_adapter": str(folder), "training.max_steps": 2},
    )
    trainer = make_trainer(cfg, log=_quiet)
    reward_weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if f".{REWARD_ADAPTER}." in n}
    assert reward_weights and not any(
        p.requires_grad for n, p in trainer.model.named_parameters() if n in reward_weights
    )
    roll, rewards = trainer._sample(trainer.train_examples[:2], 2, torch.Generator().manual_seed(0))
    ids, mask = roll.scoring_batch(trainer.tokenizer.pad_token_id)
    assert torch.allclose(rewards.cpu(), trainer.reward_model.score(ids, mask).cpu())
    trainer.train()
    assert all(torch.equal(p, reward_weights[n]) for n, p in trainer.model.named_parameters() if n in reward_weights)
    # The reward model belongs to its own run: neither a checkpoint nor the final adapter copies it.
    for folder in (trainer.out / "final_adapter", trainer.out / "checkpoint-2"):
        assert (folder / "adapter_model.safetensors").is_file() and not (folder / REWARD_ADAPTER).exists()
