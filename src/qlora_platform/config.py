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

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UserError, did_you_mean

# Keys a `--resume` must find unchanged: a different value changes the data order, the batch
# shapes or the adapter's layout, so the checkpoint would not continue the same run.
MUST_MATCH = {"resume": "must_match"}


class _Section(BaseModel):
    # Unknown keys are errors (typos must not be silently ignored); assignment is
    # validated too, so code that edits a config cannot make it invalid.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field(
        "bundled:smollm2-135m-instruct",
        json_schema_extra=MUST_MATCH,
        description="base model: hub id, local folder, .gguf file or bundled:NAME",
    )
    revision: str | None = Field(None, description="hub branch, tag or commit of the base model")
    trust_remote_code: bool = Field(
        False,
        description="run the model repository's own Python code (only for "
        "models you trust; never read from an adapter folder)",
    )
    # flex_attention (GPU) or flash_attention_2 (needs flash-attn) turn packed rows into
    # variable-length attention; sdpa and eager get a dense block-diagonal mask.
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "sdpa",
        description="attention kernel; flex_attention or flash_attention_2 give packed rows variable-length attention",
    )


class QuantizationConfig(_Section):
    load_in_4bit: bool = Field(True, description="load the base weights in 4 bits (QLoRA); false: 16-bit LoRA")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the base weights")
    double_quant: bool = Field(True, description="quantize the quantization constants too (saves ~0.4 bit/weight)")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype of the matmuls; auto: bf16 where the hardware has it, else fp16 (GPU) or fp32 (CPU)"
    )
    # peft's prepare_model_for_kbit_training keeps norms, embeddings and head in fp32, which makes
    # every activation fp32: cheap on the CPU, slow and large on GPUs.
    fp32_norms: bool | None = Field(
        None, description="keep norms, embeddings and head in fp32 (peft's way); null: on the CPU only"
    )


class LoraConfig(_Section):
    r: int = Field(16, ge=1, le=1024, json_schema_extra=MUST_MATCH, description="LoRA rank")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (the update is scaled by alpha / r)")
    dropout: float = Field(
        0.05, ge=0, lt=1, description="dropout on the LoRA input; 0 keeps the GPU fast kernels on every layer"
    )
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        json_schema_extra=MUST_MATCH,
        description="layers that get adapters: all-linear or a list such as [q_proj, v_proj]",
    )


class DataConfig(_Section):
    train_file: str = Field(
        "data/train.jsonl", json_schema_extra=MUST_MATCH, description="training JSONL written by qlora prepare"
    )
    eval_file: str | None = Field("data/eval.jsonl", description="holdout JSONL; null: no holdout")
    max_seq_len: int = Field(
        384, ge=16, le=131072, json_schema_extra=MUST_MATCH, description="tokens per example; longer ones are truncated"
    )
    packing: bool = Field(
        False,
        json_schema_extra=MUST_MATCH,
        description="padding-free packing of several examples into a row; no attention across examples",
    )


