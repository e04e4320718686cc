"""The fast training path on a GPU (run on the device machine: pytest -m gpu tests/kernels).

- offloaded checkpointing gives the gradients plain checkpointing gives;
- loss parity: 50 steps of `qlora train`'s GPU path (fast kernels, offload, logits-free loss)
  against transformers + PEFT + bitsandbytes (the plan's stack) from the same LoRA start on
  the same batches, on a Mistral-layout model small enough to run in seconds
  (`qlora_platform.train.synthetic`, the builders the training benchmark times). Set
  QLORA_TEST_OUT to a folder to keep both loss curves as JSON.
"""

import json
import os
from pathlib import Path

import pytest
import torch

PRESET = Path(__file__).resolve().parents[2] / "configs/mistral-7b.yaml"  # what `qlora train` runs on a 7B
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _lora_grads(cfg, offload: bool):
    from qlora_platform.train.model import build_training_model, summed_nll

    cfg.training.offload_checkpoints = offload
    torch.manual_seed(0)
    model, fused = build_training_model(cfg, "cuda", log=lambda *_: None)
    g = torch.Generator().manual_seed(1)
    for name, p in sorted(model.named_parameters()):
        if "lora_B" in name:
            p.data.copy_(0.2 * torch.randn(p.shape, generator=g))
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(2)).cuda()
    for _ in range(2):  # twice: the second step reuses the pooled pinned buffers
        model.zero_grad(set_to_none=True)
        loss = summed_nll(model, fused, ids, input_ids=ids)
        loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_offloaded_checkpointing_gives_plain_checkpointing_gradients(tiny_cfg, monkeypatch):
    from qlora_platform.kernels import lora

    # Unfolded products on both sides: the offloaded recompute folds other products than plain
    # checkpointing's (lora.py), and in bf16 that rounding alone moves a tiny random model's
    # gradients by percents (test_lora_fold.py holds the fold to its own bar).
    monkeypatch.setattr(lora, "_foldable", lambda x2, projs: False)
    tiny_cfg.training.device = "cuda"
    tiny_cfg.quantization.compute_dtype = "bfloat16"
    tiny_cfg.training.gradient_checkpointing = True
    loss_plain, plain = _lora_grads(tiny_cfg, offload=False)
    loss_off, off = _lora_grads(tiny_cfg, offload=True)
    assert loss_off == pytest.approx(loss_plain, rel=1e-6)
    for name, g in plain.items():
        torch.testing.assert_close(off[name], g, atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("variant", ["default", "fp8", "fp8_input_grad"])
def test_loss_matches_transformers_peft_over_50_steps(variant):
    from qlora_platform.train.synthetic import build_qlora_platform, build_reference, checkpoint

    path = checkpoint("mistral-mini")
    torch.manual_seed(0)
    reference = build_reference(path, lr=1e-3)
    torch.manual_seed(0)
    # default: what `qlora train` runs; fp8*: the opt-in fp8 base products (forward only, or
    # with the input gradient too), forced on at this size, held to the same bar.
    overrides = {"training.fp8": True, "training.fp8_min_tokens": 16} if variant.startswith("fp8") else {}
    if variant == "fp8_input_grad":
        overrides["training.fp8_input_grad"] = True
    built: list[str] = []  # the build's log: what the fast kernels patched, fp8 included
    platform = build_qlora_platform(path, 512, 2, preset=PRESET, lr=1e-3, overrides=overrides, log=built.append)
    start = {n: p for n, p in reference.model.named_parameters() if p.requires_grad}
    for n, p in platform.model.named_parameters():
        if p.requires_grad:
            p.data.copy_(start[n].data)  # the same LoRA start (A random, B zero)
    # Learnable batches: 16 documents over a 64-token alphabet, cycled in order.
    alphabet = torch.randperm(32000, generator=torch.Generator().manual_seed(5))[:64]
    docs = alphabet[torch.randint(0, 64, (16, 512), generator=torch.Generator().manual_seed(6))]
    curves = {"reference": [], "qlora_platform": []}
    for i in range(50):
        x = docs[(2 * i) % 16 : (2 * i) % 16 + 2].cuda()
        curves["reference"].append(float(reference(x)))
        curves["qlora_platform"].append(float(platform(x)))
    gaps = [abs(a - b) / b for a, b in zip(curves["qlora_platform"], curves["reference"])]
    if variant != "default":  # fp8 is really on
        assert any("fp8 from 16 tokens" in line for line in built), built
    if os.environ.get("QLORA_TEST_OUT"):
        Path(os.environ["QLORA_TEST_OUT"], f"loss_parity_{variant}.json").write_text(
            json.dumps(
                {
                    **curves,
                    "mean_gap": sum(gaps) / len(gaps),
                    "max_gap": max(gaps),
                    "device": torch.cuda.get_device_name(),
                }
            )
        )
    ref = curves["reference"]
    assert ref[-1] < ref[0] - 1.0, "the reference did not learn: the comparison would say nothing"
    assert sum(gaps) / len(gaps) < 0.01, gaps  # within 1% over the 50 steps
    assert max(gaps) < 0.03, gaps
