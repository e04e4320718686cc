"""`qlora merge`: fold a LoRA adapter into 16-bit base weights, save, and prove the result.

    qlora merge --adapter runs/demo/final_adapter --out runs/demo/merged [--dtype bf16|fp16]

The base is loaded unquantized (fp32 on the CPU, so the merge itself adds no
rounding), the adapter applied, and `merge_and_unload` computes W + scale * B @ A
for every adapted layer. Before saving, the merged model's logits are compared
with those of base + adapter on a few prompts; a difference past the tolerance
stops the export loudly (a wrong merge is worse than none). The model is saved in
the asked dtype as safetensors, with the tokenizer and its chat template, and the
largest logit difference is recorded in `merge_report.json`.

Note the merged weights are the 16-bit base plus the update, while training saw
the NF4-rounded base plus the update: `qlora export` measures what that costs.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..errors import UserError
from ..infer.load import adapter_run_config, adapter_tokenizer, check_adapter_dir
from ..models.bundled import fix_byte_level_tokenizer

PARITY_PROMPTS = ["What does `json.dumps` do in Python?", "Explain list comprehensions.", "Hello!"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "merge_report.json").is_file():
        raise UserError(f"'{out_dir}' exists and is not an earlier merge; choose an empty --out folder")
    start = time.time()
    cfg = adapter_run_config(adapter_dir)
    tokenizer = adapter_tokenizer(cfg, adapter_dir)
    base = load_base_model(cfg, "cpu", for_training=False, quantize=False)
    model = load_adapter(base, adapter_dir).eval()
    batches = [torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True,
                                                           add_generation_prompt=True, return_dict=True)["input_ids"]])
               for p in PARITY_PROMPTS]
    reference = _logits(model, batches)
    merged = model.merge_and_unload()
    after = _logits(merged, batches)
    max_diff = max(float((a - r).abs().max()) for a, r in zip(after, reference))
    scale = max(float(r.abs().max()) for r in reference)
    log(f"merge: largest logit difference merged vs base+adapter {max_diff:.2e} (logits up to {scale:.1f})")
    if max_diff > tolerance * max(scale, 1.0):
        raise UserError(f"the merged model's logits differ from base+adapter by {max_diff:.3g} (tolerance "
                        f"{tolerance * max(scale, 1.0):.3g}); the merge is wrong, nothing was saved")
    merged = merged.to(DTYPES[dtype])
    merged.config.use_cache = True
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    fix_byte_level_tokenizer(out_dir)  # adapters saved with a GGUF-derived tokenizer carry the old form
    saved_diff = max(float((a - r).abs().max()) for a, r in zip(_logits(merged.float(), batches), reference))
    report = {"adapter": str(adapter_dir), "base_model": cfg.model.name, "dtype": dtype,
              "max_logit_diff_fp32": max_diff, f"max_logit_diff_after_{dtype}": saved_diff,
              "logit_scale": scale, "tolerance": tolerance * max(scale, 1.0), "prompts": PARITY_PROMPTS,
              "seconds": round(time.time() - start, 1)}
    (out_dir / "merge_report.json").write_text(json.dumps(report, indent=2))
    log(f"merge: saved {dtype} model to {out_dir} (after rounding to {dtype}: largest difference {saved_diff:.3g})")
    return report