class TrainingConfig(_Section):
    # Every method trains one LoRA adapter on the 4-bit base; the reference policy is that base with
    # the adapter switched off, and a reward model is a second adapter with a scalar head
    # (docs/preference.md). The method-specific keys are in the alignment section.
    method: Literal["sft", "reward", "dpo", "orpo", "kto", "ppo", "grpo"] = Field(
        "sft",
        json_schema_extra=MUST_MATCH,
        description="sft: answers of chat records; reward: a reward model (adapter + scalar head) on preference "
        "pairs; dpo / orpo: preference pairs; kto: completions marked desirable or not; ppo / grpo: "
        "reinforcement learning on prompts",
    )
    epochs: float = Field(1.0, gt=0, description="passes over the training data (fractions allowed)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs when set")
    batch_size: int = Field(4, ge=1, json_schema_extra=MUST_MATCH, description="rows per micro-batch (per process)")
    grad_accum: int = Field(1, ge=1, json_schema_extra=MUST_MATCH, description="micro-batches per optimizer step")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="peak learning rate")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warm-up")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="fraction of the steps spent warming up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm; 0 turns clipping off")
    optimizer: Literal["auto", "adamw", "paged_adamw_8bit", "adamw_8bit"] = Field(
        "auto", description="auto: AdamW on the CPU, paged AdamW 8-bit on a GPU"
    )
    gradient_checkpointing: bool = Field(True, description="recompute activations in backward to save memory")
    # With several processes (qlora train --num-processes N): accelerate's engine. batch_size is
    # per process; the global batch is batch_size x processes x grad_accum.
    strategy: Literal["ddp", "fsdp", "deepspeed-zero3"] = Field(
        "ddp", description="engine with --num-processes N: ddp, fsdp (sharded FSDP-QLoRA) or deepspeed-zero3"
    )
    # The fused LoRA / SwiGLU / RMSNorm kernels and the logits-free loss (qlora_platform.kernels).
    fast_kernels: bool | None = Field(
        None,
        json_schema_extra=MUST_MATCH,
        description="the platform's fused training kernels; null: on for CUDA, off on the CPU",
    )
    # fp8 (e4m3, per-row scales) needs fp8 tensor cores (RTX 40, H100); below fp8_min_tokens the
    # quantization passes cost more than they save. Off by default: faster, but it learns more slowly.
    fp8: bool = Field(
        False, description="frozen base products in fp8 with fast_kernels (faster, learns more slowly; see docs)"
    )
    fp8_min_tokens: int = Field(8192, ge=16, description="smallest batch (tokens) that uses fp8")
    # The forward products change the function the model computes; the input gradient's product
    # (g W) only adds fp8 rounding to the gradient.
    fp8_forward: bool = Field(True, description="with fp8: forward and recompute products in fp8")
    fp8_input_grad: bool = Field(False, description="with fp8: the input-gradient product in fp8")
    offload_checkpoints: bool | None = Field(
        None,
        description="park checkpointed layer inputs in pinned CPU memory; null: on for CUDA with "
        "gradient_checkpointing",
    )
    # On the fast path batches have a few fixed shapes (packed rows max_seq_len wide, padded ones
    # bucketed), so each shape is captured once; the CPU path runs eagerly.
    cuda_graphs: bool = Field(
        True, description="with fast_kernels on CUDA: replay repeated batch shapes from CUDA graphs"
    )
    seed: int = Field(
        42, json_schema_extra=MUST_MATCH, description="seed of data order, LoRA initialisation and dropout"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when a GPU is present")
    logging_steps: int = Field(10, ge=1, description="steps between loss log lines")
    eval_steps: int | None = Field(None, ge=1, description="steps between holdout evaluations; null: at the end only")
    save_steps: int = Field(100, ge=1, description="steps between checkpoints")
    save_total_limit: int = Field(3, ge=1, description="checkpoints kept (the newest)")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        ["tensorboard"], description="trackers: tensorboard and/or wandb"
    )
    wandb_project: str = Field("qlora-platform", description="W&B project name")
    num_threads: int | None = Field(None, ge=1, description="CPU threads; null: torch's default")


class AlignmentConfig(_Section):
    beta: float = Field(
        0.1,
        gt=0,
        description="dpo, kto: strength of the pull towards the reference (the base model); orpo: weight of "
        "the odds-ratio term beside the chosen answer's loss",
    )
    kto_desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the desirable completions' losses")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the undesirable completions' losses")
    reward_adapter: str | None = Field(
        None,
        description="ppo, grpo: the final_adapter folder of a training.method reward run on the same base, "
        "scoring sampled answers",
    )
    reward_functions: list[str] = Field(
        [],
        description="grpo, ppo: Python rewards as 'module:function' (or 'path/to/file.py:function'), each called "
        "with prompts and completions and returning one float per completion; summed with the reward adapter's",
    )
    num_generations: int = Field(4, ge=2, description="grpo: answers sampled per prompt (the group); ppo: per prompt")
    max_new_tokens: int = Field(64, ge=1, description="ppo, grpo: longest sampled answer in tokens")
    temperature: float = Field(1.0, gt=0, description="ppo, grpo: sampling temperature of the answers")
    kl_coef: float = Field(
        0.05, ge=0, description="ppo, grpo: weight of the KL divergence to the reference (the base model)"
    )
    clip_range: float = Field(0.2, gt=0, description="ppo, grpo: clipping of the policy ratio")
    value_coef: float = Field(0.1, gt=0, description="ppo: weight of the value head's loss")


class OutputConfig(_Section):
    dir: str = Field("runs/default", description="run folder: checkpoints, final_adapter, logs, summary")


