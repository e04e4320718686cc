"""The reward-model trainer: preference pairs in, a LoRA adapter and a scalar head that score answers out.

    trainer = RewardTrainer(cfg)     # train/methods.make_trainer picks it for training.method reward
    summary = trainer.train()        # final_adapter/ holds the adapter and scalar_head.safetensors
    rm = RewardModel.attach(policy, "runs/reward/final_adapter")   # models/reward_model.py scores with it

The reward of an answer is a ScalarHead (models/value_head.py) on the final hidden state of the
sequence's last token (the answer's end-of-turn), computed with the adapter on. The loss is
Bradley-Terry's, averaged over pairs:

    loss = -logsigmoid(r(chosen) - r(rejected))

The head trains with the adapter: it is in the optimizer, saved beside the adapter as HEAD_FILE in
every checkpoint-N and in final_adapter, and restored by --resume, so a resumed run equals an
uninterrupted one. Each log line adds the reward accuracy (share of pairs whose chosen answer
scores higher) and the mean margin r(chosen) - r(rejected) of its steps; the holdout evaluation
gives the same on the holdout pairs.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.collate import collate
from ..models.scoring import answer_rows
from ..models.value_head import ScalarHead, final_hidden, last_token_hidden, load_head, save_head
from .dpo import _Window
from .pairs import PairTrainer


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss per pair from the rewards of its chosen and rejected answers."""
    return -F.logsigmoid(chosen - rejected)


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """Loss, reward accuracy (share of pairs whose chosen answer scores higher) and mean margin."""
    margin = chosen - rejected
    return {
        "loss": float(reward_loss(chosen, rejected).mean()),
        "reward_accuracy": float((margin > 0).float().mean()),
        "margin": float(margin.mean()),
        "chosen_reward": float(chosen.mean()),
        "rejected_reward": float(rejected.mean()),
        "pairs": len(chosen),
    }


class RewardTrainer(PairTrainer):
    """The Trainer with preference pairs as data, a scalar head beside the adapter and the
    Bradley-Terry loss; the loop, checkpoints, resume, signals and final adapter are the Trainer's."""

    window = _Window

    def _setup_model(self) -> None:
        """The model with its adapter, then the head (float32, on the model's device)."""
        super()._setup_model()
        self.hidden_size = self.model.get_base_model().config.get_text_config().hidden_size
        device = next(p.device for p in self.trainable)
        self.head = ScalarHead(self.hidden_size).to(device)

    def extra_trainable(self) -> list[torch.nn.Parameter]:
        return list(self.head.parameters())

    def _save_extra(self, folder: Path) -> None:
        save_head(self.head, folder)

    def _load_extra(self, folder: Path) -> None:
        saved = load_head(folder, self.hidden_size)
        with torch.no_grad():  # in place: the optimizer holds these tensors
            for param, value in zip(self.head.parameters(), saved.parameters()):
                param.copy_(value)

    def rewards(self, pairs: list[dict]) -> torch.Tensor:
        """[pairs, 2] rewards of (chosen, rejected), from one padded forward of both rows."""
        batch = collate(answer_rows(pairs), self.tokenizer.pad_token_id, packing=False)
        device = next(self.head.parameters()).device
        mask = batch["attention_mask"].to(device)
        hidden = final_hidden(self.model, batch["input_ids"].to(device), mask)
        return self.head(last_token_hidden(hidden, mask)).view(2, len(pairs)).t()

    def _forward_backward(self, rows, n_label_window: int) -> tuple[torch.Tensor, int]:
        """The loss of one micro-batch's pairs, summed and divided by the window's pairs (so the
        step's loss is their mean however they fall into micro-batches); gradients accumulated."""
        pairs = [self.train_examples[i] for row in rows for i in row]
        rewards = self.rewards(pairs)
        loss = reward_loss(rewards[:, 0], rewards[:, 1]).sum() / max(n_label_window, 1)
        loss.backward()
        self._window.add(rewards[:, 0], rewards[:, 1])
        tokens = sum(len(p["chosen_input_ids"]) + len(p["rejected_input_ids"]) for p in pairs)
        return loss.detach(), tokens

    def _window_metrics(self) -> dict:
        return self._window.take()

    @torch.no_grad()
    def score_pairs(self, pairs: list[dict]) -> torch.Tensor:
        """[pairs, 2] rewards in eval mode, batch_size pairs a forward."""
        was_training = self.model.training
        self.model.eval()
        size = self.cfg.training.batch_size
        out = torch.cat([self.rewards(pairs[k : k + size]).float().cpu() for k in range(0, len(pairs), size)])
        if was_training:
            self.model.train()
        return out

    def evaluate(self) -> dict | None:
        """Reward accuracy, margin and loss on the holdout pairs."""
        if not self.eval_examples:
            return None
        rewards = self.score_pairs(self.eval_examples)
        return reward_metrics(rewards[:, 0], rewards[:, 1])

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
        out["method"] = "reward"
        return out
