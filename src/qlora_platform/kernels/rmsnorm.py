"""RMSNorm (Llama/Mistral/Qwen2 form) forward and backward as Triton kernels.

    y = rms_norm(x, weight, eps)      # weight * (x / rms(x)).to(x.dtype), rms in fp32

One kernel each way instead of PyTorch's six elementwise passes through fp32
copies of the activations. The weight is frozen in QLoRA, so backward returns
the input gradient only (`patch.py` keeps trainable norms on the stock module).
`rms_norm_reference` is the Hugging Face formula, used off-GPU and in tests.
"""
from __future__ import annotations

import torch

from ._triton import row_block, tl, triton, use_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


if triton is not None:
    @triton.jit
    def _rms_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, H, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        x_raw = tl.load(x_ptr + row * H + cols, mask=mask, other=0)
        x = x_raw.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0).to(tl.float32)
        xhat = (x * rstd).to(x_raw.dtype).to(tl.float32)
        tl.store(y_ptr + row * H + cols, (w * xhat).to(x_raw.dtype), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, H, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        dy_raw = tl.load(dy_ptr + row * H + cols, mask=mask, other=0)
        x = tl.load(x_ptr + row * H + cols, mask=mask, other=0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        g = (dy_raw.to(tl.float32) * w).to(dy_raw.dtype).to(tl.float32)
        xhat = x * rstd
        dot = tl.sum(g * xhat, axis=0) / H
        dx = rstd * (g - xhat * dot)
        tl.store(dx_ptr + row * H + cols, dx.to(dy_raw.dtype), mask=mask)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        rows, h = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = row_block(h)
        _rms_fwd[(rows,)](x2, weight, y, rstd, h, eps, BLOCK=block, num_warps=min(16, max(1, block // 256)))
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(-1, x2.shape[-1]).contiguous()
        dx = torch.empty_like(dy2)
        block = row_block(x2.shape[-1])
        _rms_bwd[(x2.shape[0],)](dy2, x2, weight, rstd, dx, x2.shape[-1], BLOCK=block,
                                 num_warps=min(16, max(1, block // 256)))
        return dx.view(dy.shape), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if weight.requires_grad or weight.dtype != x.dtype or not use_triton(x):
        return rms_norm_reference(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps)
