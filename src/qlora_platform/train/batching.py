"""Batches: a deterministic order per epoch, padding or padding-free packing, in a few shapes.

The order of examples in epoch E is a permutation drawn from (seed, E) alone, so
a resumed run recomputes exactly the batches it would have seen. Two layouts:

- padded: `batch_size` examples per batch, right-padded to the longest one rounded up to
  a multiple of `WIDTH_MULTIPLE` (at most max_seq_len), so a run sees a handful of widths;
  under causal attention no real token attends to a pad on its right, and pads carry no
  label, so the loss per real token does not depend on the width;
- packed: examples are laid end to end in rows of `max_seq_len` tokens
  (`batch_size` rows per batch; each example goes into the first of a few open rows with
  room for it) with positions restarting at each example and no attention mask. Every row
  is `max_seq_len` wide: the tail after the last example is padding, labelled IGNORE and
  positioned as a sequence of its own (0, 1, ...), so it attends only to itself and no real
  token sees it. `cu_seq_lens` gives the sequences' boundaries over the flattened rows for
  variable-length attention (kernels/decoder_layer.py), in a fixed number of slots (a power
  of two; unused slots repeat the total, as empty sequences) so its shape repeats too.
  Without it, transformers reads the boundaries from the positions and builds the
  block-diagonal causal mask itself, in the form the attention kernel takes.

    plan = plan_epoch(lengths, epoch, seed, batch_size, max_seq_len, packing)
    batch = collate([[examples[i] for i in row] for row in plan[k]], pad_id, packing, max_seq_len)
"""

from __future__ import annotations

import random

import torch

from ..data.collate import collate as collate_rows
from ..data.tokenize import IGNORE

WIDTH_MULTIPLE = 128  # padded batches are as wide as their longest row, rounded up to this
OPEN_ROWS = 8  # packing: an example goes into the first of this many open rows it fits


def plan_epoch(
    lengths: list[int], epoch: int, seed: int, batch_size: int, max_seq_len: int, packing: bool
) -> list[list[list[int]]]:
    """Batches of rows of example indices: batch -> row -> example indices."""
    order = list(range(len(lengths)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    if not packing:
        rows = [[i] for i in order]
    else:
        # First fit over a window of open rows: a row closes when it is the oldest of more than
        # OPEN_ROWS, so the order stays close to the shuffled one and rows fill up.
        rows, open_rows = [], []  # open_rows: [indices, tokens used]
        for i in order:
            n = min(lengths[i], max_seq_len)
            row = next((r for r in open_rows if r[1] + n <= max_seq_len), None)
            if row is None:
                row = [[], 0]
                open_rows.append(row)
                if len(open_rows) > OPEN_ROWS:
                    rows.append(open_rows.pop(0)[0])
            row[0].append(i)
            row[1] += n
        rows += [r[0] for r in open_rows]
    return [rows[k : k + batch_size] for k in range(0, len(rows), batch_size)]


def padded_width(longest: int, max_seq_len: int | None, multiple: int = WIDTH_MULTIPLE) -> int:
    """The width of a padded batch whose longest row has `longest` tokens."""
    if max_seq_len is None:
        return longest
    return max(longest, min(-(-longest // multiple) * multiple, max_seq_len))


def segment_slots(count: int, rows: int, width: int) -> int:
    """Slots for the sequence boundaries of a packed batch: a power of two, at least one per
    64 tokens, so that almost every batch of a run has the same number."""
    need = max(count, rows * width // 64, 1)
    return 1 << (need - 1).bit_length()


def collate(
    rows: list[list[dict]], pad_id: int, packing: bool, max_seq_len: int | None = None
) -> dict[str, torch.Tensor]:
    """Tensors for one batch as data/collate.py lays them out; `rows` holds the examples of each
    row. With `max_seq_len`, packed rows are that wide (with `cu_seq_lens`) and padded batches
    a multiple of WIDTH_MULTIPLE (module doc)."""
    batch = collate_rows(rows, pad_id, packing)
    if max_seq_len is None:
        return batch
    n, longest = batch["input_ids"].shape
    width = max(longest, max_seq_len) if packing else padded_width(longest, max_seq_len)
    if width > longest:
        fill = {"input_ids": pad_id, "labels": IGNORE, "attention_mask": 0}
        for name, value in fill.items():
            if name in batch:
                t = batch[name]
                batch[name] = torch.cat([t, t.new_full((n, width - longest), value)], dim=1)
    # Padding continues its row's positions (padded) or starts a sequence of its own (packed).
    positions = torch.arange(width).repeat(n, 1)
    bounds = [0]
    for r, row in enumerate(rows):
        k = sum(len(ex["input_ids"]) for ex in row)
        if packing:
            positions[r, :k] = batch["position_ids"][r, :k]
            positions[r, k:] = torch.arange(width - k)
        for m in [len(ex["input_ids"]) for ex in row] + ([width - k] if k < width else []):
            bounds.append(bounds[-1] + m)
    batch["position_ids"] = positions
    if packing:
        slots = segment_slots(len(bounds) - 1, n, width)
        batch["cu_seq_lens"] = torch.tensor(bounds + [bounds[-1]] * (slots + 1 - len(bounds)), dtype=torch.int32)
    return batch
