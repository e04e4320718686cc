"""QLoRA training throughput and peak memory, one variant per process, one JSON line out.

    python benchmarks/train_throughput.py --shape mistral-7b --batch 2 --seq 1024 \
        --variant qlora_platform|reference|unsloth [--run-id ID] [--commit SHA] [--steps 11]
    python benchmarks/train_throughput.py --shape mistral-7b --shapes 2x1024,1x2048,4x4096 --variant ...

Builds (or reuses) a random-weight checkpoint of the shape in /tmp (throughput and
memory do not depend on weight values), then times optimizer steps on random
token ids: NF4 + double quant, bf16 compute, LoRA r=16 alpha=32 on
q,k,v,o,gate,up,down, paged AdamW 8-bit, gradient checkpointing, model in train
mode; the median step after 3 warm-up steps, `torch.cuda.max_memory_allocated`.

- reference: transformers + PEFT + bitsandbytes, the model's own loss (the plan's stack).
- qlora_platform: what `qlora train` runs on a GPU: `train.model.build_training_model` from
  the Mistral-7B preset (fast kernels, offloaded checkpoints), the trainer's optimizer and
  loss (`summed_nll`, the summed answer-token NLL without logits), forward and backward
  through the trainer's `train.model.loss_backward` (CUDA graphs from the second step of a
  shape; `--set training.cuda_graphs=false` measures it without them).
- unsloth: Unsloth's FastLanguageModel with its gradient checkpointing.

Each variant runs in its own process (so peaks do not mix); a GPU run calls this once
per variant and shape with one shared --run-id and appends the lines to
benchmarks/results/train_throughput.jsonl. `--shapes` measures several batch shapes in one
process, smallest first, one line each: the model loads once (a 7B load is most of a
process's minute) and the peak is reset before each shape, so each line's peak is that
shape's (allocated bytes do not carry over from the shape before).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def checkpoint(shape: str) -> Path:
    path = Path(f"/tmp/{shape}-random")
    if not (path / "config.json").is_file():
        sys.path.insert(0, str(ROOT))
        from benchmarks.random_checkpoint import make

        make(shape, path, ROOT / "benchmarks/assets/tok32k")
    return path


def optimizer_step(loss_fn, opt, model=None, zero_grad=None, forward_backward=None):
    """One training step on token ids x: loss, backward (or `forward_backward(x)`, which does
    both and returns the loss), optimizer step; returns the loss."""
    zero_grad = zero_grad or (lambda: opt.zero_grad(set_to_none=True))

    def step(x):
        if forward_backward is not None:
            loss = forward_backward(x)
        else:
            loss = loss_fn(x)
            loss.backward()
        opt.step()
        zero_grad()
        return loss.detach()

    step.loss_fn = loss_fn  # for benchmarks/probe_train_memory.py
    step.model = model  # for the loss-parity test (same LoRA start for both variants)
    return step


def build_reference(path: Path, lr: float = 2e-4):
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16, device_map={"": 0})
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    )
    model.train()
    opt = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    return optimizer_step(lambda x: model(input_ids=x, labels=x).loss, opt, model)


def build_qlora_platform(path: Path, seq: int, batch: int, lr: float = 2e-4, overrides: dict | None = None):
    sys.path.insert(0, str(ROOT / "src"))
    from qlora_platform.config import load_config
    from qlora_platform.train.flat_params import FlatParams
    from qlora_platform.train.model import build_training_model, loss_backward, summed_nll
    from qlora_platform.train.trainer import build_optimizer

    cfg = load_config(
        ROOT / "configs/mistral-7b.yaml",
        {
            "model.name": str(path),
            "lora.target_modules": json.dumps(TARGETS),
            "data.max_seq_len": seq,
            "training.batch_size": batch,
            "training.gradient_checkpointing": True,
            "training.learning_rate": lr,
            "training.weight_decay": 0.0,
            **(overrides or {}),
        },
    )
    model, fused = build_training_model(cfg, "cuda", log=lambda msg: print(msg, file=sys.stderr))
    flat = FlatParams([p for p in model.parameters() if p.requires_grad])  # as the trainer does on CUDA
    opt = build_optimizer([flat.param], cfg, "cuda")
    run = loss_backward(model, fused, cfg, "cuda", log=lambda msg: print(msg, file=sys.stderr))
    step = optimizer_step(
        lambda x: summed_nll(model, fused, x, input_ids=x) / (x.numel() - x.size(0)),
        opt,
        model,
        flat.zero_grad,
        lambda x: run({"labels": x, "input_ids": x}, 1 / (x.numel() - x.size(0))),
    )
    from qlora_platform.models.memory import GIB, estimate_training_memory

    def preflight(batch: int, seq: int) -> float:
        """The trainer's VRAM pre-flight for this shape, to check against the measured peak."""
        cfg.training.batch_size, cfg.data.max_seq_len = batch, seq
        return estimate_training_memory(model.config, cfg)["total"] / GIB

    step.preflight = preflight
    return step


