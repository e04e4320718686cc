"""The server's generation throughput with N concurrent streams, in process, one JSON line out.

    python benchmarks/serve_throughput.py --shape mistral-7b --weights nf4|bf16 --streams 16 \
        [--new-tokens 128] [--run-id ID] [--commit SHA]

What `qlora serve --max-concurrent N` runs on a GPU: one Engine with continuous batching
(infer/batcher.py), N threads each sending one request at a time (32-token random prompt,
--new-tokens greedy tokens, EOS ignored) for --rounds rounds. Reports the total generated
tokens/s over the timed rounds and the median time to first token. The HTTP layer is left
out on purpose: it adds the same small cost to every peer and is tested in tests/infer.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from benchmarks.common import (  # noqa: E402
    add_run_args,
    checkpoint,
    emit,
    gpu_peak_gib,
    load_for_generation,
    model_parser,
    run_meta,
)


def main() -> None:
    p = model_parser(__doc__)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    add_run_args(p)
    args = p.parse_args()
    import torch
    from transformers import AutoTokenizer

    from qlora_platform.infer.engine import Engine
    from qlora_platform.infer.sampling import SamplingParams

    path = checkpoint(args.shape)
    engine = Engine(load_for_generation("reference", path, args.weights), AutoTokenizer.from_pretrained(path))
    engine.enable_batching(args.streams)
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 32000, (32,), generator=gen).tolist() for _ in range(args.streams)]
    results = []

    def stream(i):
        for _ in range(args.rounds):
            results.append(engine.run(prompts[i], params))

    engine.run(prompts[0], params)  # warm-up: captures the batch's decode graph
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(args.streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    decoder = engine.batcher.decoder
    emit(
        {
            "variant": "qlora_platform",
            "shape": args.shape,
            "weights": args.weights,
            "streams": args.streams,
            "new_tokens": args.new_tokens,
            "total_tokens_per_s": round(sum(r.completion_tokens for r in results) / wall, 1),
            "ttft_ms_median": round(1000 * statistics.median(r.prefill_s for r in results), 1),
            "cuda_graphs": decoder.graph is not None,
            "graph_fallback": decoder.fallback_reason,
            "fused_step": decoder.fast is not None,
            "fused_step_off": decoder.fast_reason,
            "peak_alloc_gib": gpu_peak_gib(),
        }
        | run_meta(args)
    )


if __name__ == "__main__":
    main()
