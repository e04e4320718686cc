"""Direct Preference Optimization (DPO): the loss, answer log-probabilities and the reference.

    losses, chosen_reward, rejected_reward = dpo_loss(pc, pr, rc, rr, beta)
    reference = reference_logps(model, pairs, batch_size, pad_id)     # [pairs, 2], adapter off
    stats = preference_metrics(policy, reference, beta)

The trainer that uses them is train/dpo.py (`train.methods.make_trainer` picks it for training.method dpo).

Data are preference pairs (`data/preference_tokenize.encode_pair`). The log-probability of an
answer is the sum of its label tokens' log-probabilities (the shifted NLL of models/scoring.py,
negated). The reference model is the same base with the LoRA adapter switched off: its
log-probabilities do not change while the adapter trains, so they are computed once before the
first step, for every holdout pair and every training pair the step plan reaches (all of them
from an epoch on; a shorter run skips the forwards of pairs it never trains on), and kept in
memory. A resumed run computes them again for the steps it has left: they do not depend on the
adapter, so nothing of them is saved with a checkpoint. With beta = alignment.beta:

    reward(answer) = beta * (log p_policy(answer) - log p_reference(answer))
    loss           = -logsigmoid(reward(chosen) - reward(rejected)), averaged over pairs

Each micro-batch runs the chosen and the rejected rows of its pairs in one padded forward. It uses
the plain forward: the CUDA-graph replay (`run_batch`) serves SFT only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.formats import iter_jsonl_lines, parse_jsonl_line
from ..data.preference import KIND_NAMES, detect_kind
from ..errors import UserError
from ..models.scoring import sequence_logps

# The record kinds each training method reads (the first is its own), and how to make a file of each.
METHOD_KINDS = {
    "sft": ("sft",),
    "reward": ("preference",),
    "dpo": ("preference",),
    "orpo": ("preference",),
    "kto": ("kto", "preference"),  # a pair gives a desirable and an undesirable completion
    "ppo": ("prompt", "sft", "preference", "kto"),  # RL reads the prompts of any kind
    "grpo": ("prompt", "sft", "preference", "kto"),
}
MAKE_KIND = {
    "sft": "'qlora prepare --sample' or 'qlora prepare --input FILE'",
    "preference": "'qlora prepare --sample-preferences --out-dir data/pref' or 'qlora prepare --input PAIRS'",
    "kto": "'qlora prepare --input FILE' with prompt, completion and label",
    "prompt": "'qlora prepare --input FILE' with a prompt per record",
}
# The method a file of each kind suits, for the hint when they do not match.
KIND_METHOD = {"sft": "sft", "preference": "dpo", "kto": "kto", "prompt": "grpo"}


def file_kind(path: str) -> str | None:
    """The kind of record a JSONL file starts with (None: no readable record)."""
    for lineno, line in iter_jsonl_lines(path):
        try:
            return detect_kind(parse_jsonl_line(line, f"{path}:{lineno}"))
        except UserError:
            return None  # a bad line: the loader reports it with its line number
    return None


def check_record_kind(path: str | None, what: str, method: str) -> str | None:
    """The kind of record in the file of data.`what` (None: no file or no readable record); one line
    when `method` does not train on that kind."""
    from pathlib import Path

    if not path or not Path(path).is_file():
        return None
    found, accepted = file_kind(path), METHOD_KINDS[method]
    if found is not None and found not in accepted:
        needed = accepted[0]
        raise UserError(
            f"data.{what} '{path}' holds {KIND_NAMES[found][1]}, but training.method {method} trains on "
            f"{KIND_NAMES[needed][1]}; make them with {MAKE_KIND[needed]}, or set training.method "
            f"{KIND_METHOD[found]}"
        )
    return found


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen reward, rejected reward) from per-pair answer log-probabilities."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected), chosen, rejected


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of p = exp(mean_logp), the mean per-token log-probability of an answer (ORPO).
    log(1 - e^x) is log1p(-e^x) far from 0 and log(-expm1(x)) near it (both exact where they are used);
    x is kept just below 0, where the odds are infinite."""
    x = mean_logp.float().clamp(max=-1e-6)
    log1mexp = torch.where(x < -0.6931, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))
    return x - log1mexp


def orpo_loss(
    chosen_mean_logp: torch.Tensor, rejected_mean_logp: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen log-odds, rejected log-odds) from the answers' mean token log-probabilities:
    the chosen answer's NLL (mean over its tokens) + beta * -logsigmoid(log_odds(chosen) - log_odds(rejected))."""
    chosen, rejected = log_odds(chosen_mean_logp), log_odds(rejected_mean_logp)
    return -chosen_mean_logp.float() - beta * F.logsigmoid(chosen - rejected), chosen, rejected


def reference_logps(model, pairs: list[dict], batch_size: int, pad_id: int, desc: str = "") -> torch.Tensor:
    """[pairs, 2] answer log-probabilities of the base: the same model with its adapter switched off."""
    with model.disable_adapter():
        return sequence_logps(model, pairs, batch_size, pad_id, desc)


def preference_metrics(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> dict:
    """Loss, reward accuracy (share of pairs whose chosen reward is the higher), mean margin and mean
    rewards of [pairs, 2] policy and reference log-probabilities."""
    losses, chosen, rejected = dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], beta)
    margin = chosen - rejected
    return {
        "loss": float(losses.mean()),
        "reward_accuracy": float((margin > 0).float().mean()),
        "margin": float(margin.mean()),
        "chosen_reward": float(chosen.mean()),
        "rejected_reward": float(rejected.mean()),
        "pairs": len(policy),
    }
