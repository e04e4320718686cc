"""The ORPO trainer: preference pairs, no reference model, one loss that teaches the chosen answer and
pushes its odds above the rejected one's.

    trainer = ORPOTrainer(cfg)     # train/methods.make_trainer picks it for training.method orpo
    summary = trainer.train()      # the same checkpoints, resume, signals and final_adapter as SFT

With m(y) the mean log-probability of answer y's tokens and beta = alignment.beta (train/preference.py):

    log_odds(y) = m(y) - log(1 - exp(m(y)))
    loss        = -m(chosen) + beta * -logsigmoid(log_odds(chosen) - log_odds(rejected)), averaged over pairs

Each log line adds, over its steps: `nll` (the chosen answers' mean token NLL), `reward_accuracy`
(the share of pairs whose chosen answer has the higher log-odds), `margin` (the mean log-odds
difference) and the mean log-odds of each side; the holdout evaluation gives the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data.tokenize import IGNORE
from ..models.scoring import answer_logps, sequence_logps
from .pairs import PairTrainer
from .preference import orpo_loss


def answer_tokens(pairs: list[dict]) -> torch.Tensor:
    """[pairs, 2] labelled tokens of (chosen, rejected) after the one-token shift: what a mean is over."""
    return torch.tensor(
        [[sum(lab != IGNORE for lab in p[f"{side}_labels"][1:]) for side in ("chosen", "rejected")] for p in pairs],
        dtype=torch.float32,
    )


def orpo_metrics(mean_logps: torch.Tensor, beta: float) -> dict:
    """Loss, NLL, log-odds accuracy and margin of [pairs, 2] mean token log-probabilities."""
    losses, chosen, rejected = orpo_loss(mean_logps[:, 0], mean_logps[:, 1], beta)
    margin = chosen - rejected
    return {
        "loss": float(losses.mean()),
        "nll": float(-mean_logps[:, 0].mean()),
        "reward_accuracy": float((margin > 0).float().mean()),
        "margin": float(margin.mean()),
        "chosen_log_odds": float(chosen.mean()),
        "rejected_log_odds": float(rejected.mean()),
        "pairs": len(mean_logps),
    }


@dataclass
class _Window:
    """Per-pair mean log-probabilities of the steps since the last log line."""

    rows: list[torch.Tensor] = field(default_factory=list)

    def add(self, mean_logps: torch.Tensor) -> None:
        self.rows.append(mean_logps.detach().float().cpu())

    def take(self, beta: float) -> dict:
        if not self.rows:
            return {}
        stats = orpo_metrics(torch.cat(self.rows), beta)
        self.rows = []
        return {k: v for k, v in stats.items() if k not in ("loss", "pairs")}


class ORPOTrainer(PairTrainer):
    """The Trainer with preference pairs as data and the ORPO loss; the loop, checkpoints, resume,
    signals, out-of-memory handling and the final adapter are the Trainer's."""

    window = _Window

    def _forward_backward(self, rows, n_label_window: int) -> tuple[torch.Tensor, int]:
        """The ORPO loss of one micro-batch's pairs, summed and divided by the window's pairs (so the
        step's loss is their mean however they fall into micro-batches); gradients accumulated."""
        pairs = [self.train_examples[i] for row in rows for i in row]
        summed = answer_logps(self.model, pairs, self.tokenizer.pad_token_id)
        mean = summed.float() / answer_tokens(pairs).to(summed.device).clamp(min=1)
        losses, _, _ = orpo_loss(mean[:, 0], mean[:, 1], self.cfg.alignment.beta)
        loss = losses.sum() / max(n_label_window, 1)
        loss.backward()
        self._window.add(mean)
        tokens = sum(len(p["chosen_input_ids"]) + len(p["rejected_input_ids"]) for p in pairs)
        return loss.detach(), tokens

    def _window_metrics(self) -> dict:
        return self._window.take(self.cfg.alignment.beta)

    def evaluate(self) -> dict | None:
        """Loss, NLL, log-odds accuracy and margin of the adapter on the holdout pairs."""
        if not self.eval_examples:
            return None
        summed = sequence_logps(
            self.model, self.eval_examples, self.cfg.training.batch_size, self.tokenizer.pad_token_id, desc="holdout"
        )
        return orpo_metrics(summed / answer_tokens(self.eval_examples).clamp(min=1), self.cfg.alignment.beta)

    def _eval_record(self, result: dict) -> dict:
        return {
            "eval_loss": result["loss"],
            "eval_nll": result["nll"],
            "eval_reward_accuracy": result["reward_accuracy"],
            "eval_margin": result["margin"],
        }

    def _eval_summary(self, result: dict | None) -> dict:
        keys = ("eval_loss", "eval_perplexity", "eval_nll", "eval_reward_accuracy", "eval_margin")
        out: dict = dict.fromkeys(keys)
        if result:
            out.update(self._eval_record(result))
        out["method"] = "orpo"
        return out
