"""`qlora demo` (what `make demo` runs): the whole pipeline on the bundled model, on the CPU.

prepare --sample -> QLoRA on SmolLM2-135M-Instruct -> holdout perplexity of the
base and of the tuned model -> one holdout question answered before and after.
Prints a summary table and where everything was written; the same summary is
saved as `<output_dir>/demo_summary.json` and `demo.md`.

The base perplexity is measured on the LoRA-wrapped model before its first step:
LoRA's B matrices start at zero, so that model computes exactly the base model,
and one 4-bit load serves both measurements.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .config import Config
from .data.prepare import format_report, prepare
from .train.trainer import Trainer


@torch.no_grad()
def answer(model, tokenizer, messages: list[dict], max_new_tokens: int = 96) -> str:
    """A greedy answer with a mild repetition penalty (small models loop under pure greedy
    decoding); base and tuned get the same settings."""
    was_training = model.training
    model.eval()
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    device = next(model.parameters()).device
    out = model.generate(input_ids=prompt["input_ids"].to(device),
                         attention_mask=prompt["attention_mask"].to(device), max_new_tokens=max_new_tokens,
                         do_sample=False, repetition_penalty=1.2, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    if was_training:
        model.train()
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def run_demo(cfg: Config, data_dir: str = "data") -> int:
    start = time.time()
    print("== 1/4 prepare: the Python standard library assistant data set (offline)")
    report = prepare([], out_dir=data_dir, sample=True)
    print(format_report(report))
    cfg.data.train_file = report["train_file"]
    cfg.data.eval_file = report["eval_file"]

    print(f"\n== 2/4 load {cfg.model.name} in 4-bit NF4 with LoRA r={cfg.lora.r}")
    trainer = Trainer(cfg)
    question = json.loads(Path(cfg.data.eval_file).read_text().splitlines()[0])["messages"][:-1]
    t = time.time()
    base = trainer.evaluate()
    print(f"base holdout perplexity: {base['perplexity']:.2f} over {base['tokens']} answer tokens "
          f"({time.time() - t:.0f} s)")
    base_answer = answer(trainer.model, trainer.tokenizer, question)

    print(f"\n== 3/4 QLoRA training: {trainer.total_steps} steps on {trainer.device}")
    summary = trainer.train()

    print("\n== 4/4 evaluate the tuned model")
    tuned_answer = answer(trainer.model, trainer.tokenizer, question)
    tuned_ppl = summary["eval_perplexity"]
    drop = 100 * (1 - tuned_ppl / base["perplexity"])
    out = Path(cfg.output.dir)
    result = {"base_perplexity": base["perplexity"], "tuned_perplexity": tuned_ppl,
              "perplexity_reduction_pct": drop, "question": question[-1]["content"],
              "base_answer": base_answer, "tuned_answer": tuned_answer,
              "total_seconds": round(time.time() - start, 1), "train": summary}
    (out / "demo_summary.json").write_text(json.dumps(result, indent=2))
    rows = [("model", cfg.model.name), ("device", summary["device"]),
            ("data", f"{summary['train_examples']} train / {summary['eval_examples']} holdout pairs"),
            ("training", f"{summary['steps']} steps, {summary['train_seconds']:.0f} s, "
                         f"{summary['tokens_per_s']:.0f} tokens/s"),
            ("holdout perplexity", f"base {base['perplexity']:.2f} -> tuned {tuned_ppl:.2f} ({drop:.0f}% lower)"),
            ("adapter", str(out / "final_adapter")),
            ("logs", f"{out / 'train_log.jsonl'}, TensorBoard: tensorboard --logdir {out / 'logs'}"),
            ("summary", str(out / "demo_summary.json")),
            ("total time", f"{time.time() - start:.0f} s")]
    text = (f"\n{_table(rows)}\n\nQ: {question[-1]['content']}\n\n--- base model ---\n{base_answer}\n\n"
            f"--- tuned model ---\n{tuned_answer}\n")
    (out / "demo.md").write_text("# qlora demo\n\n```\n" + text + "```\n")
    print(text)
    return 0
