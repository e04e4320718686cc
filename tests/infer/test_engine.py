"""The decode loop against transformers' generate, batching, streaming, stops and cancel."""

from __future__ import annotations

import pytest
import torch

from qlora_platform.errors import UserError
from qlora_platform.infer.engine import Engine
from qlora_platform.infer.sampling import SamplingParams, apply_repetition_penalty


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return Engine(model, tokenizer)


def hf_greedy(engine, ids, n, penalty=1.0):
    out = engine.model.generate(
        torch.tensor([ids]),
        max_new_tokens=n,
        do_sample=False,
        min_new_tokens=n,
        repetition_penalty=penalty,
        pad_token_id=engine.pad_id,
    )
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_equals_transformers_generate(engine, penalty):
    ids = engine.encode_chat([{"role": "user", "content": "Tell me about lists."}])
    result = engine.generate([ids], SamplingParams(max_new_tokens=12, ignore_eos=True, repetition_penalty=penalty))[0]
    assert result.token_ids == hf_greedy(engine, ids, 12, penalty)
    assert result.finish_reason == "length" and result.completion_tokens == 12
    assert result.prefill_s > 0 and result.decode_s > 0


def test_batch_with_left_padding_equals_single_runs(engine):
    prompts = [engine.encode_chat([{"role": "user", "content": q}]) for q in ["Hi", "What is a dict in Python?"]]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    batched = engine.generate(prompts, params)
    for prompt, got in zip(prompts, batched):
        assert got.token_ids == engine.generate([prompt], params)[0].token_ids


def test_stream_pieces_join_to_the_text(engine):
    ids = engine.encode_text("The list")
    pieces = list(engine.stream(ids, SamplingParams(max_new_tokens=10, ignore_eos=True)))
    assert "".join(pieces) == engine.last.text
    assert engine.last.text == engine.tokenizer.decode(engine.last.token_ids, skip_special_tokens=True)


def test_stop_string_is_cut_and_never_streamed(engine):
    ids = engine.encode_text("The list")
    full = engine.generate([ids], SamplingParams(max_new_tokens=10, ignore_eos=True))[0].text
    stop = full.strip()[3:6]
    pieces = list(engine.stream(ids, SamplingParams(max_new_tokens=10, ignore_eos=True, stop=[stop])))
    assert engine.last.finish_reason == "stop"
    assert "".join(pieces) == full[: full.find(stop)]


def test_seeded_sampling_repeats_and_cancel_stops_early(engine):
    ids = engine.encode_text("Hello")
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    assert engine.generate([ids], params)[0].token_ids == engine.generate([ids], params)[0].token_ids
    calls = []
    result = engine.generate(
        [ids], SamplingParams(max_new_tokens=50, ignore_eos=True), cancelled=lambda: calls.append(1) or len(calls) >= 3
    )[0]
    assert result.finish_reason == "cancelled" and result.completion_tokens == 3


def test_bad_sampling_values_and_context_overflow_are_clear(engine):
    with pytest.raises(UserError, match="temperature"):
        engine.generate([[1, 2]], SamplingParams(temperature=3))
    with pytest.raises(UserError, match="top_p"):
        engine.generate([[1, 2]], SamplingParams(top_p=0))
    with pytest.raises(UserError, match=r"3 tokens and max_tokens is 510: 513 .* 512"):
        engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=510))
    with pytest.raises(UserError, match="empty prompt"):
        engine.generate([[]], SamplingParams())


def test_repetition_penalty_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]
