"""Can the checkpoint recompute skip attention's forward? Probe of the aten cuDNN attention ops.

    python benchmarks/attention_probe.py

Backward of attention needs q, k, v, the output and the log-sum-exp. If the first pass
keeps the output and the log-sum-exp, the recompute can call the backward op directly
instead of running the forward again. This checks, on the GPU, that
`aten._scaled_dot_product_cudnn_attention` takes grouped-query heads (32 q, 8 kv),
returns the log-sum-exp, that its backward op gives SDPA's gradients, and times both.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F


def timed(fn, reps=10):
    for _ in range(2):
        fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps


def main():
    print(torch.__version__, torch.ops.aten._scaled_dot_product_cudnn_attention.default._schema)
    print(torch.ops.aten._scaled_dot_product_cudnn_attention_backward.default._schema)
    for b, s in ((4, 4096), (2, 1024)):
        q = torch.randn(b, 32, s, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, 8, s, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, 8, s, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        scale = 128**-0.5
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        go = torch.randn_like(ref)
        dq, dk, dv = torch.autograd.grad(ref, (q, k, v), go)
        rec = {"batch": b, "seq": s}
        try:
            out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)
            o, lse = out[0], out[1]
            rec["fwd_err"] = float((o - ref).abs().max())
            rec["lse_shape"] = list(lse.shape)
            rec["o_strides"] = list(o.stride())
            grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                go, q, k, v, o, lse, out[6], out[7], None, out[2], out[3], out[4], out[5], 0.0, True, scale=scale
            )
            rec["grad_err"] = [float((g - r).abs().max()) for g, r in zip(grads, (dq, dk, dv))]
            rec["grad_shapes"] = [list(g.shape) for g in grads]
            # The closures are timed inside this iteration, so binding the loop's tensors late is right.
            rec["ms_sdpa_fwd"] = timed(
                lambda: F.scaled_dot_product_attention(
                    q.detach(),
                    k.detach(),
                    v.detach(),
                    is_causal=True,
                    scale=scale,
                    enable_gqa=True,
                )
            )
            rec["ms_cudnn_bwd_op"] = timed(
                lambda: torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                    go,
                    q,
                    k,
                    v,
                    o,
                    lse,
                    out[6],
                    out[7],
                    None,
                    out[2],
                    out[3],
                    out[4],
                    out[5],
                    0.0,
                    True,
                    scale=scale,
                )
            )
        except Exception as e:  # noqa: BLE001  (a probe: report what failed)
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
