"""`qlora demo` (what `make demo` runs): the whole pipeline on the bundled model, on the CPU.

prepare --sample -> QLoRA on SmolLM2-135M-Instruct -> `qlora eval` of the adapter
(holdout perplexity, keyword benchmark and speed, base against tuned, with plots).
Prints a summary table, where everything was written, and a side by side of base and tuned
answers with their keyword hits for SIDE_BY_SIDE benchmark prompts chosen by a fixed rule
(`side_by_side`); the same is saved as `<output_dir>/demo_summary.json` and `demo.md`.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

from .config import Config
from .data.prepare import format_report, prepare
from .eval.run import run_eval
from .train.trainer import Trainer

SIDE_BY_SIDE = 4  # benchmark prompts the demo prints with both answers


def side_by_side(rows: list[dict], k: int = SIDE_BY_SIDE) -> list[dict]:
    """`k` of the keyword benchmark's rows, evenly spaced in the prompt file's order (the first,
    then every len/k-th). The rule is fixed before any answer exists, so the prompts shown are
    not picked for how either side answered them."""
    n, k = len(rows), min(k, len(rows))
    return [rows[i * n // k] for i in range(k)]


def _hits_line(side: dict, keywords: int) -> str:
    found = ", ".join(side["hits"]) or "none"
    result = "pass" if side["passed"] else "fail"
    return f"{side['hit_count']} of {keywords} keywords ({side['needed']} needed): {result}; found: {found}"


def format_side_by_side(shown: list[dict], total: int) -> str:
    positions = ", ".join(str(r["position"]) for r in shown)
    lines = [
        f"Side by side: {len(shown)} of the {total} benchmark prompts, evenly spaced in the prompt file's order "
        f"(prompts {positions}; a fixed rule, not a choice made after reading the answers).",
    ]
    for i, row in enumerate(shown, 1):
        n = len(row["keywords"])
        lines += [
            "",
            f"[{i}/{len(shown)}] Q: {row['prompt']}",
            f"    keywords: {'; '.join(row['keywords'])}",
            f"--- base model: {_hits_line(row['base'], n)}",
            row["base"]["answer"].strip(),
            f"--- tuned model: {_hits_line(row['tuned'], n)}",
            row["tuned"]["answer"].strip(),
        ]
    return "\n".join(lines)


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def run_demo(cfg: Config, data_dir: str = "data") -> int:
    start = time.time()
    print("== 1/3 prepare: the Python standard library assistant data set (offline)")
    report = prepare([], out_dir=data_dir, sample=True)
    print(format_report(report))
    cfg.data.train_file = report["train_file"]
    cfg.data.eval_file = report["eval_file"]

    print(f"\n== 2/3 QLoRA training of {cfg.model.name} (4-bit NF4, LoRA r={cfg.lora.r})")
    # The demo's run folder is the demo's own; `qlora eval` below scores the holdout, so the trainer does not.
    trainer = Trainer(cfg, overwrite=True, final_eval=False)
    summary = trainer.train()
    out = Path(cfg.output.dir)
    del trainer
    gc.collect()

    print("\n== 3/3 evaluate: base against tuned")
    ev = run_eval(str(out / "final_adapter"), speed_runs=1)
    ppl, rate, bench = ev["perplexity"], ev["keyword_pass_rate"], ev["keyword_benchmark"]
    answers = [{**row, "position": i + 1} for i, row in enumerate(ev["prompts"])]
    shown = side_by_side(answers)
    result = {
        "base_perplexity": ppl["base"],
        "tuned_perplexity": ppl["tuned"],
        "perplexity_reduction_pct": ppl["reduction_pct"],
        "keyword_pass_rate": rate,
        "decode_tokens_per_s": ev["tokens_per_s"],
        "side_by_side": [
            {k: row[k] for k in ("position", "id", "prompt", "keywords", "needed", "base", "tuned")} for row in shown
        ],
        "total_seconds": round(time.time() - start, 1),
        "train": summary,
        "eval_report": str(out / "eval" / "eval.md"),
    }
    (out / "demo_summary.json").write_text(json.dumps(result, indent=2))
    rows = [
        ("model", cfg.model.name),
        ("device", summary["device"]),
        ("data", f"{summary['train_examples']} train / {summary['eval_examples']} holdout pairs"),
        (
            "training",
            f"{summary['steps']} steps, {summary['train_seconds']:.0f} s, {summary['tokens_per_s']:.0f} tokens/s",
        ),
        (
            "holdout perplexity",
            f"base {ppl['base']:.2f} -> tuned {ppl['tuned']:.2f} ({ppl['reduction_pct']:.0f}% lower)",
        ),
        (
            "keyword benchmark",
            f"base {bench['base_passed']}/{bench['prompts']} -> "
            f"tuned {bench['tuned_passed']}/{bench['prompts']} passed",
        ),
        (
            "generation",
            f"{ev['speed']['decode_tokens_per_s']:.1f} tokens/s decode, "
            f"{ev['speed']['prefill_tokens_per_s']:.0f} tokens/s prefill",
        ),
        ("adapter", str(out / "final_adapter")),
        ("eval report", f"{out / 'eval' / 'eval.md'} (+ eval.json, {', '.join(ev['plots'])})"),
        ("logs", f"{out / 'train_log.jsonl'}, TensorBoard: tensorboard --logdir {out / 'logs'}"),
        ("total time", f"{time.time() - start:.0f} s"),
    ]
    text = f"\n{_table(rows)}\n" + (f"\n{format_side_by_side(shown, len(answers))}\n" if shown else "")
    (out / "demo.md").write_text("# qlora demo\n\n```\n" + text + "```\n")
    print(text)
    return 0
