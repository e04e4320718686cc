"""Random-weight models in real layouts, and one optimizer step of each QLoRA training stack on them:
what the GPU benchmarks time and the GPU tests compare.

    path = checkpoint("mistral-mini")                       # built once in the temp folder
    platform = build_qlora_platform(path, 512, 2, preset="configs/mistral-7b.yaml")
    reference = build_reference(path)                       # transformers + PEFT + bitsandbytes
    loss = platform(token_ids)                              # one optimizer step; its loss

QLoRA's speed and memory do not depend on the weights' values, so a random checkpoint in a
model's real layout stands in for the real one where no hub is reachable. Both stacks train
NF4 + double quant weights with bf16 compute, LoRA r=16 alpha=32 on the seven projections
(TARGETS), paged AdamW 8-bit and gradient checkpointing. Each step function carries the model
(`step.model`), so that a comparison can start both stacks from the same LoRA weights.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "mistral-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rope_theta=1e6,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
    # Mistral's layout at a quarter of the width and 4 layers: GPU tests that run in seconds.
    "mistral-mini": dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=3584,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        rope_theta=1e6,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
}
# Phi-3's layout, built with Phi3ForCausalLM: checkpoints for `qlora train` with configs/phi3-mini.yaml
# (its fused qkv_proj and gate_up_proj). build_reference and build_qlora_platform target Mistral's
# seven projections (TARGETS) and take SHAPES only.
PHI3_SHAPES = {
    # Phi-3-mini-4k-instruct (3.8B): fused qkv_proj and gate_up_proj, no grouped-query attention.
    "phi3-mini": dict(
        vocab_size=32064,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
}
# The chat template a tokenizer without one gets.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def make_checkpoint(shape: str, out: Path, tokenizer: Path | None = None, vocab_size: int | None = None) -> dict:
    """A random-weight checkpoint of `shape` (a key of SHAPES or PHI3_SHAPES) in `out`, bf16, seed 0; with
    `tokenizer`, that tokenizer's files beside it (`add_tokenizer`); `vocab_size` overrides the
    shape's. Returns what was built: shape, path, billions of parameters, seconds taken."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM

    start = time.time()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    phi3 = shape in PHI3_SHAPES
    config_cls, model_cls = (Phi3Config, Phi3ForCausalLM) if phi3 else (MistralConfig, MistralForCausalLM)
    dims = {**SHAPES, **PHI3_SHAPES}[shape]
    with torch.device(device):
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = model_cls(config_cls(**{**dims, **({"vocab_size": vocab_size} if vocab_size else {})}))
        finally:
            torch.set_default_dtype(torch.float32)
    model.save_pretrained(out, max_shard_size="20GB")
    params = sum(p.numel() for p in model.parameters())
    del model
    if tokenizer is not None:
        add_tokenizer(Path(out), Path(tokenizer))
    return {
        "shape": shape,
        "path": str(out),
        "params_b": round(params / 1e9, 3),
        "make_s": round(time.time() - start, 1),
    }


def add_tokenizer(out: Path, tokenizer: Path) -> None:
    """Copies the tokenizer folder's files into the checkpoint `out`. A tokenizer that brings its
    own chat template keeps it; others get MISTRAL_TEMPLATE."""
    for f in tokenizer.iterdir():
        shutil.copy(f, out / f.name)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if not (out / "chat_template.jinja").is_file() and not cfg.get("chat_template"):
        cfg["chat_template"] = MISTRAL_TEMPLATE
    cfg["model_max_length"] = 32768
    cfg_path.write_text(json.dumps(cfg, indent=2))


def checkpoint(shape: str, tokenizer: Path | None = None) -> Path:
    """The random checkpoint of `shape`, built on first use in the temp folder and reused after;
    with `tokenizer`, its files are added when the cached checkpoint lacks them."""
    path = Path(tempfile.gettempdir()) / f"{shape}-random"
    if not (path / "config.json").is_file():
        make_checkpoint(shape, path, tokenizer)
    elif tokenizer is not None and not (path / "tokenizer_config.json").is_file():
        add_tokenizer(path, Path(tokenizer))
    return path


def optimizer_step(loss_fn, opt, model=None, zero_grad=None, forward_backward=None):
    """One training step on token ids x: loss and backward (or `forward_backward(x)`, which does
    both and returns the loss), optimizer step, gradients cleared; returns the loss, detached."""
    zero_grad = zero_grad or (lambda: opt.zero_grad(set_to_none=True))

    def step(x):
        if forward_backward is not None:
            loss = forward_backward(x)
        else:
            loss = loss_fn(x)
            loss.backward()
        opt.step()
        zero_grad()
        return loss.detach()

    step.model = model
    return step


def paged_adamw_8bit(model, lr: float = 2e-4, weight_decay: float = 0.0):
    """bitsandbytes' paged AdamW 8-bit over the model's trainable tensors."""
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW8bit(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
    )


def build_reference(path: Path, lr: float = 2e-4):
    """The plain stack on CUDA: transformers + PEFT + bitsandbytes, the model's own loss (with
    logits), gradient checkpointing without reentrancy. LoRA B starts at zero, A at random."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16, device_map={"": 0})
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    )
    model.train()
    return optimizer_step(lambda x: model(input_ids=x, labels=x).loss, paged_adamw_8bit(model, lr), model)


def build_qlora_platform(
    path: Path, seq: int, batch: int, *, preset: str | Path, lr: float = 2e-4, overrides: dict | None = None, log=None
):
    """What `qlora train` runs on CUDA, from a YAML `preset` pointed at the checkpoint `path`:
    `build_training_model` (fast kernels, offloaded checkpoints), the trainable tensors in one
    flat buffer, the trainer's optimizer, and forward and backward through `loss_backward` (the
    summed answer-token NLL without logits, CUDA graphs from a shape's second step), scaled to
    the mean over the predicted tokens. `overrides` are config keys (`training.fp8`, ...);
    `log` gets the build's messages (default: stderr). `step.preflight(batch, seq)` gives the
    trainer's VRAM estimate in GiB for a batch shape."""
    from ..config import load_config
    from ..models.memory import GIB, estimate_training_memory
    from .flat_params import FlatParams
    from .model import build_training_model, loss_backward, summed_nll
    from .trainer import build_optimizer

    log = log or (lambda msg: print(msg, file=sys.stderr))
    cfg = load_config(
        preset,
        {
            "model.name": str(path),
            "lora.target_modules": json.dumps(TARGETS),
            "data.max_seq_len": seq,
            "training.batch_size": batch,
            "training.gradient_checkpointing": True,
            "training.learning_rate": lr,
            "training.weight_decay": 0.0,
            **(overrides or {}),
        },
    )
    model, fused = build_training_model(cfg, "cuda", log=log)
    flat = FlatParams([p for p in model.parameters() if p.requires_grad])  # as the trainer does on CUDA
    opt = build_optimizer([flat.param], cfg, "cuda")
    run = loss_backward(model, fused, cfg, "cuda", log=log)
    step = optimizer_step(
        lambda x: summed_nll(model, fused, x, input_ids=x) / (x.numel() - x.size(0)),
        opt,
        model,
        flat.zero_grad,
        lambda x: run({"labels": x, "input_ids": x}, 1 / (x.numel() - x.size(0))),
    )

    def preflight(batch: int, seq: int) -> float:
        cfg.training.batch_size, cfg.data.max_seq_len = batch, seq
        return estimate_training_memory(model.config, cfg)["total"] / GIB

    step.preflight = preflight
    return step
