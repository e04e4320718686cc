"""GPU path of the trainer (run on the device machine: pytest -m gpu)."""

import shutil

import pytest
import torch

from qlora_platform.train.trainer import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _on_gpu(cfg):
    cfg.training.device = "cuda"
    cfg.training.optimizer = "paged_adamw_8bit"
    cfg.quantization.compute_dtype = "bfloat16"
    cfg.training.gradient_checkpointing = True
    return cfg


def test_qlora_on_gpu_with_paged_8bit_adam_learns(tiny_cfg):
    _on_gpu(tiny_cfg).training.max_steps = 8
    trainer = Trainer(tiny_cfg, log=lambda *_: None)
    assert trainer.model.is_gradient_checkpointing and trainer.model.training
    # One device on CUDA takes the fast path: the adapter in one flat buffer, steps from CUDA graphs.
    assert trainer.flat is not None and trainer.run_batch.enabled
    summary = trainer.train()
    losses = [h["loss"] for h in trainer.history if "loss" in h]
    assert losses[-1] < losses[0]
    assert summary["peak_memory_gib"] > 0


def test_gpu_run_resumes_its_optimizer_state_from_the_checkpoint(tiny_cfg):
    first = Trainer(_on_gpu(tiny_cfg), log=lambda *_: None)  # 6 steps, checkpoint-3 on the way
    first.train()
    shutil.rmtree(first.out / "checkpoint-6")
    resumed = Trainer(tiny_cfg, resume=True, log=lambda *_: None)
    assert resumed.step == 3 and resumed.optimizer.state, "optimizer state loaded onto the GPU"
    state = next(iter(resumed.optimizer.state.values()))
    assert all(t.device.type == "cuda" for t in state.values() if torch.is_tensor(t) and t.dim())
    resumed.train()
    assert resumed.step == 6
