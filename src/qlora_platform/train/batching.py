"""Batches: a deterministic order per epoch, padding or padding-free packing.

The order of examples in epoch E is a permutation drawn from (seed, E) alone, so
a resumed run recomputes exactly the batches it would have seen. Two layouts:

- padded: `batch_size` examples per batch, right-padded to the longest one;
- packed: examples are laid end to end in rows of `max_seq_len` tokens
  (`batch_size` rows per batch) with positions restarting at each example and no
  attention mask: transformers reads the example boundaries from the positions and
  builds the block-diagonal causal mask itself, in the form the attention kernel
  takes (a dense mask for sdpa/eager, a block mask for flex_attention, variable-length
  sequences for flash_attention_2), so no token attends across examples and almost
  no compute is spent on padding.

    plan = plan_epoch(examples, epoch, seed, batch_size, max_seq_len, packing)
    batch = collate([examples[i] for i in plan[k]], pad_id, packing, max_seq_len)
"""
from __future__ import annotations

import random

import torch

from ..data.collate import collate  # noqa: F401 (re-exported for tests/train/test_batching.py)


def plan_epoch(lengths: list[int], epoch: int, seed: int, batch_size: int, max_seq_len: int,
               packing: bool) -> list[list[list[int]]]:
    """Batches of rows of example indices: batch -> row -> example indices."""
    order = list(range(len(lengths)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    if not packing:
        rows = [[i] for i in order]
    else:
        rows, current, used = [], [], 0
        for i in order:
            n = min(lengths[i], max_seq_len)
            if current and used + n > max_seq_len:
                rows.append(current)
                current, used = [], 0
            current.append(i)
            used += n
        if current:
            rows.append(current)
    return [rows[k:k + batch_size] for k in range(0, len(rows), batch_size)]
