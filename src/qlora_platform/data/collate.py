"""One batch's tensors from encoded examples, and the count of tokens the loss is taken on.

    batch = collate([[ex_a], [ex_b, ex_c]], pad_id, packing=True)

`rows` holds the examples of each row: one per row when padded (right padding to the
longest row, with an attention mask), several per row when packed (positions restart
at each example, no attention mask, and each example's first label is dropped so that
the previous example's last token does not predict it). Training and the holdout
perplexity batch examples the same way.
"""

from __future__ import annotations

import torch

from .tokenize import IGNORE


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """The labels that positions 0..T-2 predict (token t predicts t+1)."""
    return labels[:, 1:]


def answer_token_count(labels: torch.Tensor) -> int:
    """Labelled tokens after the one-token shift: the tokens a loss or a perplexity is taken on."""
    return int((next_token_labels(labels) != IGNORE).sum())


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
    batch["num_label_tokens"] = answer_token_count(label_t)
    return batch
