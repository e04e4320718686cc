"""One run of the DPO benchmark (benchmarks/dpo_train.sh): `qlora train` with the Mistral-7B DPO
preset or TRL's DPOTrainer, on the same preference pairs, batch, schedule and steps, as one JSON line.

    python benchmarks/dpo_train.py qlora MODEL_DIR DATA_DIR WORK_DIR --steps 30 --results R.jsonl
    python benchmarks/dpo_train.py trl-dpo MODEL_DIR DATA_DIR WORK_DIR --steps 30 --results R.jsonl
    python benchmarks/dpo_train.py long-pairs MODEL_DIR DATA_DIR     # writes 1024-token pairs to DATA_DIR

qlora runs as a child process through the real CLI (`configs/mistral-7b-dpo.yaml`); TRL's
DPOTrainer runs in this process as a user would set it up for QLoRA: the model in 4-bit NF4
through bitsandbytes, `peft_config` given and no `ref_model`, so TRL's reference is the base with
the adapter disabled, computed at every step (its default). Both: batch 2 pairs x grad-accum 4,
max length 1024, lr 5e-5 cosine with 10% warm-up, beta 0.1, paged AdamW 8-bit, gradient
checkpointing, LoRA r=16 alpha=32 on the seven projections. Without a GPU both run on the CPU with
plain AdamW (to check the script; no figure comes from that). Tokens are the non-pad tokens of the
rows trained on (the prompt counts in the chosen and in the rejected row). Where a pair is longer
than 1024 tokens qlora cuts the prompt's start and TRL the end of the row (its default
truncation), so the rows have the same width.

Fields: variant, data, tokens, train_seconds, reference_seconds (qlora: the reference pass before
the first step), tokens_per_s (qlora: over train_seconds + reference_seconds), tokens_per_s_after_warmup (the first 3
optimizer steps left out), gpu_peak_gib (peak allocated from the start of training; for qlora the
reference pass included), steps, final_loss, reward_accuracy (last logged), host_rss_gib_max,
wall_seconds, device, commit, run_id.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from benchmarks.common import add_run_args, emit, gpu_peak_gib, run_meta  # noqa: E402

PRESET = ROOT / "configs/mistral-7b-dpo.yaml"
WARMUP_STEPS = 3
BATCH, GRAD_ACCUM, MAX_LEN, LR, BETA = 2, 4, 1024, 5e-5, 0.1


def qlora(model: str, data: str, work: Path, steps: int) -> dict:
    cmd = [
        sys.executable, "-m", "qlora_platform.cli", "train", "--config", str(PRESET),
        "--model.name", model, "--train_file", f"{data}/train.jsonl", "--eval_file", "null",
        "--max_steps", str(steps), "--logging_steps", "1", "--output.dir", str(work), "--overwrite",
    ]  # fmt: skip
    import torch

    if not torch.cuda.is_available():  # checking the script on a CPU machine, not a figure
        cmd += ["--device", "cpu", "--optimizer", "adamw", "--gradient_checkpointing", "false"]
    proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    print(proc.stdout, end="")
    # The reference pass (adapter off, once before the first step) is not in train_seconds; TRL
    # computes its reference inside every step, so the comparison adds it back.
    found = re.search(r"^reference: .* in ([0-9.]+) s$", proc.stdout, re.M)
    reference_s = float(found.group(1)) if found else 0.0
    summary = json.loads((work / "train_summary.json").read_text())
    logged = [r for r in map(json.loads, (work / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    later = logged[WARMUP_STEPS:]
    later_s = sum(r["tokens"] / r["tokens_per_s"] for r in later)
    tokens = sum(r["tokens"] for r in logged)
    return {
        "tokens": tokens,
        "train_seconds": summary["train_seconds"],
        "reference_seconds": reference_s,
        "tokens_per_s": round(tokens / (summary["train_seconds"] + reference_s), 1),
        "tokens_per_s_after_warmup": round(sum(r["tokens"] for r in later) / later_s, 1) if later else None,
        "gpu_peak_gib": summary["peak_memory_gib"],
        "steps": len(logged),
        "final_loss": round(logged[-1]["loss"], 4),
        "reward_accuracy": logged[-1].get("reward_accuracy"),
    }


def trl_dpo(model_dir: str, data: str, work: Path, steps: int) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from qlora_platform.train.synthetic import TARGETS

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quant, dtype=torch.bfloat16, device_map={"": 0} if gpu else "cpu"
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(TARGETS), task_type="CAUSAL_LM")
    args = DPOConfig(
        output_dir=str(work),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=GRAD_ACCUM,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,  # a fraction of the steps (transformers 5 folds warmup_ratio into it)
        beta=BETA,
        max_length=MAX_LEN,
        optim="paged_adamw_8bit" if gpu else "adamw_torch",
        bf16=gpu,
        use_cpu=not gpu,
        gradient_checkpointing=gpu,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
    )

    def conversational(rec: dict) -> dict:
        return {
            "prompt": rec["prompt"],
            "chosen": [{"role": "assistant", "content": rec["chosen"]}],
            "rejected": [{"role": "assistant", "content": rec["rejected"]}],
        }

    ds = load_dataset("json", data_files=f"{data}/train.jsonl", split="train")
    extra = [c for c in ds.column_names if c not in ("prompt", "chosen", "rejected")]
    ds = ds.map(conversational, remove_columns=extra)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)
    micro_tokens: list[int] = []
    collator = trainer.data_collator

    def counting(features):
        batch = collator(features)
        micro_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting
    step_ends: list[float] = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if gpu:
                torch.cuda.synchronize()
            step_ends.append(time.time())

    trainer.add_callback(Steps())
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    metrics = trainer.train().metrics
    tokens = sum(micro_tokens[: steps * GRAD_ACCUM])
    first = sum(micro_tokens[: WARMUP_STEPS * GRAD_ACCUM])
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "tokens": tokens,
        "train_seconds": round(metrics["train_runtime"], 1),
        "tokens_per_s": round(tokens / metrics["train_runtime"], 1),
        "tokens_per_s_after_warmup": round((tokens - first) / (step_ends[-1] - step_ends[WARMUP_STEPS - 1]), 1)
        if len(step_ends) > WARMUP_STEPS
        else None,
        "gpu_peak_gib": gpu_peak_gib() if gpu else None,
        "steps": trainer.state.global_step,
        "final_loss": round(logs[-1]["loss"], 4),
        "reward_accuracy": logs[-1].get("rewards/accuracies"),
    }


def long_pairs(model_dir: str, out: Path, n: int = 64) -> None:
    """`n` pairs whose rows are at least 1024 tokens with the model's tokenizer: a long prompt of
    words from the sample answers and two answers of about 700 tokens that share no sentence."""
    from transformers import AutoTokenizer

    from qlora_platform.data.sample import build_sample_records

    tok = AutoTokenizer.from_pretrained(model_dir)
    words = " ".join(r["messages"][-1]["content"] for r in build_sample_records()).split()
    rng = random.Random(0)

    def text(tokens: int) -> str:
        out = []
        while len(tok(" ".join(out))["input_ids"]) < tokens:
            out += rng.sample(words, 64)
        return " ".join(out)

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w") as f:
        for _ in range(n):
            rec = {"prompt": [{"role": "user", "content": text(400)}], "chosen": text(700), "rejected": text(700)}
            f.write(json.dumps(rec) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant", choices=["qlora", "trl-dpo", "long-pairs"])
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("work", type=Path, nargs="?")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--results", type=Path)
    add_run_args(ap, commit_env="COMMIT")
    args = ap.parse_args()
    if args.variant == "long-pairs":
        return long_pairs(args.model, Path(args.data))
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    run = qlora if args.variant == "qlora" else trl_dpo
    result = run(args.model, args.data, args.work, args.steps)
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    emit(
        {"variant": args.variant, "data": Path(args.data).name, **result}
        | {"host_rss_gib_max": round(peak * 1024 / 2**30, 2), "wall_seconds": round(time.time() - start, 1)}
        | run_meta(args),
        args.results,
    )


if __name__ == "__main__":
    main()
