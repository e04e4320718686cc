"""Triton kernels for the one-token decode step (infer/fast_decode.py), each with its reference.

    y = add_rms_norm(delta, residual, weight, eps)   # residual += delta in place; y = norm(residual)
    q = rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, columns)   # k, v into each row's column
    out = decode_attention(q, k_cache, v_cache, mask, columns, scale)  # one query per row, GQA

Why: a 7B decode step at batch 1 reads its weights in a few milliseconds, but the stock
Llama layer adds some 45 kernels (RMSNorm alone is seven elementwise passes, rotary ten,
repeat_kv copies the cache for grouped-query attention), and inside a CUDA graph each still
costs a few microseconds: about 4 ms a token. These three kernels cut a layer to about a
dozen launches. Rounding follows PyTorch's bf16 ops where that is cheap (the residual add,
RoPE's three rounded steps, RMSNorm's rounding before the weight), so the decoded tokens
stay those of the stock forward. The attention kernel reads only each row's columns up to its
own length, so a cache sized for long requests costs nothing for short ones.
`*_reference` are plain PyTorch (used off-GPU and in tests/kernels/test_decode_kernels.py).
"""

from __future__ import annotations

import torch

from ._triton import faithful_triton, rounded, row_block, tl, triton
from .rmsnorm import rms_norm_reference


# -- references -------------------------------------------------------------------------------
def add_rms_norm_reference(delta, residual, weight, eps):
    if delta is not None:
        residual.add_(delta)
    return rms_norm_reference(residual, weight, eps)


def rope_write_kv_reference(q, k, v, cos, sin, k_cache, v_cache, columns):
    """q (B, Hq, D), k and v (B, Hkv, D), cos/sin (B, D); caches (B, Hkv, T, D); columns (B,)."""

    def rope(x):
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos[:, None] + rotated * sin[:, None]

    rows = torch.arange(q.shape[0], device=q.device)
    k_cache[rows, :, columns] = rope(k)
    v_cache[rows, :, columns] = v
    return rope(q)


