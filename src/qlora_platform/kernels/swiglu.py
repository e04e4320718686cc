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

from ._triton import tl, triton, use_triton

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
    @triton.jit
    def _swiglu_fwd(e_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        e = tl.load(e_ptr + offs, mask=mask, other=0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0)
        silu = (e * tl.sigmoid(e)).to(u.dtype)
        tl.store(h_ptr + offs, (silu.to(tl.float32) * u.to(tl.float32)).to(u.dtype), mask=mask)

    @triton.jit
    def _swiglu_bwd(dh_ptr, e_ptr, u_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dh = tl.load(dh_ptr + offs, mask=mask, other=0).to(tl.float32)
        e = tl.load(e_ptr + offs, mask=mask, other=0).to(tl.float32)
        u_raw = tl.load(u_ptr + offs, mask=mask, other=0)
        u = u_raw.to(tl.float32)
        sig = tl.sigmoid(e)
        silu = e * sig
        h = silu.to(u_raw.dtype).to(tl.float32) * u
        du = dh * silu
        de = dh * u * sig * (1.0 + e * (1.0 - sig))
        tl.store(dh_ptr + offs, h.to(u_raw.dtype), mask=mask)
        tl.store(e_ptr + offs, de.to(u_raw.dtype), mask=mask)
        tl.store(u_ptr + offs, du.to(u_raw.dtype), mask=mask)


def swiglu_forward(e: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    if not use_triton(e):
        return swiglu_forward_reference(e, u)
    e, u = e.contiguous(), u.contiguous()
    h = torch.empty_like(u)
    n = e.numel()
    _swiglu_fwd[(triton.cdiv(n, BLOCK),)](e, u, h, n, BLOCK=BLOCK)
    return h


def swiglu_backward(dh: torch.Tensor, e: torch.Tensor, u: torch.Tensor):
    if not use_triton(e):
        return swiglu_backward_reference(dh, e, u)
    assert dh.is_contiguous() and e.is_contiguous() and u.is_contiguous()
    n = e.numel()
    _swiglu_bwd[(triton.cdiv(n, BLOCK),)](dh, e, u, n, BLOCK=BLOCK)
    return dh, e, u
