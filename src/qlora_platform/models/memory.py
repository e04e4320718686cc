"""VRAM pre-flight: estimate a QLoRA run's peak memory before loading anything.

From the model's config alone (layers, widths, vocabulary) and the run's config
(quantization, LoRA rank and targets, optimizer, batch x sequence, gradient
checkpointing) it adds up: 4-bit weights with their quantization constants, the
16-bit embeddings and head, LoRA weights with gradients and optimizer state, the
activations kept for the backward pass, the logits and their loss, and the
transient dequantized weights. On a GPU, `check_fits` refuses a run that will not
fit and says what to change. `qlora train --dry-run` prints the table.

    est = estimate_training_memory(model_config, cfg)
    print(format_estimate(est)); check_fits(est, free_bytes)
"""

from __future__ import annotations

from ..config import Config, ResolvedConfig, resolve
from ..errors import UserError

GIB = 2**30
RUNTIME_BYTES = 0.5 * GIB  # resident memory of the CPU process before the model loads
FAST_BLOCK_I = 3  # (tokens x intermediate) tensors alive in the fused MLP's backward


def _dims(mc) -> dict:
    h = mc.hidden_size
    heads = mc.num_attention_heads
    head_dim = getattr(mc, "head_dim", None) or h // heads
    kv = getattr(mc, "num_key_value_heads", None) or heads
    return {
        "h": h,
        "i": mc.intermediate_size,
        "layers": mc.num_hidden_layers,
        "vocab": mc.vocab_size,
        "q": heads * head_dim,
        "kv": kv * head_dim,
        "tied": bool(getattr(mc, "tie_word_embeddings", False)),
    }


