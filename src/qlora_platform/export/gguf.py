"""`qlora export gguf`: merged HF model -> F16 GGUF -> quantized GGUFs, each loaded once, with a report.

    qlora export gguf --adapter runs/demo/final_adapter --quant Q4_K_M --quant Q8_0 --out runs/demo/gguf
    qlora export gguf --adapter runs/demo/final_adapter --lora-only --out runs/demo/gguf-lora

Steps: merge (when given an adapter) -> `convert_hf_to_gguf.py --outtype f16` ->
`llama-quantize` to each type -> a short llama.cpp generation from each file (the
proof it loads and runs) -> `export_report.md/.json`: holdout perplexity of the
merged HF model and of each GGUF on the same text (llama-perplexity's method,
replicated for the HF model in `export.quality`), file sizes, CPU tokens/s of each
GGUF (llama-bench) against the HF model on the same machine. Also writes an Ollama
`Modelfile` for the first quantized file. `--lora-only` converts the adapter alone
(`convert_lora_to_gguf.py`) plus the base to F16, and checks they load together.
"""
from __future__ import annotations

import codecs
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from .llama_cpp import LlamaCpp

QUANT_TYPES = ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "Q4_K_S", "Q5_K_S", "Q3_K_M", "Q2_K", "IQ4_XS"]
END_MARKER = "[end of text]"  # llama-completion prints it after EOS
SUPPORTED_ARCHS = {"LlamaForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM", "Qwen2ForCausalLM",
                   "Qwen3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM"}


def _run(cmd: list, what: str, env: dict | None = None, timeout: int = 3600) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        tail = " / ".join((done.stderr or done.stdout).strip().splitlines()[-4:])
        raise UserError(f"{what} failed (exit {done.returncode}): {tail}")
    return done


def check_architecture(model_dir: Path) -> str:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"'{model_dir}' has no config.json; --model must be a Hugging Face model folder "
                        f"(use --adapter for a LoRA adapter)")
    archs = json.loads(cfg_path.read_text()).get("architectures") or ["unknown"]
    if archs[0] not in SUPPORTED_ARCHS:
        raise UserError(f"architecture {archs[0]} is not one this exporter supports ({', '.join(sorted(SUPPORTED_ARCHS))}); "
                        f"llama.cpp may still convert it: run convert_hf_to_gguf.py yourself")
    return archs[0]


def convert_to_f16(tools: LlamaCpp, model_dir: Path, out_file: Path) -> Path:
    _run([sys.executable, tools.script("convert_hf_to_gguf.py"), model_dir, "--outfile", out_file, "--outtype", "f16"],
         "convert_hf_to_gguf.py", env=tools.python_env())
    return out_file


def convert_lora(tools: LlamaCpp, adapter: Path, base_dir: Path, out_file: Path) -> Path:
    _run([sys.executable, tools.script("convert_lora_to_gguf.py"), adapter, "--base", base_dir, "--outfile", out_file,
          "--outtype", "f16"], "convert_lora_to_gguf.py", env=tools.python_env())
    return out_file


def quantize(tools: LlamaCpp, f16: Path, out_file: Path, qtype: str) -> Path:
    _run([tools.binary("llama-quantize"), f16, out_file, qtype], f"llama-quantize to {qtype}")
    return out_file


def stream_completion(tools: LlamaCpp, gguf: Path, prompt: str, stats: dict, n_predict: int = 64,
                      temperature: float = 0.0, threads: int | None = None, extra: list | None = None) -> Iterator[str]:
    """Raw-prompt completion through llama-completion, yielding text as it comes; when done, `stats`
    holds the tokens and tokens/s measured by llama.cpp's own timers."""
    cmd = [tools.binary("llama-completion"), "-m", gguf, "-p", prompt, "-n", str(n_predict), "-no-cnv",
           "--no-display-prompt", "--temp", str(temperature), "--simple-io", "-t", str(threads or os.cpu_count() or 2),
           "--no-warmup", *(extra or [])]
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""  # held back while it could be the start of llama.cpp's end-of-text marker
    try:
        for chunk in iter(lambda: proc.stdout.read1(256), b""):
            pending += decoder.decode(chunk)
            if END_MARKER in pending:
                pending = pending[:pending.index(END_MARKER)].rstrip(" ")
                break
            safe = len(pending) - len(END_MARKER)
            if safe > 0:
                yield pending[:safe]
                pending = pending[safe:]
        if pending:
            yield pending
        proc.stdout.read()
    finally:
        if proc.poll() is None and proc.stdout and not proc.stdout.closed:
            proc.terminate()  # the caller stopped early (a stop string, Ctrl-C)
        err = proc.stderr.read().decode(errors="replace")
        code = proc.wait()
    if code != 0:
        raise UserError(f"llama.cpp could not run '{gguf}': {' / '.join(err.strip().splitlines()[-3:])}")
    speed = re.search(r"\beval time =.*?/\s*(\d+) runs.*?([\d.]+) tokens per second", err)
    prompt_speed = re.search(r"prompt eval time =.*?([\d.]+) tokens per second", err)
    stats.update({"tokens": int(speed.group(1)) if speed else None,
                  "tokens_per_s": float(speed.group(2)) if speed else None,
                  "prompt_tokens_per_s": float(prompt_speed.group(1)) if prompt_speed else None})


def run_completion(tools: LlamaCpp, gguf: Path, prompt: str, **kw) -> dict:
    stats: dict = {}
    text = "".join(stream_completion(tools, gguf, prompt, stats, **kw))
    return {"text": text.strip(), **stats}


def llama_perplexity(tools: LlamaCpp, gguf: Path, text_file: Path, n_ctx: int, threads: int | None = None) -> dict:
    done = _run([tools.binary("llama-perplexity"), "-m", gguf, "-f", text_file, "-c", str(n_ctx), "-b", str(n_ctx),
                 "-t", str(threads or os.cpu_count() or 2)], f"llama-perplexity on {gguf.name}")
    log = done.stderr + done.stdout
    final = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", log)
    chunks = re.search(r"calculating perplexity over (\d+) chunks", log)
    if not final:
        raise UserError(f"llama-perplexity printed no estimate for {gguf.name}")
    return {"perplexity": float(final.group(1)), "stderr": float(final.group(2)),
            "chunks": int(chunks.group(1)) if chunks else None}


def llama_bench(tools: LlamaCpp, gguf: Path, prompt_tokens: int = 32, new_tokens: int = 64,
                threads: int | None = None) -> dict:
    done = _run([tools.binary("llama-bench"), "-m", gguf, "-p", str(prompt_tokens), "-n", str(new_tokens), "-r", "3",
                 "-t", str(threads or os.cpu_count() or 2), "-o", "json"], f"llama-bench on {gguf.name}")
    rows = json.loads(done.stdout)
    out = {}
    for row in rows:
        key = "decode_tokens_per_s" if row.get("n_gen") else "prefill_tokens_per_s"
        out[key] = round(float(row["avg_ts"]), 1)
    return out


def size_mib(path: Path) -> float:
    return round(path.stat().st_size / 2 ** 20, 1)


def timed(fn, *args, **kw):
    start = time.time()
    result = fn(*args, **kw)
    return result, round(time.time() - start, 1)
