"""Fast training kernels for QLoRA on a GPU, each with a plain-PyTorch reference.

    from qlora_platform.kernels import apply_fast_kernels, enable_offloaded_checkpointing
    report = apply_fast_kernels(peft_model)          # patch.py: the only monkeypatching
    enable_offloaded_checkpointing(peft_model)       # offload.py

- lora.py: LoRA projections and the SwiGLU MLP as autograd functions over 4-bit weights;
- decoder_layer.py: the Llama-family decoder layer written out, with a checkpoint recompute
  that redoes only attention and the gate/up products;
- swiglu.py, rmsnorm.py, rope.py, nf4.py, fp8.py: Triton kernels (the reference runs where
  Triton cannot);
- cross_entropy.py: the loss through the output head without materialising the logits;
- offload.py: gradient checkpointing with the layer inputs (and what a layer keeps) parked in
  pinned CPU memory.

The trainer turns them on for CUDA by default (training.fast_kernels,
training.offload_checkpoints). Tests: tests/kernels (CPU, Triton interpreted) and the
GPU-marked loss-parity test. Figures: docs/benchmarks.md.
"""

from .cross_entropy import linear_cross_entropy, shift_labels
from .offload import enable_offloaded_checkpointing
from .patch import FastKernelReport, apply_fast_kernels

__all__ = [
    "FastKernelReport",
    "apply_fast_kernels",
    "enable_offloaded_checkpointing",
    "linear_cross_entropy",
    "shift_labels",
]
