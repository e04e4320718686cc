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


def test_answer_nll_runs_the_head_only_where_a_label_is_predicted(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from qlora_platform.models.scoring import answer_nll, output_head_parts, summed_answer_nll

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.randint(3, 200, (2, 9))
    labels = ids.clone()
    labels[0, :4] = IGNORE
    labels[1, :6] = IGNORE
    padded = {"input_ids": ids, "attention_mask": torch.ones_like(ids).index_fill_(1, torch.tensor([8]), 0)}
    packed = {"input_ids": ids, "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]] * 2)}
    seen = []
    head = output_head_parts(model)[1]
    head.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].shape[0]))
    for inputs in (padded, packed):
        for p in model.parameters():
            p.grad = None
        want = summed_answer_nll(model(**inputs).logits, labels)
        want.backward()
        want_grads = [p.grad.clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = None
        seen.clear()
        got = answer_nll(model, labels, **inputs)
        got.backward()
        assert seen == [(5 + 3)]  # rows 0 and 1 predict 5 and 3 labelled tokens
        assert torch.allclose(got, want, rtol=1e-5)
        for p, g in zip(model.parameters(), want_grads, strict=True):
            assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6)

    # A model an engine wraps runs whole, even where the wrapper hands out the model's attributes
    # (FSDP does): its forward gathers shards and syncs gradients.
    class Forwarding(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.inner, name)

    assert Forwarding(model).get_output_embeddings() is head
    assert output_head_parts(Forwarding(model)) is None

    # A model type not known to compute its logits as the head of the last hidden state (Gemma 2
    # softcaps them) runs whole.
    model.config.model_type = "gemma2"
    assert output_head_parts(model) is None
    assert torch.allclose(answer_nll(model, labels, **packed), summed_answer_nll(model(**packed).logits, labels))
