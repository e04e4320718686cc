"""QLoRA training throughput and peak memory, one variant per process, one JSON line out.

    python benchmarks/train_throughput.py --shape mistral-7b --batch 2 --seq 1024 \
        --variant qlora_platform|reference|unsloth [--run-id ID] [--commit SHA] [--steps 11]
    python benchmarks/train_throughput.py --shape mistral-7b --shapes 2x1024,1x2048,4x4096 --variant ...

Builds (or reuses) a random-weight checkpoint of the shape in /tmp (throughput and
memory do not depend on weight values), then times optimizer steps on random
token ids: NF4 + double quant, bf16 compute, LoRA r=16 alpha=32 on
q,k,v,o,gate,up,down, paged AdamW 8-bit, gradient checkpointing, model in train
mode; the median step after 3 warm-up steps, `torch.cuda.max_memory_allocated`.

The variants (`qlora_platform.train.synthetic`, the Unsloth one in benchmarks/common.py):

- reference: transformers + PEFT + bitsandbytes, the model's own loss (the plan's stack).
- qlora_platform: what `qlora train` runs on a GPU: `train.model.build_training_model` from
  the Mistral-7B preset (fast kernels, offloaded checkpoints), the trainer's optimizer and
  loss (`summed_nll`, the summed answer-token NLL without logits), forward and backward
  through the trainer's `train.model.loss_backward` (CUDA graphs from the second step of a
  shape; `--set training.cuda_graphs=false` measures it without them).
- unsloth: Unsloth's FastLanguageModel with its gradient checkpointing.

Each variant runs in its own process (so peaks do not mix); a GPU run calls this once
per variant and shape with one shared --run-id and appends the lines to
benchmarks/results/train_throughput.jsonl. `--shapes` measures several batch shapes in one
process, smallest first, one line each: the model loads once (a 7B load is most of a
process's minute) and the peak is reset before each shape, so each line's peak is that
shape's (allocated bytes do not carry over from the shape before).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from benchmarks.common import (  # noqa: E402
    VARIANTS,
    add_run_args,
    build_step,
    checkpoint,
    emit,
    gpu_peak_gib,
    gpu_reserved_gib,
    run_meta,
)


def measure(step, batch: int, seq: int, steps: int) -> dict:
    """Median step time (after 3 warm-ups), tokens/s and the peak allocated for one shape."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    x = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(0)).cuda()
    times, host, loss = [], [], None
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = step(x)
        host.append(time.perf_counter() - t)  # until the host has queued the step: near the
        torch.cuda.synchronize()  # step time when the host is the bottleneck
        times.append(time.perf_counter() - t)
    timed = sorted(times[3:])
    median = timed[len(timed) // 2]
    host_median = sorted(host[3:])[len(timed) // 2]
    return {
        "batch": batch,
        "seq": seq,
        "tokens_per_s": round(batch * seq / median),
        "median_step_s": round(median, 3),
        "host_step_s": round(host_median, 3),
        "peak_alloc_gib": gpu_peak_gib(),
        "reserved_gib": gpu_reserved_gib(),
        "loss": round(float(loss), 4),
    }


def _shapes(args) -> list[tuple[int, int]]:
    if args.shapes:
        try:
            pairs = [(int(b), int(s)) for b, s in (part.split("x") for part in args.shapes.split(","))]
        except ValueError:
            raise SystemExit(
                f"--shapes {args.shapes!r}: write batch x sequence pairs, e.g. 2x1024,1x2048,4x4096"
            ) from None
        return sorted(pairs, key=lambda bs: bs[0] * bs[1])
    if args.batch is None or args.seq is None:
        raise SystemExit("give --batch and --seq, or --shapes BxS,BxS")
    return [(args.batch, args.seq)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="mistral-7b")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--shapes", help="several batch shapes in one process, e.g. 2x1024,1x2048,4x4096")
    p.add_argument("--variant", choices=VARIANTS, required=True)
    p.add_argument("--steps", type=int, default=11)
    add_run_args(p)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for qlora_platform, e.g. training.fp8=false (recorded in the line)",
    )
    args = p.parse_args()
    overrides = dict(kv.split("=", 1) for kv in args.set)
    shapes = _shapes(args)
    # Built for the largest shape (Unsloth sizes its RoPE cache from max_seq_length).
    batch_max, seq_max = max(b for b, _ in shapes), max(s for _, s in shapes)
    step = build_step(args.variant, checkpoint(args.shape), batch_max, seq_max, overrides)
    for batch, seq in shapes:
        line = {"variant": args.variant, "shape": args.shape} | measure(step, batch, seq, args.steps)
        line |= run_meta(args)
        if hasattr(step, "preflight"):
            line["preflight_gib"] = round(step.preflight(batch, seq), 2)
        if overrides:
            line["overrides"] = overrides
        emit(line)


if __name__ == "__main__":
    main()