def decode_attention_reference(q, k_cache, v_cache, mask, columns, scale):
    """q (B, Hq, D) attends to columns 0..columns[b] of its row where mask is 1."""
    b, hq, d = q.shape
    hkv, t = k_cache.shape[1], k_cache.shape[2]
    keys = k_cache.repeat_interleave(hq // hkv, dim=1).float()
    values = v_cache.repeat_interleave(hq // hkv, dim=1).float()
    scores = torch.einsum("bhd,bhtd->bht", q.float(), keys) * scale
    seen = (mask != 0) & (torch.arange(t, device=q.device)[None] <= columns[:, None])
    scores = scores.masked_fill(~seen[:, None], float("-inf"))
    return torch.einsum("bht,bhtd->bhd", scores.softmax(-1), values).to(q.dtype)


# -- kernels ----------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _add_rms(d_ptr, r_ptr, w_ptr, y_ptr, H, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        x = tl.load(r_ptr + row * H + cols, mask=mask, other=0)
        if HAS_DELTA:  # the residual add, rounded as PyTorch's bf16 add is
            x = (x.to(tl.float32) + tl.load(d_ptr + row * H + cols, mask=mask, other=0).to(tl.float32)).to(x.dtype)
            tl.store(r_ptr + row * H + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / H + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0).to(tl.float32)
        xhat = rounded(xf * rstd, x.dtype)
        tl.store(y_ptr + row * H + cols, (w * xhat).to(x.dtype), mask=mask)

    @triton.jit
    def _rope_write(
        q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr, col_ptr, Hq, Hkv, T, D: tl.constexpr
    ):
        # One program per (row, head) over q's heads, then k's, then v's.
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        d = tl.arange(0, D)
        half: tl.constexpr = D // 2
        col = tl.load(col_ptr + b)
        if h < Hq:
            src = q_ptr + (b * Hq + h) * D
            dst = qo_ptr + (b * Hq + h) * D
        elif h < Hq + Hkv:
            src = k_ptr + (b * Hkv + h - Hq) * D
            dst = kc_ptr + ((b * Hkv + h - Hq) * T + col) * D
        else:
            src = v_ptr + (b * Hkv + h - Hq - Hkv) * D
            dst = vc_ptr + ((b * Hkv + h - Hq - Hkv) * T + col) * D
        x = tl.load(src + d)
        if h < Hq + Hkv:
            # x*cos + rotate_half(x)*sin with PyTorch's three bf16 roundings.
            partner = tl.load(src + tl.where(d < half, d + half, d - half)).to(tl.float32)
            partner = tl.where(d < half, -partner, partner)
            cos = tl.load(cos_ptr + b * D + d).to(tl.float32)
            sin = tl.load(sin_ptr + b * D + d).to(tl.float32)
            a = rounded(x.to(tl.float32) * cos, x.dtype)
            r = rounded(partner * sin, x.dtype)
            x = (a + r).to(x.dtype)
        tl.store(dst + d, x)

    @triton.jit
    def _decode_attn(
        q_ptr,
        k_ptr,
        v_ptr,
        mask_ptr,
        col_ptr,
        out_ptr,
        scale,
        Hkv,
        T,
        G,
        D: tl.constexpr,
        G_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # One program per (row, kv head): its G query heads (padded to a dot-product tile) run
        # an online softmax over the row's columns 0..columns[b], block by block.
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        heads = kvh * G + g
        q_rows = (b * Hkv * G + heads)[:, None] * D + d[None, :]
        q = tl.load(q_ptr + q_rows, mask=(g < G)[:, None], other=0)
        n = tl.load(col_ptr + b) + 1
        base = (b * Hkv + kvh) * T * D
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        for start in range(0, n, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            inside = cols < n
            seen = inside & (tl.load(mask_ptr + b * T + cols, mask=inside, other=0) != 0)
            k = tl.load(k_ptr + base + cols[:, None] * D + d[None, :], mask=inside[:, None], other=0)
            if IEEE:  # noqa: SIM108 - a constexpr branch: Triton compiles only the side taken
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(seen[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with nothing seen yet
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + base + cols[:, None] * D + d[None, :], mask=inside[:, None], other=0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + q_rows, out.to(q.dtype), mask=(g < G)[:, None])


def add_rms_norm(delta, residual, weight, eps):
    """residual (B, H) += delta (in place, if given); returns RMSNorm(residual) * weight."""
    if not faithful_triton(residual) or weight.dtype != residual.dtype:
        return add_rms_norm_reference(delta, residual, weight, eps)
    h = residual.shape[-1]
    y = torch.empty_like(residual)
    block = row_block(h)
    _add_rms[(residual.numel() // h,)](
        delta if delta is not None else residual,
        residual,
        weight,
        y,
        h,
        eps,
        HAS_DELTA=delta is not None,
        BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )
    return y


def rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, columns):
    """Rotate q and k (B, heads, D) by cos/sin (B, D); write k and v at each row's column of
    the caches (B, Hkv, T, D); return the rotated q."""
    if not faithful_triton(q):
        return rope_write_kv_reference(q, k, v, cos, sin, k_cache, v_cache, columns)
    b, hq, d = q.shape
    hkv, t = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    _rope_write[(b, hq + 2 * hkv)](q, k, v, cos, sin, out, k_cache, v_cache, columns, hq, hkv, t, D=d)
    return out


def decode_attention(q, k_cache, v_cache, mask, columns, scale):
    """Attention of one query per row (B, Hq, D) over the cache; see the module docstring."""
    if not faithful_triton(q):
        return decode_attention_reference(q, k_cache, v_cache, mask, columns, scale)
    b, hq, d = q.shape
    hkv, t = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    out = torch.empty_like(q)
    _decode_attn[(b, hkv)](
        q,
        k_cache,
        v_cache,
        mask,
        columns,
        out,
        scale,
        hkv,
        t,
        group,
        D=d,
        G_PAD=max(16, row_block(group)),
        BLOCK_N=64,
        IEEE=q.dtype == torch.float32,
        num_warps=4,
    )
    return out


def decode_kernels_fit(head_dim: int) -> bool:
    """The kernels need a power-of-two head size of at least 16 (tile shapes)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0
