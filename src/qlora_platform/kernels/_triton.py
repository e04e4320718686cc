"""When the hand-written Triton kernels run, and the one import of Triton.

On a CUDA tensor with Triton installed the kernels run compiled. With
`TRITON_INTERPRET=1` in the environment (set before the first import, as
tests/conftest.py does on machines without a GPU) Triton interprets them on CPU
tensors, which is how CI checks every kernel against its PyTorch reference.
Everywhere else the reference runs.
"""

from __future__ import annotations

import os

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


# A producer that leaves free columns beside its output (the normed x of rmsnorm.py, the h of
# swiglu.py) marks its wider buffer with this attribute, the index of the first free column:
# lora.py's folded projections then write their x A^T columns there instead of copying x into a
# buffer of their own. The mark lives on the buffer, so only buffers made as scratch carry it.
_FREE_FROM = "_qlora_free_columns_from"


def padded_empty(rows: int, cols: int, extra: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised (rows, cols) tensor in like's dtype and device; with `extra` > 0 the left
    block of a (rows, cols + extra) buffer whose free right block `padded_buffer` hands out."""
    buf = torch.empty((rows, cols + extra), dtype=like.dtype, device=like.device)
    if not extra:
        return buf
    setattr(buf, _FREE_FROM, cols)
    return buf[:, :cols]


def padded_buffer(x2: torch.Tensor, width: int) -> torch.Tensor | None:
    """The (rows, width) buffer that `padded_empty` made with x2 (rows, cols) as its left block;
    None for any other tensor (a slice of a wider tensor that holds data among them). The buffer
    is handed out once: after that its right block holds the caller's columns, not free room."""
    buf = x2._base
    if (
        buf is None
        or getattr(buf, _FREE_FROM, None) != x2.shape[1]
        or tuple(buf.shape) != (x2.shape[0], width)
        or buf.data_ptr() != x2.data_ptr()
        or x2.stride() != (width, 1)
    ):
        return None
    delattr(buf, _FREE_FROM)
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
