"""RMSNorm (Llama/Mistral/Qwen2 form) forward and backward as Triton kernels.

    y = rms_norm(x, weight, eps)      # weight * (x / rms(x)).to(x.dtype), rms in fp32
    x, y = residual_rms_norm(x, weight, eps)   # x also goes on in the residual stream

One kernel each way instead of PyTorch's six elementwise passes through fp32
copies of the activations. The weight is frozen in QLoRA, so backward returns
the input gradient only (`patch.py` keeps trainable norms on the stock module).
`rms_norm_reference` is the Hugging Face formula, used off-GPU and in tests.
"""

from __future__ import annotations

import torch

from ._triton import as_rows, padded_empty, row_block, tl, triton, use_triton

# RMSNorms computing weight * (x * rsqrt(mean(x^2) + eps)).to(dtype) (Gemma's 1 + weight is not this).
RMSNORM_CLASSES = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"}


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


if triton is not None:

    @triton.jit
    def _rms_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, H, eps, ldx, ldy, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        x_raw = tl.load(x_ptr + row * ldx + cols, mask=mask, other=0)
        x = x_raw.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0).to(tl.float32)
        xhat = (x * rstd).to(x_raw.dtype).to(tl.float32)
        tl.store(y_ptr + row * ldy + cols, (w * xhat).to(x_raw.dtype), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_bwd(
        dy_ptr,
        x_ptr,
        w_ptr,
        rstd_ptr,
        dx_ptr,
        res_ptr,
        H,
        lddy,
        ldx,
        lddx,
        ldres,
        HAS_RES: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        dy_raw = tl.load(dy_ptr + row * lddy + cols, mask=mask, other=0)
        x = tl.load(x_ptr + row * ldx + cols, mask=mask, other=0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        g = (dy_raw.to(tl.float32) * w).to(dy_raw.dtype).to(tl.float32)
        xhat = x * rstd
        dot = tl.sum(g * xhat, axis=0) / H
        dx = (rstd * (g - xhat * dot)).to(dy_raw.dtype)
        if HAS_RES:  # the residual stream's own gradient, added as PyTorch would add it
            dx = dx.to(tl.float32) + tl.load(res_ptr + row * ldres + cols, mask=mask, other=0).to(tl.float32)
        tl.store(dx_ptr + row * lddx + cols, dx.to(dy_raw.dtype), mask=mask)


def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float, extra: int = 0):
    x2 = as_rows(x)
    rows, h = x2.shape
    y = padded_empty(rows, h, extra, x)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    block = row_block(h)
    _rms_fwd[(rows,)](
        x2, weight, y, rstd, h, eps, x2.stride(0), y.stride(0), BLOCK=block, num_warps=min(16, max(1, block // 256))
    )
    return x2, y, rstd


def _backward(dy: torch.Tensor, x2, weight, rstd, residual: torch.Tensor | None = None) -> torch.Tensor:
    """dx of the norm (dy may be row-strided), plus `residual` when given, in one kernel."""
    dy2 = as_rows(dy)
    res = as_rows(residual) if residual is not None else dy2
    dx = torch.empty(x2.shape, dtype=dy.dtype, device=dy.device)
    block = row_block(x2.shape[-1])
    _rms_bwd[(x2.shape[0],)](
        dy2,
        x2,
        weight,
        rstd,
        dx,
        res,
        x2.shape[-1],
        dy2.stride(0),
        x2.stride(0),
        dx.stride(0),
        res.stride(0),
        HAS_RES=residual is not None,
        BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )
    return dx


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, extra):
        x2, y, rstd = _forward(x, weight, eps, extra)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        return _backward(dy, x2, weight, rstd).view(dy.shape), None, None, None


class _ResidualRMSNorm(torch.autograd.Function):
    """(x, norm(x)) for a residual stream x that also feeds a norm: backward adds the stream's
    gradient to the norm's input gradient inside the norm's kernel instead of autograd adding
    the two afterwards (one pass over the activations less per norm)."""

    @staticmethod
    def forward(ctx, x, weight, eps, extra):
        x2, y, rstd = _forward(x, weight, eps, extra)
        ctx.save_for_backward(x2, weight, rstd)
        return x.view_as(x), y.view(x.shape)

    @staticmethod
    def backward(ctx, g_stream, dy):
        if dy is None:
            return g_stream, None, None, None
        x2, weight, rstd = ctx.saved_tensors
        return _backward(dy, x2, weight, rstd, g_stream).view(dy.shape), None, None, None


def _kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return not weight.requires_grad and weight.dtype == x.dtype and use_triton(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, extra: int = 0) -> torch.Tensor:
    """With `extra` > 0 (kernel path) the output is the left block of a buffer `extra` columns
    wider (`_triton.padded_buffer` finds it)."""
    if not _kernel_applies(x, weight):
        return rms_norm_reference(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps, extra)


def residual_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, extra: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, rms_norm(x)) where x goes on in the residual stream too; see `_ResidualRMSNorm`."""
    if not _kernel_applies(x, weight) or not torch.is_grad_enabled():
        return x, rms_norm(x, weight, eps, extra)
    return _ResidualRMSNorm.apply(x, weight, eps, extra)
