"""When the hand-written Triton kernels run, and the one import of Triton.

On a CUDA tensor with Triton installed the kernels run compiled. With
`TRITON_INTERPRET=1` in the environment (set before the first import, as
tests/conftest.py does on machines without a GPU) Triton interprets them on CPU
tensors, which is how CI checks every kernel against its PyTorch reference.
Everywhere else the reference runs.
"""
from __future__ import annotations

import os

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


def row_block(n: int) -> int:
    """Power-of-two block that holds a whole row of n elements."""
    return 1 << max(4, (n - 1).bit_length())
