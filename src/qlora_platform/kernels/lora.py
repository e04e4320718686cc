"""LoRA on frozen (4-bit) linear layers as hand-written autograd functions.

    y = lora_linear(x, proj)                    # one projection (o_proj)
    q, k, v = lora_projections(x, [q, k, v])    # several sharing one input (QKV)
    y = lora_swiglu_mlp(x, gate, up, down)      # down(silu(gate(x)) * up(x))

`proj` is a `LoRAProj` built from a PEFT LoRA layer (`LoRAProj.of(layer)`). What
this buys over PEFT + bitsandbytes' own autograd, measured on an H100 with the
Mistral-7B shape (benchmarks/profile_train_step.py):
- the input is never copied: PEFT clones the base output and casts the input to
  fp32 for fp32 LoRA weights (a 2x copy per projection, kept for backward);
- LoRA products run in the compute dtype, added into the base output in place;
- the dequantized weight is never kept: dequantized again in backward (cheap next
  to the matmul), so memory holds only the 4-bit copy;
- projections that share an input accumulate their input gradient into one buffer;
- the MLP keeps gate and up outputs only and rebuilds silu(g) * u in backward.

Gradients for A and B come out in the compute dtype; autograd casts them to the
fp32 master weights. Works on any device bitsandbytes runs on (CPU included).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .swiglu import swiglu_backward, swiglu_forward


@dataclass
class LoRAProj:
    base: torch.nn.Module          # bnb Linear4bit or nn.Linear, frozen
    A: torch.Tensor                # (r, in)  fp32 master
    B: torch.Tensor                # (out, r) fp32 master
    scaling: float
    bias: torch.Tensor | None

    @classmethod
    def of(cls, layer, adapter: str = "default") -> "LoRAProj":
        base = layer.get_base_layer()
        return cls(base, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight,
                   float(layer.scaling[adapter]), base.bias)


def base_weight(base: torch.nn.Module) -> torch.Tensor:
    """The frozen weight (out, in) in the compute dtype: dequantized when 4-bit."""
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight
    import bitsandbytes.functional as bnbf
    return bnbf.dequantize_4bit(weight.data, state)


def _forward(x2: torch.Tensor, p: LoRAProj) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x W^T + s (x A^T) B^T (+ bias), and x A^T kept for backward."""
    w = base_weight(p.base)
    y = x2 @ w.t()
    del w
    xa = x2 @ p.A.to(x2.dtype).t()
    y.addmm_(xa, p.B.to(x2.dtype).t(), alpha=p.scaling)
    if p.bias is not None:
        y += p.bias.to(y.dtype)
    return y, xa


def _backward(g2: torch.Tensor, x2: torch.Tensor, xa: torch.Tensor, p: LoRAProj,
              dx: torch.Tensor | None, need_dx: bool):
    """LoRA grads (dA, dB) and the input grad added into dx (allocated when None)."""
    a, b = p.A.to(g2.dtype), p.B.to(g2.dtype)
    gb = g2 @ b                                   # (T, r)
    da = (gb.t() @ x2).mul_(p.scaling) if p.A.requires_grad else None
    db = (g2.t() @ xa).mul_(p.scaling) if p.B.requires_grad else None
    if need_dx:
        w = base_weight(p.base)
        if dx is None:
            dx = g2 @ w
        else:
            dx.addmm_(g2, w)
        del w
        dx.addmm_(gb, a, alpha=p.scaling)
    return dx, da, db


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _as_compute(x2: torch.Tensor, p: LoRAProj) -> torch.Tensor:
    """The input in the base layer's compute dtype (a copy only when they differ)."""
    state = getattr(p.base.weight, "quant_state", None)
    dtype = state.dtype if state is not None else p.base.weight.dtype
    return x2 if x2.dtype == dtype else x2.to(dtype)


class _LoRAProjections(torch.autograd.Function):
    """n projections of one input; args: x, then (A, B) of each so autograd tracks them."""

    @staticmethod
    def forward(ctx, x, projs, *weights):
        x2 = _as_compute(_flat(x), projs[0])
        outs, xas = [], []
        for p in projs:
            y, xa = _forward(x2, p)
            outs.append(y.view(*x.shape[:-1], y.shape[-1]))
            xas.append(xa)
        ctx.projs, ctx.x_shape = projs, x.shape
        ctx.save_for_backward(x2, *xas)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x2, *xas = ctx.saved_tensors
        dx, dweights = None, []
        for p, xa, g in zip(ctx.projs, xas, grads):
            if g is None:
                dweights += [None, None]
                continue
            dx, da, db = _backward(_flat(g), x2, xa, p, dx, ctx.needs_input_grad[0])
            dweights += [da, db]
        dx = dx.view(ctx.x_shape) if dx is not None else None
        return (dx, None, *dweights)


def lora_projections(x: torch.Tensor, projs: list[LoRAProj]) -> tuple[torch.Tensor, ...]:
    weights = [t for p in projs for t in (p.A, p.B)]
    return _LoRAProjections.apply(x, projs, *weights)


def lora_linear(x: torch.Tensor, proj: LoRAProj) -> torch.Tensor:
    return lora_projections(x, [proj])[0]


class _LoRASwiGLU(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)); keeps x, gate and up outputs, rebuilds h in backward."""

    @staticmethod
    def forward(ctx, x, projs, *weights):
        gate, up, down = projs
        x2 = _as_compute(_flat(x), gate)
        e, xa_gate = _forward(x2, gate)
        u, xa_up = _forward(x2, up)
        h = swiglu_forward(e, u)
        y, ha_down = _forward(h, down)
        del h
        ctx.projs, ctx.x_shape = projs, x.shape
        ctx.save_for_backward(x2, e, u, xa_gate, xa_up, ha_down)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, e, u, xa_gate, xa_up, ha_down = ctx.saved_tensors
        gate, up, down = ctx.projs
        g2 = _flat(grad)
        # Down projection first: dh = g W_down + s (g B) A; dA needs h, rebuilt below.
        a, b = down.A.to(g2.dtype), down.B.to(g2.dtype)
        gb = g2 @ b
        w = base_weight(down.base)
        dh = g2 @ w
        del w
        dh.addmm_(gb, a, alpha=down.scaling)
        # In place: dh -> h, e -> d(gate out), u -> d(up out): no new (T, I) buffers.
        h, de, du = swiglu_backward(dh, e, u)
        da_down = (gb.t() @ h).mul_(down.scaling) if down.A.requires_grad else None
        db_down = (g2.t() @ ha_down).mul_(down.scaling) if down.B.requires_grad else None
        del h
        need_dx = ctx.needs_input_grad[0]
        dx, da_gate, db_gate = _backward(de, x2, xa_gate, gate, None, need_dx)
        dx, da_up, db_up = _backward(du, x2, xa_up, up, dx, need_dx)
        dx = dx.view(ctx.x_shape) if dx is not None else None
        return (dx, None, da_gate, db_gate, da_up, db_up, da_down, db_down)


def lora_swiglu_mlp(x: torch.Tensor, gate: LoRAProj, up: LoRAProj, down: LoRAProj) -> torch.Tensor:
    weights = [t for p in (gate, up, down) for t in (p.A, p.B)]
    return _LoRASwiGLU.apply(x, (gate, up, down), *weights)