def build_unsloth(path: Path, seq: int):
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    import bitsandbytes as bnb
    import torch
    import unsloth  # noqa: F401  (must come before transformers)
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(path), max_seq_length=seq, load_in_4bit=True, dtype=torch.bfloat16)
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=32,
        lora_dropout=0,
        bias="none",
        target_modules=TARGETS,
        use_gradient_checkpointing="unsloth",
        random_state=0,
    )
    model.train()
    opt = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    return optimizer_step(lambda x: model(input_ids=x, labels=x).loss, opt)


def build_step(variant: str, path: Path, batch: int, seq: int, overrides: dict | None = None):
    if variant == "unsloth":
        return build_unsloth(path, seq)  # imports unsloth before torch's first use
    if variant == "reference":
        return build_reference(path)
    return build_qlora_platform(path, seq, batch, overrides=overrides)


def measure(step, batch: int, seq: int, steps: int) -> dict:
    """Median step time (after 3 warm-ups), tokens/s and the peak allocated for one shape."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    x = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(0)).cuda()
    times, host, loss = [], [], None
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = step(x)
        host.append(time.perf_counter() - t)  # until the host has queued the step: near the
        torch.cuda.synchronize()  # step time when the host is the bottleneck
        times.append(time.perf_counter() - t)
    timed = sorted(times[3:])
    median = timed[len(timed) // 2]
    host_median = sorted(host[3:])[len(timed) // 2]
    return {
        "batch": batch,
        "seq": seq,
        "tokens_per_s": round(batch * seq / median),
        "median_step_s": round(median, 3),
        "host_step_s": round(host_median, 3),
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 2),  # CUDA graph pools included
        "loss": round(float(loss), 4),
    }


def _shapes(args) -> list[tuple[int, int]]:
    if args.shapes:
        try:
            pairs = [(int(b), int(s)) for b, s in (part.split("x") for part in args.shapes.split(","))]
        except ValueError:
            raise SystemExit(
                f"--shapes {args.shapes!r}: write batch x sequence pairs, e.g. 2x1024,1x2048,4x4096"
            ) from None
        return sorted(pairs, key=lambda bs: bs[0] * bs[1])
    if args.batch is None or args.seq is None:
        raise SystemExit("give --batch and --seq, or --shapes BxS,BxS")
    return [(args.batch, args.seq)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="mistral-7b")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--shapes", help="several batch shapes in one process, e.g. 2x1024,1x2048,4x4096")
    p.add_argument("--variant", choices=["qlora_platform", "reference", "unsloth"], required=True)
    p.add_argument("--steps", type=int, default=11)
    p.add_argument("--run-id", default=time.strftime("%Y%m%d-%H%M%S"))
    p.add_argument("--commit", default=os.environ.get("QLORA_COMMIT", "unknown"))
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for qlora_platform, e.g. training.fp8=false (recorded in the line)",
    )
    args = p.parse_args()
    overrides = dict(kv.split("=", 1) for kv in args.set)
    shapes = _shapes(args)
    # Built for the largest shape (Unsloth sizes its RoPE cache from max_seq_length).
    batch_max, seq_max = max(b for b, _ in shapes), max(s for _, s in shapes)
    step = build_step(args.variant, checkpoint(args.shape), batch_max, seq_max, overrides)
    import torch

    for batch, seq in shapes:
        line = {"variant": args.variant, "shape": args.shape} | measure(step, batch, seq, args.steps)
        line |= {"device": torch.cuda.get_device_name(), "commit": args.commit, "run_id": args.run_id}
        if hasattr(step, "preflight"):
            line["preflight_gib"] = round(step.preflight(batch, seq), 2)
        if overrides:
            line["overrides"] = overrides
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
