"""The decode-step kernels (kernels/decode.py) against their references and against the
transformers ops they replace: interpreted in fp32 on the CPU, compiled in bf16 on a GPU."""

from __future__ import annotations

import pytest
import torch

from qlora_platform.kernels.decode import (
    add_rms_norm,
    add_rms_norm_reference,
    decode_attention,
    decode_attention_reference,
    rope_write_kv,
    rope_write_kv_reference,
)

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if GPU else [])  # the interpreter truncates bf16


def _cache(b, hkv, t, d, dtype, g):
    return ((torch.randn(b, hkv, t, d, generator=g)).to(DEVICE, dtype) for _ in range(2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (9, 3, 64), (32, 8, 128)])
def test_rope_write_matches_transformers_rotary_and_writes_each_rows_column(dtype, heads, kv_heads, head_dim):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(0)
    b, t = 3, 40
    q = torch.randn(b, heads, head_dim, generator=g).to(DEVICE, dtype)
    k, v = (torch.randn(b, kv_heads, head_dim, generator=g).to(DEVICE, dtype) for _ in range(2))
    cos, sin = (torch.randn(b, head_dim, generator=g).to(DEVICE, dtype) for _ in range(2))
    k_cache, v_cache = _cache(b, kv_heads, t, head_dim, dtype, g)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    columns = torch.tensor([0, 17, 39], device=DEVICE)
    got = rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, columns)
    want = rope_write_kv_reference(q, k, v, cos, sin, k_ref, v_ref, columns)
    q_hf, k_hf = apply_rotary_pos_emb(q[:, :, None], k[:, :, None], cos[:, None], sin[:, None])
    written = k_cache[torch.arange(b, device=DEVICE), :, columns]
    # bf16: PyTorch's three roundings, bit for bit; fp32 on a GPU: the compiler fuses the
    # products into an FMA (one rounding fewer), so equal to float precision only.
    tol = dict(atol=1e-6, rtol=1e-6) if GPU and dtype == torch.float32 else dict(atol=0, rtol=0)
    for a, b_ in [(got, want), (k_cache, k_ref), (got, q_hf[:, :, 0]), (written, k_hf[:, :, 0])]:
        torch.testing.assert_close(a, b_, **tol)
    assert torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (32, 8)])
def test_decode_attention_matches_reference_with_padding_and_several_blocks(dtype, heads, kv_heads):
    g = torch.Generator().manual_seed(1)
    b, t, d = 3, 200, 64
    q = torch.randn(b, heads, d, generator=g).to(DEVICE, dtype)
    k_cache, v_cache = _cache(b, kv_heads, t, d, dtype, g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, :70] = 0  # a left-padded row whose whole first block is padding
    mask[2, 5:9] = 0
    mask, columns = mask.to(DEVICE), torch.tensor([0, 150, 199], device=DEVICE)
    got = decode_attention(q, k_cache, v_cache, mask, columns, d**-0.5)
    want = decode_attention_reference(q, k_cache, v_cache, mask, columns, d**-0.5)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    # Columns after a row's own length are never read (a long cache costs short rows nothing).
    k_cache[0, :, 1:] = float("nan")
    assert torch.isfinite(decode_attention(q, k_cache, v_cache, mask, columns, d**-0.5)[0]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_updates_the_residual_and_matches_the_llama_norm(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(2)
    residual = (torch.randn(4, 1, 576, generator=g) * 3).to(DEVICE, dtype)
    delta = torch.randn(4, 1, 576, generator=g).to(DEVICE, dtype)
    norm = LlamaRMSNorm(576, eps=1e-5).to(DEVICE, dtype)
    norm.weight.data = (1 + 0.1 * torch.randn(576, generator=g)).to(DEVICE, dtype)
    expected_residual = residual + delta
    with torch.no_grad():
        want = norm(expected_residual)
        got = add_rms_norm(delta, residual, norm.weight, norm.variance_epsilon)
        alone = add_rms_norm(None, residual.clone(), norm.weight, norm.variance_epsilon)
    assert torch.equal(residual, expected_residual)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(alone, want, **tol)
    torch.testing.assert_close(got, add_rms_norm_reference(None, expected_residual, norm.weight, 1e-5), **tol)
