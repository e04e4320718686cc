"""The written-out decoder layer (kernels/decoder_layer.py) on a tiny 4-bit Llama on the CPU:
under checkpointing its recompute skips the q/k/v, o_proj and down_proj products, RoPE and
SwiGLU yet gives the gradients of the un-checkpointed model; with a KV cache it hands over
to the stock layer."""

import pytest
import torch

from qlora_platform.kernels import apply_fast_kernels, decoder_layer, lora
from qlora_platform.kernels.offload import LayerReplay, Offloader, replay_of, use_offloader
from qlora_platform.models.loader import attach_lora, load_base_model
from qlora_platform.models.scoring import output_head_parts
from qlora_platform.train.model import summed_nll


def _model(cfg, fast=True):
    torch.manual_seed(0)
    model = attach_lora(load_base_model(cfg, "cpu", for_training=True), cfg)
    g = torch.Generator().manual_seed(1)
    for name, p in sorted(model.named_parameters()):
        if "lora_B" in name:
            p.data.copy_(0.2 * torch.randn(p.shape, generator=g))
    if fast:
        assert apply_fast_kernels(model).decoder_layers == 2
    model.train()
    return model


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = summed_nll(model, output_head_parts(model), ids, input_ids=ids) / ids.numel()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# 80 tokens >= hidden 64: the folded projections (lora.py), in fp32 (in bf16 the fold's other
# rounding moves this tiny random model's gradients by several percent; test_lora_fold.py).
@pytest.mark.parametrize("dtype, seq", [("float32", 12), ("bfloat16", 12), ("float32", 40)])
def test_checkpoint_recompute_skips_output_products_and_keeps_the_gradients(tiny_cfg, monkeypatch, dtype, seq):
    tiny_cfg.quantization.compute_dtype = dtype
    tiny_cfg.quantization.fp32_norms = False
    ids = torch.randint(0, 1000, (2, seq), generator=torch.Generator().manual_seed(2))
    loss_plain, plain = _step(_model(tiny_cfg), ids)

    model = _model(tiny_cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    offloader = use_offloader(model, Offloader(torch.device("cpu")))
    calls = []
    real = lora.base_weight
    monkeypatch.setattr(lora, "base_weight", lambda base, out=None: calls.append(base) or real(base, out))
    for _ in range(2):  # the second step finds the offloader emptied by the first
        loss_ckpt, ckpt = _step(model, ids)
        assert offloader.saved == []
    # Per layer and step: 7 weights forward, 2 in the recompute (gate, up; q, k, v, o and
    # down are not recomputed), 7 for the input gradients. Stock checkpointing would take 21.
    assert len(calls) == 2 * 2 * (7 + 2 + 7)
    # Unfolded: the same products in the same order. Folded q/k/v (first pass only) add the
    # LoRA half inside the GEMM: another summation order.
    folded = seq == 40
    assert plain.keys() == ckpt.keys() and len(plain) == 2 * 7 * 2
    assert loss_ckpt == (pytest.approx(loss_plain, rel=1e-6) if folded else loss_plain)
    tol = dict(atol=2e-5, rtol=1e-3) if folded else dict(atol=1e-6, rtol=1e-5)
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, **tol)


def test_generation_with_a_cache_uses_the_stock_layer_and_matches_peft(tiny_cfg):
    ref, fast = _model(tiny_cfg, fast=False).eval(), _model(tiny_cfg).eval()
    ids = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        got = fast.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        logits_ref = ref(input_ids=ids).logits
        logits_fast = fast(input_ids=ids, use_cache=False).logits
    assert torch.equal(got, want)
    torch.testing.assert_close(logits_fast, logits_ref, atol=1e-4, rtol=1e-4)


