"""Inference speed: prefill and decode tokens/s apart, time to first token, peak memory.

    speed = measure_speed(engine, prompt_ids, new_tokens=64, runs=3)
    speed["decode_tokens_per_s"], speed["prefill_tokens_per_s"], speed["ttft_ms"]

Batch 1, greedy, a fixed number of new tokens (EOS ignored) so that every run does
the same work; one warm-up run first (allocator, kernels, caches), then the median
of `runs`. Peak memory is `torch.cuda.max_memory_allocated` on a GPU and the
process's peak resident set on the CPU (which includes everything loaded).
"""

from __future__ import annotations

import statistics

import torch

from ..models.loader import device_label
from ..models.memory import peak_memory_gib
from .sampling import SamplingParams


def measure_speed(engine, prompt_ids: list[int], new_tokens: int = 64, runs: int = 3) -> dict:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    cuda = engine.device.type == "cuda"
    engine.generate([prompt_ids], params)  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    results = [engine.generate([prompt_ids], params)[0] for _ in range(runs)]
    med = statistics.median
    return {
        "prefill_tokens_per_s": round(med(r.prefill_tokens_per_s for r in results), 1),
        "decode_tokens_per_s": round(med(r.decode_tokens_per_s for r in results), 1),
        "ttft_ms": round(1000 * med(r.prefill_s for r in results), 1),
        "prompt_tokens": len(prompt_ids),
        "new_tokens": new_tokens,
        "runs": runs,
        "batch": 1,
        "peak_memory_gib": round(peak_memory_gib("cuda" if cuda else "cpu"), 2),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if cuda else "process peak RSS",
        "device": device_label(engine.device),
    }
