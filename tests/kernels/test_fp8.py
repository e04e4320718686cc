"""fp8 base products: per-row quantization and the LoRA path through them (CPU: torch's
_scaled_mm; on a GPU the Triton quantizer is checked against the reference too)."""

import pytest
import torch

from qlora_platform.kernels.fp8 import E4M3, Fp8Plan, fp8_matmul, quantize_rows, quantize_rows_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_quantize_rows_scales_each_row_to_the_e4m3_range():
    t = torch.randn(6, 80) * torch.logspace(-3, 3, 6)[:, None]  # rows six decades apart
    q, scale = quantize_rows_reference(t)
    assert q.dtype == E4M3 and scale.shape == (6, 1)
    assert torch.allclose(q.float().abs().amax(1), torch.full((6,), 448.0))
    back = q.float() * scale
    assert ((back - t).abs() <= t.abs() * 2**-4 + scale * 2**-6).all()  # 3 mantissa bits


def test_fp8_matmul_is_close_to_the_bf16_product():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, 256, generator=g).bfloat16().to(DEVICE) for n in (64, 96))
    want = a.float() @ b.float().t()
    got = fp8_matmul(a, b)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).norm() / want.norm() < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton quantizer runs on CUDA only")
def test_triton_quantizer_matches_reference_on_gpu():
    t = (torch.randn(37, 3000, device="cuda") * 5).bfloat16()
    q, s = quantize_rows(t)
    q_ref, s_ref = quantize_rows_reference(t)
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(q.float() * s, q_ref.float() * s_ref, atol=0, rtol=2**-3)


def _proj(out_f, in_f, fp8, seed):
    from qlora_platform.kernels.lora import LoRAProj

    g = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(in_f, out_f, bias=False).bfloat16().requires_grad_(False).to(DEVICE)
    base.weight.data = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).bfloat16().to(DEVICE)
    a = torch.nn.Parameter((torch.randn(8, in_f, generator=g) / in_f**0.5).to(DEVICE))
    b = torch.nn.Parameter((torch.randn(out_f, 8, generator=g) * 0.1).to(DEVICE))
    return LoRAProj(base, a, b, 2.0, None, Fp8Plan(16, input_grad=True) if fp8 else None)


def _run(fn, fp8):
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(9)).bfloat16().to(DEVICE).requires_grad_()
    projs = fn(fp8)
    y = projs[0](x)
    y.float().pow(2).sum().backward()
    return [y.float(), x.grad.float()] + [t.grad for p in projs[1] for t in (p.A, p.B)]


@pytest.mark.parametrize("which", ["linear", "swiglu"])
def test_lora_functions_through_fp8_stay_within_a_few_percent(which):
    from qlora_platform.kernels.lora import lora_linear, lora_swiglu_mlp

    def build(fp8):
        if which == "linear":
            p = _proj(96, 128, fp8, 1)
            return (lambda x: lora_linear(x, p)), [p]
        ps = [_proj(256, 128, fp8, 2), _proj(256, 128, fp8, 3), _proj(128, 256, fp8, 4)]
        return (lambda x: lora_swiglu_mlp(x, *ps)), ps

    for got, want in zip(_run(build, True), _run(build, False)):
        assert (got - want).norm() / want.norm() < 0.06
