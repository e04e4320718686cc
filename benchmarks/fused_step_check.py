"""Where the fused decode step and the model's own forward part ways, layer by layer (GPU).

    python benchmarks/fused_step_check.py --shape mistral-7b --weights bf16|nf4 [--kernels triton|reference]

Prefills one random 32-token prompt into two StaticDecoders (fused step, model forward), then
runs one decode step of the model's forward with hooks on every decoder layer, and feeds each
layer's captured input through the fused layer (`DecodeStep.layer`). Prints one JSON line per
layer (max |difference| of the residual stream against the stock layer's output, relative to
its largest value) and one for the logits. bf16 rounding alone gives relative differences
around 1e-2; a wrong kernel gives far more. --kernels reference runs the fused layer on the
PyTorch references instead of the Triton kernels, which separates kernel bugs from the
step's structure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from benchmarks.generate_throughput import load, model_parser  # noqa: E402
from benchmarks.train_throughput import checkpoint  # noqa: E402


def main() -> None:
    p = model_parser(__doc__)
    p.add_argument("--kernels", choices=["triton", "reference"], default="triton")
    p.add_argument("--device", default="cuda", help="cpu: bf16 weights only, a smoke test of this script")
    args = p.parse_args()
    import torch

    from qlora_platform.infer import fast_decode
    from qlora_platform.infer.static_decode import StaticDecoder
    from qlora_platform.kernels import decode

    if args.kernels == "reference":  # this script only: the fused layer on the PyTorch references
        fast_decode.add_rms_norm = decode.add_rms_norm_reference
        fast_decode.rope_write_kv = decode.rope_write_kv_reference
        fast_decode.decode_attention = decode.decode_attention_reference
    if args.device == "cpu":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(checkpoint(args.shape), dtype=torch.bfloat16).eval()
    else:
        model = load("reference", checkpoint(args.shape), args.weights)
    ids = torch.randint(5, 32000, (1, 32), generator=torch.Generator().manual_seed(0)).to(args.device)
    ones = torch.ones_like(ids)
    fused, stock = (
        StaticDecoder(model, 1, 256, graphs=False),
        StaticDecoder(model, 1, 256, graphs=False, fast_step=False),
    )
    token = stock.prefill(ids, ones).argmax(-1)
    fused.prefill(ids, ones)
    layers = fused.fast.layers
    seen = []
    hooks = [
        layer.register_forward_hook(
            lambda m, a, kw, out: seen.append(
                ((a[0] if a else kw["hidden_states"]).clone(), (out[0] if isinstance(out, tuple) else out).clone())
            ),
            with_kwargs=True,
        )
        for layer in layers
    ]
    with torch.no_grad():
        stock_logits = stock.step(token)
        for h in hooks:
            h.remove()
        fused.token.copy_(token.view(-1, 1))
        fused.position.copy_(stock.position)
        fused.mask.copy_(stock.mask)
        fused.writes.columns.copy_(stock.writes.columns - 1)  # the column stock's step wrote
        rope = fused.fast.rope(seen[0][0], fused.position)
        for i, (h_in, h_out) in enumerate(seen):
            hidden = h_in.clone()
            x = fast_decode._add_norm(None, hidden, fused.fast.norms[i])
            fused.fast.layer(i, hidden, x, rope)
            gap = (hidden.float() - h_out.float()).abs().max().item()
            print(
                json.dumps(
                    {
                        "layer": i,
                        "max_abs_diff": gap,
                        "relative": gap / h_out.float().abs().max().item(),
                        "kernels": args.kernels,
                    }
                )
            )
        fused_logits = fused.fast(fused.token, fused.position)
        # The noise floor: the same position through the model without any cache.
        plain_logits = model(torch.cat([ids, token.view(1, 1)], dim=1)).logits[:, -1]
    top2 = stock_logits.float().topk(2, dim=-1).values[0]
    print(
        json.dumps(
            {
                "logits_max_abs_diff": (fused_logits.float() - stock_logits.float()).abs().max().item(),
                "no_cache_vs_static_max_abs_diff": (plain_logits.float() - stock_logits.float()).abs().max().item(),
                "logits_max": stock_logits.float().abs().max().item(),
                "top2_gap": (top2[0] - top2[1]).item(),
                "same_argmax": bool((fused_logits.argmax(-1) == stock_logits.argmax(-1)).all()),
                "weights": args.weights,
                "kernels": args.kernels,
            }
        )
    )


if __name__ == "__main__":
    main()
