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

from ..data.tokenize import IGNORE


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


def collate(rows: list[list[dict]], pad_id: int, packing: bool) -> dict[str, torch.Tensor]:
    """Tensors for one batch; `rows` holds the examples of each row."""
    seqs, labels, positions, segments = [], [], [], []
    for row in rows:
        ids, labs, pos, seg = [], [], [], []
        for s, ex in enumerate(row):
            ex_labels = list(ex["labels"])
            if packing and ids:
                ex_labels[0] = IGNORE  # the previous example's last token must not predict this one
            ids += ex["input_ids"]
            labs += ex_labels
            pos += range(len(ex["input_ids"]))
            seg += [s + 1] * len(ex["input_ids"])
        seqs.append(ids)
        labels.append(labs)
        positions.append(pos)
        segments.append(seg)
    width = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    label_t = torch.full((n, width), IGNORE, dtype=torch.long)
    seg_t = torch.zeros((n, width), dtype=torch.long)  # 0 marks padding
    pos_t = torch.zeros((n, width), dtype=torch.long)
    for r in range(n):
        k = len(seqs[r])
        input_ids[r, :k] = torch.tensor(seqs[r])
        label_t[r, :k] = torch.tensor(labels[r])
        seg_t[r, :k] = torch.tensor(segments[r])
        pos_t[r, :k] = torch.tensor(positions[r])
    batch = {"input_ids": input_ids, "labels": label_t, "position_ids": pos_t}
    if not packing:
        batch["attention_mask"] = (seg_t > 0).long()
    batch["num_tokens"] = int((seg_t > 0).sum())
    batch["num_label_tokens"] = int((label_t[:, 1:] != IGNORE).sum())
    return batch
