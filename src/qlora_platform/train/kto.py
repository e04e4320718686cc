"""The KTO trainer: completions marked desirable or undesirable, each scored against the base on its own.

    trainer = KTOTrainer(cfg)     # train/methods.make_trainer picks it for training.method kto
    summary = trainer.train()     # the same checkpoints, resume, signals and final_adapter as SFT

Data are KTO records (prompt, completion, label) or preference pairs, each pair giving its chosen
answer as a desirable and its rejected answer as an undesirable completion. The reference is the
base with the adapter off; its log-probabilities are computed once before the first step (for the
examples and mismatched pairs the step plan reaches) and kept in memory, as DPO does. With
beta = alignment.beta, log-ratio r = log p_policy(y|x) - log p_reference(y|x) summed over the
completion's tokens, and weights w_d = alignment.kto_desirable_weight, w_u = kto_undesirable_weight:

    z       = max(0, mean over the micro-batch's mismatched pairs of r(y'|x)), detached
    loss(y) = w_d * (1 - sigmoid(beta * (r - z)))   for a desirable y
              w_u * (1 - sigmoid(beta * (z - r)))   for an undesirable y, averaged over completions

z estimates the KL divergence of the policy from the reference as TRL's KTOTrainer does: each
completion of a micro-batch is paired with the prompt of the next (rotated by one: (x_1, y_n),
(x_2, y_1), ...), so the mismatched outputs are the same set as the matched ones. A micro-batch of
one completion has no mismatched pair; its z is 0. The policy's log-probabilities of the
mismatched pairs are computed without gradient. Each log line adds the mean reward beta * r of the
desirable and of the undesirable completions of its steps, their difference (`margin`) and the
mean z (`kl`); the holdout evaluation gives the same, with the holdout rotated by one for z.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..data.preference import load_kind_records
from ..data.preference_tokenize import encode_kto
from ..data.tokenize import IGNORE
from ..errors import UserError
from ..models.loader import load_tokenizer
from ..models.scoring import row_logps, rows_logps
from .preference import check_record_kind
from .trainer import Trainer


def kto_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per completion, reward beta * log-ratio per completion) from summed log-probabilities;
    `desirable` is a bool tensor, `kl` the detached estimate z (module doc)."""
    logratio = policy.float() - reference.float()
    kl = torch.as_tensor(kl, dtype=logratio.dtype, device=logratio.device)
    good = desirable_weight * (1 - torch.sigmoid(beta * (logratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratio)))
    return torch.where(desirable.to(logratio.device), good, bad), beta * logratio


def kl_estimate(policy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """z = max(0, mean log-ratio of the mismatched pairs), detached; 0 without any pair."""
    if policy.numel() == 0:
        return torch.zeros((), device=policy.device)
    return (policy.float() - reference.float().to(policy.device)).mean().clamp(min=0).detach()


def rotated(index: list) -> list[tuple]:
    """Mismatched (prompt of, completion of) pairs: each completion with the prompt of the next."""
    if len(index) < 2:
        return []
    return [(index[k], index[k - 1]) for k in range(len(index))]


def kto_records(path: str | None, what: str) -> tuple[list[dict], str | None]:
    """The KTO records of data.`what` (pairs become a desirable and an undesirable record each) and
    the kind of record the file holds."""
    kind = check_record_kind(path, what, "kto")
    if not path:
        return [], None
    records = load_kind_records(path, what, kind or "kto")
    if kind != "preference":
        return records, kind
    out = []
    for pair in records:
        out.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        out.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return out, kind


def encode_examples(tokenizer, records: list[dict], max_seq_len: int) -> tuple[list[dict], int]:
    """Encoded completions ({'input_ids', 'labels', 'prompt_len', 'label', 'truncated'}) and how many
    were dropped whose completion does not fit."""
    out, dropped = [], 0
    for rec in records:
        ex = encode_kto(tokenizer, rec, max_seq_len)
        if ex is None:
            dropped += 1
            continue
        out.append(
            {
                "input_ids": ex["completion_input_ids"],
                "labels": ex["completion_labels"],
                "prompt_len": len(ex["prompt_input_ids"]),
                "label": ex["label"],
                "truncated": ex["truncated"],
            }
        )
    return out, dropped


def mismatched(prompt_of: dict, completion_of: dict, max_seq_len: int) -> dict:
    """One example's prompt followed by another's completion (the prompt cut from its left to fit)."""
    prompt = prompt_of["input_ids"][: prompt_of["prompt_len"]]
    completion = completion_of["input_ids"][completion_of["prompt_len"] :]
    room = max(max_seq_len - len(completion), 1)
    prompt = prompt[-room:]
    return {"input_ids": prompt + completion, "labels": [IGNORE] * len(prompt) + completion}


@dataclass
class _Window:
    """Rewards and KL estimates of the steps since the last log line."""

    rewards: list[torch.Tensor] = field(default_factory=list)
    desirable: list[torch.Tensor] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)

    def add(self, rewards: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor) -> None:
        self.rewards.append(rewards.detach().float().cpu())
        self.desirable.append(desirable.cpu())
        self.kl.append(float(kl))

    def take(self) -> dict:
        if not self.rewards:
            return {}
        stats = reward_stats(torch.cat(self.rewards), torch.cat(self.desirable))
        stats["kl"] = sum(self.kl) / len(self.kl)
        self.rewards, self.desirable, self.kl = [], [], []
        return stats


