"""Packed rows with variable-length attention (kernels/decoder_layer.py, `cu_seq_lens` from
train/batching.py): no token attends across examples. On the CPU the dense-mask reference
runs; tests marked gpu check FlashAttention's variable-length kernel against it."""

import pytest
import torch

from qlora_platform.data.tokenize import IGNORE
from qlora_platform.kernels import apply_fast_kernels
from qlora_platform.kernels.decoder_layer import varlen_attention_reference
from qlora_platform.kernels.offload import Offloader, use_offloader
from qlora_platform.models.loader import attach_lora, load_base_model
from qlora_platform.models.scoring import output_head_parts
from qlora_platform.train.batching import collate
from qlora_platform.train.model import summed_nll

no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _ex(n, seed):
    ids = torch.randint(1, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return {"input_ids": ids, "labels": [IGNORE] * 2 + ids[2:]}


def _model(cfg):
    torch.manual_seed(0)
    model = attach_lora(load_base_model(cfg, "cpu", for_training=True), cfg)
    g = torch.Generator().manual_seed(1)
    for name, p in sorted(model.named_parameters()):
        if "lora_B" in name:
            p.data.copy_(0.2 * torch.randn(p.shape, generator=g))
    assert apply_fast_kernels(model).decoder_layers == 2
    return model.train()


def _attention_alone(q, k, v, bounds, scale):
    """Each sequence on its own, through SDPA's causal attention."""
    rep = q.shape[2] // k.shape[2]
    outs = []
    flat = [t.reshape(-1, *t.shape[2:]) for t in (q, k, v)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in flat)
        ks, vs = ks.repeat_interleave(rep, 1), vs.repeat_interleave(rep, 1)
        outs.append(
            torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)[0].transpose(0, 1)
        )
    return torch.cat(outs).reshape(q.shape[0], q.shape[1], -1)


def test_the_reference_is_attention_on_each_sequence_alone():
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 16, 4, 8, generator=g),
        torch.randn(2, 16, 2, 8, generator=g),
        torch.randn(2, 16, 2, 8, generator=g),
    )
    bounds = [0, 5, 12, 16, 19, 32]
    cu = torch.tensor(bounds + [32] * 3, dtype=torch.int32)  # unused slots: empty sequences
    got = varlen_attention_reference(q, k, v, cu, 0.3)
    torch.testing.assert_close(got, _attention_alone(q, k, v, bounds, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("offload", [False, True])
def test_packed_loss_and_gradients_equal_each_example_alone(tiny_cfg, offload):
    tiny_cfg.quantization.compute_dtype = "float32"
    tiny_cfg.quantization.fp32_norms = False
    model = _model(tiny_cfg)
    if offload:  # the checkpoint's recompute path (on the CPU the offloader keeps tensors in place)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        use_offloader(model, Offloader(torch.device("cpu")))
    fused = output_head_parts(model)
    rows = [[_ex(9, 1), _ex(14, 2)], [_ex(20, 3)]]
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(**batch):
        model.zero_grad(set_to_none=True)
        loss = summed_nll(model, fused, **batch)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in params]

    packed = collate(rows, 0, packing=True, max_seq_len=32)
    got, got_grads = loss_and_grads(
        labels=packed["labels"],
        input_ids=packed["input_ids"],
        position_ids=packed["position_ids"],
        cu_seq_lens=packed["cu_seq_lens"],
    )
    want, want_grads = 0.0, [torch.zeros_like(p) for p in params]
    for ex in [ex for row in rows for ex in row]:
        one = collate([[ex]], 0, packing=False)
        loss, grads = loss_and_grads(labels=one["labels"], input_ids=one["input_ids"])
        want += loss
        want_grads = [a + b for a, b in zip(want_grads, grads)]
    assert got == pytest.approx(want, rel=1e-3)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.gpu
@no_gpu
@pytest.mark.parametrize("hq, hkv, d", [(32, 8, 128), (4, 4, 64)])
def test_flash_varlen_matches_the_reference_and_replays_from_a_graph(hq, hkv, d):
    from qlora_platform.kernels.decoder_layer import _VarlenAttention

    g = torch.Generator(device="cuda").manual_seed(0)
    b, s = 2, 256
    q, k, v = (
        torch.randn(b, s, h, d, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for h in (hq, hkv, hkv)
    )
    cu = torch.tensor([0, 100, 180, 256, 300, 512] + [512] * 11, dtype=torch.int32, device="cuda")
    out = _VarlenAttention.apply(q, k, v, cu, d**-0.5, None)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = varlen_attention_reference(*ref_in, cu, d**-0.5)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a.float(), r, atol=5e-2, rtol=5e-2)
    # New boundaries in the same buffer: a captured graph gives what an eager call gives.
    static_cu = cu.clone()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        static_out = _VarlenAttention.apply(q.detach(), k.detach(), v.detach(), static_cu, d**-0.5, None)
    static_cu.copy_(torch.tensor([0, 30, 256, 512] + [512] * 13, dtype=torch.int32, device="cuda"))
    graph.replay()
    torch.testing.assert_close(
        static_out, _VarlenAttention.apply(q.detach(), k.detach(), v.detach(), static_cu, d**-0.5, None)
    )


def test_only_a_batch_without_mask_or_packing_lets_the_layers_drop_the_mask(tiny_cfg, monkeypatch):
    """The plain-causal shortcut is derived from each batch (train/model.summed_nll), never left
    over from another one: a packed batch after a plain one still gets its boundaries."""
    from qlora_platform.kernels import decoder_layer

    model = _model(tiny_cfg)
    fused = output_head_parts(model)
    seen = []
    real = decoder_layer.attention_core

    def spy(*args, **kwargs):
        seen.append((kwargs.get("causal_only", False), kwargs.get("cu_seq_lens") is not None))
        return real(*args, **kwargs)

    monkeypatch.setattr(decoder_layer, "attention_core", spy)
    ids = torch.randint(1, 1000, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        summed_nll(model, fused, ids, input_ids=ids)
        packed = collate([[_ex(5, 1), _ex(7, 2)]], 0, packing=True, max_seq_len=16)
        summed_nll(
            model,
            fused,
            packed["labels"],
            input_ids=packed["input_ids"],
            position_ids=packed["position_ids"],
            cu_seq_lens=packed["cu_seq_lens"],
        )
        summed_nll(model, fused, ids, input_ids=ids, attention_mask=torch.ones_like(ids))
    assert seen == [(True, False)] * 2 + [(False, True)] * 2 + [(False, False)] * 2
