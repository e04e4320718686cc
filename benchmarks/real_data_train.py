"""One run of the real-data benchmark (benchmarks/real_data_train.sh): `qlora train` or Unsloth's
SFTTrainer for one epoch on the sample data set, with its host memory sampled, as one JSON line.

    python benchmarks/real_data_train.py qlora packed MODEL_DIR DATA_DIR WORK_DIR --results R.jsonl
    python benchmarks/real_data_train.py unsloth-sft padded MODEL_DIR DATA_DIR WORK_DIR --results R.jsonl

The run is a child process (the real CLI for qlora, benchmarks/unsloth_sft.py for Unsloth); its
resident memory is read from /proc every 0.2 s, its steps from the per-step log it writes
(qlora: train_log.jsonl with logging_steps 1; Unsloth: the step log of unsloth_sft.py).
Fields: variant, layout, tokens (non-pad tokens trained on), train_seconds, tokens_per_s,
tokens_per_s_after_warmup (the first 3 optimizer steps excluded), gpu_peak_gib (peak allocated
from the start of training), host_rss_gib_step10 (when step 10's log line appears),
host_rss_gib_max (the child's peak RSS, from the kernel), final_loss (last step's loss),
device, commit, run_id.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

WARMUP_STEPS = 3


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def watch(proc, step_log: Path, state: dict) -> None:
    """Samples RSS and notes it when step 10 and each later step is logged, until the child exits."""
    while proc.poll() is None:
        rss = rss_bytes(proc.pid)
        state["samples"].append((time.time(), rss))
        if step_log.is_file():
            steps = [json.loads(line).get("step", 0) for line in step_log.read_text().splitlines() if '"loss"' in line]
            if steps and max(steps) > state.get("last_step", 0):
                state["last_step"], state["rss_last_step"] = max(steps), rss
                if max(steps) >= 10 and state.get("rss_step10") is None:
                    state["rss_step10"] = rss
        time.sleep(0.2)


def qlora_command(layout: str, model: str, data: str, work: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "qlora_platform.cli",
        "train",
        "--config",
        "configs/mistral-7b.yaml",
        "--model.name",
        model,
        "--train_file",
        f"{data}/train.jsonl",
        "--eval_file",
        f"{data}/eval.jsonl",
        "--packing",
        "true" if layout == "packed" else "false",
        "--epochs",
        "1",
        "--logging_steps",
        "1",
        "--output.dir",
        str(work),
        "--overwrite",
    ]


def qlora_result(work: Path) -> dict:
    summary = json.loads((work / "train_summary.json").read_text())
    steps = [r for r in map(json.loads, (work / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    tokens = sum(r["tokens"] for r in steps)
    later = steps[WARMUP_STEPS:]
    later_s = sum(r["tokens"] / r["tokens_per_s"] for r in later)
    return {
        "tokens": tokens,
        "train_seconds": summary["train_seconds"],
        "tokens_per_s": round(tokens / summary["train_seconds"], 1),
        "tokens_per_s_after_warmup": round(sum(r["tokens"] for r in later) / later_s, 1),
        "gpu_peak_gib": summary["peak_memory_gib"],
        "final_loss": round(steps[-1]["loss"], 4),
        "steps": len(steps),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variant", choices=["qlora", "unsloth-sft"])
    ap.add_argument("layout", choices=["packed", "padded"])
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("work", type=Path)
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--run-id", default=os.environ.get("RUN_ID", "local"))
    ap.add_argument("--commit", default=os.environ.get("COMMIT", "unknown"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.variant == "qlora":
        cmd, step_log = qlora_command(args.layout, args.model, args.data, args.work), args.work / "train_log.jsonl"
        step_log.unlink(missing_ok=True)
    else:
        step_log = args.work / "unsloth_steps.jsonl"
        step_log.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            str(Path(__file__).with_name("unsloth_sft.py")),
            args.model,
            f"{args.data}/train.jsonl",
            "true" if args.layout == "packed" else "false",
            str(args.work),
            str(step_log),
        ]
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = {"samples": []}
    sampler = threading.Thread(target=watch, args=(proc, step_log, state), daemon=True)
    sampler.start()
    lines = []
    for line in proc.stdout:
        if "it/s]" not in line and "s/it]" not in line:
            print(line, end="", flush=True)
        lines.append(line)
    proc.wait()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if proc.returncode != 0:
        sys.exit(f"{args.variant} {args.layout}: exit {proc.returncode}")
    if args.variant == "qlora":
        result = qlora_result(args.work)
    else:
        result = json.loads(next(line for line in reversed(lines) if line.startswith('{"variant"')))
        result.pop("variant", None)
    import torch

    record = {
        "variant": args.variant,
        "layout": args.layout,
        **result,
        "host_rss_gib_step10": round(state["rss_step10"] / 2**30, 2) if state.get("rss_step10") else None,
        "host_rss_gib_max": round(peak / 2**30, 2),
        "host_rss_gib_last_step": round(state["rss_last_step"] / 2**30, 2) if state.get("rss_last_step") else None,
        "wall_seconds": round(time.time() - start, 1),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "commit": args.commit,
        "run_id": args.run_id,
    }
    with open(args.results, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