def _linears(d: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of one decoder block (Llama/Mistral/Phi-3 style)."""
    h, i = d["h"], d["i"]
    return {
        "q_proj": (h, d["q"]),
        "k_proj": (h, d["kv"]),
        "v_proj": (h, d["kv"]),
        "o_proj": (d["q"], h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


# Rows of one micro-batch per training.batch_size unit: a pair's chosen and rejected answers (for
# KTO a completion and the mismatched completion of its KL estimate), or an RL prompt's sampled answers.
PAIR_METHODS = ("reward", "dpo", "orpo", "kto")


def micro_batch_rows(cfg: Config) -> int:
    """The rows one micro-batch runs through the model for cfg's training method."""
    method, b = cfg.training.method, cfg.training.batch_size
    if method in PAIR_METHODS:
        return 2 * b
    if method in ("ppo", "grpo"):
        return b * cfg.alignment.num_generations
    return b


def estimate_training_memory(
    mc, cfg: Config | ResolvedConfig, processes: int = 1, device: str | None = None
) -> dict[str, float]:
    """Bytes per component of one device's peak; the sum is under 'total'. With several
    processes the single-GPU fast path is off, and FSDP / ZeRO-3 split the weights, adapter and
    optimizer state between them (one decoder block's weights gathered at a time).

    `cfg` is a config resolved for its device (config.resolve), or a raw config resolved here
    for `device` ("cpu" or "cuda"; by default training.device, with "auto" estimated as a GPU
    run, since an estimate is mostly asked for the GPU a run is planned on). On the CPU the
    peak is the process's resident memory, so the Python runtime with torch and transformers
    loaded counts too."""
    if not isinstance(cfg, ResolvedConfig):
        cfg = resolve(cfg, device or ("cpu" if cfg.training.device == "cpu" else "cuda"))
    rc, device = cfg, cfg.device
    cfg = rc.cfg
    d = _dims(mc)
    b, s, layers = micro_batch_rows(cfg), cfg.data.max_seq_len, d["layers"]
    act_bytes = 4 if cfg.quantization.compute_dtype == "float32" else 2
    linears = _linears(d)
    linear_params = layers * sum(a * o for a, o in linears.values())
    if cfg.quantization.load_in_4bit:
        # 4 bits a weight + one absmax per 64-weight block (8-bit with double quantization).
        per_param = 0.5 + (1.0 if cfg.quantization.double_quant else 4.0) / 64
    else:
        per_param = act_bytes
    embed = d["vocab"] * d["h"] * (1 if d["tied"] else 2)
    targets = (
        linears
        if cfg.lora.target_modules == "all-linear"
        else {k: v for k, v in linears.items() if k in cfg.lora.target_modules}
    )
    lora_params = layers * sum(cfg.lora.r * (a + o) for a, o in targets.values())
    opt_bytes = 2 if rc.optimizer in ("paged_adamw_8bit", "adamw_8bit") else 8
    tokens = b * s
    fp32_norms = rc.fp32_norms
    if device == "cpu" and fp32_norms:
        act_bytes = 4  # fp32 norms and head make every activation fp32
    single = processes == 1
    fast = single and rc.fast_kernels and not fp32_norms
    # Only SFT's loss is the logits-free one; the other methods score answers from full logits.
    fast_loss = fast and cfg.training.method == "sft"
    offload = single and rc.offload_checkpoints
    shards = processes if not single and cfg.training.strategy in ("fsdp", "deepspeed-zero3") else 1
    heads = mc.num_attention_heads
    if fp32_norms:
        # fp32 norms make the activations fp32, and SDPA then materialises attention scores:
        # about 14 bytes a score for the layer in flight (fitted to GPU measurements with fp32
        # norms; tests/models/test_memory.py holds the anchors).
        attention, block_h, logit_bytes = b * heads * s * s * 14, 10, act_bytes + 8
    else:
        # 16-bit activations: SDPA's fused kernels keep no score matrix (fitted to GPU
        # measurements; tests/models/test_memory.py holds the anchors).
        attention, block_h, logit_bytes = 0, 8, 8
    # The fused MLP keeps gate and up outputs only and reuses them for its gradients.
    block_i = FAST_BLOCK_I if fast else 4
    if cfg.training.gradient_checkpointing:
        # Each block's input is kept (offloaded: only the one or two being copied back); one
        # block's internals are rebuilt at a time. The fast decoder layer also offloads the
        # rotated q, k, v, the attention output and the residual after attention; its recompute
        # takes them back instead of materialising them (or the o_proj/down outputs, or the
        # layer output).
        per_layer = tokens * d["h"] * act_bytes
        if fast and offload:
            per_layer += tokens * (d["h"] + 2 * d["q"] + 2 * d["kv"]) * act_bytes
            block_h -= 2
        kept = (2 if offload else layers) * per_layer
        block = tokens * (block_h * d["h"] + block_i * d["i"]) * act_bytes
    else:
        kept = layers * tokens * (12 * d["h"] + 4 * d["i"]) * act_bytes
        block = 0
    if not cfg.training.gradient_checkpointing and attention:
        kept += layers * b * heads * s * s * act_bytes
    if (
        device == "cpu"
        and act_bytes == 4
        and cfg.quantization.load_in_4bit
        and cfg.quantization.compute_dtype != "float32"
    ):
        # fp32 activations enter the 4-bit layers cast to the compute dtype, and autograd keeps
        # that copy too: the inputs of q, k, v, o, gate and up (h wide) and of down (i wide).
        kept += (layers if not cfg.training.gradient_checkpointing else 1) * tokens * (6 * d["h"] + d["i"]) * 2
    if fast_loss:
        # The logits-free loss: one chunk of 16-bit and fp32 logits, and the hidden-state gradient.
        from ..kernels.cross_entropy import chunk_rows

        logits = min(tokens, chunk_rows(d["vocab"])) * d["vocab"] * 6 + tokens * d["h"] * act_bytes
    else:
        # Logits (16-bit, or already fp32), their fp32 upcast for the loss and its gradient.
        logits = tokens * d["vocab"] * logit_bytes
    dequant = (
        (2 if fast else 3) * max(a * o for a, o in linears.values()) * act_bytes if cfg.quantization.load_in_4bit else 0
    )
    # fp8 base products: the quantized input of the widest projection and one quantized weight.
    fp8 = (
        tokens * d["i"] + max(a * o for a, o in linears.values())
        if fast and rc.fp8 and tokens >= cfg.training.fp8_min_tokens
        else 0
    )
    # Sharded: this device's part, plus the block being computed, gathered whole.
    gathered = linear_params / layers * per_param if shards > 1 else 0
    est = {
        "weights_4bit" if cfg.quantization.load_in_4bit else "weights": linear_params * per_param / shards + gathered,
        "embeddings_and_head": embed * (4 if fp32_norms else 2) / shards,
        "lora_weights_grads": lora_params * 8 / shards,
        "optimizer_state": lora_params * opt_bytes / shards,
        "activations_kept": kept,
        "activations_block": block,
        "attention_scores": attention,
        "logits_and_loss": logits,
        "dequant_buffers": dequant,
        "fp8_buffers": fp8,
        # The Python process with torch, transformers, peft and bitsandbytes loaded (measured: 0.51 GiB).
        "runtime": RUNTIME_BYTES if device == "cpu" else 0,
    }
    est["total"] = sum(est.values())
    return est


def format_estimate(est: dict[str, float]) -> str:
    rows = [f"  {k:<22} {v / GIB:8.2f} GiB" for k, v in est.items() if k != "total"]
    return "\n".join(["estimated peak memory:"] + rows + [f"  {'total':<22} {est['total'] / GIB:8.2f} GiB"])


def check_fits(est: dict[str, float], free_bytes: int, device_name: str, cfg: Config) -> None:
    """Refuse (UserError) when the estimate exceeds 95% of the free memory, with what to change."""
    if est["total"] <= 0.95 * free_bytes:
        return
    raise UserError(
        f"this run needs about {est['total'] / GIB:.1f} GiB but {device_name} has "
        f"{free_bytes / GIB:.1f} GiB free; try {memory_advice(cfg)} (see 'qlora train --dry-run')"
    )


def memory_advice(cfg: Config) -> str:
    """The overrides that lower a run's peak memory the most, as the user would type them."""
    advice = []
    if not cfg.training.gradient_checkpointing:
        advice.append("--gradient_checkpointing true")
    if cfg.training.batch_size > 1:
        advice.append(f"--batch_size {max(1, cfg.training.batch_size // 2)} --grad_accum {cfg.training.grad_accum * 2}")
    if cfg.data.max_seq_len > 512:
        advice.append(f"--max_seq_len {cfg.data.max_seq_len // 2}")
    return " or ".join(advice) or "a smaller model"


def peak_memory_gib(device: str) -> float:
    """Measured peak: allocated CUDA memory on a GPU, the process's peak resident set on the CPU."""
    import resource

    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
