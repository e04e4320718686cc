"""kernels/lora.py: gate and up folded into one GEMM give the unfolded MLP's output and gradients."""

import pytest
import torch

from qlora_platform.kernels import lora
from qlora_platform.kernels.lora import LoRAProj, lora_swiglu_mlp


def _projs(hidden=64, inter=96, rank=8, seed=0):
    g = torch.Generator().manual_seed(seed)

    def proj(n_in, n_out, scaling):
        base = torch.nn.Linear(n_in, n_out, bias=False)
        base.weight.data = torch.randn(n_out, n_in, generator=g) / n_in**0.5
        base.weight.requires_grad_(False)
        A = torch.nn.Parameter(torch.randn(rank, n_in, generator=g) / n_in**0.5)
        B = torch.nn.Parameter(torch.randn(n_out, rank, generator=g) / rank)
        return LoRAProj(base, A, B, scaling, None)

    return proj(hidden, inter, 2.0), proj(hidden, inter, 0.5), proj(inter, hidden, 1.0)


@pytest.mark.parametrize("output", [True, False])
def test_folded_gate_up_gives_the_unfolded_output_and_gradients(monkeypatch, output):
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    g = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    results = _both_ways(monkeypatch, x, g, output, lambda: _projs())
    (y_f, dx_f, g_f), (y_u, dx_u, g_u) = results
    if output:
        torch.testing.assert_close(y_f, y_u, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx_f, dx_u, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_f, g_u):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_folded_gate_up_in_bf16_on_the_gpu_is_as_close_as_bf16_allows(monkeypatch):
    """At a realistic width the fold's one rounding (instead of two) stays within bf16 noise."""

    def projs():
        ps = _projs(hidden=512, inter=1024, rank=16, seed=4)
        for p in ps:
            p.base.to("cuda", torch.bfloat16)
            p.A.data, p.B.data = p.A.data.cuda(), p.B.data.cuda()
        return ps

    x = torch.randn(4, 256, 512, generator=torch.Generator().manual_seed(1)).cuda().bfloat16()
    g = torch.randn(4, 256, 512, generator=torch.Generator().manual_seed(2)).cuda().bfloat16()
    (y_f, dx_f, g_f), (y_u, dx_u, g_u) = _both_ways(monkeypatch, x, g, True, projs)
    for a, b in [(y_f, y_u), (dx_f, dx_u), *zip(g_f, g_u)]:
        assert (a.float() - b.float()).norm() < 1e-2 * b.float().norm()


def _both_ways(monkeypatch, x, g, output, make_projs):
    """(output, input grad, adapter grads) folded, then unfolded."""
    results = []
    for fold in (True, False):
        projs = make_projs()
        monkeypatch.setattr(lora, "_foldable", lambda x2, ps, fold=fold: fold)
        xi = x.clone().requires_grad_(True)
        y = lora_swiglu_mlp(xi, *projs, output=output)
        y.backward(g)
        grads = [t.grad for p in projs for t in (p.A, p.B)]
        results.append((y.detach() if output else None, xi.grad, grads))
    return results


def test_small_batches_fp8_plans_and_biases_keep_the_unfolded_path():
    gate, up, _ = _projs()
    x2 = torch.randn(64, 64)
    assert lora._foldable(x2, (gate, up))
    assert not lora._foldable(x2[:63], (gate, up))  # fewer tokens than features
    gate.bias = torch.zeros(96)
    assert not lora._foldable(x2, (gate, up))
    assert not lora._foldable(x2.to(torch.bfloat16), (up, up))  # compute dtype differs from x


@pytest.mark.parametrize("fold", [True, False])
def test_a_residual_gets_its_gradient(monkeypatch, fold):
    """lora_linear / lora_swiglu_mlp with residual=r equal the product plus r, gradients included,
    with r added inside the folded GEMM and after the unfolded one."""
    from qlora_platform.kernels.lora import lora_linear

    monkeypatch.setattr(lora, "_foldable", lambda x2, ps: fold)
    gate, up, down = _projs()
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    r = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(4))
    g = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(5))
    for fn in (
        lambda x, res=None: lora_swiglu_mlp(x, gate, up, down, residual=res),
        lambda x, res=None: lora_linear(torch.nn.functional.pad(x, (0, 32)), down, residual=res),
    ):
        got, want = [], []
        for fused, out in ((True, got), (False, want)):
            xi, ri = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
            y = fn(xi, ri) if fused else fn(xi) + ri
            y.backward(g)
            out += [y.detach(), xi.grad, ri.grad, down.A.grad.clone(), down.B.grad.clone()]
            down.A.grad = down.B.grad = None
            for p in (gate, up):
                p.A.grad = p.B.grad = None
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fold", [True, False])
def test_a_young_adapters_small_output_survives_the_residual_in_bf16(monkeypatch, fold):
    """A LoRA half far below a bf16 step of the residual stream (the first steps of training)
    still moves the output on average: it is never added to an already rounded r + x W^T,
    where it would round away (an 11-step run at the 7B shape learnt 4% slower for that)."""
    from qlora_platform.kernels.lora import lora_linear

    monkeypatch.setattr(lora, "_foldable", lambda x2, ps: fold)
    g = torch.Generator().manual_seed(7)
    base = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    base.weight.data = (torch.randn(64, 64, generator=g) / 8).bfloat16()
    base.weight.requires_grad_(False)
    A = torch.rand(8, 64, generator=g) / 8  # x A^T > 0, so the delta has one sign
    x = torch.rand(4096, 64, generator=g).bfloat16()
    r = (8 * torch.randn(4096, 64, generator=g)).bfloat16()  # a bf16 step of r: about 0.03
    delta = {}
    for b in (1e-4, 0.0):
        proj = LoRAProj(base, A, torch.full((64, 8), b), 2.0, None)
        delta[b] = lora_linear(x, proj, residual=r).double()
    want = 2.0 * (x.double() @ A.bfloat16().double().t()).sum(1).mean() * 1e-4  # mean LoRA half
    moved = (delta[1e-4] - delta[0.0]).mean(1).mean()
    assert moved > 0.5 * want, f"the adapter moved the output by {moved:.2e} on average, not {want:.2e}"
