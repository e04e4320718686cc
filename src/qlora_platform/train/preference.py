"""Direct Preference Optimization (DPO): the loss, answer log-probabilities and the reference.

    losses, chosen_reward, rejected_reward = dpo_loss(pc, pr, rc, rr, beta)
    reference = reference_logps(model, pairs, batch_size, pad_id)     # [pairs, 2], adapter off
    stats = preference_metrics(policy, reference, beta)

The trainer that uses them is train/dpo.py (`make_trainer` picks it for training.method dpo).

Data are preference pairs (`data/preference_tokenize.encode_pair`). The log-probability of an
answer is the sum of its label tokens' log-probabilities (the shifted NLL of models/scoring.py,
negated). The reference model is the same base with the LoRA adapter switched off: its
log-probabilities do not change while the adapter trains, so they are computed once before the
first step, for every holdout pair and every training pair the step plan reaches (all of them
from an epoch on; a shorter run skips the forwards of pairs it never trains on), and kept in
memory. A resumed run computes them again for the steps it has left: they do not depend on the
adapter, so nothing of them is saved with a checkpoint. With beta = training.dpo_beta:

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

# The record kind each training method reads, and how to make a file of it.
METHOD_KIND = {"sft": "sft", "dpo": "preference"}
MAKE_KIND = {
    "sft": "'qlora prepare --sample' or 'qlora prepare --input FILE'",
    "preference": "'qlora prepare --sample-preferences --out-dir data/pref' or 'qlora prepare --input PAIRS'",
}


def file_kind(path: str) -> str | None:
    """The kind of record a JSONL file starts with (None: no readable record)."""
    for lineno, line in iter_jsonl_lines(path):
        try:
            return detect_kind(parse_jsonl_line(line, f"{path}:{lineno}"))
        except UserError:
            return None  # a bad line: the loader reports it with its line number
    return None


def check_record_kind(path: str | None, what: str, method: str) -> None:
    """One line when the file of data.`what` holds another kind of record than `method` trains on."""
    from pathlib import Path

    if not path or not Path(path).is_file():
        return
    found, needed = file_kind(path), METHOD_KIND[method]
    if found is not None and found != needed:
        raise UserError(
            f"data.{what} '{path}' holds {KIND_NAMES[found][1]}, but training.method {method} trains on "
            f"{KIND_NAMES[needed][1]}; make them with {MAKE_KIND[needed]}, or set training.method "
            f"{'dpo' if found == 'preference' else 'sft'}"
        )


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
