"""Loading base models and tokenizers, 4-bit QLoRA set-up, and LoRA adapters.

One place decides where a model comes from (hub id, local folder, .gguf file or
`bundled:NAME`), on which device and in which dtype it runs, and how it is
quantized (NF4 + double quantization through bitsandbytes, on CPU and GPU alike):

    tok = load_tokenizer(cfg.model)
    model = load_base_model(cfg, device, for_training=True)
    model = attach_lora(model, cfg)

Hub failures (401/403 on gated models, unknown ids, no network) become one
`UserError` that says what to do.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..config import Config, ModelConfig, resolve
from ..errors import UserError
from .bundled import BUNDLED_PREFIX, resolve_gguf


def resolve_model_source(name: str) -> str:
    """A local folder path or a hub id that `from_pretrained` accepts; GGUF is converted first."""
    if name.startswith(BUNDLED_PREFIX) or name.endswith(".gguf"):
        return str(resolve_gguf(name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(
                f"model folder '{path}' has no config.json: point model.name at a "
                f"Hugging Face model folder, a .gguf file, or a hub id"
            )
        return str(path)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local:
        raise UserError(
            f"model path '{name}' does not exist; use a local folder, a .gguf file, "
            f"'bundled:smollm2-135m-instruct' or a hub id such as "
            f"'mistralai/Mistral-7B-Instruct-v0.3'"
        )
    work_offline_if_hub_unreachable()
    return name  # a hub id


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub (or $HF_ENDPOINT) opens within `timeout`."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection(
            (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout
        ):
            return True
    except OSError:
        return False


def work_offline_if_hub_unreachable() -> None:
    """Without a network the hub client retries for tens of seconds before failing; when the hub
    cannot be reached at all, switch it to offline mode at once, so that a cached model loads
    and a missing one fails with one line straight away."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE and not hub_reachable():
        constants.HF_HUB_OFFLINE = True


def hub_error(name: str, err: Exception) -> UserError:
    """Turn the hub's many failure modes into one actionable line."""
    text = f"{type(err).__name__}: {err}"
    if any(s in text for s in ("401", "403", "GatedRepo", "gated", "restricted")):
        return UserError(
            f"the hub refused '{name}' (401/403): it is gated or private. Accept its licence "
            f"on its model page, then set HF_TOKEN or run 'huggingface-cli login'"
        )
    if any(s in text for s in ("RepositoryNotFound", "404", "not a valid model identifier")):
        return UserError(f"model '{name}' was not found on the hub nor on disk; check the id or path")
    if any(s in text for s in ("offline", "LocalEntryNotFound", "Connection", "resolve", "couldn't connect")):
        return UserError(
            f"cannot reach the hub to fetch '{name}' and it is not in the local cache; "
            f"connect to the network or point model.name at a local folder"
        )
    return UserError(f"cannot load model '{name}': {str(err).splitlines()[0]}")


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "training.device is 'cuda' but no CUDA GPU is visible; set --device cpu or check 'qlora doctor'"
        )
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def device_label(device) -> str:
    """'NVIDIA H100 80GB HBM3' or 'cpu (2 threads)': what reports print as the device."""
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


def pick_compute_dtype(requested: str, device: str):
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # On the CPU bitsandbytes computes NF4 matmuls in bf16 correctly (to 0.3% of fp32)
    # and faster on CPUs with AVX512-BF16 / AMX; fp32 elsewhere.
    return torch.bfloat16 if _cpu_has_bf16() else torch.float32


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_tokenizer(model_cfg: ModelConfig, source: str | None = None):
    """The model's tokenizer; `source` overrides where it is read from (an adapter folder)."""
    from transformers import AutoTokenizer

    source = source or resolve_model_source(model_cfg.name)
    try:
        tok = AutoTokenizer.from_pretrained(
            source, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
    except Exception as err:  # noqa: BLE001 - the hub raises many types
        raise hub_error(model_cfg.name, err) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # transformers ignores this clean-up for BPE tokenizers and warns each time it does; off, the
    # decoded text is the same and the warning is gone.
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "BPE":
        tok.clean_up_tokenization_spaces = False
    if not getattr(tok, "chat_template", None):
        raise UserError(
            f"the tokenizer of '{model_cfg.name}' has no chat template; use an instruct "
            f"model or one whose tokenizer_config.json defines chat_template"
        )
    return tok


def disable_cpu_weight_repacking(model) -> int:
    """Keep bitsandbytes from repacking 4-bit weights for its fast CPU inference kernel.

    bitsandbytes 0.50.2 on CPUs with AVX512-BF16 repacks a Linear4bit weight in place
    the first time the layer runs in eval mode without gradients; afterwards that layer
    passes no gradient to its input, even in train mode, so training after any
    evaluation silently goes wrong. Must run before the model's first forward pass.
    Returns how many layers were changed.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def load_base_model(cfg: Config, device: str, for_training: bool, quantize: bool | None = None):
    """The base model, 4-bit quantized when the config says so (and `quantize` is not False)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    source = resolve_model_source(cfg.model.name)
    dtype = pick_compute_dtype(cfg.quantization.compute_dtype, device)
    quantize = cfg.quantization.load_in_4bit if quantize is None else quantize
    kwargs = dict(
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation,
        use_safetensors=True,
        dtype=dtype if quantize else (dtype if device == "cuda" else torch.float32),
    )
    if quantize:
        # Sharded (FSDP) training stores the 4-bit weights in the compute dtype so that FSDP can
        # flatten and shard them with everything else (the FSDP-QLoRA recipe).
        sharded = for_training and cfg.training.strategy == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quantization.quant_type,
            bnb_4bit_use_double_quant=cfg.quantization.double_quant,
            bnb_4bit_compute_dtype=dtype,
            **({"bnb_4bit_quant_storage": dtype} if sharded else {}),
        )
    # This process's GPU (torchrun/accelerate set it; 0 when alone).
    kwargs["device_map"] = {"": torch.cuda.current_device()} if device == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ImportError as err:
        raise UserError(f"missing package to load '{cfg.model.name}': {err}; run 'qlora doctor'") from None
    except Exception as err:  # noqa: BLE001
        if "safetensors" in str(err).lower() and "use_safetensors" not in str(err):
            raise UserError(
                f"'{cfg.model.name}' has no safetensors weights; the platform loads "
                f"safetensors only (pickled .bin files can run code)"
            ) from None
        raise hub_error(cfg.model.name, err) from None
    if for_training and quantize:
        disable_cpu_weight_repacking(model)
    model.config.use_cache = not for_training
    return model


