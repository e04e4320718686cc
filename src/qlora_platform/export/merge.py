"""`qlora merge`: fold a LoRA adapter into 16-bit base weights, save, and prove the result.

    qlora merge --adapter runs/demo/final_adapter --out runs/demo/merged [--dtype bf16|fp16]

The base is loaded unquantized (fp32 on the CPU, so the merge itself adds no
rounding), the adapter applied, and `merge_and_unload` computes W + scale * B @ A
for every adapted layer. Before saving, the merged model's logits are compared
with those of base + adapter on a few prompts; a difference past the tolerance
stops the export loudly (a wrong merge is worse than none). The model is saved in
the asked dtype as safetensors, with the tokenizer and its chat template, and the
largest logit difference is recorded in `merge_report.json`.

Rounding the merged weights to bf16 (3 significant digits) or fp16 moves the logits
by more than the fp32 check allows, so that difference has its own tolerance: a
share of the largest logit (ROUNDING_TOLERANCE), scaled to the dtype's precision;
past it (an overflow to inf in fp16, a broken cast) the merge stops, nothing saved.

The model is written to a fresh folder beside `--out` and moved into place when
complete. An existing `--out` is replaced only when it is empty or an earlier merge
(it holds `merge_report.json`); any other folder is refused, never deleted.

Note the merged weights are the 16-bit base plus the update, while training saw
the NF4-rounded base plus the update: `qlora export` measures what that costs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..errors import UserError
from ..infer.load import adapter_run_config, adapter_tokenizer, check_adapter_dir
from ..models.bundled import fix_byte_level_tokenizer

PARITY_PROMPTS = ["What does `json.dumps` do in Python?", "Explain list comprehensions.", "Hello!"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Largest logit difference after rounding the weights, as a share of the largest logit. Each weight moves by
# up to half a unit in the last place (bf16: 2^-8 relative, fp16: 2^-11) and the errors of every layer add
# up; 25 such units leave room for deep models (SmolLM2-135M lands near 2.5% in bf16) while an overflow or
# a broken cast lands far past it.
ROUNDING_TOLERANCE = {"bf16": 25 * 2.0**-8, "fp16": 25 * 2.0**-11}
MARKER = "merge_report.json"


def check_merge_target(out_dir: Path) -> None:
    """Refuse an --out folder that holds anything but an earlier merge: it is never deleted."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"'{out_dir}' is a file; choose a folder for --out")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MARKER).is_file():
        raise UserError(
            f"'{out_dir}' exists and is not an earlier merge (no {MARKER}); choose an empty --out "
            f"folder, or move its files away"
        )


def _move_into_place(staged: Path, out_dir: Path) -> None:
    """Put the complete merge at `out_dir`, replacing an earlier merge (checked again, just before)."""
    check_merge_target(out_dir)
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.replaced-{staged.name.rsplit('-', 1)[-1]}")
        out_dir.rename(old)
    staged.rename(out_dir)
    if old is not None:
        shutil.rmtree(old)  # an earlier merge (or an empty folder), as checked above


def rounding_verdict(report: dict) -> str:
    """One line on the difference the saved dtype's rounding makes, with its tolerance and whether it passed."""
    dtype = report["dtype"]
    diff, limit = report[f"max_logit_diff_after_{dtype}"], report["rounding_tolerance"]
    share = 100 * diff / max(report["logit_scale"], 1.0)
    verdict = "ok" if report["rounding_ok"] else "FAILED"
    return (
        f"after rounding to {dtype} the largest logit difference is {diff:.3g} ({share:.1f}% of the largest "
        f"logit, {report['logit_scale']:.1f}): {verdict}, tolerance {limit:.3g} for {dtype} rounding; the "
        f"merge itself is checked in fp32 ({report['max_logit_diff_fp32']:.2e}, tolerance "
        f"{report['tolerance']:.2g})"
    )


@torch.no_grad()
def _logits(model, batches) -> list[torch.Tensor]:
    return [model(input_ids=ids).logits.float() for ids in batches]


def merge_adapter(adapter: str, out: str, dtype: str = "bf16", tolerance: float = 1e-3, log=print) -> dict:
    from ..models.loader import load_adapter, load_base_model

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)} (got '{dtype}')")
    adapter_dir = Path(adapter)
    check_adapter_dir(adapter_dir)
    out_dir = Path(out)
    check_merge_target(out_dir)
    start = time.time()
    cfg = adapter_run_config(adapter_dir)
    tokenizer = adapter_tokenizer(cfg, adapter_dir)
    base = load_base_model(cfg, "cpu", for_training=False, quantize=False)
    model = load_adapter(base, adapter_dir).eval()
    batches = [
        torch.tensor(
            [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True, return_dict=True
                )["input_ids"]
            ]
        )
        for p in PARITY_PROMPTS
    ]
    reference = _logits(model, batches)
    merged = model.merge_and_unload()
    after = _logits(merged, batches)
    max_diff = max(float((a - r).abs().max()) for a, r in zip(after, reference))
    scale = max(float(r.abs().max()) for r in reference)
    log(f"merge: largest logit difference merged vs base+adapter {max_diff:.2e} (logits up to {scale:.1f})")
    if max_diff > tolerance * max(scale, 1.0):
        raise UserError(
            f"the merged model's logits differ from base+adapter by {max_diff:.3g} (tolerance "
            f"{tolerance * max(scale, 1.0):.3g}); the merge is wrong, nothing was saved"
        )
    # The rounded weights, computed in fp32 (module.float() converts in place; the values stay the rounded
    # ones, so converting back to the dtype for saving is exact).
    rounded = _logits(merged.to(DTYPES[dtype]).float(), batches)
    saved_diff = max(float((a - r).abs().max()) for a, r in zip(rounded, reference))
    if not all(bool(torch.isfinite(a).all()) for a in rounded):
        saved_diff = float("inf")  # an overflow (fp16 past 65504): NaN would slip through max()
    limit = ROUNDING_TOLERANCE.get(dtype, tolerance) * max(scale, 1.0)
    report = {
        "adapter": str(adapter_dir),
        "base_model": cfg.model.name,
        "dtype": dtype,
        "max_logit_diff_fp32": max_diff,
        f"max_logit_diff_after_{dtype}": saved_diff,
        "logit_scale": scale,
        "tolerance": tolerance * max(scale, 1.0),
        "rounding_tolerance": limit,
        "rounding_ok": saved_diff <= limit,
        "prompts": PARITY_PROMPTS,
    }
    log(f"merge: {rounding_verdict(report)}")
    if not report["rounding_ok"]:
        raise UserError(
            f"the merged model's logits after rounding to {dtype} differ from base+adapter by "
            f"{saved_diff:.3g}, past the {limit:.3g} that {dtype} rounding explains; nothing was saved "
            f"(try --dtype fp32, or bf16 where fp16 overflows)"
        )
    merged = merged.to(DTYPES[dtype])
    merged.config.use_cache = True
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        merged.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
        fix_byte_level_tokenizer(staged)  # adapters saved with a GGUF-derived tokenizer carry the old form
        report["seconds"] = round(time.time() - start, 1)
        (staged / MARKER).write_text(json.dumps(report, indent=2))
        _move_into_place(staged, out_dir)
    finally:
        if staged.exists():
            shutil.rmtree(staged)  # this run's own unfinished folder
    log(f"merge: saved {dtype} model to {out_dir}")
    return report
