"""One CPU training step of a config, with and without LoRA dropout and the answer-only output head.

    python benchmarks/cpu_train_step.py [--config configs/demo.yaml] [--rounds 3]

Builds `qlora train`'s trainer for the config (its data must exist: `qlora prepare --sample`),
takes its first batch and times forward, backward and the optimizer step on that batch for four
variants, interleaved round by round in one process so that a noisy machine slows them alike:
LoRA dropout 0.05 or 0, and the loss through the full logits or through the output head at the
answer positions only (`models.scoring.answer_nll`). Prints the median and every time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]

from torch import nn  # noqa: E402

import qlora_platform.models.scoring as scoring  # noqa: E402
from qlora_platform.config import load_config  # noqa: E402
from qlora_platform.train.trainer import Trainer  # noqa: E402

VARIANTS = [  # (name, dropout on, answer-only head)
    ("dropout 0.05, full logits", True, False),
    ("dropout 0, full logits", False, False),
    ("dropout 0.05, answer-only head", True, True),
    ("dropout 0, answer-only head", False, True),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    cfg = load_config(args.config)
    cfg.output.dir = "/tmp/cpu_train_step"
    cfg.lora.dropout = 0.05  # PEFT builds the dropout modules only for a dropout above 0
    cfg.training.device = "cpu"
    trainer = Trainer(cfg, overwrite=True, final_eval=False, log=lambda *a, **k: None)
    lora_layers = [m for m in trainer.model.modules() if hasattr(m, "lora_dropout")]
    head_parts = scoring.output_head_parts
    _, rows = next(trainer._micro_batches(skip=0))

    def step(dropout: bool, answer_head: bool) -> float:
        for layer in lora_layers:
            for name in layer.lora_dropout:
                layer.lora_dropout[name] = nn.Dropout(0.05) if dropout else nn.Identity()
        # answer_nll takes the full logits when output_head_parts says the head is not plain.
        scoring.output_head_parts = head_parts if answer_head else (lambda model: None)
        start = time.perf_counter()
        trainer._forward_backward(rows, 1000)
        trainer.optimizer.step()
        trainer._zero_grad()
        return time.perf_counter() - start

    step(True, False)  # warm-up
    times: dict[str, list[float]] = {name: [] for name, _, _ in VARIANTS}
    for _ in range(args.rounds):
        for name, dropout, answer_head in VARIANTS:
            times[name].append(step(dropout, answer_head))
    print(f"{args.config}: {len(rows)} rows x {cfg.data.max_seq_len} tokens, {trainer.device}")
    for name, ts in times.items():
        print(f"{name:32s} median {statistics.median(ts):6.2f} s  ({', '.join(f'{t:.2f}' for t in ts)})")


if __name__ == "__main__":
    main()
