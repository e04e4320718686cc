"""How much folding the LoRA half into the base GEMM would save, on the GPU, before building it.

    python benchmarks/lora_fold_probe.py [--tokens 16384 2048]

Times, for the Mistral-7B MLP (hidden 4096, intermediate 14336, rank 16) and QKV
(4096 -> 4096 + 1024 + 1024), today's products against the folded ones:
- today: per projection xa = x A^T, y = x W^T, y += s xa B^T (a second pass over y);
- folded: one xa for the projections that share x, written beside x (x' = [x | s xa]),
  and one GEMM y = x' W'^T with W' = [W | B] block-diagonal in the extra columns;
- the same for the input gradient of gate/up: today g_e W_g + s (g_e B_g) A_g (and up),
  folded: one GEMM [g_e | g_u] W' whose extra columns are s g B, then one rank-32 update.
- with a residual r (o: 4096 -> 4096, down: 14336 -> 4096; `--residual`): r added first
  (addmm(r, x, W^T), then the LoRA update: run w's order, which rounds a young adapter away),
  added last (one more pass over y), or folded with r as the GEMM's C, x copied into x' (o)
  or already written there by its producer (down: swiglu's padded h).
Prints one JSON line per case (median ms over 20 runs, CUDA events).
"""

from __future__ import annotations

import argparse
import json

import torch


def timed(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[reps // 2]


def case(tokens: int, outs: list[int], k: int = 4096, r: int = 16, s: float = 2.0) -> dict:
    dev, dt = "cuda", torch.bfloat16
    n = sum(outs)
    x = torch.randn(tokens, k, device=dev, dtype=dt)
    ws = [torch.randn(o, k, device=dev, dtype=dt) / 64 for o in outs]
    As = [torch.randn(r, k, device=dev, dtype=dt) / 64 for _ in outs]
    Bs = [torch.randn(o, r, device=dev, dtype=dt) / 4 for o in outs]
    kp = k + r * len(outs)
    xp = torch.empty(tokens, kp, device=dev, dtype=dt)
    xp[:, :k] = x
    wp = torch.zeros(n, kp, device=dev, dtype=dt)
    row = 0
    for i, (o, w, B) in enumerate(zip(outs, ws, Bs)):
        wp[row : row + o, :k] = w
        wp[row : row + o, k + r * i : k + r * (i + 1)] = B
        row += o
    a_all = torch.cat(As)

    def today_fwd():
        for w, A, B in zip(ws, As, Bs):
            xa = x @ A.t()
            y = x @ w.t()
            y.addmm_(xa, B.t(), alpha=s)

    def folded_fwd():
        xa = xp[:, :k] @ a_all.t()
        xp[:, k:].copy_(xa.mul_(s))
        return xp @ wp.t()

    def base_only():
        for w in ws:
            x @ w.t()

    gs = [torch.randn(tokens, o, device=dev, dtype=dt) for o in outs]
    g_all = torch.cat(gs, 1)

    def today_dgrad():
        dx = None
        for g, w, A, B in zip(gs, ws, As, Bs):
            gb = g @ B
            dx = g @ w if dx is None else dx.addmm_(g, w)
            dx.addmm_(gb, A, alpha=s)

    def folded_dgrad():
        dxp = g_all @ wp  # (T, k + r n): extra columns are g_i B_i
        dx = dxp[:, :k]
        dx.addmm_(dxp[:, k:], a_all, alpha=s)
        return dx

    y_ref = torch.cat([x @ w.t() + s * (x @ A.t()) @ B.t() for w, A, B in zip(ws, As, Bs)], 1)
    y_fold = folded_fwd()
    dx_ref = sum(g @ w + s * (g @ B) @ A for g, w, A, B in zip(gs, ws, As, Bs))
    dx_fold = folded_dgrad()
    dxp_ptr_same = dx_fold.data_ptr()  # addmm_ on the strided view wrote in place (no copy)
    return {
        "tokens": tokens,
        "outs": outs,
        "fwd_today_ms": round(timed(today_fwd), 3),
        "fwd_folded_ms": round(timed(folded_fwd), 3),
        "fwd_base_only_ms": round(timed(base_only), 3),
        "dgrad_today_ms": round(timed(today_dgrad), 3),
        "dgrad_folded_ms": round(timed(folded_dgrad), 3),
        "fwd_max_rel_err": float((y_fold - y_ref).abs().max() / y_ref.abs().max()),
        "dgrad_max_rel_err": float((dx_fold - dx_ref).abs().max() / dx_ref.abs().max()),
        "dgrad_in_place": dxp_ptr_same == dx_fold.data_ptr(),
        "device": torch.cuda.get_device_name(),
    }


def residual_case(tokens: int, k: int, n: int = 4096, r: int = 16, s: float = 2.0) -> dict:
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(tokens, k, device=dev, dtype=dt)
    res = torch.randn(tokens, n, device=dev, dtype=dt)
    w = torch.randn(n, k, device=dev, dtype=dt) / 64
    A, B = torch.randn(r, k, device=dev, dtype=dt) / 64, torch.randn(n, r, device=dev, dtype=dt) / 4
    xp = torch.empty(tokens, k + r, device=dev, dtype=dt)
    xp[:, :k] = x
    wp = torch.empty(n, k + r, device=dev, dtype=dt)

    def first():
        y = torch.addmm(res, x, w.t())
        y.addmm_(x @ A.t(), B.t(), alpha=s)

    def last():
        y = x @ w.t()
        y.addmm_(x @ A.t(), B.t(), alpha=s)
        y.add_(res)

    def fold(copy: bool):
        if copy:
            buf = torch.empty(tokens, k + r, device=dev, dtype=dt)
            buf[:, :k].copy_(x)
        else:
            buf = xp
        buf[:, k:].copy_(buf[:, :k] @ A.t())
        wp[:, :k].copy_(w)  # stands in for the dequantization every variant does
        torch.mul(B, s, out=wp[:, k:])
        return torch.addmm(res, buf, wp.t())

    def dequant_stand_in():
        wp[:, :k].copy_(w)

    return {
        "tokens": tokens,
        "k": k,
        "n": n,
        "residual_first_ms": round(timed(first), 3),
        "residual_last_ms": round(timed(last), 3),
        "fold_copy_ms": round(timed(lambda: fold(True)), 3),
        "fold_padded_ms": round(timed(lambda: fold(False)), 3),
        "weight_copy_ms": round(timed(dequant_stand_in), 3),
        "device": torch.cuda.get_device_name(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[16384, 2048])
    p.add_argument("--residual", action="store_true", help="the o/down residual cases only")
    args = p.parse_args()
    for t in args.tokens:
        if args.residual:
            for k in (4096, 14336):
                print(json.dumps(residual_case(t, k)), flush=True)
            continue
        for outs in ([14336, 14336], [4096, 1024, 1024]):
            print(json.dumps(case(t, outs)), flush=True)


if __name__ == "__main__":
    main()
