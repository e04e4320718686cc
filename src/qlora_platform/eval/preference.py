"""Preference metrics of a DPO run for `qlora eval`: base against tuned on the holdout pairs.

    pref = preference_scores(loaded, "data/pref/eval.jsonl")   # loaded: infer.load.load_for_inference
    pref["accuracy"]["base"], pref["accuracy"]["tuned"], pref["margin"]["base"], pref["margin"]["tuned"]

The log-probability of an answer is the sum of its answer tokens' log-probabilities after the
prompt, as DPO training scores it (models/scoring.py). Base = the same weights with the adapter
switched off. Against itself the base's DPO reward is 0, so the base ranks a pair by its own
log-probabilities:

- base margin of a pair:  log p_base(chosen) - log p_base(rejected);
- tuned margin of a pair: the DPO implicit reward margin against the base,
  beta * ((log p_tuned(chosen) - log p_base(chosen)) - (log p_tuned(rejected) - log p_base(rejected)));
- accuracy: the share of pairs whose margin is above 0; `margin`: the mean margin.

The two margins are on different scales (nats against beta-scaled nats); the accuracies compare.
"""

from __future__ import annotations

import torch

from ..data.preference import load_kind_records
from ..data.preference_tokenize import encode_pairs
from ..errors import UserError
from ..models.loader import training_numerics
from ..models.scoring import sequence_logps

DEFINITION = (
    "base: log p(chosen) - log p(rejected) under the base (adapter off); tuned: the DPO implicit reward "
    "margin beta * ((log p_tuned(chosen) - log p_base(chosen)) - (log p_tuned(rejected) - log p_base(rejected))); "
    "accuracy: share of pairs with margin > 0; log p: summed over the answer tokens"
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
    size, pad, beta = batch_size or max(1, cfg.training.batch_size), tok.pad_token_id, cfg.training.dpo_beta
    # Scored with the 4-bit numerics training used, before any generation repacks the layers.
    with training_numerics(loaded.model):
        with loaded.base_only():
            base = sequence_logps(loaded.model, pairs, size, pad, "preference (base)")
        tuned = sequence_logps(loaded.model, pairs, size, pad, "preference (tuned)")
    base_margin = base[:, 0] - base[:, 1]
    tuned_margin = beta * ((tuned[:, 0] - base[:, 0]) - (tuned[:, 1] - base[:, 1]))
    (base_acc, base_mean), (tuned_acc, tuned_mean) = _summary(base_margin), _summary(tuned_margin)
    return {
        "accuracy": {"base": base_acc, "tuned": tuned_acc},
        "margin": {"base": base_mean, "tuned": tuned_mean},
        "pairs": len(pairs),
        "dropped": dropped,
        "beta": beta,
        "eval_file": str(eval_file),
        "max_seq_len": cfg.data.max_seq_len,
        "method": DEFINITION,
    }


def preference_markdown(pref: dict) -> list[str]:
    """The eval.md section of the preference metrics."""
    acc, margin = pref["accuracy"], pref["margin"]
    return [
        "## Preference pairs (DPO)",
        "",
        "| metric | base | tuned |",
        "|---|---|---|",
        f"| preference accuracy | {100 * acc['base']:.1f}% | {100 * acc['tuned']:.1f}% |",
        f"| mean margin | {margin['base']:.3f} | {margin['tuned']:.3f} |",
        "",
        f"{pref['pairs']} holdout pairs of `{pref['eval_file']}` (max {pref['max_seq_len']} tokens each, "
        f"{pref['dropped']} dropped that do not fit), beta {pref['beta']}. Base ranks a pair by "
        f"log p(chosen) - log p(rejected) under the base model (the adapter switched off; its DPO reward "
        f"against itself is 0); tuned by the DPO implicit reward margin against the base, "
        f"beta * ((log p_tuned(chosen) - log p_base(chosen)) - (log p_tuned(rejected) - log p_base(rejected))). "
        f"Accuracy is the share of pairs whose margin is above 0; log p sums over the answer tokens. "
        f"The two margins are on different scales; the accuracies compare.",
        "",
    ]