class Config(_Section):
    model: ModelConfig = ModelConfig()
    quantization: QuantizationConfig = QuantizationConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    alignment: AlignmentConfig = AlignmentConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _consistent(self):
        if self.training.optimizer in ("paged_adamw_8bit", "adamw_8bit") and self.training.device == "cpu":
            raise ValueError(
                "training.optimizer: 8-bit optimizers need a GPU; use 'adamw' or 'auto' with training.device cpu"
            )
        if self.training.offload_checkpoints and not self.training.gradient_checkpointing:
            raise ValueError(
                "training.offload_checkpoints: offloading moves the checkpoints of gradient "
                "checkpointing; set training.gradient_checkpointing true or drop it"
            )
        if self.training.method != "sft" and self.data.packing:
            raise ValueError(
                f"data.packing: training.method {self.training.method} runs each answer in a padded row of its "
                "own; set data.packing false"
            )
        return self


SECTIONS: dict[str, type[BaseModel]] = {
    name: cast(type[BaseModel], f.annotation) for name, f in Config.model_fields.items()
}


def resume_keys() -> list[tuple[str, str]]:
    """(section, key) of every key declared MUST_MATCH: what `--resume` refuses to see changed."""
    return [
        (section, key)
        for section, model in SECTIONS.items()
        for key, field in model.model_fields.items()
        if (field.json_schema_extra or {}).get("resume") == "must_match"
    ]


@dataclass(frozen=True)
class ResolvedConfig:
    """A config with every "auto" / null default decided for the device the run uses.

    The keys that default to "depends on the device" are decided here and only here; the
    trainer, the memory estimate and the dry run read these values, never the raw keys.
    """

    cfg: Config
    device: Literal["cpu", "cuda"]
    optimizer: Literal["adamw", "paged_adamw_8bit", "adamw_8bit"]
    fp32_norms: bool  # norms, embeddings and head in fp32 (peft's way)
    fast_kernels: bool  # training on qlora_platform.kernels
    fp8: bool  # frozen base products in fp8 (needs fast_kernels)
    offload_checkpoints: bool  # checkpointed layer inputs in pinned CPU memory


