"""What `qlora train` trains and how it scores a batch: one builder and one loss for the
trainer and the GPU benchmarks alike (benchmarks/train_throughput.py measures this code).

    model, fused = build_training_model(cfg, "cuda", log=print)
    nll_sum = summed_nll(model, fused, labels, input_ids=ids, attention_mask=mask)

On CUDA (by default, see TrainingConfig.fast_kernels / offload_checkpoints) the LoRA
layers, SwiGLU MLPs and RMSNorms run on qlora_platform.kernels, checkpointed layer inputs
wait in pinned CPU memory, and the loss goes through the output head in chunks so the
logits never exist in full. On the CPU the model is PEFT's own, as the demo measured.
"""

from __future__ import annotations

import torch

from ..config import Config
from ..models.loader import attach_lora, fast_kernels_on, fp8_plan, load_base_model, offload_on
from ..models.scoring import answer_nll, output_head_parts

# Batch inputs that make attention more than causal: a padding mask, or packed sequences.
PLAIN_CAUSAL_UNLESS = frozenset({"attention_mask", "position_ids", "cu_seq_lens"})


def build_training_model(cfg: Config, device: str, log=print, distributed: bool = False):
    """The base model with trainable LoRA adapters, sped up as configured; returns
    (model, fused) where fused is (decoder, head) for the logits-free loss, or None.
    With several processes the model stays PEFT's own (the engine wraps it)."""
    model = attach_lora(load_base_model(cfg, device, for_training=True), cfg)
    fused = None
    if distributed:
        if fast_kernels_on(cfg, device) or offload_on(cfg, device):
            log("several processes: the single-GPU fast path (fast kernels, offloaded checkpoints) is off")
        return model, None
    if fast_kernels_on(cfg, device):
        from ..kernels import apply_fast_kernels

        log(apply_fast_kernels(model, fp8_plan(cfg, device)).summary())
        fused = output_head_parts(model)
        if fused is None:
            log("fast kernels: this model's output head needs full logits; the loss materialises them")
    if offload_on(cfg, device):
        from ..kernels import enable_offloaded_checkpointing

        enable_offloaded_checkpointing(model)
        log("gradient checkpointing: layer inputs offloaded to pinned CPU memory")
    return model, fused


def summed_nll(model, fused, labels: torch.Tensor, **inputs) -> torch.Tensor:
    """Negative log-likelihood summed over labelled tokens (token t predicts t+1), fp32. Packed
    rows pass `cu_seq_lens` (train/batching.py) for the fast layers' variable-length attention."""
    inputs.setdefault("use_cache", False)
    if fused is not None and not (PLAIN_CAUSAL_UNLESS & inputs.keys()):
        # Neither a padding mask nor packing: the fast layers may drop the mask the model builds
        # (kernels/decoder_layer.attention_core), which keeps a captured step on the fastest
        # attention kernels. Derived from this batch alone, so no other batch can inherit it.
        inputs["causal_only"] = True
    if fused is None:
        return answer_nll(model, labels, **inputs)
    from ..kernels import linear_cross_entropy, shift_labels

    decoder, head = fused
    hidden = decoder(**inputs).last_hidden_state
    return linear_cross_entropy(hidden, head.weight, shift_labels(labels))


def loss_backward(model, fused, cfg: Config, device: str, log=print):
    """Forward and backward of one batch as `qlora train` runs them: `run(batch, scale)` with
    batch = {"labels": ..., "input_ids": ..., [mask / positions]} accumulates the gradients of
    scale x summed NLL and returns that loss; replayed from CUDA graphs where train/cuda_graph.py
    can (training.cuda_graphs, with the fast kernels on CUDA)."""
    from ..kernels.offload import offloader_of
    from .cuda_graph import LossBackward

    run = LossBackward(
        lambda labels, **inputs: summed_nll(model, fused, labels, **inputs),
        device,
        offloader=offloader_of(model),
        log=log,
        max_graphs=8,
    )  # padded widths come in buckets (batching.py): a handful of shapes
    run.enabled = run.enabled and cfg.training.cuda_graphs and fast_kernels_on(cfg, device)
    return run
