"""Seeded train/holdout split with no prompt on both sides.

Records that share a prompt (compared case- and whitespace-insensitively) form
one group and land on the same side, so the holdout never measures memorised
questions. Groups are stratified by the records' `category` where there is one:
each category contributes its share of the holdout.

    train, holdout = split_holdout(records, ratio=0.1, seed=42)
"""

from __future__ import annotations

import random
from collections import defaultdict

from .formats import normalise_key, prompt_of


def split_holdout(records: list[dict], ratio: float = 0.1, seed: int = 42) -> tuple[list[dict], list[dict]]:
    if not 0 <= ratio < 1:
        raise ValueError("ratio must be in [0, 1)")
    if ratio == 0 or len(records) < 2:
        return list(records), []
    groups: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        groups[normalise_key(prompt_of(rec))].append(i)
    if len(groups) < 2:  # one prompt only: no holdout can be kept apart from training
        return list(records), []
    by_category: dict[str, list[list[int]]] = defaultdict(list)
    for members in groups.values():
        by_category[str(records[members[0]].get("category", ""))].append(members)

    rng = random.Random(seed)
    holdout_idx: set[int] = set()
    target_total = max(1, round(len(records) * ratio))
    for category in sorted(by_category):
        cat_groups = by_category[category]
        rng.shuffle(cat_groups)
        size = sum(len(g) for g in cat_groups)
        want = round(size * ratio)
        taken = 0
        for g in cat_groups:
            if taken >= want:
                break
            holdout_idx.update(g)
            taken += len(g)
    # Small categories round to zero; top up from the largest ones so the holdout is ~ratio.
    remaining = [
        g
        for cat in sorted(by_category, key=lambda c: -len(by_category[c]))
        for g in by_category[cat]
        if g[0] not in holdout_idx
    ]
    for g in remaining:
        if len(holdout_idx) >= target_total:
            break
        holdout_idx.update(g)
    if len(holdout_idx) == len(records):  # never leave training empty: give one group back
        holdout_idx.difference_update(next(iter(groups.values())))
    train = [r for i, r in enumerate(records) if i not in holdout_idx]
    holdout = [r for i, r in enumerate(records) if i in holdout_idx]
    return train, holdout
