"""What is alive at the peak of a QLoRA training step: the largest live allocations, and where
in the code each was made.

    python benchmarks/memory_peak_probe.py --batch 2 --seq 1024 [--top 20]

Builds the qlora_platform step of benchmarks/train_throughput.py (what `qlora train` runs),
records the CUDA caching allocator's history over three steps (eager, CUDA graph capture,
replay), and prints for each step its peak of allocated bytes and, at the highest peak, the
live blocks by size with the innermost frame of this repository (or else of torch /
transformers) that allocated them. Used to find what to trim when a peak must come down.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_throughput import build_step, checkpoint  # noqa: E402


def _where(frames: list[dict]) -> str:
    for key in ("qlora_platform", "benchmarks", "transformers", "torch"):
        for f in frames:
            if key in f.get("filename", ""):
                return f"{Path(f['filename']).name}:{f['line']} {f['name']}"
    return "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args()
    step = build_step("qlora_platform", checkpoint("mistral-7b"), args.batch, args.seq)
    import torch

    x = torch.randint(0, 32000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).cuda()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    marks = []
    for _ in range(3):
        step(x)
        torch.cuda.synchronize()
        marks.append(len(torch.cuda.memory._snapshot()["device_traces"][0]))
    trace = torch.cuda.memory._snapshot()["device_traces"][0]
    torch.cuda.memory._record_memory_history(enabled=None)
    import bisect

    live: dict[int, tuple[int, list]] = {}
    now, best, best_live, peaks = base, 0, {}, [0, 0, 0]
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], ev.get("frames", []))
            now += ev["size"]
        elif ev["action"] == "free_requested":
            now -= live.pop(ev["addr"])[0] if ev["addr"] in live else ev["size"]
        k = min(bisect.bisect_right(marks, i), 2)
        peaks[k] = max(peaks[k], now)
        if now > best:
            best, best_live = now, dict(live)
    for k, (name, peak) in enumerate(zip(("eager", "capture", "replay"), peaks)):
        print(f"step {k + 1} ({name}): peak {peak / 2**30:.3f} GiB")
    print(
        f"allocated before the steps {base / 2**30:.3f} GiB; at the highest peak ({best / 2**30:.3f} GiB) "
        f"the blocks made during the steps, largest first:"
    )
    for size, frames in sorted(best_live.values(), key=lambda t: -t[0])[: args.top]:
        print(f"{size / 2**20:10.1f} MiB  {_where(frames)}")


if __name__ == "__main__":
    main()
