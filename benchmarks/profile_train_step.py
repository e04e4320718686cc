"""Where one QLoRA training step spends its GPU time: a torch.profiler table per variant.

    python benchmarks/profile_train_step.py --variant qlora_platform --batch 4 --seq 4096 \
        [--rows 40] [--sort self_cpu_time_total]

Builds the variant as benchmarks/train_throughput.py does (`common.build_step`), runs 3
warm-up steps, profiles the 4th and prints the kernels (CUDA time, calls) sorted by total
GPU time, then the step's wall time and peak memory. Used to pick what to fuse next.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from benchmarks.common import VARIANTS, build_step, checkpoint, gpu_peak_gib  # noqa: E402


def _gpu_busy(prof) -> tuple[float, int]:
    """Seconds in which at least one kernel ran (copies left out), and the number of kernels:
    a step whose wall time is well above its busy time waits on the host."""
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type.name == "CUDA" and not e.name.startswith("Memcpy") and not e.name.startswith("Memset")
    )
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy / 1e6, len(spans)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="mistral-7b")
    p.add_argument("--variant", choices=VARIANTS, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--rows", type=int, default=40)
    p.add_argument("--sort", default="cuda_time_total", help="table order, e.g. self_cpu_time_total")
    args = p.parse_args()
    step = build_step(args.variant, checkpoint(args.shape), args.batch, args.seq)
    import torch
    from torch.profiler import ProfilerActivity, profile

    x = torch.randint(0, 32000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).cuda()
    for _ in range(3):
        step(x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        step(x)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    table = prof.key_averages().table(sort_by=args.sort, row_limit=args.rows, max_name_column_width=70)
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    gpu_total = sum(e.self_device_time_total for e in events) / 1e6
    busy, launches = _gpu_busy(prof)
    print(
        f"# {args.variant} b{args.batch} x s{args.seq}: step {wall:.3f} s (profiled), "
        f"GPU kernels {gpu_total:.3f} s, GPU busy (kernels, any stream) {busy:.3f} s, {launches} kernel launches, "
        f"peak {gpu_peak_gib():.2f} GiB"
    )
    kernels = sorted(events, key=lambda e: -e.self_device_time_total)[: args.rows]
    for e in kernels:
        print(f"{e.self_device_time_total / 1e3:10.1f} ms {e.count:6d}x  {e.key[:110]}")
    print(table)


if __name__ == "__main__":
    main()
