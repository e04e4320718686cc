"""The platform's own decode step (infer/fast_decode.py) against the model's forward."""

from __future__ import annotations

import pytest
import torch

from qlora_platform.infer.engine import Engine
from qlora_platform.infer.sampling import SamplingParams
from qlora_platform.infer.static_decode import StaticDecoder


def _model(tiny_model_dir, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, config=cfg, dtype=torch.float32).eval()


def _decode_both_ways(model, ids, mask, steps=6):
    """Logits of each step from a decoder on the fused step and one on the model's forward."""
    fast, stock = (
        StaticDecoder(model, ids.shape[0], 64, graphs=False),
        StaticDecoder(model, ids.shape[0], 64, graphs=False, fast_step=False),
    )
    pairs = []
    a, b = fast.prefill(ids, mask), stock.prefill(ids, mask)
    for _ in range(steps):
        token = b.argmax(-1)
        a, b = fast.step(token), stock.step(token)
        pairs.append((a, b))
    return fast, pairs


def test_fused_step_gives_the_models_logits_for_a_left_padded_batch(tiny_model_dir):
    model = _model(tiny_model_dir)
    ids = torch.randint(5, 200, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :8] = 0
    fast, pairs = _decode_both_ways(model, ids, mask)
    assert fast.fast is not None and fast.fast_checked and fast.fast_reason is None
    for got, want in pairs:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_fused_step_runs_lora_layers_with_their_adapter(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        _model(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    ).eval()
    ids = torch.randint(5, 200, (1, 7), generator=torch.Generator().manual_seed(1))
    fast, pairs = _decode_both_ways(model, ids, torch.ones_like(ids))
    assert fast.fast is not None
    for got, want in pairs:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with model.disable_adapter():
        _, plain = _decode_both_ways(model, ids, torch.ones_like(ids))
    assert not torch.allclose(plain[0][0], pairs[0][0])  # the adapter did act above


@pytest.mark.parametrize(
    "overrides,why", [({"hidden_act": "gelu"}, "activation"), ({"head_dim": 24, "hidden_size": 96}, "head size")]
)
def test_models_the_step_does_not_cover_keep_their_forward_and_say_why(tiny_model_dir, tokenizer, overrides, why):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    decoder = StaticDecoder(model, 1, 64, graphs=False)
    assert decoder.fast is None and why in decoder.fast_reason
    engine, plain = Engine(model, tokenizer, static_cache=True), Engine(model, tokenizer, static_cache=False)
    ids = engine.encode_text("Hello there")
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    assert engine.generate([ids], params)[0].token_ids == plain.generate([ids], params)[0].token_ids


def test_a_fused_step_that_disagrees_is_dropped_after_the_first_check(tiny_model_dir):
    model = _model(tiny_model_dir)
    ids = torch.randint(5, 200, (1, 5), generator=torch.Generator().manual_seed(2))
    decoder = StaticDecoder(model, 1, 64, graphs=False)
    decoder.fast.scale *= 3  # a fused step that gets the attention wrong
    stock = StaticDecoder(model, 1, 64, graphs=False, fast_step=False)
    a, b = decoder.prefill(ids, torch.ones_like(ids)), stock.prefill(ids, torch.ones_like(ids))
    for _ in range(3):
        token = b.argmax(-1)
        a, b = decoder.step(token), stock.step(token)
        torch.testing.assert_close(a, b)
    assert decoder.fast is None and "differed" in decoder.fast_reason