def resolve(cfg: Config, device: str) -> ResolvedConfig:
    """Decide the device-dependent defaults of `cfg` for `device` ("cpu" or "cuda", already picked)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"resolve() takes the picked device, 'cpu' or 'cuda', not {device!r}")
    q, t = cfg.quantization, cfg.training
    optimizer = t.optimizer if t.optimizer != "auto" else ("paged_adamw_8bit" if device == "cuda" else "adamw")
    fast = device == "cuda" if t.fast_kernels is None else t.fast_kernels
    # Offloading needs a GPU (there is nowhere cheaper than CPU memory to park CPU tensors) and
    # gradient checkpointing (it moves the checkpoints); on by default when both hold.
    offload = t.gradient_checkpointing and device == "cuda" and t.offload_checkpoints is not False
    return ResolvedConfig(
        cfg=cfg,
        device=device,
        optimizer=optimizer,
        fp32_norms=device != "cuda" if q.fp32_norms is None else q.fp32_norms,
        fast_kernels=fast,
        fp8=fast and t.fp8,
        offload_checkpoints=offload,
    )


def _leaf_index() -> dict[str, list[str]]:
    """key name -> the dotted paths that end with it (to resolve bare --key overrides)."""
    index: dict[str, list[str]] = {}
    for section, model in SECTIONS.items():
        for key in model.model_fields:
            index.setdefault(key, []).append(f"{section}.{key}")
    return index


# Names that users of Hugging Face's Trainer, Axolotl and LLaMA-Factory type for our keys.
ALIASES = {
    "lr": "training.learning_rate",
    "num_train_epochs": "training.epochs",
    "num_epochs": "training.epochs",
    "per_device_train_batch_size": "training.batch_size",
    "micro_batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.grad_accum",
    "lr_scheduler_type": "training.lr_scheduler",
    "optim": "training.optimizer",
    "lora_r": "lora.r",
    "rank": "lora.r",
    "lora_rank": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target": "lora.target_modules",
    "lora_target_modules": "lora.target_modules",
    "output_dir": "output.dir",
    "model_name_or_path": "model.name",
    "base_model": "model.name",
    "max_seq_length": "data.max_seq_len",
    "sequence_len": "data.max_seq_len",
    "cutoff_len": "data.max_seq_len",
    "max_length": "data.max_seq_len",
}


def resolve_key(key: str) -> str:
    """Turn 'learning_rate', 'training.learning_rate' or an alias ('lr') into the dotted path, or fail clearly."""
    key = key.replace("-", "_") if "." not in key else key
    if "." in key:
        section, _, leaf = key.partition(".")
        if section not in SECTIONS:
            raise UserError(
                f"unknown config section '{section}'{did_you_mean(section, SECTIONS)}; "
                f"sections are: {', '.join(SECTIONS)}"
            )
        fields = SECTIONS[section].model_fields
        if leaf not in fields:
            raise UserError(
                f"unknown config key '{key}'{did_you_mean(leaf, fields)}; keys of '{section}' are: {', '.join(fields)}"
            )
        return key
    if key in ALIASES:
        return ALIASES[key]
    paths = _leaf_index().get(key)
    if not paths:
        hint = did_you_mean(key, [*_leaf_index(), *ALIASES])
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


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict[str, str]:
    """Patch `raw` in place; returns dotted key -> the name the user typed, for error messages."""
    typed = {}
    for key, value in overrides.items():
        dotted = resolve_key(key)
        section, _, leaf = dotted.partition(".")
        node = raw.setdefault(section, {})
        if not isinstance(node, dict):
            raise UserError(f"config section '{section}' must be a mapping, got {type(node).__name__}")
        node[leaf] = _parse_value(value)
        typed[dotted] = key
    return typed


def nest_flat_keys(raw: dict, source: str = "config") -> dict:
    """A config written flat, as Axolotl and LLaMA-Factory users write it, in sections.

    `model: NAME` is short for `model.name`; any other top-level key that is not a section is
    read as the command line reads a bare `--key` (a unique key name, a dotted path or an
    alias), with the same did-you-mean for an unknown one. Sections pass through unchanged.
    """
    out: dict = {}
    flat: list[tuple[str, str, Any]] = []
    for key, value in raw.items():
        name = str(key)
        if name == "model" and (isinstance(value, str) or value is None):
            flat.append((name, "model.name", value))
        elif name in SECTIONS:
            out[name] = value
        else:
            try:
                flat.append((name, resolve_key(name), value))
            except UserError as err:
                raise UserError(f"{source}: {err}") from None
    for name, dotted, value in flat:
        section, _, leaf = dotted.partition(".")
        node = out.setdefault(section, {})
        if not isinstance(node, dict):
            raise UserError(f"{source}: config section '{section}' must be a mapping, got {type(node).__name__}")
        if leaf in node:
            raise UserError(f"{source}: '{dotted}' is set twice (as '{name}' and in section '{section}'); keep one")
        node[leaf] = value
    return out


def _format_validation_error(err: ValidationError, source: str, typed: dict[str, str] | None = None) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if typed and loc in typed:  # the bad value came from the command line, not the file
        source = f"--{typed[loc]}"
    if first["type"] == "extra_forbidden":
        parts = [str(p) for p in first["loc"]]
        model = Config if len(parts) == 1 else SECTIONS.get(parts[0], Config)
        return f"{source}: unknown config key '{loc}'{did_you_mean(parts[-1], model.model_fields)}"
    value = first.get("input")
    shown = f" (got {value!r})" if value is not None and not isinstance(value, dict) else ""
    where = f"'{loc}'" if loc else "config"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {where}: {first['msg']}{shown}{more}"


def validate_config(raw: dict, source: str = "config", typed: dict[str, str] | None = None) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise UserError(_format_validation_error(err, source, typed)) from None


# Paths in a config are relative to the folder the command runs in; a run stores them
# absolute, so its config.yaml and the commands printed for it work from anywhere.
PATH_KEYS = (("data", "train_file"), ("data", "eval_file"), ("alignment", "reward_adapter"), ("output", "dir"))


def absolute_paths(cfg: Config, base: Path | None = None) -> Config:
    """A copy of `cfg` whose file and folder keys are absolute (relative ones taken from `base`, the cwd)."""
    base = Path.cwd() if base is None else base
    out = cfg.model_copy(deep=True)
    for section, key in PATH_KEYS:
        value = getattr(getattr(out, section), key)
        if value and not Path(value).expanduser().is_absolute():
            setattr(getattr(out, section), key, str((base / Path(value).expanduser()).resolve()))
        elif value:
            setattr(getattr(out, section), key, str(Path(value).expanduser()))
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read YAML (or start from the defaults), apply overrides, validate; fail with one line."""
    raw: dict = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise UserError(
                f"config file '{path}' does not exist; presets are in configs/ (for example configs/smollm2-135m.yaml)"
            )
        data = path.read_bytes()
        try:
            raw = yaml.safe_load(data.decode("utf-8")) or {}
        except UnicodeDecodeError as err:
            line, column = data.count(b"\n", 0, err.start) + 1, err.start - data.rfind(b"\n", 0, err.start)
            raise UserError(
                f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); "
                f"a config is a UTF-8 YAML file"
            ) from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"{path}:{line} is not valid YAML: {getattr(err, 'problem', err)}") from None
        if not isinstance(raw, dict):
            raise UserError(
                f"{path}: the top level must be a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}"
            )
        raw = nest_flat_keys(raw, source)
    typed = apply_overrides(raw, overrides or {})
    return validate_config(raw, source, typed)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)