def test_adapters_laid_out_flat_are_cast_once_per_layer(tiny_cfg):
    from qlora_platform.kernels.lora import LoRAProj, cast_adapters
    from qlora_platform.train.flat_params import FlatParams

    tiny_cfg.quantization.compute_dtype = "bfloat16"
    tiny_cfg.quantization.fp32_norms = False
    model = _model(tiny_cfg)
    layer = model.get_base_model().model.layers[0]
    names = ["q_proj", "k_proj", "v_proj", "o_proj"]
    projs = [LoRAProj.of(getattr(layer.self_attn, n)) for n in names]
    cast_adapters(projs, torch.bfloat16)  # separate tensors: left to _forward
    assert all(p.a16 is None for p in projs)
    FlatParams([p for p in model.parameters() if p.requires_grad])
    projs = [LoRAProj.of(getattr(layer.self_attn, n)) for n in names]
    cast_adapters(projs, torch.bfloat16)
    for p in projs:
        assert p.a16.dtype == torch.bfloat16 and torch.equal(p.a16, p.A.to(torch.bfloat16))
        assert torch.equal(p.b16, p.B.to(torch.bfloat16))
    assert len({p.a16.untyped_storage().data_ptr() for p in projs}) == 1  # one cast


def test_packed_rows_with_restarting_positions_match_peft(tiny_cfg):
    # Packing passes position_ids that restart per example; the layer hands them (and the
    # mask transformers builds from them) to the attention function as the stock layer does.
    ref, fast = _model(tiny_cfg, fast=False), _model(tiny_cfg)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(4))
    pos = torch.tensor([list(range(5)) + list(range(7)), list(range(12))])
    loss_ref = summed_nll(ref, None, ids, input_ids=ids, position_ids=pos)
    loss_fast = summed_nll(fast, output_head_parts(fast), ids, input_ids=ids, position_ids=pos)
    torch.testing.assert_close(loss_fast, loss_ref, atol=1e-4, rtol=1e-5)
    unpacked = summed_nll(fast, output_head_parts(fast), ids, input_ids=ids)
    assert abs(unpacked.item() - loss_fast.item()) > 1e-3  # the positions did matter


def _offloaded(model):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return use_offloader(model, Offloader(torch.device("cpu")))


def test_a_recompute_whose_first_pass_kept_nothing_recomputes_in_full(tiny_cfg):
    # The first pass ran the stock layer (adapter switched off then), the recompute the fast one.
    model = _model(tiny_cfg)
    offloader = _offloaded(model)
    layer = model.get_base_model().model.layers[0]
    x = torch.randn(1, 5, 64, requires_grad=True)
    rotary = model.get_base_model().model.rotary_emb
    pos = rotary(x, torch.arange(5)[None])
    want = layer.forward(x, position_embeddings=pos)  # the patched forward, outside the checkpoint
    replay = LayerReplay(kept={})
    with offloader.replaying(replay):
        assert replay_of(layer) is replay
        got = layer.forward(x, position_embeddings=pos)
    assert replay_of(layer) is None
    torch.testing.assert_close(got, want)


def test_two_models_do_not_share_the_replay_of_a_checkpointed_layer(tiny_cfg, monkeypatch):
    # Model b's layer runs in the middle of model a's checkpointed layer: it must neither park
    # its tensors with a's layer nor take a's pass for its own, and a's gradients stay exact.
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(5))
    loss_plain, plain = _step(_model(tiny_cfg), ids)
    a, b = _model(tiny_cfg), _model(tiny_cfg)
    offloader_a, offloader_b = _offloaded(a), _offloaded(b)
    layer_a, layer_b = (m.get_base_model().model.layers[0] for m in (a, b))
    x = torch.randn(1, 5, 64)
    pos = b.get_base_model().model.rotary_emb(x, torch.arange(5)[None])
    seen = []
    real = decoder_layer.attention_core

    def attention_core(attn, *args, **kwargs):
        if attn is layer_a.self_attn:
            seen.append((replay_of(layer_a), replay_of(layer_b)))
            with torch.no_grad():
                layer_b.forward(x, position_embeddings=pos)
        return real(attn, *args, **kwargs)

    monkeypatch.setattr(decoder_layer, "attention_core", attention_core)
    loss_a, grads_a = _step(a, ids)
    # Once in the first pass, once in the recompute: a's layer saw its replay, b's layer none.
    assert len(seen) == 2 and all(ra is not None and rb is None for ra, rb in seen)
    assert offloader_a.replay is None and offloader_b.replay is None and offloader_b.saved == []
    assert loss_a == loss_plain
    for name, g in plain.items():
        torch.testing.assert_close(grads_a[name], g, atol=1e-6, rtol=1e-5)
