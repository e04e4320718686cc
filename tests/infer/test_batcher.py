"""Continuous batching: requests arriving at different times share decode steps and get what
they would get alone (greedy and seeded sampling), stop and cancel on their own."""

from __future__ import annotations

import threading

import pytest
import torch

from qlora_platform.infer.engine import Engine
from qlora_platform.infer.sampling import SamplingParams


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


QUESTIONS = ["Hi", "What is a dict in Python?", "Lists?", "Explain tuples briefly please.", "Sets", "json"]


def test_concurrent_requests_equal_their_single_runs(model, tokenizer):
    alone = Engine(model, tokenizer, static_cache=False)
    batched = Engine(model, tokenizer)
    batched.enable_batching(slots=3, max_len=256)  # fewer rows than requests: some wait
    jobs = [
        (
            alone.encode_chat([{"role": "user", "content": q}]),
            SamplingParams(
                max_new_tokens=6 + 3 * i, ignore_eos=True, **({"temperature": 0.8, "seed": i} if i % 2 else {})
            ),
        )
        for i, q in enumerate(QUESTIONS)
    ]
    got = [None] * len(jobs)
    pieces = [[] for _ in jobs]

    def work(i):
        got[i] = batched.run(jobs[i][0], jobs[i][1], on_text=pieces[i].append)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, (prompt, params) in enumerate(jobs):
        want = alone.run(prompt, params)
        assert got[i].token_ids == want.token_ids, i
        assert got[i].finish_reason == "length" and "".join(pieces[i]) == got[i].text
        assert got[i].prefill_s > 0 and got[i].decode_s > 0


def test_stop_string_and_cancel_end_one_row_only(model, tokenizer):
    batched = Engine(model, tokenizer)
    batched.enable_batching(slots=2, max_len=256)
    prompt = batched.encode_text("The list")
    plain = batched.run(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True))
    stop = plain.text[len(plain.text) // 2 :][:3]
    stopped = batched.run(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True, stop=[stop]))
    assert stopped.finish_reason == "stop" and stop not in stopped.text
    count = {"n": 0}

    def cancelled():
        count["n"] += 1
        return count["n"] > 3

    cut = batched.run(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True), cancelled=cancelled)
    assert cut.finish_reason == "cancelled" and len(cut.token_ids) == 4
    again = batched.run(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert again.token_ids == plain.token_ids  # the freed row is clean for the next one


def test_too_long_requests_run_on_their_own(model, tokenizer):
    batched = Engine(model, tokenizer, static_cache=False)
    batched.enable_batching(slots=2, max_len=32)
    prompt = batched.encode_chat([{"role": "user", "content": "What is a dict in Python?"}])
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    assert not batched.batcher.fits(prompt, params)
    assert batched.run(prompt, params).completion_tokens == 30


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batched_cuda_graph_steps_equal_single_runs(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda()
    alone = Engine(model, tokenizer, static_cache=False)
    batched = Engine(model, tokenizer)
    batched.enable_batching(slots=4, max_len=256)
    prompts = [alone.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    got = [None] * len(prompts)
    threads = [
        threading.Thread(target=lambda i=i: got.__setitem__(i, batched.run(prompts[i], params)))
        for i in range(len(prompts))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [g.token_ids for g in got] == [alone.run(p, params).token_ids for p in prompts]
    decoder = batched.batcher.decoder
    assert decoder.graph is not None, decoder.fallback_reason
    assert decoder.fast is not None, decoder.fast_reason


def test_a_model_the_batcher_cannot_take_is_decoded_alone(model, tokenizer, monkeypatch):
    from qlora_platform.infer import static_decode

    def refuse(*args, **kwargs):
        raise ValueError("this model's cache has sliding or non-attention layers")

    monkeypatch.setattr(static_decode, "positioned_cache", refuse)
    engine = Engine(model, tokenizer, static_cache=False)
    engine.enable_batching(slots=2, max_len=256)
    prompt = engine.encode_text("The list")
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    want = Engine(model, tokenizer, static_cache=False).run(prompt, params).token_ids
    assert engine.run(prompt, params).token_ids == want
    assert "sliding" in engine.batcher.broken
    assert engine.run(prompt, params).token_ids == want  # and later ones too


def test_a_long_request_beside_idle_rows_never_fills_the_cache(model, tokenizer):
    # Free rows step along with the busy one; parked, they do not use up its cache.
    engine = Engine(model, tokenizer)
    engine.enable_batching(slots=4, max_len=64)
    prompt = engine.encode_text("A")
    params = SamplingParams(max_new_tokens=60 - len(prompt), ignore_eos=True)
    alone = Engine(model, tokenizer, static_cache=False).run(prompt, params)
    for _ in range(2):  # twice: rows are reused
        assert engine.run(prompt, params).token_ids == alone.token_ids
    assert max(engine.batcher.decoder.lengths) < 64
