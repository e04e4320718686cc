"""The static-cache decode path (the GPU default; CUDA graphs on the device) against the
dynamic-cache loop and transformers' generate, on the CPU."""

from __future__ import annotations

import pytest
import torch

from qlora_platform.infer.engine import Engine
from qlora_platform.infer.sampling import SamplingParams

PARAMS = SamplingParams(max_new_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return Engine(model, tokenizer, static_cache=True), Engine(model, tokenizer, static_cache=False)


def _prompts(engine):
    return [engine.encode_chat([{"role": "user", "content": q}]) for q in ["Hi", "What is a dict in Python?"]]


def test_static_greedy_equals_dynamic_for_one_and_for_a_left_padded_batch(engines):
    static, dynamic = engines
    prompts = _prompts(static)
    for batch in ([prompts[1]], prompts):
        got = static.generate(batch, PARAMS)
        want = dynamic.generate(batch, PARAMS)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert static.static_fallback_reason is None and static._decoders  # it really ran static


def test_decoder_is_reused_and_reset_between_requests(engines):
    static, dynamic = engines
    a, b = _prompts(static)
    first = static.generate([a], PARAMS)[0].token_ids
    decoders = dict(static._decoders)
    static.generate([b], PARAMS)  # another prompt, same shape bucket
    assert static.generate([a], PARAMS)[0].token_ids == first  # nothing left over from b
    assert any(static._decoders.get(k) is d for k, d in decoders.items())


def test_streaming_and_stops_work_on_the_static_path(engines):
    static, dynamic = engines
    ids = static.encode_text("The list")
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    pieces = list(static.stream(ids, params))
    assert "".join(pieces) == static.last.text == dynamic.generate([ids], params)[0].text


def test_a_model_without_static_cache_support_falls_back_with_the_reason(tiny_model_dir, tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM

    from qlora_platform.infer import static_decode

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    engine = Engine(model, tokenizer, static_cache=True)
    ids = engine.encode_text("Hello")
    want = Engine(model, tokenizer, static_cache=False).generate([ids], PARAMS)[0].token_ids

    def broken(*args, **kwargs):
        raise RuntimeError("no static cache here")

    monkeypatch.setattr(static_decode.StaticDecoder, "prefill", broken)
    got = engine.generate([ids], PARAMS)[0].token_ids
    assert got == want and "no static cache here" in engine.static_fallback_reason
    assert engine.static_cache is False


def test_adapter_on_and_off_get_decoders_of_their_own(tiny_model_dir, tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    static, dynamic = Engine(model, tokenizer, static_cache=True), Engine(model, tokenizer, static_cache=False)
    ids = static.encode_text("Hello there")
    tuned = static.generate([ids], PARAMS)[0].token_ids
    with model.disable_adapter():
        plain = static.generate([ids], PARAMS)[0].token_ids
        assert plain == dynamic.generate([ids], PARAMS)[0].token_ids
    assert tuned == dynamic.generate([ids], PARAMS)[0].token_ids
    assert len({key[2] for key in static._decoders}) == 2  # a CUDA graph per adapter state


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replay_gives_the_eager_tokens(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).cuda()
    graphs = Engine(model, tokenizer, static_cache=True, cuda_graphs=True)
    eager = Engine(model, tokenizer, static_cache=False)
    prompts = _prompts(graphs)
    for batch in ([prompts[1]], prompts, [prompts[0]]):
        assert [g.token_ids for g in graphs.generate(batch, PARAMS)] == [
            w.token_ids for w in eager.generate(batch, PARAMS)
        ]
    decoder = next(iter(graphs._decoders.values()))
    assert decoder.graph is not None, decoder.fallback_reason
    assert decoder.fast is not None, decoder.fast_reason  # the platform's own step, in bf16


def test_repeating_a_step_rewrites_the_same_cache_column(engines):
    # What graph warm-up and the replay checks do on the GPU: the same step run twice must not
    # shift later keys (transformers' StaticLayer would, counting every forward).
    from qlora_platform.infer.static_decode import StaticDecoder

    static, dynamic = engines
    ids = static.encode_text("A list is")
    decoder = StaticDecoder(static.model, 1, 256, graphs=False)
    logits = decoder.prefill(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    tokens = []
    for _ in range(8):
        token = logits.argmax(-1)
        tokens.append(int(token))
        logits = decoder.step(token)
        decoder.writes.columns -= 1  # the same step once more
        again = decoder._eager_step()
        decoder.writes.columns += 1
        torch.testing.assert_close(again, logits)
    want = dynamic.generate([ids], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].token_ids
    assert tokens == want
