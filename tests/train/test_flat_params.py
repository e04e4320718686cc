"""One flat buffer for the adapter: same training as per-tensor, checkpoints round-trip."""

import shutil

import pytest
import torch

from qlora_platform.train.flat_params import FlatParams


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(3, 4, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]


def test_flat_adamw_steps_like_per_tensor_adamw():
    a, b = _params(), _params()
    flat = FlatParams(b)
    opt_a = torch.optim.AdamW(a, lr=0.1)
    opt_b = torch.optim.AdamW([flat.param], lr=0.1)
    for _ in range(3):
        for ps in (a, b):
            ((ps[0] ** 2).sum() + (ps[1] ** 3).sum()).backward()
        assert torch.equal(flat.param.grad[:12].view(3, 4), b[0].grad)  # accumulated in place
        opt_a.step(), opt_b.step()
        opt_a.zero_grad(), flat.zero_grad()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    assert b[0].data_ptr() == flat.param.data_ptr()


def test_gradients_set_to_none_are_caught():
    params = _params()
    flat = FlatParams(params)
    params[0].grad = None
    with pytest.raises(RuntimeError, match="flat gradient buffer"):
        flat.check()


def test_resume_with_fast_kernels_continues_to_the_same_adapter(tiny_cfg):
    from qlora_platform.train.trainer import Trainer

    tiny_cfg.training.fast_kernels = True
    # The kernels run in Triton's interpreter here, seconds a step: 4 steps, and no holdout score.
    tiny_cfg.training.max_steps, tiny_cfg.training.save_steps = 4, 2
    first = Trainer(tiny_cfg, log=lambda *_: None, final_eval=False)  # checkpoint-2 on the way
    first.train()
    shutil.rmtree(first.out / "checkpoint-4")  # resume from checkpoint-2 instead
    final = {n: p.detach().clone() for n, p in first.model.named_parameters() if p.requires_grad}
    resumed = Trainer(tiny_cfg, resume=True, log=lambda *_: None, final_eval=False)
    assert resumed.step == 2 and resumed.flat is not None
    resumed.train()  # adapter and flat optimizer state restored
    for n, p in resumed.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), final[n])
