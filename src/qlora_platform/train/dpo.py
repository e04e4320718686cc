"""The DPO trainer: the platform's Trainer with preference pairs as data and the DPO loss.

    trainer = DPOTrainer(cfg)     # train/methods.make_trainer picks it for training.method dpo
    summary = trainer.train()     # the same checkpoints, resume, signals and final_adapter as SFT

train/preference.py defines the loss, the answer log-probabilities and the reference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..models.scoring import answer_logps, sequence_logps
from .pairs import PairTrainer
from .preference import dpo_loss, preference_metrics, reference_logps


@dataclass
class _Window:
    """Per-pair rewards of the steps since the last log line."""

    chosen: list[torch.Tensor] = field(default_factory=list)
    rejected: list[torch.Tensor] = field(default_factory=list)

    def add(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        self.chosen.append(chosen.detach().float().cpu())
        self.rejected.append(rejected.detach().float().cpu())

    def take(self) -> dict:
        if not self.chosen:
            return {}
        chosen, rejected = torch.cat(self.chosen), torch.cat(self.rejected)
        margin = chosen - rejected
        self.chosen, self.rejected = [], []
        return {
            "reward_accuracy": float((margin > 0).float().mean()),
            "margin": float(margin.mean()),
            "chosen_reward": float(chosen.mean()),
            "rejected_reward": float(rejected.mean()),
        }


class DPOTrainer(PairTrainer):
    """The Trainer with preference pairs as data and the DPO loss; the loop, checkpoints, resume,
    signals, out-of-memory handling and the final adapter are the Trainer's."""

    window = _Window

    def _planned_pairs(self) -> list[int]:
        """The training pairs of the steps this run has left, in index order."""
        tc = self.cfg.training
        start = self._resume_state["global_step"] if self._resume_from is not None else 0
        batches = self._micro_batches(skip=start * tc.grad_accum)
        seen: set[int] = set()
        for _ in range((self.total_steps - start) * tc.grad_accum):
            seen.update(i for row in next(batches)[1] for i in row)
            if len(seen) == len(self.train_examples):
                break
        return sorted(seen)

    def _setup_model(self) -> None:
        """The model, then the reference log-probabilities (adapter off) of the pairs the run scores."""
        super()._setup_model()
        start, size, pad = time.time(), self.cfg.training.batch_size, self.tokenizer.pad_token_id
        planned = self._planned_pairs()
        # NaN marks a pair no step of this run reaches: a loss that read it would say so.
        self.reference = torch.full((len(self.train_examples), 2), float("nan"))
        if planned:
            pairs = [self.train_examples[i] for i in planned]
            self.reference[planned] = reference_logps(self.model, pairs, size, pad, desc="reference")
        self.eval_reference = reference_logps(self.model, self.eval_examples, size, pad, desc="reference (holdout)")
        self.log(
            f"reference: log-probabilities of {len(planned)} training and {len(self.eval_examples)} holdout "
            f"pairs under the base (adapter off) in {time.time() - start:.1f} s"
        )

    def _forward_backward(self, rows, n_label_window: int) -> tuple[torch.Tensor, int]:
        """The DPO loss of one micro-batch's pairs, summed and divided by the window's pairs (so the
        step's loss is their mean however they fall into micro-batches); gradients accumulated."""
        index = [i for row in rows for i in row]
        pairs = [self.train_examples[i] for i in index]
        policy = answer_logps(self.model, pairs, self.tokenizer.pad_token_id)
        ref = self.reference[index].to(policy.device, policy.dtype)
        beta = self.cfg.alignment.beta
        losses, chosen, rejected = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta)
        loss = losses.sum() / max(n_label_window, 1)
        loss.backward()
        self._window.add(chosen, rejected)
        tokens = sum(len(p["chosen_input_ids"]) + len(p["rejected_input_ids"]) for p in pairs)
        return loss.detach(), tokens

    def _window_metrics(self) -> dict:
        return self._window.take()

    def evaluate(self) -> dict | None:
        """Preference accuracy, margin and DPO loss of the adapter on the holdout pairs."""
        if not self.eval_examples:
            return None
        policy = sequence_logps(
            self.model, self.eval_examples, self.cfg.training.batch_size, self.tokenizer.pad_token_id, desc="holdout"
        )
        return preference_metrics(policy, self.eval_reference, self.cfg.alignment.beta)

    def _eval_record(self, result: dict) -> dict:
        return {
            "eval_loss": result["loss"],
            "eval_reward_accuracy": result["reward_accuracy"],
            "eval_margin": result["margin"],
        }

    def _eval_summary(self, result: dict | None) -> dict:
        out = {"eval_loss": None, "eval_perplexity": None, "eval_reward_accuracy": None, "eval_margin": None}
        if result:
            out.update(self._eval_record(result))
        out["method"] = "dpo"
        return out
