"""Preference metrics of a DPO run for `qlora eval`: base against tuned on the holdout pairs.

    pref = preference_scores(loaded, "data/pref/eval.jsonl")   # loaded: infer.load.load_for_inference
    pref["accuracy"]["base"], pref["accuracy"]["tuned"], pref["margin"]["base"], pref["margin"]["tuned"]

The log-probability of an answer is the sum of its answer tokens' log-probabilities after the
prompt, as DPO training scores it (models/scoring.py). Base = the same weights with the adapter
switched off. Both models rank a pair the same way, by their own log-probabilities:

- margin of a pair under a model: log p(chosen) - log p(rejected);
- accuracy: the share of pairs whose margin is above 0; `margin`: the mean margin (nats).

The tuned adapter's DPO implicit reward against the base (what DPO training logs as reward
accuracy) is reported beside them as `implicit_reward`: its margin is
beta * ((log p_tuned(chosen) - log p_base(chosen)) - (log p_tuned(rejected) - log p_base(rejected))),
the share above 0 being the pairs the tuning moved towards the chosen answer. The base's implicit
reward against itself is 0, so it has no such figure.
"""

from __future__ import annotations

import torch

from ..data.preference import load_kind_records
from ..data.preference_tokenize import encode_pairs
from ..errors import UserError
from ..models.loader import training_numerics
from ..models.scoring import sequence_logps

DEFINITION = (
    "margin: log p(chosen) - log p(rejected) under each model (base = adapter off); accuracy: share of pairs "
    "with margin > 0; log p: summed over the answer tokens; implicit_reward: the tuned model's DPO reward margin "
    "beta * ((log p_tuned(chosen) - log p_base(chosen)) - (log p_tuned(rejected) - log p_base(rejected)))"
)


def _summary(margins: torch.Tensor) -> tuple[float, float]:
    return float((margins > 0).float().mean()), float(margins.mean())


def preference_scores(loaded, eval_file: str, batch_size: int | None = None) -> dict:
    """Accuracy and mean margin of base and tuned on the pairs of `eval_file` (module doc)."""
    cfg, tok = loaded.cfg, loaded.tokenizer
    records = load_kind_records(eval_file, "eval_file", "preference")
    pairs, dropped = encode_pairs(tok, records, cfg.data.max_seq_len)
    if not pairs:
        raise UserError(f"no holdout pair of '{eval_file}' fits in data.max_seq_len {cfg.data.max_seq_len}")
    size, pad, beta = batch_size or max(1, cfg.training.batch_size), tok.pad_token_id, cfg.alignment.beta
    # Scored with the 4-bit numerics training used, before any generation repacks the layers.
    with training_numerics(loaded.model):
        with loaded.base_only():
            base = sequence_logps(loaded.model, pairs, size, pad, "preference (base)")
        tuned = sequence_logps(loaded.model, pairs, size, pad, "preference (tuned)")
    base_margin, tuned_margin = base[:, 0] - base[:, 1], tuned[:, 0] - tuned[:, 1]
    implicit = beta * (tuned_margin - base_margin)
    (base_acc, base_mean), (tuned_acc, tuned_mean) = _summary(base_margin), _summary(tuned_margin)
    implicit_acc, implicit_mean = _summary(implicit)
    return {
        "accuracy": {"base": base_acc, "tuned": tuned_acc},
        "margin": {"base": base_mean, "tuned": tuned_mean},
        "implicit_reward": {"accuracy": implicit_acc, "margin": implicit_mean},
        "training_method": cfg.training.method,
        "pairs": len(pairs),
        "dropped": dropped,
        "beta": beta,
        "eval_file": str(eval_file),
        "max_seq_len": cfg.data.max_seq_len,
        "method": DEFINITION,
    }


def preference_markdown(pref: dict) -> list[str]:
    """The eval.md section of the preference metrics; the implicit-reward row for DPO runs only."""
    acc, margin, method = pref["accuracy"], pref["margin"], pref.get("training_method", "dpo")
    dpo = method == "dpo"
    implicit = (
        [f"| implicit reward accuracy (tuned against base) | | {100 * pref['implicit_reward']['accuracy']:.1f}% |"]
        if dpo
        else []
    )
    note = (
        f"The implicit reward is DPO's, beta {pref['beta']}: beta * ((log p_tuned(chosen) - log p_base(chosen)) - "
        f"(log p_tuned(rejected) - log p_base(rejected))); its accuracy is the share of pairs the tuning moved "
        f"towards the chosen answer."
        if dpo
        else ""
    )
    return [
        f"## Preference pairs ({method.upper()})",
        "",
        "| metric | base | tuned |",
        "|---|---|---|",
        f"| preference accuracy | {100 * acc['base']:.1f}% | {100 * acc['tuned']:.1f}% |",
        f"| mean margin (nats) | {margin['base']:.3f} | {margin['tuned']:.3f} |",
        *implicit,
        "",
        f"{pref['pairs']} holdout pairs of `{pref['eval_file']}` (max {pref['max_seq_len']} tokens each, "
        f"{pref['dropped']} dropped that do not fit). Each model ranks a pair by its own "
        f"log p(chosen) - log p(rejected), log p summed over the answer tokens (base: the adapter "
        f"switched off); accuracy is the share of pairs ranked right. {note}".rstrip(),
        "",
    ]
