"""What the benchmark scripts share: where things are, the random checkpoints, the Unsloth and
transformers set-ups of the peers, the training step of each variant, run metadata, memory
readings and JSON-line output.

    from benchmarks.common import add_run_args, build_step, checkpoint, emit, run_meta

The package half (random checkpoints, the platform's and the reference's training step) is
`qlora_platform.train.synthetic`, which the GPU tests use too; this module adds what only the
benchmarks need. Nothing heavy is imported at module level: Unsloth must be imported before
transformers, so a script decides when torch and transformers load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from qlora_platform.train.synthetic import (  # noqa: E402
    TARGETS,
    build_qlora_platform,
    build_reference,
    optimizer_step,
    paged_adamw_8bit,
)
from qlora_platform.train.synthetic import checkpoint as _checkpoint  # noqa: E402

ASSETS = ROOT / "benchmarks/assets"
TOKENIZER_32K = ASSETS / "tok32k"  # a 32k-word tokenizer, the vocabulary of the random checkpoints
MISTRAL_PRESET = ROOT / "configs/mistral-7b.yaml"
VARIANTS = ["qlora_platform", "reference", "unsloth"]
GIB = 2**30


def checkpoint(shape: str) -> Path:
    """The random checkpoint of `shape` with the 32k benchmark tokenizer, built once in the temp folder."""
    return _checkpoint(shape, TOKENIZER_32K)


# Run metadata and output.


def add_run_args(parser: argparse.ArgumentParser, commit_env: str = "QLORA_COMMIT") -> argparse.ArgumentParser:
    """--run-id (default $RUN_ID, else the time) and --commit (default $`commit_env`, else unknown)."""
    parser.add_argument("--run-id", default=os.environ.get("RUN_ID") or time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--commit", default=os.environ.get(commit_env, "unknown"))
    return parser


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def run_meta(args: argparse.Namespace) -> dict:
    """The fields every result line ends with: device, commit, run_id."""
    return {"device": device_name(), "commit": args.commit, "run_id": args.run_id}


def emit(record: dict, results: Path | None = None) -> None:
    """Prints the record as one JSON line; with `results`, appends it to that file too."""
    line = json.dumps(record)
    if results is not None:
        with open(results, "a") as f:
            f.write(line + "\n")
    print(line, flush=True)


# Memory readings.


def gpu_peak_gib() -> float:
    """Peak bytes allocated on the GPU since the last `torch.cuda.reset_peak_memory_stats`, in GiB."""
    import torch

    return round(torch.cuda.max_memory_allocated() / GIB, 2)


def gpu_reserved_gib() -> float:
    """Bytes the caching allocator holds now (CUDA graph pools included), in GiB."""
    import torch

    return round(torch.cuda.memory_reserved() / GIB, 2)


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of process `pid` from /proc; 0 once it has gone. `field="RssAnon"` leaves
    out file-backed pages (a memory-mapped checkpoint), which the kernel can drop under pressure."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# The peers' models.


def unsloth_model(path: Path, seq: int | None = None, load_in_4bit: bool = True, lora: bool = True):
    """Unsloth's FastLanguageModel from `path` in bf16 (4-bit weights unless told otherwise);
    with `lora`, its LoRA adapters as the platform sets them (r=16, alpha=32, no dropout, the seven
    projections) with Unsloth's gradient checkpointing. Returns (model, tokenizer). Imports
    Unsloth, which must come before transformers: call it before anything loads transformers."""
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    import torch
    import unsloth  # noqa: F401  (patches transformers and TRL when imported first)
    from unsloth import FastLanguageModel

    kwargs = {"max_seq_length": seq} if seq else {}
    model, tokenizer = FastLanguageModel.from_pretrained(
        str(path), load_in_4bit=load_in_4bit, dtype=torch.bfloat16, **kwargs
    )
    if lora:
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
    return model, tokenizer


def load_for_generation(variant: str, path: Path, weights: str):
    """A model for greedy generation: Unsloth's `for_inference` (variant unsloth), else
    transformers' with bitsandbytes NF4 (`weights` nf4) or bf16 weights, on GPU 0, in eval mode."""
    if variant == "unsloth":
        model, _ = unsloth_model(path, load_in_4bit=weights == "nf4", lora=False)
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
        return model
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": torch.bfloat16, "device_map": {"": 0}}
    if weights == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def model_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of every script that loads a model for generation: --shape, --weights."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--shape", default="mistral-7b")
    p.add_argument("--weights", choices=["bf16", "nf4"], required=True)
    return p


# One training step of each variant.


def build_unsloth(path: Path, seq: int, lr: float = 2e-4):
    """Unsloth's training step: its model and gradient checkpointing, the model's own loss,
    paged AdamW 8-bit."""
    model, _ = unsloth_model(path, seq)
    model.train()
    return optimizer_step(lambda x: model(input_ids=x, labels=x).loss, paged_adamw_8bit(model, lr), model)


def build_step(variant: str, path: Path, batch: int, seq: int, overrides: dict | None = None):
    """One optimizer step of `variant` (see VARIANTS) on token ids, built for batch x seq;
    `overrides` are config keys for qlora_platform."""
    if variant == "unsloth":
        return build_unsloth(path, seq)  # imports Unsloth before torch's first use
    if variant == "reference":
        return build_reference(path)
    return build_qlora_platform(path, seq, batch, preset=MISTRAL_PRESET, overrides=overrides)
