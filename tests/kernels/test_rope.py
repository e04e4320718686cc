"""The training RoPE kernel (Triton, interpreted on the CPU in fp32) against transformers'
apply_rotary_pos_emb: rotated q and k, gradients through them, strided gradients, in place."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from qlora_platform.kernels.rope import rope_qk, rope_reference

# Compiled on a GPU, interpreted on the CPU (tests/conftest.py sets TRITON_INTERPRET there).
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _cos_sin(batch, seq, head_dim, dtype, shifted=False):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=512)
    rotary = LlamaRotaryEmbedding(cfg)
    pos = torch.arange(seq)[None].repeat(batch, 1)
    if shifted:  # packed rows restart their positions
        pos[1] = torch.cat([torch.arange(seq // 2), torch.arange(seq - seq // 2)])
    x = torch.zeros(1, dtype=dtype)
    return tuple(t.to(DEV) for t in rotary(x, pos))


def _stock(q, k, cos, sin):
    # transformers rotates (B, H, S, D) tensors with unsqueeze_dim=1; ours are (B, S, H, D).
    qe, ke = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return qe.transpose(1, 2), ke.transpose(1, 2)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (6, 6, 32), (3, 1, 64)])
def test_rope_forward_equals_transformers_and_backward_its_autograd(heads, kv_heads, head_dim):
    torch.manual_seed(0)
    b, s = 2, 7
    cos, sin = _cos_sin(b, s, head_dim, torch.float32, shifted=True)
    q = torch.randn(b, s, heads * head_dim, device=DEV).view(b, s, heads, head_dim)
    k = torch.randn(b, s, kv_heads * head_dim, device=DEV).view(b, s, kv_heads, head_dim)
    want_q, want_k = _stock(q, k, cos, sin)
    torch.testing.assert_close(rope_reference(q, k, cos, sin)[0], want_q)

    qa, ka = q.clone().requires_grad_(), k.clone().requires_grad_()
    got_q, got_k = rope_qk(qa * 1, ka * 1, cos, sin)  # non-leaf inputs, rotated in place
    assert type(got_q.grad_fn).__name__ == "_RoPEBackward"
    torch.testing.assert_close(got_q, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k, want_k, atol=1e-5, rtol=1e-5)

    gq, gk = torch.randn_like(got_q), torch.randn_like(got_k)
    (got_q * gq).sum().backward(retain_graph=True)
    (got_k * gk).sum().backward()
    qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
    ref_q, ref_k = _stock(qr, kr, cos, sin)
    ((ref_q * gq).sum() + (ref_k * gk).sum()).backward()
    torch.testing.assert_close(qa.grad, qr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ka.grad, kr.grad, atol=1e-5, rtol=1e-5)


def test_rope_backward_takes_gradients_in_attention_layout():
    # SDPA hands back dq in (B, H, S, D) memory; the kernel reads it through its strides.
    torch.manual_seed(1)
    b, s, h, d = 2, 5, 4, 16
    cos, sin = _cos_sin(b, s, d, torch.float32)
    q = torch.randn(b, s, h, d, device=DEV, requires_grad=True)
    k = torch.randn(b, s, 2, d, device=DEV, requires_grad=True)
    got_q, got_k = rope_qk(q * 1, k * 1, cos, sin)
    g = torch.randn(b, h, s, d, device=DEV).transpose(1, 2)  # strided like SDPA's gradient
    assert not g.is_contiguous()
    torch.autograd.backward([got_q, got_k], [g, torch.zeros_like(got_k)])
    qr = q.detach().clone().requires_grad_()
    ref_q, _ = _stock(qr, k.detach(), cos, sin)
    ref_q.backward(g)
    torch.testing.assert_close(q.grad, qr.grad, atol=1e-5, rtol=1e-5)


def test_rope_falls_back_to_the_reference_where_the_kernel_does_not_run():
    b, s, h, d = 1, 3, 2, 12  # head size not a power of two
    cos, sin = _cos_sin(b, s, d, torch.float32)
    q, k = torch.randn(b, s, h, d, device=DEV), torch.randn(b, s, h, d, device=DEV)
    got_q, got_k = rope_qk(q, k, cos, sin)
    want_q, want_k = _stock(q, k, cos, sin)
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(got_k, want_k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rope_bf16_on_the_gpu_equals_transformers_bit_for_bit():
    torch.manual_seed(2)
    b, s, h, kv, d = 2, 300, 32, 8, 128
    cos, sin = _cos_sin(b, s, d, torch.bfloat16, shifted=True)
    q = torch.randn(b, s, h * d, dtype=torch.bfloat16, device="cuda").view(b, s, h, d)
    k = torch.randn(b, s, kv * d, dtype=torch.bfloat16, device="cuda").view(b, s, kv, d)
    want_q, want_k = _stock(q, k, cos, sin)
    got_q, got_k = rope_qk(q.clone(), k.clone(), cos, sin)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


def test_rope_backward_of_a_head_size_the_kernel_cannot_tile_uses_the_reference():
    # The decoder layer's recompute calls rope_backward directly, whatever the head size.
    from qlora_platform.kernels.rope import rope_backward

    b, s, h, d = 1, 4, 2, 12
    cos, sin = _cos_sin(b, s, d, torch.float32)
    x = torch.randn(b, s, h, d, device=DEV, requires_grad=True)
    g = torch.randn(b, s, h, d, device=DEV)
    want, _ = _stock(x, x[:, :, :0], cos, sin)
    want.backward(g)
    torch.testing.assert_close(rope_backward(g, cos, sin), x.grad)
