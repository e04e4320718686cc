"""When the hand-written Triton kernels run, and the one import of Triton.

On a CUDA tensor with Triton installed the kernels run compiled. With
`TRITON_INTERPRET=1` in the environment (set before the first import, as
tests/conftest.py does on machines without a GPU) Triton interprets them on CPU
tensors, which is how CI checks every kernel against its PyTorch reference.
Everywhere else the reference runs.
"""

from __future__ import annotations

import os
import weakref

import torch

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # CPU installs without triton
    triton = tl = None
    HAVE_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t) -> bool:
    return HAVE_TRITON and (t.is_cuda or INTERPRET)


def faithful_triton(t) -> bool:
    """Run a kernel whose rounding must match PyTorch's: compiled on the GPU, but interpreted only
    in fp32 (Triton's CPU interpreter rounds to bf16 by truncation and mis-computes bf16 dots)."""
    return use_triton(t) and (t.is_cuda or t.dtype == torch.float32)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, last dim) with a unit column stride; a copy only when it has no such view
    (a row-strided view, e.g. the left block of a wider buffer, stays a view)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(1) == 1 else t2.contiguous()


# Outputs written as the left block of a wider buffer, by the buffer's address: lora.py's
# folded projections write their x A^T columns beside such an x (the normed x of rmsnorm.py,
# the h of swiglu.py) instead of copying x into a buffer of their own.
_PADDED: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def padded_empty(rows: int, cols: int, extra: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised (rows, cols) tensor in like's dtype and device; with `extra` > 0 the left
    block of a (rows, cols + extra) buffer that `padded_buffer` finds."""
    buf = torch.empty((rows, cols + extra), dtype=like.dtype, device=like.device)
    if extra:
        _PADDED[buf.data_ptr()] = buf
    return buf[:, :cols]


def padded_buffer(x2: torch.Tensor, width: int) -> torch.Tensor | None:
    """The (rows, width) buffer x2 (rows, cols) was written into as its left block, if it was."""
    buf = _PADDED.get(x2.data_ptr())
    if buf is None or tuple(buf.shape) != (x2.shape[0], width) or x2.stride() != (width, 1):
        return None
    return buf


def row_block(n: int) -> int:
    """Power-of-two block that holds a whole row of n elements."""
    return 1 << max(4, (n - 1).bit_length())


if triton is not None:

    @triton.jit
    def rounded(x, dtype: tl.constexpr):
        """fp32 x rounded to `dtype` and back, as a PyTorch op in that dtype rounds its result.
        For bf16 the rounding (to nearest, ties to even) is done on the bits: a plain cast pair
        may be folded away by the compiler, which then fuses products and sums into FMAs."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            return bits.to(tl.float32, bitcast=True)
        else:
            return x.to(dtype).to(tl.float32)
