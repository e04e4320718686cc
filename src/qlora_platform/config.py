"""The one typed configuration schema of the platform, and how it is loaded.

A run is described by six sections (model, quantization, lora, data, training,
output), read from YAML and then patched by `--section.key value` (or the bare
`--key value` when the key name is unique) command-line overrides. Everything is
validated here, before any model or data is touched: an unknown key, a wrong
type or an impossible value becomes one `UserError` that names the key.

    from qlora_platform.config import load_config
    cfg = load_config("configs/smollm2-135m.yaml", {"training.learning_rate": "1e-4"})
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UserError, did_you_mean


class _Section(BaseModel):
    # Unknown keys are errors (typos must not be silently ignored); assignment is
    # validated too, so code that edits a config cannot make it invalid.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = "bundled:smollm2-135m-instruct"  # hub id, local folder, .gguf file or bundled:NAME
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # flex_attention (GPU) or flash_attention_2 (needs flash-attn) turn packed rows into
    # variable-length attention; sdpa and eager get a dense block-diagonal mask.
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"


class QuantizationConfig(_Section):
    load_in_4bit: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # peft's prepare_model_for_kbit_training keeps norms, embeddings and head in fp32, which makes
    # every activation fp32. None: that on the CPU (where the demo was measured), 16-bit on GPUs
    # (H100, 7B, b4 x s4096: 3.1x the tokens/s at a third of the memory; benchmarks/README.md).
    fp32_norms: Optional[bool] = None


class LoraConfig(_Section):
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"


class DataConfig(_Section):
    train_file: str = "data/train.jsonl"
    eval_file: Optional[str] = "data/eval.jsonl"
    max_seq_len: int = Field(384, ge=16, le=131072)
    packing: bool = False  # padding-free packing; no attention across samples


class TrainingConfig(_Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: Optional[int] = Field(None, ge=1)  # overrides epochs when set
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    optimizer: Literal["auto", "adamw", "paged_adamw_8bit", "adamw_8bit"] = "auto"
    gradient_checkpointing: bool = True
    # The fused LoRA / SwiGLU / RMSNorm kernels and the logits-free loss (qlora_platform.kernels).
    # None: on for CUDA, off on the CPU (where PEFT's own path is what the demo measured).
    # With several processes (qlora train --num-processes N): accelerate's engine. batch_size is
    # per process; the global batch is batch_size x processes x grad_accum.
    strategy: Literal["ddp", "fsdp", "deepspeed-zero3"] = "ddp"
    fast_kernels: Optional[bool] = None
    # With fast_kernels: the frozen base weights' products in fp8 (e4m3, per-row scales) on GPUs
    # with fp8 tensor cores (RTX 40, H100), for batches of at least fp8_min_tokens tokens (below
    # that the quantization passes cost more than they save). Off by default: faster, but it
    # learns more slowly (benchmarks/README.md).
    fp8: bool = False
    fp8_min_tokens: int = Field(8192, ge=16)
    # Which base products go through fp8: the forward ones (forward and recompute; they change
    # the function the model computes, and on the 7B shape that slowed learning) and/or the
    # input gradient's (g W; the loss stays exact, only the gradient carries fp8 rounding).
    fp8_forward: bool = True
    fp8_input_grad: bool = False
    # Checkpointed layer inputs parked in pinned CPU memory during forward. None: on for CUDA
    # whenever gradient_checkpointing is; no effect on the CPU.
    offload_checkpoints: Optional[bool] = None
    # With fast_kernels on CUDA: a batch shape seen before replays its forward and backward from a
    # CUDA graph (train/cuda_graph.py), so small batches are not held back by Python and kernel
    # launches. Batches that need an attention mask or packing positions run eagerly.
    cuda_graphs: bool = True
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    logging_steps: int = Field(10, ge=1)
    eval_steps: Optional[int] = Field(None, ge=1)  # None: evaluate at the end only
    save_steps: int = Field(100, ge=1)
    save_total_limit: int = Field(3, ge=1)
    report_to: list[Literal["tensorboard", "wandb"]] = ["tensorboard"]
    wandb_project: str = "qlora-platform"
    num_threads: Optional[int] = Field(None, ge=1)  # CPU threads; None: torch's default


class OutputConfig(_Section):
    dir: str = "runs/default"


class Config(_Section):
    model: ModelConfig = ModelConfig()
    quantization: QuantizationConfig = QuantizationConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _consistent(self):
        if self.training.optimizer in ("paged_adamw_8bit", "adamw_8bit") and self.training.device == "cpu":
            raise ValueError("training.optimizer: 8-bit optimizers need a GPU; use 'adamw' or 'auto' "
                             "with training.device cpu")
        if self.training.offload_checkpoints and not self.training.gradient_checkpointing:
            raise ValueError("training.offload_checkpoints: offloading moves the checkpoints of gradient "
                             "checkpointing; set training.gradient_checkpointing true or drop it")
        return self


SECTIONS = {name: field.annotation for name, field in Config.model_fields.items()}


def _leaf_index() -> dict[str, list[str]]:
    """key name -> the dotted paths that end with it (to resolve bare --key overrides)."""
    index: dict[str, list[str]] = {}
    for section, model in SECTIONS.items():
        for key in model.model_fields:
            index.setdefault(key, []).append(f"{section}.{key}")
    return index


def resolve_key(key: str) -> str:
    """Turn 'learning_rate' or 'training.learning_rate' into the dotted path, or fail clearly."""
    key = key.replace("-", "_") if "." not in key else key
    if "." in key:
        section, _, leaf = key.partition(".")
        if section not in SECTIONS:
            raise UserError(f"unknown config section '{section}'{did_you_mean(section, SECTIONS)}; "
                            f"sections are: {', '.join(SECTIONS)}")
        fields = SECTIONS[section].model_fields
        if leaf not in fields:
            raise UserError(f"unknown config key '{key}'{did_you_mean(leaf, fields)}; "
                            f"keys of '{section}' are: {', '.join(fields)}")
        return key
    paths = _leaf_index().get(key)
    if not paths:
        hint = did_you_mean(key, _leaf_index())
        raise UserError(f"unknown config key '{key}'{hint}; run 'qlora train --help-config' for all keys")
    if len(paths) > 1:
        raise UserError(f"config key '{key}' is ambiguous: write one of {', '.join(paths)}")
    return paths[0]


def _parse_value(text: Any) -> Any:
    # YAML scalars give the user 1e-4, true, null and [a, b] on the command line.
    if not isinstance(text, str):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    for key, value in overrides.items():
        section, _, leaf = resolve_key(key).partition(".")
        node = raw.setdefault(section, {})
        if not isinstance(node, dict):
            raise UserError(f"config section '{section}' must be a mapping, got {type(node).__name__}")
        node[leaf] = _parse_value(value)
    return raw


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        parts = [str(p) for p in first["loc"]]
        model = Config if len(parts) == 1 else SECTIONS.get(parts[0], Config)
        return (f"{source}: unknown config key '{loc}'{did_you_mean(parts[-1], model.model_fields)}")
    value = first.get("input")
    shown = f" (got {value!r})" if value is not None and not isinstance(value, dict) else ""
    where = f"'{loc}'" if loc else "config"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {where}: {first['msg']}{shown}{more}"


def validate_config(raw: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise UserError(_format_validation_error(err, source)) from None


def load_config(path: Optional[str | Path] = None, overrides: Optional[dict[str, Any]] = None) -> Config:
    """Read YAML (or start from the defaults), apply overrides, validate; fail with one line."""
    raw: dict = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise UserError(f"config file '{path}' does not exist; presets are in configs/ "
                            f"(for example configs/smollm2-135m.yaml)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"{path}:{line} is not valid YAML: {getattr(err, 'problem', err)}") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: the top level must be a mapping of sections "
                            f"({', '.join(SECTIONS)}), got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or {})
    return validate_config(raw, source)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)


def describe_keys() -> str:
    """Every key with its default, for `qlora train --help-config`."""
    lines = []
    for section, model in SECTIONS.items():
        lines.append(f"{section}:")
        for key, field in model.model_fields.items():
            lines.append(f"  {key}: {field.default!r}")
    return "\n".join(lines)
