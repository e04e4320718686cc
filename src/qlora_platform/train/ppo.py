"""The PPO trainer: RLHF's proximal policy optimisation of the LoRA adapter, with a value head.

    trainer = PPOTrainer(cfg)     # train/methods.make_trainer picks it for training.method ppo
    summary = trainer.train()     # checkpoints, resume and final_adapter carry the value head too

train/rl.py samples the answers and scores them. The value function is a ScalarHead
(models/value_head.py) on the policy's last hidden states: V_t is read at the position that
predicts answer token t, so the head trains the adapter's trunk too. The head is trainable, in the
optimizer after the adapter, and saved as `value_head/` (models/value_head.HEAD_FILE in it) in
every checkpoint and in final_adapter; --resume restores it.

Per answer token t, with KL_t the k3 estimate to the reference (adapter off, models/rollout.py)
and the reward (alignment.reward_functions and/or the reward adapter) at the answer's last token:

    r_t   = -alignment.kl_coef * KL_t  (+ reward, at the last token)
    delta = r_t + GAMMA * V_{t+1} - V_t            (V after the last token is 0)
    A_t   = delta_t + GAMMA * LAMBDA * A_{t+1}      (GAE), returns R_t = A_t + V_t

The advantages are whitened over the micro-batch's answer tokens. With ratio = exp(log p_policy -
log p_old) (one pass per rollout, so ratio = 1), eps = alignment.clip_range and V_old the detached
values of the same forward:

    policy loss = mean_t max(-A_t * ratio, -A_t * clip(ratio, 1 - eps, 1 + eps))
    value loss  = 0.5 * mean_t max((V_t - R_t)^2, (V_old + clip(V_t - V_old, -eps, eps) - R_t)^2)
    loss        = policy loss + alignment.value_coef * value loss

GAMMA = 1 (an answer is one episode; its reward comes at its end) and LAMBDA = 0.95 are the
usual RLHF values and fixed here. Logged beside train/rl.py's figures: value_loss, policy_loss.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.rollout import masked_mean
from ..models.value_head import ScalarHead, load_head, save_head
from .grpo import clipped_policy_loss
from .rl import RLTrainer, RolloutBatch, whiten

GAMMA = 1.0  # no discount within an answer
LAMBDA = 0.95  # GAE's bias-variance trade-off
VALUE_DIR = "value_head"  # beside the adapter: the ScalarHead's file in its own folder


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """[N, T] per-token rewards: -kl_coef * KL, plus each answer's score at its last token."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last] += scores.to(rewards.device, rewards.dtype)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = GAMMA, lam: float = LAMBDA
) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, T] advantages, [N, T] returns) by generalised advantage estimation; positions after an
    answer's end count as reward 0 and value 0, and get advantage and return 0."""
    rewards, values = rewards * mask, values * mask
    running = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(rewards.size(1))):
        following = values[:, t + 1] if t + 1 < rewards.size(1) else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * following - values[:, t]
        running = delta + gamma * lam * running
        out.append(running)
    advantages = torch.stack(out[::-1], dim=1) * mask
    return advantages, (advantages + values) * mask


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> torch.Tensor:
    """0.5 * the masked mean of the larger of the plain and the clipped squared error."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def ppo_loss(
    batch: RolloutBatch, values: torch.Tensor, clip: float, kl_coef: float, value_coef: float
) -> tuple[torch.Tensor, dict]:
    """The micro-batch's PPO loss (module doc) from its rollout and its values ([N, T], with gradients)."""
    mask, logps = batch.mask, batch.policy.logps
    old_values = values.detach()
    rewards = shaped_rewards(batch.rewards, batch.kl, mask, kl_coef)
    advantages, returns = gae(rewards, old_values, mask)
    advantages = whiten(advantages, mask) * mask
    policy, was_clipped = clipped_policy_loss(logps, logps.detach(), advantages, clip)
    policy_loss = masked_mean(policy, mask)
    critic = value_loss(values, old_values, returns, mask, clip)
    stats = {
        "clip_fraction": float(masked_mean(was_clipped.float(), mask)),
        "policy_loss": float(policy_loss.detach()),
        "value_loss": float(critic.detach()),
    }
    return policy_loss + value_coef * critic, stats


class PPOTrainer(RLTrainer):
    """The RL trainer with a value head and PPO's loss (module doc)."""

    method = "ppo"
    value_head = True

    def _setup_model(self) -> None:
        """The model and reward model (train/rl.py), then the value head."""
        super()._setup_model()
        self.hidden_size = self.model.get_base_model().config.get_text_config().hidden_size
        self.value = ScalarHead(self.hidden_size).to(next(self.model.parameters()).device)
        # Values start at 0: the first advantages are the (discounted) rewards to go, not the
        # noise of a random head on hidden states whose scale depends on the model.
        torch.nn.init.zeros_(self.value.linear.weight)

    def extra_trainable(self) -> list[torch.nn.Parameter]:
        return list(self.value.parameters())

    def _save_extra(self, folder: Path) -> None:
        super()._save_extra(folder)
        (Path(folder) / VALUE_DIR).mkdir(exist_ok=True)
        save_head(self.value, Path(folder) / VALUE_DIR)

    def _load_extra(self, folder: Path) -> None:
        saved = load_head(Path(folder) / VALUE_DIR, self.hidden_size)
        with torch.no_grad():  # into the parameters the optimizer holds
            for mine, theirs in zip(self.value.parameters(), saved.parameters()):
                mine.copy_(theirs)

    def _loss(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict]:
        al = self.cfg.alignment
        values = self.value(batch.policy.hidden)
        return ppo_loss(batch, values, al.clip_range, al.kl_coef, al.value_coef)
