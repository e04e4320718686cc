"""Holdout perplexity against a value computed by hand, token by token."""

from __future__ import annotations

import math

import torch

from qlora_platform.data.tokenize import IGNORE
from qlora_platform.models.scoring import holdout_perplexity


def test_perplexity_equals_a_hand_computed_value(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # Two examples of different lengths; labels only on the "answer" part (IGNORE elsewhere).
    examples = [
        {"input_ids": [5, 17, 42, 99, 7, 3], "labels": [IGNORE, IGNORE, IGNORE, 99, 7, 3]},
        {"input_ids": [11, 12, 13, 14], "labels": [IGNORE, IGNORE, 13, 14]},
    ]
    total, count = 0.0, 0
    for ex in examples:
        with torch.no_grad():
            logits = model(torch.tensor([ex["input_ids"]])).logits[0]
        for t in range(1, len(ex["input_ids"])):
            if ex["labels"][t] == IGNORE:
                continue
            # Token t is predicted from position t-1: -log softmax(logits[t-1])[token t].
            row = logits[t - 1].double()
            total += float(torch.logsumexp(row, 0) - row[ex["input_ids"][t]])
            count += 1
    expected = math.exp(total / count)

    # Batched with padding (batch 2) and one at a time must both give the hand value.
    for batch_size in (1, 2):
        got = holdout_perplexity(model, examples, batch_size=batch_size, pad_id=0)
        assert got["tokens"] == count == 5
        assert math.isclose(got["perplexity"], expected, rel_tol=1e-5)
        assert math.isclose(got["loss"], total / count, rel_tol=1e-5)
