"""The one-kernel NF4 dequantization against bitsandbytes' own (interpreted on the CPU in CI)."""

import pytest
import torch

from qlora_platform.kernels import _triton
from qlora_platform.kernels.nf4 import dequantize_nf4, dequantize_nf4_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(not _triton.use_triton(torch.empty(0, device=DEVICE)), reason="needs triton")
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_bitsandbytes(nested, dtype):
    import bitsandbytes.functional as bnbf

    w = torch.randn(96, 320, generator=torch.Generator().manual_seed(0)).to(DEVICE, dtype)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    got = dequantize_nf4(packed, state)
    want = dequantize_nf4_reference(packed, state)
    assert got.shape == want.shape == w.shape and got.dtype == want.dtype == dtype
    # fp32 product, one rounding; bitsandbytes' CPU path may round in bf16 first: one bf16 step apart.
    tol = 2**-7 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(got, want, atol=1e-6, rtol=tol)
    assert (got.float() - w.float()).abs().max() < 0.25 * w.abs().max()  # it is w, 4-bit


@pytest.mark.skipif(not _triton.use_triton(torch.empty(0, device=DEVICE)), reason="needs triton")
def test_dequantizes_into_the_left_block_of_a_wider_buffer():
    import bitsandbytes.functional as bnbf

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.float32)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    wide = torch.full((64, 128 + 32), 7.0, device=DEVICE)
    dequantize_nf4(packed, state, wide[:, :128])
    torch.testing.assert_close(wide[:, :128], dequantize_nf4(packed, state))
    assert (wide[:, 128:] == 7.0).all()  # the columns beside it are untouched
