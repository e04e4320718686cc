"""LoRA on frozen (4-bit) linear layers as hand-written autograd functions.

    y = lora_linear(x, proj, residual=r)        # one projection (o_proj), + the residual r
    q, k, v = lora_projections(x, [q, k, v])    # several sharing one input (QKV)
    y = lora_swiglu_mlp(x, gate, up, down)      # down(silu(gate(x)) * up(x))

`proj` is a `LoRAProj` built from a PEFT LoRA layer (`LoRAProj.of(layer)`). What
this buys over PEFT + bitsandbytes' own autograd (profiles: docs/benchmarks.md):
- the input is never copied: PEFT clones the base output and casts the input to
  fp32 for fp32 LoRA weights (a 2x copy per projection, kept for backward);
- LoRA products run in the compute dtype, added into the base output in place;
- the dequantized weight is never kept: dequantized again in backward (cheap next
  to the matmul), so memory holds only the 4-bit copy;
- projections that share an input accumulate their input gradient into one buffer;
- the MLP keeps gate and up outputs only and rebuilds silu(g) * u in backward;
- with an `Fp8Plan`, the base weight's forward products (and, if the plan says so, its
  input-gradient product) run on fp8 tensor cores (fp8.py) once a batch has enough
  tokens; LoRA products stay 16-bit;
- from as many tokens as input features, projections sharing an input (gate/up; q/k/v
  when no gradient is recorded, and their input gradient in a recompute) run as one GEMM
  with the LoRA halves folded into K (`_folded_forward`): the output is written once, not
  written and then updated by a rank-r GEMM per projection; o and down fold too, their
  residual riding in the GEMM's C (`_residual_forward`, which says why the residual is
  never summed before the LoRA half).

Gradients for A and B come out in the master weights' dtype straight from the GEMM on
CUDA (in the compute dtype elsewhere; autograd then casts them). Works on any device
bitsandbytes runs on (CPU included).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import cast

import torch

from ._triton import padded_buffer
from .fp8 import Fp8Plan, fp8_fits, fp8_matmul, quantize_rows
from .nf4 import dequantize_nf4
from .swiglu import swiglu_backward, swiglu_forward


@dataclass
class LoRAProj:
    base: torch.nn.Module  # bnb Linear4bit or nn.Linear, frozen
    A: torch.Tensor  # (r, in)  fp32 master
    B: torch.Tensor  # (out, r) fp32 master
    scaling: float
    bias: torch.Tensor | None
    fp8: Fp8Plan | None = None  # base products in fp8 (None: 16-bit)
    a16: torch.Tensor | None = None  # A and B already in the compute dtype (cast_adapters)
    b16: torch.Tensor | None = None

    def compute_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.a16 is not None and self.b16 is not None and self.a16.dtype == dtype:
            return self.a16, self.b16
        return self.A.to(dtype), self.B.to(dtype)

    @classmethod
    def of(cls, layer, adapter: str = "default", fp8: Fp8Plan | None = None) -> LoRAProj:
        base = layer.get_base_layer()
        return cls(
            base,
            layer.lora_A[adapter].weight,
            layer.lora_B[adapter].weight,
            float(layer.scaling[adapter]),
            base.bias,
            fp8,
        )


def base_weight(base: torch.nn.Module, out: torch.Tensor | None = None) -> torch.Tensor:
    """The frozen weight (out, in) in the compute dtype: dequantized when 4-bit; into `out`
    (a row-strided block of a wider buffer) when given."""
    weight = cast(torch.Tensor, base.weight)
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight if out is None else out.copy_(weight)
    return dequantize_nf4(weight.data, state, out)


def fold_columns(x: torch.Tensor, projs) -> int:
    """How many columns beside x (tokens x features) `_folded_input` fills for these projections:
    a producer of x that leaves them free (rmsnorm's `extra`) spares the fold a copy of x."""
    x2 = x.reshape(-1, x.shape[-1])
    return sum(p.A.shape[0] for p in projs) if _foldable(x2, projs) else 0


def _foldable(x2: torch.Tensor, projs) -> bool:
    """Whether these projections of x2 run as one folded GEMM (`_folded_forward`): no bias, no
    fp8 plan (fp8 products keep their own path), the compute dtype of x2, and at least as many
    tokens as input features. The folded weight holds all the projections' dequantized weights
    at once (one 7B MLP weight, 117 MB, more than one at a time), while what folding saves is a
    pass over the outputs, which scale with the tokens: small batches, whose peak is mostly
    weights, keep the separate products and their lower peak."""
    return x2.shape[0] >= x2.shape[1] and all(
        p.bias is None and p.fp8 is None and compute_dtype(p) == x2.dtype for p in projs
    )


def _scaled_a(projs, dtype, scaled: bool = True) -> torch.Tensor:
    """[s_1 A_1; s_2 A_2; ...]: (sum of ranks, in); the A's alone without `scaled`."""
    return torch.cat([p.compute_weights(dtype)[0] * (p.scaling if scaled else 1.0) for p in projs])


def _folded_weight(projs, dtype, device, scale_b: bool = False) -> torch.Tensor:
    """W' = [W_1 B_1 0; W_2 0 B_2; ...]: the base weights stacked by rows, each followed by its
    LoRA B in columns of its own (total out x (in + sum of ranks)), dequantized in place; with
    `scale_b` each B carries its scaling (for an x' whose x A^T columns are unscaled)."""
    k = projs[0].A.shape[1]
    ranks = [p.A.shape[0] for p in projs]
    w = torch.empty(sum(p.B.shape[0] for p in projs), k + sum(ranks), dtype=dtype, device=device)
    w[:, k:].zero_()
    row, col = 0, k
    for p, r in zip(projs, ranks):
        n = p.B.shape[0]
        base_weight(p.base, w[row : row + n, :k])
        torch.mul(p.compute_weights(dtype)[1], p.scaling if scale_b else 1.0, out=w[row : row + n, col : col + r])
        row, col = row + n, col + r
    return w


def _folded_input(x2: torch.Tensor, projs, scale_a: bool = True) -> torch.Tensor:
    """x' = [x | s_1 x A_1^T | s_2 x A_2^T | ...] (one GEMM for all the A products); without
    `scale_a` the x A^T columns are left unscaled."""
    k = x2.shape[1]
    a = _scaled_a(projs, x2.dtype, scale_a)
    xp = padded_buffer(x2, k + a.shape[0])  # x already written with room beside it
    if xp is None:
        xp = torch.empty(x2.shape[0], k + a.shape[0], dtype=x2.dtype, device=x2.device)
        xp[:, :k].copy_(x2)
    xp[:, k:].copy_(x2 @ a.t())
    return xp


def _folded_forward(x2: torch.Tensor, projs) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x' W'^T with x' = [x | s_1 x A_1^T | ...]: every projection's LoRA half rides in the
    base GEMM's K dimension, so y is written once instead of written and then updated by a
    rank-r GEMM per projection (docs/kernels.md). Returns y (tokens x total out) and x' (kept for backward:
    its left block is x, its right block the scaled x A^T that dB needs)."""
    xp = _folded_input(x2, projs)
    return xp @ _folded_weight(projs, x2.dtype, x2.device).t(), xp


def fused_columns(*parts: torch.Tensor) -> torch.Tensor | None:
    """The (..., total) tensor whose column blocks are `parts`, side by side in this order, if
    they are such blocks of one buffer (the outputs of a folded `lora_projections`); else None."""
    first = parts[0]
    total = sum(p.shape[-1] for p in parts)
    if first.stride(-1) != 1 or first.dim() < 2 or first.stride(-2) != total:
        return None
    offset = first.data_ptr()
    for p in parts:
        if p.data_ptr() != offset or p.stride() != first.stride() or p.shape[:-1] != first.shape[:-1]:
            return None
        offset += p.shape[-1] * p.element_size()
    shape = (*first.shape[:-1], total)
    return first.as_strided(shape, first.stride())


def _folded_backward(gy: torch.Tensor, xp: torch.Tensor, projs, need_dx: bool):
    """Gradients of `_folded_forward` from gy (tokens x total out, the outputs' gradients side
    by side): one GEMM gy W' gives g W (left block) and every g_i B_i (right block); returns
    dx (or None) and (dA, dB) per projection."""
    k = xp.shape[1] - sum(p.A.shape[0] for p in projs)
    dxp = gy @ _folded_weight(projs, gy.dtype, gy.device)
    dx, gb = dxp[:, :k], dxp[:, k:]
    grads, row, col = [], 0, 0
    for p in projs:
        n, r = p.B.shape[0], p.A.shape[0]
        da = _scaled_mm(gb[:, col : col + r].t(), xp[:, :k], p.scaling, p.A.dtype) if p.A.requires_grad else None
        db = (
            _scaled_mm(gy[:, row : row + n].t(), xp[:, k + col : k + col + r], 1.0, p.B.dtype)
            if p.B.requires_grad
            else None
        )
        grads += [da, db]
        row, col = row + n, col + r
    if not need_dx:
        return None, grads
    return dx.addmm_(gb, _scaled_a(projs, gy.dtype)), grads


def _use_fp8(x2: torch.Tensor, w: torch.Tensor, p: LoRAProj, backward: bool = False) -> bool:
    plan = p.fp8
    return plan is not None and (plan.input_grad if backward else plan.forward) and fp8_fits(x2, w, plan.min_tokens)


def _forward(x2: torch.Tensor, p: LoRAProj, x_fp8: dict | None = None, output: bool = True):
    """y = x W^T + s (x A^T) B^T (+ bias); returns y, x A^T and the 16-bit A, B for backward.
    Projections sharing an input pass one `x_fp8` dict: x is quantized by the first of them
    that takes the fp8 path and reused by the others. With output=False (a checkpoint's
    recompute that already knows what y fed into) only x A^T is formed and y is None."""
    a, b = p.compute_weights(x2.dtype)
    xa = x2 @ a.t()
    if not output:
        return None, xa, a, b
    w = base_weight(p.base)
    if _use_fp8(x2, w, p):
        x_fp8 = {} if x_fp8 is None else x_fp8
        if "x" not in x_fp8:
            x_fp8["x"] = quantize_rows(x2)
        y = fp8_matmul(x2, w, x_fp8["x"])
    else:
        y = x2 @ w.t()
    del w
    y.addmm_(xa, b.t(), alpha=p.scaling)
    if p.bias is not None:
        y += p.bias.to(y.dtype)
    return y, xa, a, b


def _residual_forward(x2: torch.Tensor, p: LoRAProj, residual: torch.Tensor, x_fp8: dict | None = None):
    """y = residual + x W^T + s (x A^T) B^T (+ bias); returns y, the input to keep for backward
    (x2, or the same values as the left block of x'), x A^T and the 16-bit A, B.

    The residual never enters a sum before the LoRA half: a young adapter's s (x A^T) B^T is
    mostly below half a bf16 step of the residual stream, so added to an already rounded
    r + x W^T it rounds away (PEFT's order, (x W^T + lora) + r, keeps most of it; adding r
    first measurably slows learning, docs/kernels.md). Folded (one projection,
    as many tokens as features) r rides in the GEMM's C and the LoRA half in its K, all three
    summed in fp32 and rounded once: y is written once. Otherwise r is added last."""
    if not _foldable(x2, [p]):
        y, xa, a, b = _forward(x2, p, x_fp8)
        return y.add_(residual), x2, xa, a, b
    a, b = p.compute_weights(x2.dtype)
    k = x2.shape[1]
    xp = _folded_input(x2, [p], scale_a=False)  # unscaled x A^T: what backward's dB takes
    y = torch.addmm(residual, xp, _folded_weight([p], x2.dtype, x2.device, scale_b=True).t())
    return y, xp[:, :k], xp[:, k:], a, b


def placeholder(ref: torch.Tensor, shape) -> torch.Tensor:
    """Stands in for an output whose value nobody reads: the shape, ref's dtype, no memory."""
    return ref.new_zeros(()).expand(*shape)


@functools.cache
def addmm_out_dtype_available(device: torch.device, dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether this torch build runs addmm on `device` with `dtype` operands and an `out_dtype`
    result: tried once on tiny matrices, the answer cached per device and dtypes (a property of
    the build and the GPU, not of any model). `addmm_out_dtype_available.cache_clear()` resets it."""
    m = torch.zeros(16, 16, dtype=dtype, device=device)
    try:
        torch.addmm(torch.empty(16, 16, dtype=out_dtype, device=device), m, m, beta=0, out_dtype=out_dtype)
    except (RuntimeError, TypeError):  # NotImplementedError is a RuntimeError
        return False
    return True


def _scaled_mm(m1: torch.Tensor, m2: torch.Tensor, alpha: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """alpha * m1 @ m2 in one GEMM (beta=0 ignores the uninitialised input). With `dtype` (an
    adapter's fp32 master) the GEMM writes that dtype directly on CUDA where the build can, so
    autograd has no cast to make before it accumulates the gradient (one kernel fewer per LoRA tensor)."""
    if dtype is not None and dtype != m1.dtype and m1.is_cuda and addmm_out_dtype_available(m1.device, m1.dtype, dtype):
        out = torch.empty(m1.shape[0], m2.shape[1], dtype=dtype, device=m1.device)
        return torch.addmm(out, m1, m2, beta=0, alpha=alpha, out_dtype=dtype)
    out = torch.empty(m1.shape[0], m2.shape[1], dtype=m1.dtype, device=m1.device)
    return torch.addmm(out, m1, m2, beta=0, alpha=alpha)


def cast_adapters(projs: list[LoRAProj], dtype: torch.dtype) -> None:
    """Give each projection its A and B in `dtype` (`a16`, `b16`). When the tensors lie back
    to back in one buffer (train/flat_params.py lays a layer's adapters out so) that is one
    cast for all of them instead of two kernels per projection and pass."""
    tensors = [t for p in projs for t in (p.A, p.B)]
    if tensors[0].dtype == dtype or not all(t.is_contiguous() for t in tensors):
        return
    storage = tensors[0].untyped_storage()
    if any(t.untyped_storage().data_ptr() != storage.data_ptr() or t.dtype != tensors[0].dtype for t in tensors):
        return
    ordered = sorted(tensors, key=lambda t: t.storage_offset())
    start = ordered[0].storage_offset()
    end = start
    for t in ordered:
        if t.storage_offset() != end:
            return  # a gap or an overlap: cast one by one
        end += t.numel()
    with torch.no_grad():
        span = tensors[0].new_empty(0).set_(storage, start, (end - start,), (1,))
        low = span.to(dtype)

    def view(t):
        return low[t.storage_offset() - start : t.storage_offset() - start + t.numel()].view(t.shape)

    for p in projs:
        p.a16, p.b16 = view(p.A), view(p.B)


def _input_grad(g2: torch.Tensor, p: LoRAProj, dx: torch.Tensor | None) -> torch.Tensor:
    """dx (+)= g W, through fp8 when the forward used it."""
    w = base_weight(p.base)
    if _use_fp8(g2, w.t(), p, backward=True):
        part = fp8_matmul(g2, w.t().contiguous())  # rows of W^T: one scale per input channel
        return part if dx is None else dx.add_(part)
    if dx is None:
        return g2 @ w
    return dx.addmm_(g2, w)


def _backward(g2, x2, xa, a, b, p: LoRAProj, dx, need_dx: bool):
    """LoRA grads (dA, dB) and the input grad added into dx (allocated when None)."""
    gb = g2 @ b  # (T, r)
    da = _scaled_mm(gb.t(), x2, p.scaling, p.A.dtype) if p.A.requires_grad else None
    db = _scaled_mm(g2.t(), xa, p.scaling, p.B.dtype) if p.B.requires_grad else None
    if need_dx:
        dx = _input_grad(g2, p, dx)
        dx.addmm_(gb, a, alpha=p.scaling)
    return dx, da, db


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def compute_dtype(p: LoRAProj) -> torch.dtype:
    """The dtype the base layer computes in (a 4-bit layer's compute dtype)."""
    weight = cast(torch.Tensor, p.base.weight)
    state = getattr(weight, "quant_state", None)
    return state.dtype if state is not None else weight.dtype


def _as_compute(x2: torch.Tensor, p: LoRAProj) -> torch.Tensor:
    """The input in the base layer's compute dtype (a copy only when they differ)."""
    dtype = compute_dtype(p)
    return x2 if x2.dtype == dtype else x2.to(dtype)


class _LoRAProjections(torch.autograd.Function):
    """n projections of one input; args: x, then (A, B) of each so autograd tracks them."""

    @staticmethod
    def forward(ctx, x, projs, output, graded, residual, *weights):
        x2 = _as_compute(_flat(x), projs[0])
        # Folded (one GEMM, LoRA halves in K) when the outputs need no gradient (`graded`: the
        # caller's grad mode): with gradients their views of one buffer could not be modified in
        # place (RoPE). The recompute (output=False) folds the input gradient: x' only.
        ctx.folded = len(projs) > 1 and _foldable(x2, projs) and not (output and graded)
        if ctx.folded:
            ctx.projs, ctx.x_shape = projs, x.shape
            if output:
                y, xp = _folded_forward(x2, projs)
                outs, col = [], 0
                for p in projs:
                    outs.append(y[:, col : col + p.B.shape[0]])
                    col += p.B.shape[0]
            else:
                xp = _folded_input(x2, projs)
                outs = [placeholder(x2, (x2.shape[0], p.B.shape[0])) for p in projs]
            ctx.save_for_backward(xp)
            return tuple(outs)
        x_fp8: dict = {}
        outs, saved = [], []
        ctx.residual_shape = residual.shape if residual is not None else None
        for p in projs:
            if residual is not None:  # one projection (lora_linear)
                y, x2, xa, a, b = _residual_forward(x2, p, _flat(residual), x_fp8)
            else:
                y, xa, a, b = _forward(x2, p, x_fp8, output)
            if y is None:
                y = placeholder(x2, (x2.shape[0], p.B.shape[0]))
            outs.append(y)  # flat (T, out): callers' views of it may be modified in place (RoPE)
            saved += [xa, a, b]
        ctx.projs, ctx.x_shape = projs, x.shape
        ctx.save_for_backward(x2, *saved)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.folded:  # the outputs' gradients side by side, then one GEMM with W'
            (xp,) = ctx.saved_tensors
            gy = fused_columns(*grads) if all(g is not None for g in grads) else None
            gy = (
                _flat(gy)
                if gy is not None
                else torch.cat(
                    [
                        _flat(g) if g is not None else xp.new_zeros(xp.shape[0], p.B.shape[0])
                        for g, p in zip(grads, ctx.projs)
                    ],
                    dim=1,
                )
            )
            dx, dweights = _folded_backward(gy, xp, ctx.projs, ctx.needs_input_grad[0])
            return (dx.view(ctx.x_shape) if dx is not None else None, None, None, None, None, *dweights)
        x2, *saved = ctx.saved_tensors
        dx, dweights = None, []
        for i, (p, g) in enumerate(zip(ctx.projs, grads)):
            if g is None:
                dweights += [None, None]
                continue
            xa, a, b = saved[3 * i : 3 * i + 3]
            dx, da, db = _backward(_flat(g), x2, xa, a, b, p, dx, ctx.needs_input_grad[0])
            dweights += [da, db]
        dx = dx.view(ctx.x_shape) if dx is not None else None
        # A residual added inside the GEMM (one projection) gets the output's gradient as it is.
        d_residual = grads[0].view(ctx.residual_shape) if ctx.needs_input_grad[4] else None
        return (dx, None, None, None, d_residual, *dweights)


def lora_projections(x: torch.Tensor, projs: list[LoRAProj], output: bool = True) -> tuple[torch.Tensor, ...]:
    """The projections of x; with output=False placeholders that still carry the gradient."""
    weights = [t for p in projs for t in (p.A, p.B)]
    outs = _LoRAProjections.apply(x, projs, output, torch.is_grad_enabled(), None, *weights)
    return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outs)


def lora_linear(
    x: torch.Tensor, proj: LoRAProj, output: bool = True, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """proj(x), plus `residual` if given: after the LoRA half, or with as many tokens as input
    features inside the folded GEMM that writes the output (`_residual_forward`)."""
    if residual is not None and not output:
        raise ValueError("a residual needs the output (output=True)")
    weights = (proj.A, proj.B)
    y = _LoRAProjections.apply(x, [proj], output, torch.is_grad_enabled(), residual, *weights)[0]
    return y.view(*x.shape[:-1], y.shape[-1])


class _LoRASwiGLU(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)); keeps x, gate and up outputs, rebuilds h in backward.
    With output=False (recompute) it stops after gate and up: h and down's product are
    formed in backward only, and the output is a placeholder that carries the gradient."""

    @staticmethod
    def forward(ctx, x, projs, output, residual, *weights):
        gate, up, down = projs
        x2 = _as_compute(_flat(x), gate)
        ctx.folded = _foldable(x2, (gate, up))
        if ctx.folded:  # gate and up in one GEMM, their LoRA halves folded in
            eu, xp = _folded_forward(x2, (gate, up))
            n = gate.B.shape[0]
            e, u = eu[:, :n], eu[:, n:]
            x2, xa_gate, xa_up, a_gate, b_gate, a_up, b_up = xp, eu, None, None, None, None, None
        else:
            x_fp8: dict = {}
            e, xa_gate, a_gate, b_gate = _forward(x2, gate, x_fp8)
            u, xa_up, a_up, b_up = _forward(x2, up, x_fp8)
        a_down, b_down = down.compute_weights(x2.dtype)
        if output and residual is not None:  # h written with room for down's fold (_residual_forward)
            h = swiglu_forward(e, u, fold_columns(e, [down]))
            y, _, ha_down, _, _ = _residual_forward(h, down, _flat(residual))
            ha_down = ha_down.contiguous()  # not a view that would keep h alive for backward
            del h
        elif output:
            h = swiglu_forward(e, u)
            y, ha_down, _, _ = _forward(h, down)
            del h
        else:
            y, ha_down = placeholder(x2, (x2.shape[0], down.B.shape[0])), None
        ctx.projs, ctx.x_shape = projs, x.shape
        # Folded: x2 is x' and xa_gate the fused gate/up output (e and u are its two halves).
        ctx.save_for_backward(x2, e, u, xa_gate, xa_up, ha_down, a_gate, b_gate, a_up, b_up, a_down, b_down)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, e, u, xa_gate, xa_up, ha_down, a_gate, b_gate, a_up, b_up, a_down, b_down = ctx.saved_tensors
        gate, up, down = ctx.projs
        g2 = _flat(grad)
        # Down projection first: dh = g W_down + s (g B) A; dA needs h, rebuilt below.
        gb = g2 @ b_down
        dh = _input_grad(g2, down, None)
        dh.addmm_(gb, a_down, alpha=down.scaling)
        # In place: dh -> h, e -> d(gate out), u -> d(up out): no new (T, I) buffers.
        h, de, du = swiglu_backward(dh, e, u)
        if ha_down is None:  # the forward was a recompute that skipped h
            ha_down = h @ a_down.t()
        da_down = _scaled_mm(gb.t(), h, down.scaling, down.A.dtype) if down.A.requires_grad else None
        db_down = _scaled_mm(g2.t(), ha_down, down.scaling, down.B.dtype) if down.B.requires_grad else None
        del h
        need_dx = ctx.needs_input_grad[0]
        if ctx.folded:  # de and du lie side by side in the fused output's buffer
            dx, (da_gate, db_gate, da_up, db_up) = _folded_backward(xa_gate, x2, (gate, up), need_dx)
        else:
            dx, da_gate, db_gate = _backward(de, x2, xa_gate, a_gate, b_gate, gate, None, need_dx)
            dx, da_up, db_up = _backward(du, x2, xa_up, a_up, b_up, up, dx, need_dx)
        dx = dx.view(ctx.x_shape) if dx is not None else None
        d_residual = grad if ctx.needs_input_grad[3] else None  # added to down's output
        return (dx, None, None, d_residual, da_gate, db_gate, da_up, db_up, da_down, db_down)


def lora_swiglu_mlp(
    x: torch.Tensor,
    gate: LoRAProj,
    up: LoRAProj,
    down: LoRAProj,
    output: bool = True,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) (+ residual, as `lora_linear` adds it)."""
    if residual is not None and not output:
        raise ValueError("a residual needs the output (output=True)")
    weights = [t for p in (gate, up, down) for t in (p.A, p.B)]
    return _LoRASwiGLU.apply(x, (gate, up, down), output, residual, *weights)
