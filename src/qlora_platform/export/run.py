"""The export pipeline behind `qlora export gguf`, and its quality and speed report.

    report = export_gguf(adapter="runs/demo/final_adapter", quants=["Q4_K_M", "Q8_0"], out="runs/demo/gguf")

Writes into `out`: `merged/` (when given an adapter), `model-F16.gguf`,
`model-<QUANT>.gguf` for each type, `Modelfile`, `holdout.txt` (the scored text),
`export_report.json` and `export_report.md`.

Nothing is deleted that the export did not make: `merged/` is replaced only when it
is an earlier merge (see `export.merge`), else the export stops before any work.
GGUF files are written into a staging folder inside `out` and get their final
names only once llama.cpp has loaded them and generated text; a failed export
leaves no half-written or unchecked file under a final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from ..config import load_config
from ..errors import UserError
from ..infer.generation import single_turn
from ..infer.load import adapter_run_config, run_config_for
from .gguf import (
    QUANT_TYPES,
    check_architecture,
    convert_lora,
    convert_to_f16,
    llama_bench,
    llama_perplexity,
    quantize,
    run_completion,
    size_mib,
    timed,
)
from .llama_cpp import ensure_llama_cpp
from .merge import check_merge_target
from .ollama import modelfile, system_command

SMOKE_PROMPT = "What does `json.dumps` do in Python?"


def _source_dir(model: str) -> Path:
    from ..models.loader import resolve_model_source

    source = resolve_model_source(model)
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # noqa: BLE001
        from ..models.loader import hub_error

        raise hub_error(model, err) from None


def _holdout_records(eval_file: str | None) -> list[dict]:
    from ..data.formats import load_records

    if not eval_file or not Path(eval_file).is_file():
        raise UserError(
            f"holdout file '{eval_file}' not found; pass --eval-file FILE (or --no-quality to skip "
            f"the perplexity table)"
        )
    return load_records(eval_file, "eval_file")


def _hf_quality(model_dir: Path, text: str, n_ctx: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..infer.engine import Engine
    from ..infer.speed import measure_speed
    from .quality import chunked_perplexity

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ppl, seconds = timed(chunked_perplexity, model, tok, text, n_ctx)
    engine = Engine(model, tok)
    prompt = engine.encode_chat([{"role": "user", "content": SMOKE_PROMPT}])
    speed = measure_speed(engine, prompt, new_tokens=64, runs=3)
    return {
        **ppl,
        "seconds": seconds,
        "decode_tokens_per_s": speed["decode_tokens_per_s"],
        "prefill_tokens_per_s": speed["prefill_tokens_per_s"],
        "dtype": "fp32 (transformers, CPU)",
    }


def _convert_and_check(
    tools,
    source: Path,
    staging: Path,
    out_dir: Path,
    quants: list[str],
    adapter: str | None,
    lora_only: bool,
    system: str | None,
    log,
) -> tuple[list[dict], object]:
    """F16 and quantized GGUFs, made in `staging` and moved to `out_dir` once each has loaded and answered;
    returns their report entries and the tokenizer."""
    from transformers import AutoTokenizer

    log(f"export: {source} -> GGUF F16")
    f16, seconds = timed(convert_to_f16, tools, source, staging / "model-F16.gguf")
    files = [{"name": f16.name, "type": "F16", "size_mib": size_mib(f16), "seconds": seconds}]
    if lora_only:
        lora_file = staging / "adapter-F16.gguf"
        convert_lora(tools, Path(adapter), source, lora_file)
        files.append({"name": lora_file.name, "type": "LoRA F16", "size_mib": size_mib(lora_file)})
    for q in quants:
        log(f"export: quantize -> {q}")
        path, seconds = timed(quantize, tools, f16, staging / f"model-{q}.gguf", q)
        files.append({"name": path.name, "type": q, "size_mib": size_mib(path), "seconds": seconds})

    tok = AutoTokenizer.from_pretrained(source if not lora_only else adapter)
    prompt = tok.apply_chat_template(single_turn(SMOKE_PROMPT, system), tokenize=False, add_generation_prompt=True)
    for entry in files:
        path = staging / entry["name"]
        if entry["type"] == "LoRA F16":
            continue
        extra = ["--lora", str(staging / "adapter-F16.gguf")] if lora_only else None
        smoke = run_completion(tools, path, prompt, n_predict=48, extra=extra)
        if not smoke["text"]:
            raise UserError(
                f"{path.name} loaded but generated nothing; the export is broken (the earlier files "
                f"in {out_dir} are left as they were)"
            )
        entry["sample"] = smoke["text"]
        log(f"export: {entry['name']} loads and answers: {smoke['text'][:80]!r}")
    for entry in files:  # every file has passed: only now do they take their final names
        os.replace(staging / entry["name"], out_dir / entry["name"])
    return files, tok


def export_gguf(
    adapter: str | None = None,
    model: str | None = None,
    quants: list[str] | None = None,
    out: str = "export",
    lora_only: bool = False,
    eval_file: str | None = None,
    n_ctx: int = 512,
    dtype: str = "bf16",
    quality: bool = True,
    log=print,
) -> dict:
    start = time.time()
    if bool(adapter) == bool(model):
        raise UserError("give either --adapter DIR (merged first) or --model DIR (a Hugging Face model folder)")
    quants = quants or ["Q4_K_M"]
    unknown = [q for q in quants if q.upper() not in QUANT_TYPES]
    if unknown:
        raise UserError(f"unknown --quant {', '.join(unknown)}; choose from {', '.join(QUANT_TYPES)}")
    quants = list(dict.fromkeys(q.upper() for q in quants))
    out_dir = Path(out)
    if adapter and not lora_only:
        check_merge_target(out_dir / "merged")  # before any work: a folder we did not write is never deleted
    out_dir.mkdir(parents=True, exist_ok=True)
    run_cfg = run_config_for(Path(adapter)) if adapter else None
    cfg = load_config(run_cfg) if run_cfg else None
    eval_file = eval_file or (cfg.data.eval_file if cfg else None)
    records = _holdout_records(eval_file) if quality else []
    system = next((m["content"] for r in records[:1] for m in r.get("messages", []) if m["role"] == "system"), None)
    if system:
        try:
            system_command(system)  # the Modelfile's SYSTEM line, checked before hours of work
        except UserError as err:
            raise UserError(f"{eval_file}: {err}") from None
    tools = ensure_llama_cpp(log)

    report = {
        "adapter": adapter,
        "model": model or (cfg.model.name if cfg else None),
        "llama_cpp": str(tools.source),
        "files": [],
        "quants": quants,
    }
    if adapter:
        from ..export.merge import merge_adapter

        source = out_dir / "merged"
        if lora_only:
            source = _source_dir(adapter_run_config(Path(adapter)).model.name)
        else:
            report["merge"] = merge_adapter(adapter, str(source), dtype=dtype, log=log)
    else:
        source = _source_dir(model)
    report["architecture"] = check_architecture(source)

    staging = Path(tempfile.mkdtemp(prefix=".export-partial-", dir=out_dir))
    try:
        files, tok = _convert_and_check(tools, source, staging, out_dir, quants, adapter, lora_only, system, log)
    finally:
        shutil.rmtree(staging)  # this run's own folder: what is left in it did not pass

    if quality and not lora_only:
        from .quality import holdout_text

        text_file = out_dir / "holdout.txt"
        text_file.write_text(holdout_text(records))
        log(f"quality: perplexity of the merged HF model on {text_file} (n_ctx {n_ctx})")
        report["hf"] = _hf_quality(source, text_file.read_text(), n_ctx)
        for entry in files:
            path = out_dir / entry["name"]
            log(f"quality: llama-perplexity and llama-bench on {path.name}")
            entry.update(llama_perplexity(tools, path, text_file, n_ctx))
            entry.update(llama_bench(tools, path))
            entry["ppl_vs_hf_pct"] = round(100 * (entry["perplexity"] / report["hf"]["perplexity"] - 1), 3)
    report["files"] = files
    first_quant = next((f["name"] for f in files if f["type"] in quants), files[0]["name"])
    (out_dir / "Modelfile").write_text(modelfile(first_quant, tok.chat_template, system))
    report["seconds"] = round(time.time() - start, 1)
    from .report import write_export_report

    write_export_report(out_dir, report)
    log(f"export: done in {report['seconds']} s; report {out_dir / 'export_report.md'}")
    return report