def _allowed(field) -> str:
    """'one of a, b, c' for Literal keys, '' otherwise."""
    from typing import get_args, get_origin

    choices = []
    for arg in (field.annotation, *get_args(field.annotation)):
        if get_origin(arg) is Literal:
            choices += [str(c) for c in get_args(arg)]
    return f" [{' | '.join(choices)}]" if choices else ""


def describe_keys() -> str:
    """Every key with its default, allowed values and meaning, for `qlora train --help-config`."""
    lines = ["Override any key with --section.key VALUE (or --key VALUE when the name is unique).", ""]
    for section, model in SECTIONS.items():
        lines.append(f"{section}:")
        for key, field in model.model_fields.items():
            resume = "  (must match on --resume)" if (section, key) in resume_keys() else ""
            lines.append(f"  {key}: {field.default!r}{_allowed(field)}{resume}")
            lines.append(f"      {field.description}")
    aliases = ", ".join(f"{a} -> {d}" for a, d in ALIASES.items())
    lines += ["", f"aliases: {aliases}"]
    return "\n".join(lines)


DOC_BEGIN = "<!-- begin: generated from the schema by qlora_platform.config.config_reference; do not edit -->"
DOC_END = "<!-- end: generated -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_reference() -> str:
    """Every key as a Markdown table per section (default, allowed values, resume rule, meaning), then the aliases."""
    lines = [
        "Every key with its default, allowed values and meaning (`qlora train --help-config` prints the same).",
        "Keys marked *must match* cannot change between a checkpoint and `--resume`.",
        "",
    ]
    for section, model in SECTIONS.items():
        lines += [
            f"### {section}",
            "",
            "| key | default | allowed | resume | meaning |",
            "| --- | --- | --- | --- | --- |",
        ]
        for key, field in model.model_fields.items():
            resume = "must match" if (section, key) in resume_keys() else ""
            allowed = _allowed(field).strip(" []")
            lines.append(
                f"| `{section}.{key}` | `{field.default!r}` | {_cell(allowed)} | {resume} | "
                f"{_cell(field.description or '')} |"
            )
        lines.append("")
    lines += ["### Aliases", "", "| alias | key |", "| --- | --- |"]
    lines += [f"| `{alias}` | `{dotted}` |" for alias, dotted in ALIASES.items()]
    return "\n".join(lines) + "\n"


def with_config_reference(doc: str) -> str:
    """`doc` (docs/config.md) with the text between its generated markers replaced by config_reference()."""
    if DOC_BEGIN not in doc or DOC_END not in doc:
        raise ValueError(f"the page has no generated section; add the lines {DOC_BEGIN} and {DOC_END}")
    head, _, rest = doc.partition(DOC_BEGIN)
    _, _, tail = rest.partition(DOC_END)
    return f"{head}{DOC_BEGIN}\n\n{config_reference()}\n{DOC_END}{tail}"


if __name__ == "__main__":
    # python -m qlora_platform.config docs/config.md: rewrite the generated key reference of that page.
    import sys

    page = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/config.md")
    page.write_text(with_config_reference(page.read_text(encoding="utf-8")), encoding="utf-8")
