"""GPU path of the trainer (run on the device machine: pytest -m gpu)."""

import pytest
import torch

from qlora_platform.train.trainer import Trainer

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_on_gpu_with_paged_8bit_adam_learns(tiny_cfg):
    tiny_cfg.training.device = "cuda"
    tiny_cfg.training.optimizer = "paged_adamw_8bit"
    tiny_cfg.quantization.compute_dtype = "bfloat16"
    tiny_cfg.training.gradient_checkpointing = True
    tiny_cfg.training.max_steps = 8
    trainer = Trainer(tiny_cfg, log=lambda *_: None)
    assert trainer.model.is_gradient_checkpointing and trainer.model.training
    summary = trainer.train()
    losses = [h["loss"] for h in trainer.history if "loss" in h]
    assert losses[-1] < losses[0]
    assert summary["peak_memory_gib"] > 0
