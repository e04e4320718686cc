"""Unsloth's own SFT path on the project's sample data set, 1 epoch: what a user would pick instead
(the peer of `qlora train` in benchmarks/real_data_train.sh).

    python unsloth_sft.py MODEL_DIR TRAIN_JSONL PACKING(true|false) OUT_DIR STEP_LOG

Packed runs use TRL's padding-free packing. Each optimizer step appends {"step", "loss"} to
STEP_LOG; the last stdout line is one JSON record: tokens (non-pad tokens the data collator
handed over), train_seconds, tokens_per_s, tokens_per_s_after_warmup (the first 3 steps
excluded), gpu_peak_gib, final_loss (last step's loss).
"""

import json
import os
import sys
import time

os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
import torch  # noqa: E402
import unsloth  # noqa: F401,E402  (first, so that it patches transformers and TRL)
from datasets import load_dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402
from unsloth import FastLanguageModel  # noqa: E402

WARMUP_STEPS, GRAD_ACCUM = 3, 4
path, data, packing, out, step_log = sys.argv[1], sys.argv[2], sys.argv[3] == "true", sys.argv[4], sys.argv[5]
model, tok = FastLanguageModel.from_pretrained(path, max_seq_length=1024, load_in_4bit=True, dtype=torch.bfloat16)
model = FastLanguageModel.get_peft_model(
    model,
    r=16,
    lora_alpha=32,
    lora_dropout=0,
    bias="none",
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    use_gradient_checkpointing="unsloth",
    random_state=0,
)
ds = load_dataset("json", data_files=data, split="train")
cfg = SFTConfig(
    output_dir=out,
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
print(
    json.dumps(
        {
            "variant": "unsloth-sft",
            "tokens": tokens,
            "train_seconds": round(metrics["train_runtime"], 1),
            "tokens_per_s": round(tokens / metrics["train_runtime"], 1),
            "tokens_per_s_after_warmup": round((tokens - first) / (step_ends[-1] - step_ends[WARMUP_STEPS - 1]), 1),
            "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "final_loss": round(losses[-1], 4),
            "steps": trainer.state.global_step,
            "dataset_tokens": sum(len(x) for x in trainer.train_dataset["input_ids"]),
        }
    ),
    flush=True,
)