def reward_stats(rewards: torch.Tensor, desirable: torch.Tensor) -> dict:
    """Mean reward of the desirable and of the undesirable completions, and their difference (where both exist)."""
    out = {}
    if desirable.any():
        out["desirable_reward"] = float(rewards[desirable].mean())
    if (~desirable).any():
        out["undesirable_reward"] = float(rewards[~desirable].mean())
    if len(out) == 2:
        out["margin"] = out["desirable_reward"] - out["undesirable_reward"]
    return out


class KTOTrainer(Trainer):
    """The Trainer with desirable and undesirable completions as data and the KTO loss; the loop,
    checkpoints, resume, signals, out-of-memory handling and the final adapter are the Trainer's."""

    def _setup_data(self) -> None:
        cfg = self.cfg
        if cfg.training.batch_size < 2:
            raise UserError(
                "training.method kto estimates its KL term from the other completions of a micro-batch; set "
                f"training.batch_size 2 or more (now {cfg.training.batch_size})"
            )
        train_records, kind = kto_records(cfg.data.train_file, "train_file")
        eval_records, _ = kto_records(cfg.data.eval_file, "eval_file") if cfg.data.eval_file else ([], None)
        self.tokenizer = load_tokenizer(cfg.model)
        self.train_examples, dropped = encode_examples(self.tokenizer, train_records, cfg.data.max_seq_len)
        self.eval_examples, eval_dropped = encode_examples(self.tokenizer, eval_records, cfg.data.max_seq_len)
        truncated = self._count_data(len(train_records), dropped + eval_dropped)
        good = sum(ex["label"] for ex in self.train_examples)
        source = " (from preference pairs)" if kind == "preference" else ""
        self.log(
            f"data: {good} desirable and {len(self.train_examples) - good} undesirable training completions"
            f"{source} ({truncated} with the prompt cut to fit {cfg.data.max_seq_len} tokens, {dropped} dropped "
            f"whose completion does not fit), {len(self.eval_examples)} holdout completions"
        )
        if not self.train_examples:
            raise UserError(
                f"no usable completion in '{cfg.data.train_file}' (none fits in data.max_seq_len "
                f"{cfg.data.max_seq_len}; raise it)"
            )
        self._window = _Window()

    def _lengths_and_weights(self) -> tuple[list[int], list[int]]:
        """Each completion weighs one in the loss (a mean over completions)."""
        return [len(ex["input_ids"]) for ex in self.train_examples], [1] * len(self.train_examples)

    def _planned_batches(self) -> list[list[int]]:
        """The example indices of every micro-batch this run has left, in order."""
        tc = self.cfg.training
        start = self._resume_state["global_step"] if self._resume_from is not None else 0
        batches = self._micro_batches(skip=start * tc.grad_accum)
        return [[i for row in next(batches)[1] for i in row] for _ in range((self.total_steps - start) * tc.grad_accum)]

    def _scores(self, rows: list[dict], desc: str = "") -> torch.Tensor:
        """[rows] log-probabilities in eval mode, 2 * batch_size rows a forward (as DPO scores pairs)."""
        size = 2 * self.cfg.training.batch_size
        return rows_logps(self.model, rows, size, self.tokenizer.pad_token_id, desc)

    def _reference(self, rows: list[dict], desc: str) -> torch.Tensor:
        with self.model.disable_adapter():
            return self._scores(rows, desc)

    def _setup_model(self) -> None:
        """The model, then the reference log-probabilities (adapter off) of the completions and the
        mismatched pairs the run scores."""
        super()._setup_model()
        start, n = time.time(), self.cfg.data.max_seq_len
        batches = self._planned_batches()
        planned = sorted({i for index in batches for i in index})
        keys = sorted({key for index in batches for key in rotated(index)})
        rows = [self.train_examples[i] for i in planned]
        rows += [mismatched(self.train_examples[i], self.train_examples[j], n) for i, j in keys]
        scores = self._reference(rows, "reference")
        # NaN marks a completion no step of this run reaches: a loss that read it would say so.
        self.reference = torch.full((len(self.train_examples),), float("nan"))
        self.reference[planned] = scores[: len(planned)]
        self.kl_reference = dict(zip(keys, scores[len(planned) :].tolist()))
        held = self.eval_examples
        self.eval_kl_rows = [mismatched(held[i], held[j], n) for i, j in rotated(list(range(len(held))))]
        scores = self._reference(held + self.eval_kl_rows, "reference (holdout)")
        self.eval_reference, self.eval_kl_reference = scores[: len(held)], scores[len(held) :]
        self.log(
            f"reference: log-probabilities of {len(planned)} training completions, {len(keys)} mismatched pairs "
            f"and {len(held)} holdout completions under the base (adapter off) in {time.time() - start:.1f} s"
        )

    def _loss(self, policy, reference, desirable, kl) -> tuple[torch.Tensor, torch.Tensor]:
        al = self.cfg.alignment
        return kto_loss(policy, reference, desirable, kl, al.beta, al.kto_desirable_weight, al.kto_undesirable_weight)

    def _forward_backward(self, rows, n_label_window: int) -> tuple[torch.Tensor, int]:
        """The KTO loss of one micro-batch's completions, summed and divided by the window's
        completions (a mean however they fall into micro-batches); gradients accumulated."""
        index = [i for row in rows for i in row]
        examples = [self.train_examples[i] for i in index]
        pad = self.tokenizer.pad_token_id
        keys = rotated(index)
        kl_rows = [
            mismatched(self.train_examples[i], self.train_examples[j], self.cfg.data.max_seq_len) for i, j in keys
        ]
        with torch.no_grad():
            kl_policy = row_logps(self.model, kl_rows, pad) if kl_rows else torch.zeros(0)
        kl = kl_estimate(kl_policy, torch.tensor([self.kl_reference[k] for k in keys]))
        policy = row_logps(self.model, examples, pad)
        desirable = torch.tensor([ex["label"] for ex in examples])
        losses, rewards = self._loss(policy, self.reference[index].to(policy.device), desirable, kl)
        loss = losses.sum() / max(n_label_window, 1)
        loss.backward()
        self._window.add(rewards, desirable, kl)
        tokens = sum(len(ex["input_ids"]) for ex in examples + kl_rows)
        return loss.detach(), tokens

    def _window_metrics(self) -> dict:
        return self._window.take()

    def evaluate(self) -> dict | None:
        """Loss, the rewards of each side, their margin and the KL estimate on the holdout completions."""
        if not self.eval_examples:
            return None
        held = len(self.eval_examples)
        scores = self._scores(self.eval_examples + self.eval_kl_rows, desc="holdout")
        policy, kl = scores[:held], kl_estimate(scores[held:], self.eval_kl_reference)
        desirable = torch.tensor([ex["label"] for ex in self.eval_examples])
        losses, rewards = self._loss(policy, self.eval_reference, desirable, kl)
        return {"loss": float(losses.mean()), **reward_stats(rewards, desirable), "kl": float(kl)}

    def _eval_record(self, result: dict) -> dict:
        return {f"eval_{k}": v for k, v in result.items()}

    def _eval_summary(self, result: dict | None) -> dict:
        keys = ("eval_loss", "eval_perplexity", "eval_desirable_reward", "eval_undesirable_reward", "eval_margin")
        out: dict = dict.fromkeys((*keys, "eval_kl"))
        if result:
            out.update(self._eval_record(result))
        out["method"] = "kto"
        return out
