"""Rotary position embedding of q and k for training: one Triton kernel each way.

    q, k = rope_qk(q, k, cos, sin)   # q (B, S, Hq, D), k (B, S, Hkv, D), cos/sin (B, S, D)

transformers' `apply_rotary_pos_emb` is ten elementwise kernels a layer (two multiplies,
a negation, a concatenation and an add for each of q and k) and three times that in a
checkpointed training step, a visible share of the step (docs/benchmarks.md). Here forward rotates q and k
in place in the projections' own buffers (nothing is saved: rotation is linear, so
backward needs only cos and sin) and backward rotates the gradients back, both one launch.

Forward rounds as the stock bf16 code does (x*cos and rotate_half(x)*sin each rounded,
then their sum), so the rotated q and k equal transformers' bit for bit. `rope_reference`
is that code, used where the kernel does not run and in tests/kernels/test_rope.py.
"""

from __future__ import annotations

import torch

from ._triton import faithful_triton, rounded, row_block, tl, triton


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb for (B, S, H, D) tensors and (B, S, D) cos/sin."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


if triton is not None:

    @triton.jit
    def _rope(
        x_ptr,
        y_ptr,
        cos_ptr,
        sin_ptr,
        S,
        H,
        sxb,
        sxs,
        sxh,
        syb,
        sys,
        syh,
        scb,
        scs,
        BACKWARD: tl.constexpr,
        D: tl.constexpr,
        H_BLOCK: tl.constexpr,
    ):
        # One program per token: all heads of that token, cos/sin loaded once.
        row = tl.program_id(0).to(tl.int64)
        b, s = row // S, row % S
        heads = tl.arange(0, H_BLOCK)[:, None]
        d = tl.arange(0, D)[None, :]
        half: tl.constexpr = D // 2
        partner = tl.where(d < half, d + half, d - half)
        mask = heads < H
        src = x_ptr + b * sxb + s * sxs + heads * sxh
        x_raw = tl.load(src + d, mask=mask, other=0)
        x = x_raw.to(tl.float32)
        xp = tl.load(src + partner, mask=mask, other=0).to(tl.float32)
        c_row = cos_ptr + b * scb + s * scs
        s_row = sin_ptr + b * scb + s * scs
        cos = tl.load(c_row + d).to(tl.float32)
        if BACKWARD:
            # y = x*cos + rotate_half(x)*sin is linear; its transpose pairs each gradient with
            # its partner's sine: dx[d] = g[d]cos[d] +/- g[p]sin[p] (+ in the first half).
            sin_p = tl.load(s_row + partner).to(tl.float32)
            y = x * cos + tl.where(d < half, xp, -xp) * sin_p
        else:
            sin = tl.load(s_row + d).to(tl.float32)
            a = rounded(x * cos, x_raw.dtype)
            r = rounded(tl.where(d < half, -xp, xp) * sin, x_raw.dtype)
            y = a + r
        tl.store(y_ptr + b * syb + s * sys + heads * syh + d, y.to(x_raw.dtype), mask=mask)


def _launch(x, y, cos, sin, backward: bool) -> None:
    b, s, h, d = x.shape
    _rope[(b * s,)](
        x,
        y,
        cos,
        sin,
        s,
        h,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        y.stride(0),
        y.stride(1),
        y.stride(2),
        cos.stride(0),
        cos.stride(1),
        BACKWARD=backward,
        D=d,
        H_BLOCK=row_block(h),
        num_warps=4,
    )


def _fits(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1


def _kernel_runs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the kernel takes x (either way): a power-of-two head size of at least 16 (its
    tile), contiguous last dimensions, cos and sin laid out alike and in x's dtype."""
    d = x.shape[-1]
    return (
        faithful_triton(x)
        and d >= 16
        and not d & (d - 1)
        and _fits(cos)
        and sin.stride() == cos.stride()
        and cos.dtype == x.dtype
    )


class _RoPE(torch.autograd.Function):
    """One tensor a call: autograd allows an in-place Function on a view only with one output."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        _launch(x, x, cos, sin, backward=False)  # in place: a token's heads are read before written
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        return x

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rope_backward(grad, cos, sin), None, None


def rope_backward(
    grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The gradient before the rotation, from the gradient after it: (B, S, heads, D), contiguous
    or written into `out` (any strides with a contiguous last dimension)."""
    if not _kernel_runs(grad, cos, sin) or (out is not None and not _fits(out)):
        with torch.enable_grad():
            x = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device, requires_grad=True)
            y, _ = rope_reference(x, x[:, :, :0], cos, sin)
            result = torch.autograd.grad(y, x, grad)[0]
            return result.contiguous() if out is None else out.copy_(result)
    grad = grad if _fits(grad) else grad.contiguous()
    out = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device) if out is None else out
    _launch(grad, out, cos.expand(grad.shape[0], -1, -1), sin.expand(grad.shape[0], -1, -1), backward=True)
    return out


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotated (q, k); in place when the kernel runs. q, k: (B, S, heads, D), last dim
    contiguous; cos, sin: (B, S, D) (a broadcast batch dimension is fine)."""
    if not (_kernel_runs(q, cos, sin) and _fits(q) and _fits(k)):
        return rope_reference(q, k, cos, sin)
    cos, sin = cos.expand(q.shape[0], -1, -1), sin.expand(q.shape[0], -1, -1)
    return _RoPE.apply(q, cos, sin), _RoPE.apply(k, cos, sin)
