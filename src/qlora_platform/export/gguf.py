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
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError
from .llama_cpp import LlamaCpp

QUANT_TYPES = ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "Q4_K_S", "Q5_K_S", "Q3_K_M", "Q2_K", "IQ4_XS"]
END_MARKER = "[end of text]"  # llama-completion prints it after EOS
SUPPORTED_ARCHS = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Phi3ForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
}


def _run(cmd: list, what: str, env: dict | None = None, timeout: int = 3600) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        tail = " / ".join((done.stderr or done.stdout).strip().splitlines()[-4:])
        raise UserError(f"{what} failed (exit {done.returncode}): {tail}")
    return done


def check_architecture(model_dir: Path) -> str:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(
            f"'{model_dir}' has no config.json; --model must be a Hugging Face model folder "
            f"(use --adapter for a LoRA adapter)"
        )
    archs = json.loads(cfg_path.read_text()).get("architectures") or ["unknown"]
    if archs[0] not in SUPPORTED_ARCHS:
        raise UserError(
            f"architecture {archs[0]} is not one this exporter supports ({', '.join(sorted(SUPPORTED_ARCHS))}); "
            f"llama.cpp may still convert it: run convert_hf_to_gguf.py yourself"
        )
    return archs[0]


def _written(out_file: Path, step) -> Path:
    """Run `step`, which writes `out_file`; when it fails, remove what it left so no broken file remains."""
    try:
        step()
    except BaseException:
        Path(out_file).unlink(missing_ok=True)
        raise
    return out_file


def convert_to_f16(tools: LlamaCpp, model_dir: Path, out_file: Path) -> Path:
    return _written(
        out_file,
        lambda: _run(
            [
                sys.executable,
                tools.script("convert_hf_to_gguf.py"),
                model_dir,
                "--outfile",
                out_file,
                "--outtype",
                "f16",
            ],
            "convert_hf_to_gguf.py",
            env=tools.python_env(),
        ),
    )


def convert_lora(tools: LlamaCpp, adapter: Path, base_dir: Path, out_file: Path) -> Path:
    return _written(
        out_file,
        lambda: _run(
            [
                sys.executable,
                tools.script("convert_lora_to_gguf.py"),
                adapter,
                "--base",
                base_dir,
                "--outfile",
                out_file,
                "--outtype",
                "f16",
            ],
            "convert_lora_to_gguf.py",
            env=tools.python_env(),
        ),
    )


def quantize(tools: LlamaCpp, f16: Path, out_file: Path, qtype: str) -> Path:
    return _written(
        out_file, lambda: _run([tools.binary("llama-quantize"), f16, out_file, qtype], f"llama-quantize to {qtype}")
    )


def _last(pattern: str, log: str):
    # llama.cpp prints its timings last; the last match is theirs even if the text before held look-alikes.
    found = list(re.finditer(pattern, log))
    return found[-1] if found else None


def _rate(match) -> float | None:
    # 'inf' tokens per second: llama.cpp measured no time for that step
    return float(match.group(2)) if match and match.group(2) != "inf" else None


def parse_generation_stats(log: str, eos: bool, produced_text: bool = True) -> dict:
    """Generated tokens (EOS not counted) and speeds from llama.cpp's closing timings.

    The sampler chain counts every token it accepts: the prompt's, then each sampled one, so the sampled
    tokens are that count less the prompt tokens. The 'eval' runs are no count of them: they are the
    single-token decodes, which leave out the last token sampled (never evaluated) and take in a
    one-token prompt. A prompt of exactly k*n_batch+1 tokens (k >= 1) still reads one token long."""
    speed = _last(r"\beval time =.*?/\s*(\d+) runs.*?([\d.]+|inf) tokens per second", log)
    prompt = _last(r"prompt eval time =.*?/\s*(\d+) tokens.*?([\d.]+|inf) tokens per second", log)
    sampled = _last(r"samplers time =.*?/\s*(\d+) tokens", log)
    runs = int(speed.group(1)) if speed else None
    if sampled and prompt:
        tokens = int(sampled.group(1)) - int(prompt.group(1)) - (1 if eos else 0)
    elif runs is not None:
        tokens = runs + (0 if eos else 1)
    else:
        tokens = None
    if eos and not produced_text:
        tokens = 0  # EOS came first
    return {
        "tokens": max(tokens, 0) if tokens is not None else None,
        "eos": eos,
        "eval_runs": runs,
        "tokens_per_s": _rate(speed),
        "prompt_tokens_per_s": _rate(prompt),
    }


