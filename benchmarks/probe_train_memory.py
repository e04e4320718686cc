"""Where the GPU memory of one QLoRA step goes: resident, peak in forward, peak in backward, and
whether gradient checkpointing recomputes each decoder layer (forward calls per layer per step).

    python benchmarks/probe_train_memory.py --batch 4 --seq 4096 --variant qlora_platform|reference
"""

from __future__ import annotations

import argparse
import gc
import json
from collections import Counter

import torch
from train_throughput import build_qlora_platform, build_reference, checkpoint

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--variant", default="qlora_platform", choices=["qlora_platform", "reference"])
    args = p.parse_args()
    path = checkpoint("mistral-7b")
    step = (
        build_qlora_platform(path, args.seq, args.batch) if args.variant == "qlora_platform" else build_reference(path)
    )
    x = torch.randint(0, 32000, (args.batch, args.seq)).cuda()
    step(x)  # warm-up: optimizer state exists from here on
    gc.collect()
    torch.cuda.synchronize()
    layers = [
        m for m in gc.get_objects() if isinstance(m, torch.nn.Module) and type(m).__name__.endswith("DecoderLayer")
    ]
    calls: Counter = Counter()
    for m in layers:
        m.register_forward_hook(lambda mod, i, o: calls.update([id(mod)]))
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = step.loss_fn(x)
    torch.cuda.synchronize()
    after_forward, peak_forward = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    forward_calls = sorted(set(calls.values()))
    loss.backward()
    torch.cuda.synchronize()
    g = 2**30
    print(
        json.dumps(
            {
                "variant": args.variant,
                "batch": args.batch,
                "seq": args.seq,
                "resident_gib": round(resident / g, 2),
                "kept_after_forward_gib": round((after_forward - resident) / g, 2),
                "peak_forward_gib": round(peak_forward / g, 2),
                "peak_step_gib": round(torch.cuda.max_memory_allocated() / g, 2),
                "decoder_layers": len(layers),
                "forward_calls_in_forward": forward_calls,
                "forward_calls_per_step": sorted(set(calls.values())),
            }
        )
    )
