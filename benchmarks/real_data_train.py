"""One run of the real-data benchmark (benchmarks/real_data_train.sh): `qlora train` or Unsloth's
SFTTrainer for one epoch on the sample data set, with its host memory sampled, as one JSON line.

    python benchmarks/real_data_train.py qlora packed MODEL_DIR DATA_DIR WORK_DIR --results R.jsonl
    python benchmarks/real_data_train.py unsloth-sft padded MODEL_DIR DATA_DIR WORK_DIR --results R.jsonl
    python benchmarks/real_data_train.py qlora packed MODEL_DIR DATA_DIR WORK_DIR --results R.jsonl \
        --preset configs/phi3-mini.yaml --max-seq-len 2048 --max-steps 40

The run is a child process: the real CLI for qlora; for Unsloth this script again with
--child, which trains with Unsloth's SFTTrainer as a user would set it up (`unsloth_sft`) and
prints its result line. The child's resident memory is read from /proc every 0.2 s, its steps
from the per-step log it writes (qlora: train_log.jsonl with logging_steps 1; Unsloth:
unsloth_steps.jsonl). One line per run, appended to --results and printed. Fields: variant,
layout, tokens (non-pad tokens trained on), train_seconds, tokens_per_s,
tokens_per_s_after_warmup (the first 3 optimizer steps excluded), gpu_peak_gib (peak allocated
from the start of training), final_loss (last step's loss), steps, host_rss_gib_step10 (when
step 10's log line appears), host_rss_gib_max (the child's peak RSS, from the kernel),
host_rss_gib_last_step, host_rss_anon_gib_max (the largest anonymous RSS sampled every 0.2 s:
the peak without the memory-mapped checkpoint's pages), wall_seconds, device, commit, run_id.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from benchmarks.common import (  # noqa: E402
    MISTRAL_PRESET,
    add_run_args,
    emit,
    gpu_peak_gib,
    rss_bytes,
    run_meta,
    unsloth_model,
)

WARMUP_STEPS = 3  # optimizer steps left out of tokens_per_s_after_warmup
GRAD_ACCUM = 4  # Unsloth's run: batch 2 x grad-accum 4, as the Mistral-7B preset trains
CHILD_PREFIX = "unsloth-sft result: "  # marks the child's result line in its output


def watch(proc, step_log: Path, state: dict) -> None:
    """Samples RSS and notes it when step 10 and each later step is logged, until the child exits."""
    while proc.poll() is None:
        rss = rss_bytes(proc.pid)
        state["samples"].append((time.time(), rss))
        state["anon_max"] = max(state.get("anon_max", 0), rss_bytes(proc.pid, "RssAnon"))
        if step_log.is_file():
            steps = [json.loads(line).get("step", 0) for line in step_log.read_text().splitlines() if '"loss"' in line]
            if steps and max(steps) > state.get("last_step", 0):
                state["last_step"], state["rss_last_step"] = max(steps), rss
                if max(steps) >= 10 and state.get("rss_step10") is None:
                    state["rss_step10"] = rss
        time.sleep(0.2)


def qlora_command(
    layout: str, model: str, data: str, work: Path, preset: Path = MISTRAL_PRESET, extra: list[str] | None = None
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "qlora_platform.cli",
        "train",
        "--config",
        str(preset),
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
        *(extra or []),
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


def unsloth_sft(model_dir: str, train_file: str, packing: bool, work: Path, step_log: Path) -> dict:
    """Unsloth's own SFT path, 1 epoch, as a user would set it up (the peer of `qlora train`):
    SFTTrainer on the data set's chat pairs, TRL's padding-free packing when packed. Each
    optimizer step appends {"step", "loss"} to `step_log`. Returns tokens (non-pad tokens the
    data collator handed over), train_seconds, tokens_per_s, tokens_per_s_after_warmup,
    gpu_peak_gib, final_loss, steps, dataset_tokens."""
    model, tok = unsloth_model(Path(model_dir), seq=1024)  # Unsloth first: it patches transformers and TRL
    import torch
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cfg = SFTConfig(
        output_dir=str(work),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=GRAD_ACCUM,
        num_train_epochs=1,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        optim="paged_adamw_8bit",
        bf16=True,
        logging_steps=1,
        save_strategy="no",
        max_length=1024,
        packing=packing,
        padding_free=packing,
        report_to=[],
        dataset_num_proc=1,
        seed=0,
    )
    ds = load_dataset("json", data_files=train_file, split="train")
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=ds, args=cfg)
    micro_tokens = []  # non-pad tokens of each micro-batch, in the order the collator built them
    collator = trainer.data_collator

    def counting_collator(features):
        batch = collator(features)
        mask = batch.get("attention_mask")
        micro_tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting_collator
    step_ends = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            step_ends.append(time.time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                with open(step_log, "a") as f:
                    f.write(json.dumps({"step": state.global_step, "loss": logs["loss"]}) + "\n")

    trainer.add_callback(Steps())
    torch.cuda.reset_peak_memory_stats()
    metrics = trainer.train().metrics
    tokens = sum(micro_tokens)
    first = sum(micro_tokens[: WARMUP_STEPS * GRAD_ACCUM])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "tokens": tokens,
        "train_seconds": round(metrics["train_runtime"], 1),
        "tokens_per_s": round(tokens / metrics["train_runtime"], 1),
        "tokens_per_s_after_warmup": round((tokens - first) / (step_ends[-1] - step_ends[WARMUP_STEPS - 1]), 1),
        "gpu_peak_gib": gpu_peak_gib(),
        "final_loss": round(losses[-1], 4),
        "steps": trainer.state.global_step,
        "dataset_tokens": sum(len(x) for x in trainer.train_dataset["input_ids"]),
    }


def seq_len(args) -> int:
    """The max_seq_len the run trained with: --max-seq-len, else the preset's."""
    import yaml

    return args.max_seq_len or yaml.safe_load(args.preset.read_text())["data"]["max_seq_len"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant", choices=["qlora", "unsloth-sft"])
    ap.add_argument("layout", choices=["packed", "padded"])
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("work", type=Path)
    ap.add_argument("--results", type=Path, help="the JSON-lines file the run's line is appended to")
    ap.add_argument("--child", action="store_true", help="unsloth-sft: train in this process (the measured child)")
    ap.add_argument("--preset", type=Path, default=MISTRAL_PRESET, help="qlora: the config preset trained")
    ap.add_argument("--max-seq-len", type=int, help="qlora: data.max_seq_len (default: the preset's)")
    ap.add_argument("--max-steps", type=int, help="qlora: stop after this many optimizer steps (default: 1 epoch)")
    add_run_args(ap, commit_env="COMMIT")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    step_log = args.work / ("train_log.jsonl" if args.variant == "qlora" else "unsloth_steps.jsonl")
    if args.child:
        if args.variant != "unsloth-sft":
            ap.error("--child runs unsloth-sft only")
        result = unsloth_sft(args.model, f"{args.data}/train.jsonl", args.layout == "packed", args.work, step_log)
        print(CHILD_PREFIX + json.dumps(result), flush=True)
        return
    if args.results is None:
        ap.error("--results is required")
    step_log.unlink(missing_ok=True)
    extra = [*(["--max_seq_len", str(args.max_seq_len)] if args.max_seq_len else [])]
    extra += ["--max_steps", str(args.max_steps)] if args.max_steps else []
    if args.variant == "qlora":
        cmd = qlora_command(args.layout, args.model, args.data, args.work, args.preset, extra)
    elif extra or args.preset != MISTRAL_PRESET:
        ap.error("--preset, --max-seq-len and --max-steps apply to the qlora variant")
    else:
        cmd = [sys.executable, __file__, args.variant, args.layout, args.model, args.data, str(args.work), "--child"]
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
        marked = next(line for line in reversed(lines) if line.startswith(CHILD_PREFIX))
        result = json.loads(marked.removeprefix(CHILD_PREFIX))
    emit(
        {
            "variant": args.variant,
            "layout": args.layout,
            **({"preset": args.preset.name, "max_seq_len": seq_len(args)} if args.variant == "qlora" else {}),
            **result,
            "host_rss_gib_step10": round(state["rss_step10"] / 2**30, 2) if state.get("rss_step10") else None,
            "host_rss_gib_max": round(peak / 2**30, 2),
            "host_rss_anon_gib_max": round(state.get("anon_max", 0) / 2**30, 2),
            "host_rss_gib_last_step": round(state["rss_last_step"] / 2**30, 2) if state.get("rss_last_step") else None,
            "wall_seconds": round(time.time() - start, 1),
        }
        | run_meta(args),
        args.results,
    )


if __name__ == "__main__":
    main()
