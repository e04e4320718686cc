"""PPO: reward shaping, GAE and the value loss by hand, then learning and resume (value head included)
on the tiny model."""

from __future__ import annotations

import pytest
import torch

from qlora_platform.errors import UserError
from qlora_platform.models.rollout import AnswerScores, Rollout
from qlora_platform.models.value_head import HEAD_FILE
from qlora_platform.train.checkpoint import list_checkpoints
from qlora_platform.train.methods import make_trainer
from qlora_platform.train.ppo import VALUE_DIR, PPOTrainer, gae, ppo_loss, shaped_rewards, value_loss
from qlora_platform.train.rl import RolloutBatch
from tests.conftest import assert_same_lora, interrupt_during
from tests.train.test_rl import bundled_rl_config, eos_model_dir, restore_threads, rl_config  # noqa: F401 - fixtures


def _quiet(*_args, **_kwargs) -> None:
    pass


def test_gae_equals_the_hand_computed_values():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 0.4], [0.5, 0.4, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second answer ends at its second token
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # Row 0: deltas 0.2 - 0.5, 0.4 - 0.2, 1 - 0.4 -> A2 = 0.6, A1 = 0.2 + 0.95 * 0.6, A0 = -0.3 + 0.95 * A1.
    a1 = 0.2 + 0.95 * 0.6
    # Row 1: what follows its end counts as reward 0 and value 0: A1 = 1 - 0.4, A0 = (0.4 - 0.5) + 0.95 * A1.
    expected = torch.tensor([[-0.3 + 0.95 * a1, a1, 0.6], [-0.1 + 0.95 * 0.6, 0.6, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.allclose(ret, (expected + values) * mask, atol=1e-6)
    # gamma 0.5, lambda 1: A_t = sum_k 0.5^k delta_{t+k} = discounted return - V_t.
    adv, _ = gae(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]]), torch.ones(1, 2), gamma=0.5, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[2.0, 2.0]]))


def test_the_kl_is_folded_into_per_token_rewards_and_the_score_comes_last():
    kl = torch.tensor([[0.2, 0.4, 0.6], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards = shaped_rewards(torch.tensor([1.0, -2.0]), kl, mask, kl_coef=0.5)
    assert torch.allclose(rewards, torch.tensor([[-0.1, -0.2, -0.3 + 1.0], [-0.5 - 2.0, 0.0, 0.0]]))


def test_the_value_loss_takes_the_larger_of_the_plain_and_the_clipped_error():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 1.0]])
    # Token 0: plain (1 - 2)^2 = 1, clipped (0.2 - 2)^2 = 3.24; token 1: both (0 - 1)^2 = 1.
    assert float(value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)) == pytest.approx(0.5 * (3.24 + 1) / 2)


def test_ppo_loss_at_ratio_one_has_a_zero_policy_term_but_a_gradient():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    roll = Rollout(
        input_ids=torch.zeros(2, 4, dtype=torch.long),
        attention_mask=torch.ones(2, 4, dtype=torch.long),
        prompt_width=1,
        answer_mask=mask,
        prompt_ids=[[0], [0]],
        finished=torch.tensor([True, False]),
    )
    logps = torch.full((2, 3), -1.0, requires_grad=True)
    batch = RolloutBatch(
        roll=roll,
        rewards=torch.tensor([1.0, 0.0]),
        policy=AnswerScores(logps=logps * 1, hidden=None),
        reference=torch.full((2, 3), -1.0),
        group=1,
    )
    values = torch.zeros(2, 3, requires_grad=True)
    loss, stats = ppo_loss(batch, values * 1, clip=0.2, kl_coef=0.05, value_coef=0.1)
    assert stats["policy_loss"] == pytest.approx(0.0, abs=1e-6)  # whitened advantages average to 0
    # With values 0, A_t = r_t + 0.95 A_{t+1} = the return: 0.95, 1 for answer 0 (score 1 at its last token);
    # 0, 0, 0 for answer 1. Value loss: 0.5 * (0.95^2 + 1^2) / 5 tokens.
    assert stats["value_loss"] == pytest.approx(0.5 * (0.95**2 + 1) / 5)
    loss.backward()
    assert logps.grad[0, 0] < 0 < logps.grad[1, 0]  # the rewarded answer's tokens are pushed up
    assert logps.grad[0, 2] == 0 and values.grad[0, 2] == 0


def test_ppo_learns_and_an_interrupted_run_resumes_to_the_same_adapter_and_value_head(eos_model_dir, tmp_path):  # noqa: F811
    straight_cfg = rl_config(eos_model_dir, tmp_path / "a", "ppo")
    full = make_trainer(straight_cfg, log=_quiet)
    assert isinstance(full, PPOTrainer)
    head0 = [p.detach().clone() for p in full.value.parameters()]
    summary = full.train()
    steps = [h for h in full.history if "reward" in h]
    before, after = (steps[0]["reward"] + steps[1]["reward"]) / 2, (steps[2]["reward"] + steps[3]["reward"]) / 2
    assert after > before + 0.03 and steps[-1]["answer_tokens"] < steps[0]["answer_tokens"] - 1
    assert all(0.0 <= h["kl"] < 4.0 for h in steps) and all("value_loss" in h for h in steps)
    assert any(not torch.equal(a, b) for a, b in zip(head0, full.value.parameters()))  # the head trains
    assert summary["method"] == "ppo" and summary["eval_reward"] is not None
    final = full.out / "final_adapter"
    assert (final / VALUE_DIR / HEAD_FILE).is_file() and not (final / HEAD_FILE).exists()  # not a reward model

    cfg = rl_config(eos_model_dir, tmp_path / "b", "ppo")
    interrupted = interrupt_during(make_trainer(cfg, log=_quiet), call=3)
    with pytest.raises(UserError, match="interrupted at step 2/4.*--resume"):
        interrupted.train()
    assert [s for s, _ in list_checkpoints(cfg.output.dir)] == [2]
    assert (tmp_path / "b" / "run" / "checkpoint-2" / VALUE_DIR / HEAD_FILE).is_file()

    resumed = make_trainer(cfg, resume=True, log=_quiet)
    assert resumed.step == 2
    resumed.train()
    assert resumed.step == 4
    assert_same_lora(resumed.model, full.model)
    for mine, want in zip(resumed.value.parameters(), full.value.parameters()):
        assert torch.allclose(mine, want, atol=1e-5)
    # The same answers were sampled at steps 3 and 4: a resumed run's rollouts are the uninterrupted run's.
    rewards = [h["reward"] for h in resumed.history if "reward" in h]
    assert rewards[2:] == pytest.approx([h["reward"] for h in steps][2:], abs=1e-6)


@pytest.mark.slow
def test_ppo_on_the_bundled_model_raises_the_reward_with_a_bounded_kl(tmp_path):
    trainer = make_trainer(bundled_rl_config(tmp_path, "ppo", **{"training.max_steps": "5"}), log=_quiet)
    trainer.train()
    records = [h for h in trainer.history if "reward" in h]
    steps = [h["reward"] for h in records]
    # Seen: rewards 0.836, 0.835, 0.902, 0.796, 0.946; KL at most 0.58 per token; answers 10.1 -> 6.5 tokens.
    assert sum(steps[2:]) / 3 > sum(steps[:2]) / 2 + 0.02 and steps[-1] > steps[0] + 0.05
    assert all(h["kl"] < 2.0 for h in records) and records[-1]["answer_tokens"] < records[0]["answer_tokens"]
