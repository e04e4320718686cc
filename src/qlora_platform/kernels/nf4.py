"""NF4 dequantization of a bitsandbytes 4-bit weight in one Triton kernel.

    w = dequantize_nf4(weight.data, weight.quant_state)   # (out, in) in the compute dtype

bitsandbytes dequantizes a double-quantized weight in two kernels (the 8-bit block
scales first, then the weight) behind several custom-op dispatches. A 7B step
dequantizes hundreds of times, and on small batches that bookkeeping is host time on
a step the host already bounds (docs/benchmarks.md). Here each output value reads its packed byte
(high nibble first, as bitsandbytes packs), the NF4 code, its block's 8-bit scale
and that scale's own fp32 scale, in one launch. Anything else (fp4, non-uint8
storage, a single-quantized weight on the CPU) goes to `dequantize_nf4_reference`,
which is bitsandbytes itself.
"""

from __future__ import annotations

import torch

from ._triton import tl, triton, use_triton

BLOCK = 2048


def dequantize_nf4_reference(packed: torch.Tensor, state) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(packed, state)


if triton is not None:

    @triton.jit
    def _dequant_nf4(
        packed_ptr,
        code_ptr,
        absmax_ptr,
        code2_ptr,
        absmax2_ptr,
        offset_ptr,
        out_ptr,
        n,
        cols,
        ld,
        QBLOCK: tl.constexpr,
        QBLOCK2: tl.constexpr,
        NESTED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
        nibble = tl.where(offs % 2 == 0, byte >> 4, byte & 15)
        value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
        block = offs // QBLOCK
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q, mask=mask, other=0.0) * tl.load(
                absmax2_ptr + block // QBLOCK2, mask=mask, other=0.0
            )
            scale += tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        dest = offs if ld == cols else (offs // cols) * ld + offs % cols  # rows of `ld` (a wider buffer)
        tl.store(out_ptr + dest, (value * scale).to(out_ptr.dtype.element_ty), mask=mask)


def _supported(packed: torch.Tensor, state) -> bool:
    nested = bool(getattr(state, "nested", False))
    return (
        state.quant_type == "nf4"
        and packed.dtype == torch.uint8
        and use_triton(packed)
        and (not nested or torch.is_tensor(state.offset))
    )


def dequantize_nf4(packed: torch.Tensor, state, out: torch.Tensor | None = None) -> torch.Tensor:
    """The (out, in) weight in the compute dtype; into `out` when given (rows may be strided,
    e.g. the left block of a wider buffer)."""
    if not _supported(packed, state):
        w = dequantize_nf4_reference(packed, state)
        return w if out is None else out.copy_(w)
    if out is None:
        out = torch.empty(state.shape, dtype=state.dtype, device=packed.device)
    assert tuple(out.shape) == tuple(state.shape) and out.stride(1) == 1 and out.dtype == state.dtype
    n = out.numel()
    nested = bool(state.nested)
    absmax = state.absmax
    code2 = state.state2.code if nested else absmax
    absmax2 = state.state2.absmax if nested else absmax
    offset = state.offset if nested else absmax
    _dequant_nf4[(triton.cdiv(n, BLOCK),)](
        packed,
        state.code,
        absmax,
        code2,
        absmax2,
        offset,
        out,
        n,
        out.shape[1],
        out.stride(0),
        QBLOCK=state.blocksize,
        QBLOCK2=state.state2.blocksize if nested else 1,
        NESTED=nested,
        BLOCK=BLOCK,
    )
    return out
