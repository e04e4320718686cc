"""The GRPO trainer: group-relative policy optimisation of the LoRA adapter against rewards.

    trainer = GRPOTrainer(cfg)    # train/methods.make_trainer picks it for training.method grpo
    summary = trainer.train()     # the same checkpoints, resume, signals and final_adapter as SFT

train/rl.py samples the answers and scores them. For each prompt, the alignment.num_generations
answers form a group, and each answer's advantage is its reward against its group's:

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)        std with Bessel's correction

Every token of an answer carries its answer's advantage. With ratio = exp(log p_policy - log
p_old) (p_old: the policy's detached log-probabilities of the same rollout, so ratio = 1 in the
one pass made per rollout) and eps = alignment.clip_range, the loss per answer token is

    -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + alignment.kl_coef * KL_k3(policy, reference)

averaged over the micro-batch's answer tokens. No value function: the group mean is the baseline.
A group whose answers all score the same teaches only the KL term. `clip_fraction` (logged) is the
share of answer tokens whose clipped term was taken.
"""

from __future__ import annotations

import torch

from ..models.rollout import kl_estimate, masked_mean
from .rl import RLTrainer, RolloutBatch

STD_EPS = 1e-4  # keeps a group of equal rewards at advantage 0


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """[N] advantages of [N] rewards whose consecutive runs of `group` answers share a prompt."""
    grouped = rewards.float().view(-1, group)
    mean, std = grouped.mean(1, keepdim=True), grouped.std(1, keepdim=True)
    return ((grouped - mean) / (std + STD_EPS)).view(-1)


def clipped_policy_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, T] -min(ratio * A, clip(ratio) * A), [N, T] whether the clipped term was taken); A is [N, T]."""
    ratio = torch.exp(logps - old_logps)
    unclipped, clipped = ratio * advantages, torch.clamp(ratio, 1 - clip, 1 + clip) * advantages
    return -torch.min(unclipped, clipped), (clipped < unclipped)


def grpo_loss(batch: RolloutBatch, clip: float, kl_coef: float) -> tuple[torch.Tensor, dict]:
    """The micro-batch's GRPO loss (module doc) and its clip fraction."""
    mask = batch.mask
    logps = batch.policy.logps
    advantages = group_advantages(batch.rewards, batch.group).to(logps.device)[:, None].expand_as(logps)
    policy_loss, was_clipped = clipped_policy_loss(logps, logps.detach(), advantages, clip)
    per_token = policy_loss + kl_coef * kl_estimate(logps, batch.reference)
    return masked_mean(per_token, mask), {"clip_fraction": float(masked_mean(was_clipped.float(), mask))}


class GRPOTrainer(RLTrainer):
    """The RL trainer with GRPO's loss (module doc); rollouts, rewards and evaluation are train/rl.py's."""

    method = "grpo"

    def _loss(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict]:
        al = self.cfg.alignment
        return grpo_loss(batch, al.clip_range, al.kl_coef)
