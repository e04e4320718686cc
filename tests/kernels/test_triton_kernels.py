"""The Triton kernels against their plain-PyTorch references (interpreted on the CPU in CI)."""

import pytest
import torch

from qlora_platform.kernels import _triton
from qlora_platform.kernels.rmsnorm import rms_norm, rms_norm_reference
from qlora_platform.kernels.swiglu import (
    swiglu_backward,
    swiglu_backward_reference,
    swiglu_forward,
    swiglu_forward_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not _triton.use_triton(torch.empty(0, device=DEVICE)),
    reason="needs triton (CUDA, or TRITON_INTERPRET=1 on the CPU)",
)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_forward_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    e, u = (torch.randn(3, 37, 200, generator=g).to(DEVICE, dtype) * 3 for _ in range(2))
    torch.testing.assert_close(swiglu_forward(e, u), swiglu_forward_reference(e, u), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_backward_matches_autograd_and_works_in_place(dtype):
    g = torch.Generator().manual_seed(1)
    e, u, dh = (torch.randn(5, 333, generator=g).to(DEVICE, dtype) * 2 for _ in range(3))
    e_ref, u_ref = e.float().requires_grad_(), u.float().requires_grad_()
    h_ref = torch.nn.functional.silu(e_ref) * u_ref
    h_ref.backward(dh.float())
    bufs = (dh.clone(), e.clone(), u.clone())
    h, de, du = swiglu_backward(*bufs)
    assert h.data_ptr() == bufs[0].data_ptr() and de.data_ptr() == bufs[1].data_ptr()  # no new buffers
    torch.testing.assert_close(h.float(), h_ref.detach(), **TOL[dtype])
    torch.testing.assert_close(de.float(), e_ref.grad, **TOL[dtype])
    torch.testing.assert_close(du.float(), u_ref.grad, **TOL[dtype])
    ref = swiglu_backward_reference(dh.clone(), e.clone(), u.clone())
    for got, want in zip((h, de, du), ref):
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 100])
def test_rms_norm_forward_and_input_grad_match_reference(dtype, hidden):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 9, hidden, generator=g) * 4).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(DEVICE, dtype)
    dy = torch.randn(2, 9, hidden, generator=g).to(DEVICE, dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = rms_norm(x1, w, 1e-5)
    y_ref = rms_norm_reference(x2, w, 1e-5)
    assert y.grad_fn is not None and "RMSNorm" in type(y.grad_fn).__name__  # the kernel ran
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL[dtype])


def test_rms_norm_with_a_trainable_weight_uses_the_reference():
    x = torch.randn(4, 16, device=DEVICE)
    w = torch.ones(16, device=DEVICE, requires_grad=True)
    rms_norm(x, w, 1e-6).sum().backward()
    assert w.grad is not None


def test_swiglu_runs_on_the_two_halves_of_one_buffer():
    """The fused gate/up output: e and u are row-strided halves of one (T, 2I) buffer."""
    g = torch.Generator().manual_seed(2)
    eu, dh = torch.randn(7, 2 * 48, generator=g).to(DEVICE), torch.randn(7, 48, generator=g).to(DEVICE)
    e, u = eu[:, :48], eu[:, 48:]
    torch.testing.assert_close(swiglu_forward(e, u), swiglu_forward_reference(e, u), **TOL[torch.float32])
    want = swiglu_backward_reference(dh.clone(), e.clone(), u.clone())
    h, de, du = swiglu_backward(dh, e, u)
    assert de.data_ptr() == eu.data_ptr()  # written back into the shared buffer
    for got, ref in zip((h, de, du), want):
        torch.testing.assert_close(got, ref, **TOL[torch.float32])


def test_swiglu_writes_h_with_room_beside_it_for_the_down_fold():
    """extra=8: h is the left block of a buffer 8 columns wider, which padded_buffer hands out
    once (its free columns then hold the fold's); a plain slice of a wider tensor never."""
    g = torch.Generator().manual_seed(3)
    e, u = torch.randn(5, 48, generator=g).to(DEVICE), torch.randn(5, 48, generator=g).to(DEVICE)
    h = swiglu_forward(e, u, extra=8)
    torch.testing.assert_close(h, swiglu_forward_reference(e, u), **TOL[torch.float32])
    assert _triton.padded_buffer(h, 57) is None  # not its width
    assert _triton.padded_buffer(h[:4], 56) is None  # not all its rows
    buf = _triton.padded_buffer(h, 56)
    assert buf is not None and buf.data_ptr() == h.data_ptr() and h.stride() == (56, 1)
    assert _triton.padded_buffer(h, 56) is None  # handed out already
    plain = swiglu_forward(e, u)
    wide = torch.randn(5, 56, generator=g).to(DEVICE)
    assert _triton.padded_buffer(plain, 48) is None and _triton.padded_buffer(wide[:, :48], 56) is None


def test_residual_rms_norm_adds_the_stream_gradient_in_the_kernel():
    """(x, norm(x)) with x going on in the residual stream: x's gradient is the stream's plus the
    norm's, as autograd would add them; dy may be a row-strided view (a folded MLP's dx)."""
    from qlora_platform.kernels.rmsnorm import residual_rms_norm

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 64, generator=g) * 3).to(DEVICE)
    w = (1 + 0.1 * torch.randn(64, generator=g)).to(DEVICE)
    wide = torch.randn(6, 64 + 16, generator=g).to(DEVICE)
    dy, g_stream = wide[:, :64], torch.randn(6, 64, generator=g).to(DEVICE)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    stream, y = residual_rms_norm(x1, w, 1e-5)
    assert "ResidualRMSNorm" in type(y.grad_fn).__name__
    torch.autograd.backward([stream * 1.0, y], [g_stream, dy])
    y_ref = rms_norm_reference(x2, w, 1e-5)
    torch.autograd.backward([x2 * 1.0, y_ref], [g_stream, dy])
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    torch.testing.assert_close(x1.grad, x2.grad, **TOL[torch.float32])
