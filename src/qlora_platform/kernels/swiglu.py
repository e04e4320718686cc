"""SwiGLU, silu(e) * u, forward and an in-place backward, as Triton kernels.

    h = swiglu_forward(e, u)
    h, de, du = swiglu_backward(dh, e, u)   # reuses the buffers of dh, e and u

The backward writes h (needed for the down projection's LoRA gradient) into dh's
buffer and the two input gradients into e's and u's, so the MLP's backward
allocates no new (tokens x intermediate) tensor. Rounding follows PyTorch's bf16
`F.silu(e) * u` exactly in forward: silu in fp32, rounded, then the product
rounded. `*_reference` are the plain-PyTorch versions (used off-GPU and in tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import as_rows, padded_empty, tl, triton, use_triton

BLOCK = 1024


def swiglu_forward_reference(e: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(e) * u


def swiglu_backward_reference(dh, e, u):
    ef = e.float()
    sig = torch.sigmoid(ef)
    silu = ef * sig
    h = silu.to(e.dtype) * u
    du = (dh.float() * silu).to(e.dtype)
    de = (dh.float() * u.float() * sig * (1 + ef * (1 - sig))).to(e.dtype)
    dh.copy_(h), e.copy_(de), u.copy_(du)
    return dh, e, u


if triton is not None:
    # Rows of `cols` values; each operand has its own row stride, so e and u may be the two
    # halves of one fused gate/up output (lora.py).
    @triton.jit
    def _swiglu_fwd(e_ptr, u_ptr, h_ptr, n, cols, lde, ldu, ldh, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        row, col = offs // cols, offs % cols
        e = tl.load(e_ptr + row * lde + col, mask=mask, other=0).to(tl.float32)
        u = tl.load(u_ptr + row * ldu + col, mask=mask, other=0)
        silu = (e * tl.sigmoid(e)).to(u.dtype)
        tl.store(h_ptr + row * ldh + col, (silu.to(tl.float32) * u.to(tl.float32)).to(u.dtype), mask=mask)

    @triton.jit
    def _swiglu_bwd(dh_ptr, e_ptr, u_ptr, n, cols, ldh, lde, ldu, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        row, col = offs // cols, offs % cols
        dh = tl.load(dh_ptr + row * ldh + col, mask=mask, other=0).to(tl.float32)
        e = tl.load(e_ptr + row * lde + col, mask=mask, other=0).to(tl.float32)
        u_raw = tl.load(u_ptr + row * ldu + col, mask=mask, other=0)
        u = u_raw.to(tl.float32)
        sig = tl.sigmoid(e)
        silu = e * sig
        h = silu.to(u_raw.dtype).to(tl.float32) * u
        du = dh * silu
        de = dh * u * sig * (1.0 + e * (1.0 - sig))
        tl.store(dh_ptr + row * ldh + col, h.to(u_raw.dtype), mask=mask)
        tl.store(e_ptr + row * lde + col, de.to(u_raw.dtype), mask=mask)
        tl.store(u_ptr + row * ldu + col, du.to(u_raw.dtype), mask=mask)


def swiglu_forward(e: torch.Tensor, u: torch.Tensor, extra: int = 0) -> torch.Tensor:
    """silu(e) * u; with `extra` > 0 (kernel path) written as the left block of a buffer `extra`
    columns wider, where the down projection's fold puts h A^T (lora.py)."""
    if not use_triton(e):
        return swiglu_forward_reference(e, u)
    e2, u2 = as_rows(e), as_rows(u)
    h = padded_empty(e2.shape[0], e2.shape[1], extra, u)
    n, cols = e2.numel(), e2.shape[1]
    _swiglu_fwd[(triton.cdiv(n, BLOCK),)](e2, u2, h, n, cols, e2.stride(0), u2.stride(0), h.stride(0), BLOCK=BLOCK)
    return h if e.dim() == 2 else h.view(e.shape)


def swiglu_backward(dh: torch.Tensor, e: torch.Tensor, u: torch.Tensor):
    """In place: dh becomes h, e becomes d(e), u becomes d(u). 2-D operands may be row-strided."""
    if not use_triton(e):
        return swiglu_backward_reference(dh, e, u)
    assert all(t.dim() == 2 and t.stride(1) == 1 for t in (dh, e, u)), "2-D row views with unit column stride"
    n, cols = e.numel(), e.shape[1]
    _swiglu_bwd[(triton.cdiv(n, BLOCK),)](dh, e, u, n, cols, dh.stride(0), e.stride(0), u.stride(0), BLOCK=BLOCK)
    return dh, e, u