def keeps_fp32_norms(cfg: Config, device: str) -> bool:
    """Whether 4-bit training keeps norms, embeddings and head in fp32 (config.resolve decides)."""
    return resolve(cfg, device).fp32_norms


def fast_kernels_on(cfg: Config, device: str) -> bool:
    """Whether training runs on qlora_platform.kernels (config.resolve decides)."""
    return resolve(cfg, device).fast_kernels


def fp8_plan(cfg: Config, device: str):
    """Which base products the fast kernels run in fp8 (a kernels.fp8.Fp8Plan), or None."""
    if not resolve(cfg, device).fp8:
        return None
    # Off unless asked: fp8 makes large batches faster, but the model then learns more slowly
    # (docs/benchmarks.md has the measurements).
    from ..kernels.fp8 import Fp8Plan

    return Fp8Plan(cfg.training.fp8_min_tokens, cfg.training.fp8_input_grad, cfg.training.fp8_forward)


def offload_on(cfg: Config, device: str) -> bool:
    """Whether checkpointed layer inputs wait in pinned CPU memory (config.resolve decides)."""
    return resolve(cfg, device).offload_checkpoints


def match_training_precision(model, cfg: Config, device: str) -> int:
    """Give a model loaded for inference the dtypes its training run computed in.

    4-bit training on the CPU keeps norms, embeddings and head in fp32 (peft's
    prepare_model_for_kbit_training, see keeps_fp32_norms), so the holdout perplexity of
    training is computed with fp32 norms; the same adapter on bf16 norms scores a few percent
    differently. Returns how many tensors were cast.
    """
    import torch

    if not cfg.quantization.load_in_4bit or not keeps_fp32_norms(cfg, device):
        return 0
    cast = 0
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
            param.data = param.data.float()
            cast += 1
    return cast


@contextlib.contextmanager
def training_numerics(model):
    """Inside: 4-bit layers compute as in training (no repacking for bitsandbytes' CPU inference
    kernel, which rounds differently), so scores match the ones training logged. Outside, the
    first inference forward may repack, which about doubles CPU decoding speed; a layer already
    repacked stays so, hence score before generating."""
    changed = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for module in changed:
        module.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for module in changed:
            module.support_avx512bf16_for_cpu = True


def attach_lora(model, cfg: Config):
    """Wrap a (quantized) base model with trainable LoRA adapters; base weights stay frozen."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    gc = cfg.training.gradient_checkpointing
    if cfg.quantization.load_in_4bit and keeps_fp32_norms(cfg, next(model.parameters()).device.type):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as err:
        raise UserError(f"lora.target_modules: {str(err).splitlines()[0]}") from None
    # Gradient checkpointing only acts in train mode; from_pretrained returns eval mode.
    model.train()
    return model


def check_adapter_folder(adapter_dir: Path) -> None:
    """A UserError unless `adapter_dir` holds a LoRA adapter (its adapter_config.json)."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(
            f"'{adapter_dir}' is not a LoRA adapter folder (no adapter_config.json); "
            f"point at <run>/final_adapter or <run>/checkpoint-N"
        )


def load_adapter(base_model, adapter_dir: str | os.PathLike, trainable: bool = False):
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    check_adapter_folder(adapter_dir)
    return PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=trainable)
