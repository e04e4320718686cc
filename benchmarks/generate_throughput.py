"""Generation speed on a GPU, one variant per process, one JSON line out.

    python benchmarks/generate_throughput.py --shape mistral-7b --weights bf16|nf4 --batch 1 \
        --variant qlora_platform|reference|unsloth [--new-tokens 128] [--run-id ID] [--commit SHA]

Random weights in the shape's real layout (`common.checkpoint`, built once in
/tmp), a 32-token random prompt per row, greedy decoding of --new-tokens tokens (EOS
ignored). `tokens_per_s` counts decoded tokens after the first, over all rows, per
second of decoding; `ttft_ms` is the prompt's forward plus the first token.

- reference: transformers `generate` (dynamic cache), bitsandbytes NF4 or bf16 weights;
- qlora_platform: `infer.engine.Engine` as `qlora chat/serve/eval` run it on a GPU (static KV
  cache, the platform's fused decode step replayed as a CUDA graph); also runs the reference's greedy
  decode on the same weights and reports `tokens_match_reference` (the generation issue's equality
  condition; where they part, `first_divergence` and the reference's own top-two gap there), then
  the same check with both paths computing in fp32 on the same weights (`*_fp32`);
- unsloth: `FastLanguageModel.for_inference` + `generate`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from benchmarks.common import (  # noqa: E402
    VARIANTS,
    add_run_args,
    checkpoint,
    emit,
    gpu_peak_gib,
    load_for_generation,
    model_parser,
    run_meta,
)


def hf_generate(model, prompt, new_tokens: int):
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    torch.cuda.synchronize()
    return out[:, prompt.shape[1] :].tolist(), time.perf_counter() - start


def compare(model, prompt, got: list[list[int]], new_tokens: int) -> dict:
    """Greedy tokens against transformers' generate on the same model; where they part, and the
    gap between the reference's top two logits there (teacher-forced on its own tokens)."""
    import torch

    want, _ = hf_generate(model, prompt, new_tokens)
    out = {"tokens_match_reference": got == want}
    if got != want:
        row = next(i for i in range(len(got)) if got[i] != want[i])
        at = next(i for i, (a, b) in enumerate(zip(got[row], want[row])) if a != b)
        seen = torch.tensor([want[row][:at]], device=prompt.device, dtype=torch.long)
        with torch.no_grad():
            logits = model(torch.cat([prompt[row : row + 1], seen], dim=1)).logits[0, -1].float()
        top2 = logits.topk(2).values
        out |= {
            "first_divergence": at,
            "reference_top2_gap_there": round((top2[0] - top2[1]).item(), 4),
            "reference_logit_max": round(logits.abs().max().item(), 3),
        }
    return out


def to_fp32(model) -> None:
    """Compute in fp32 on the same weights: 16-bit tensors upcast, 4-bit layers keep their codes
    and compute in fp32."""
    import torch

    for module in model.modules():
        if hasattr(module, "compute_dtype"):  # bitsandbytes Linear4bit
            module.compute_dtype = torch.float32
        for param in module.parameters(recurse=False):
            if param.dtype in (torch.bfloat16, torch.float16):
                param.data = param.data.float()
    model.config.dtype = torch.float32


def main() -> None:
    p = model_parser(__doc__)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--variant", choices=VARIANTS, required=True)
    p.add_argument("--new-tokens", type=int, default=128)
    add_run_args(p)
    args = p.parse_args()
    model = load_for_generation(args.variant, checkpoint(args.shape), args.weights)
    import torch

    prompt = torch.randint(5, 32000, (args.batch, 32), generator=torch.Generator().manual_seed(0)).cuda()
    line = {
        "variant": args.variant,
        "shape": args.shape,
        "weights": args.weights,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
    }
    if args.variant == "qlora_platform":
        from transformers import AutoTokenizer

        from qlora_platform.infer.engine import Engine
        from qlora_platform.infer.sampling import SamplingParams

        engine = Engine(model, AutoTokenizer.from_pretrained(checkpoint(args.shape)))
        params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        rows = [r.tolist() for r in prompt]
        engine.generate(rows, params)  # warm-up: captures the decode graph
        torch.cuda.reset_peak_memory_stats()
        results = engine.generate(rows, params)
        decode_s = max(r.decode_s for r in results)
        line |= {
            "tokens_per_s": round(args.batch * (args.new_tokens - 1) / decode_s, 1),
            "ttft_ms": round(1000 * max(r.prefill_s for r in results), 1),
            "cuda_graphs": bool(engine._decoders) and all(d.graph is not None for d in engine._decoders.values()),
            "fused_step": bool(engine._decoders) and all(d.fast is not None for d in engine._decoders.values()),
            "fused_step_off": next((d.fast_reason for d in engine._decoders.values() if d.fast_reason), None),
            "static_fallback": engine.static_fallback_reason,
            "peak_alloc_gib": gpu_peak_gib(),
        }
        line |= compare(model, prompt, [r.token_ids for r in results], args.new_tokens)
        # The same weights computed in fp32 by both paths: rounding noise (which in bf16 moves a
        # random-weight 7B's logits by as much as the gap between its top two tokens) is gone,
        # so any difference left would be the platform computing something else.
        del engine
        torch.cuda.empty_cache()
        to_fp32(model)
        engine = Engine(model, AutoTokenizer.from_pretrained(checkpoint(args.shape)))
        fp32 = compare(model, prompt, [r.token_ids for r in engine.generate(rows, params)], args.new_tokens)
        line |= {f"{key}_fp32": value for key, value in fp32.items()}
    else:
        hf_generate(model, prompt, 8)  # warm-up
        torch.cuda.reset_peak_memory_stats()
        _, first = hf_generate(model, prompt, 1)
        _, total = hf_generate(model, prompt, args.new_tokens)
        line |= {
            "tokens_per_s": round(args.batch * (args.new_tokens - 1) / (total - first), 1),
            "ttft_ms": round(1000 * first, 1),
            "peak_alloc_gib": gpu_peak_gib(),
        }
    emit(line | run_meta(args))


if __name__ == "__main__":
    main()