def stream_completion(
    tools: LlamaCpp,
    gguf: Path,
    prompt: str,
    stats: dict,
    n_predict: int = 64,
    temperature: float = 0.0,
    threads: int | None = None,
    extra: list | None = None,
) -> Iterator[str]:
    """Raw-prompt completion through llama-completion, yielding text as it comes; when done, `stats`
    holds the tokens generated (EOS not counted), whether EOS ended it, and tokens/s by llama.cpp's timers.

    The prompt goes through a file read verbatim (`--binary-file`, no escape processing), as an argument
    it would be limited to 128 KiB by the OS; stderr goes to a file, so a chatty log never fills a pipe
    that nobody reads while stdout is streamed."""
    with tempfile.TemporaryDirectory(prefix="qlora-gguf-") as tmp:
        prompt_file = Path(tmp) / "prompt.txt"
        prompt_file.write_bytes(prompt.encode("utf-8"))
        cmd = [
            tools.binary("llama-completion"),
            "-m",
            gguf,
            "--binary-file",
            prompt_file,
            "--no-escape",
            "-n",
            str(n_predict),
            "-no-cnv",
            "--no-display-prompt",
            "--temp",
            str(temperature),
            "--simple-io",
            "-t",
            str(threads or os.cpu_count() or 2),
            "--no-warmup",
            *(extra or []),
        ]
        with open(Path(tmp) / "stderr.log", "w+b") as err_file:
            proc = subprocess.Popen(
                [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=err_file, stdin=subprocess.DEVNULL
            )
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            pending = ""  # held back while it could be the start of llama.cpp's end-of-text marker
            eos = produced = finished = False
            try:
                for chunk in iter(lambda: proc.stdout.read1(256), b""):
                    pending += decoder.decode(chunk)
                    if END_MARKER in pending:
                        pending = pending[: pending.index(END_MARKER)].rstrip(" ")
                        eos = True
                        break
                    safe = len(pending) - len(END_MARKER)
                    if safe > 0:
                        produced = True
                        yield pending[:safe]
                        pending = pending[safe:]
                if not eos and pending.endswith("\n\n"):
                    pending = pending[:-2]  # llama-completion ends its output with a blank line of its own
                if pending:
                    produced = True
                    yield pending
                proc.stdout.read()
                finished = True
            finally:
                if not finished and proc.poll() is None:
                    proc.terminate()  # the caller stopped early (a stop string, Ctrl-C)
                code = proc.wait()
                proc.stdout.close()
                err_file.seek(0)
                err = err_file.read().decode(errors="replace")
    if code != 0:
        raise UserError(f"llama.cpp could not run '{gguf}': {' / '.join(err.strip().splitlines()[-3:])}")
    stats.update(parse_generation_stats(err, eos, produced))


def run_completion(tools: LlamaCpp, gguf: Path, prompt: str, **kw) -> dict:
    stats: dict = {}
    text = "".join(stream_completion(tools, gguf, prompt, stats, **kw))
    return {"text": text.strip(), **stats}


def llama_perplexity(tools: LlamaCpp, gguf: Path, text_file: Path, n_ctx: int, threads: int | None = None) -> dict:
    done = _run(
        [
            tools.binary("llama-perplexity"),
            "-m",
            gguf,
            "-f",
            text_file,
            "-c",
            str(n_ctx),
            "-b",
            str(n_ctx),
            "-t",
            str(threads or os.cpu_count() or 2),
        ],
        f"llama-perplexity on {gguf.name}",
    )
    log = done.stderr + done.stdout
    final = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", log)
    chunks = re.search(r"calculating perplexity over (\d+) chunks", log)
    if not final:
        raise UserError(f"llama-perplexity printed no estimate for {gguf.name}")
    return {
        "perplexity": float(final.group(1)),
        "stderr": float(final.group(2)),
        "chunks": int(chunks.group(1)) if chunks else None,
    }


def llama_bench(
    tools: LlamaCpp, gguf: Path, prompt_tokens: int = 32, new_tokens: int = 64, threads: int | None = None
) -> dict:
    done = _run(
        [
            tools.binary("llama-bench"),
            "-m",
            gguf,
            "-p",
            str(prompt_tokens),
            "-n",
            str(new_tokens),
            "-r",
            "3",
            "-t",
            str(threads or os.cpu_count() or 2),
            "-o",
            "json",
        ],
        f"llama-bench on {gguf.name}",
    )
    rows = json.loads(done.stdout)
    out = {}
    for row in rows:
        key = "decode_tokens_per_s" if row.get("n_gen") else "prefill_tokens_per_s"
        out[key] = round(float(row["avg_ts"]), 1)
    return out


def size_mib(path: Path) -> float:
    return round(path.stat().st_size / 2**20, 1)


def timed(fn, *args, **kw):
    start = time.time()
    result = fn(*args, **kw)
    return result, round(time.time() - start, 1)
