"""8-bit float (e4m3) matrix products for the frozen base weights, with per-row scales.

    y = fp8_matmul(a, b)     # a (M, K) @ b (N, K)^T in a's dtype; each row of a and b scaled
                             # so its largest magnitude lands on e4m3's 448, then one
                             # torch._scaled_mm on the fp8 tensor cores (H100, RTX 40)

Why: at large batches the base weights' matrix products are most of a QLoRA step
(profiles: docs/benchmarks.md), and fp8 tensor cores run them at up to twice the bf16
rate. The base weights are already 4-bit NF4 and frozen; only their
products (forward, recomputed forward and the input gradient) go through fp8, while
the LoRA adapters, their gradients, norms, attention and the loss stay in 16/32 bit.
Per-row scaling (one scale per token and per output channel) keeps an outlier token or
channel from flattening the others. `quantize_rows` is one Triton kernel per tensor
(two passes over each row: its absolute maximum, then the scaled cast);
`quantize_rows_reference` is the PyTorch version. The loss-parity test
(tests/kernels/test_fast_path_gpu.py) checks the training loss against bf16 PEFT.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ._triton import tl, triton, use_triton


@dataclass(frozen=True)
class Fp8Plan:
    min_tokens: int  # batches with fewer tokens stay 16-bit
    input_grad: bool = False  # the input gradient's product (g W)
    forward: bool = True  # the forward (and recomputed forward) products


E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 1024


def quantize_rows_reference(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (t.float() / scale).to(E4M3), scale


if triton is not None:

    @triton.jit
    def _quantize_rows(x_ptr, q_ptr, s_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = row * n_cols
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + base + cols, mask=cols < n_cols, other=0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / 448.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(x_ptr + base + cols, mask=mask, other=0).to(tl.float32)
            tl.store(q_ptr + base + cols, (x / scale).to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr + row, scale)


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 tensor, fp32 scale per row of shape (rows, 1)) with t ~= q * scale."""
    if not (use_triton(t) and t.is_cuda):  # the interpreter has no fp8 type
        return quantize_rows_reference(t)
    t = t.contiguous()
    q = torch.empty(t.shape, dtype=E4M3, device=t.device)
    scale = torch.empty(t.shape[0], 1, dtype=torch.float32, device=t.device)
    _quantize_rows[(t.shape[0],)](t, q, scale, t.shape[1], BLOCK=BLOCK)
    return q, scale


def fp8_matmul(a: torch.Tensor, b: torch.Tensor, a_quantized=None) -> torch.Tensor:
    """a @ b.T through e4m3 with per-row scales of a and of b; `a_quantized` reuses a's."""
    aq, sa = a_quantized or quantize_rows(a)
    bq, sb = quantize_rows(b)
    return torch._scaled_mm(aq, bq.t(), scale_a=sa, scale_b=sb.t(), out_dtype=a.dtype)


@functools.cache
def device_has_fp8(index: int) -> bool:
    """fp8 tensor cores: compute capability 8.9 (RTX 40, L4) or newer."""
    return torch.cuda.get_device_capability(index) >= (8, 9)


def fp8_fits(a: torch.Tensor, b: torch.Tensor, min_rows: int) -> bool:
    """Whether a @ b.T should go through fp8: not on a GPU without fp8, enough rows (tokens)
    for the tensor cores to win over the quantization passes, and the widths _scaled_mm
    needs. (The CPU runs _scaled_mm too, slowly: that is how CI tests this path.)"""
    if a.is_cuda and not device_has_fp8(a.device.index or 0):
        return False
    return a.shape[0] >= min_rows and a.shape[1] % 16 == 0 and b.shape[0] % 16 == 0
