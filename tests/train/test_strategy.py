"""The strategy interface the trainer talks to: both implementations complete, the trainer
calling nothing else of them, and a one-process run never touching accelerate."""

from __future__ import annotations

import inspect
import json
import re
import sys

import pytest
import torch
from safetensors.torch import save_file

from qlora_platform.config import load_config
from qlora_platform.train import trainer as trainer_module
from qlora_platform.train.distributed import Distributed, pick_strategy
from qlora_platform.train.strategy import SingleDevice, Strategy

ATTRIBUTES = {"world", "rank", "is_main", "fast_path"}


def _public_methods(cls) -> set[str]:
    return {name for name, _ in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")}


def _parameters(function) -> list[tuple[str, object]]:
    return [(p.name, p.kind) for p in inspect.signature(function).parameters.values()]


def test_both_strategies_implement_the_whole_interface():
    interface = set(Strategy.__abstractmethods__)
    assert set(Strategy.__annotations__) >= ATTRIBUTES
    for cls in (SingleDevice, Distributed):
        assert issubclass(cls, Strategy) and not cls.__abstractmethods__, cls
        assert _public_methods(cls) == interface, cls  # nothing the trainer could come to rely on beside it
        for name in interface:  # the same parameters, so one call fits both
            assert _parameters(getattr(cls, name)) == _parameters(getattr(Strategy, name)), (cls, name)
    assert (SingleDevice.fast_path, Distributed.fast_path) == (True, False)


def test_the_trainer_uses_only_the_interface_and_never_asks_which_strategy_it_has():
    source = inspect.getsource(trainer_module)
    used = set(re.findall(r"self\.strategy\.(\w+)", source))
    assert used and used <= set(Strategy.__abstractmethods__) | ATTRIBUTES, used
    assert "self.dist" not in source and "isinstance(self.strategy" not in source


class _Toy(torch.nn.Module):
    """A stand-in adapter: one trainable tensor, saved as PEFT saves its adapter file."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def save_pretrained(self, path, safe_serialization=True):
        save_file({"w": self.w.detach()}, str(path / "adapter_model.safetensors"))


def test_one_process_runs_its_strategy_without_accelerate(monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setitem(sys.modules, "accelerate", None)  # any import of accelerate now fails
    cfg = load_config(None, {"training.device": "cpu"})
    strategy = pick_strategy(cfg, "cpu")
    assert type(strategy) is SingleDevice and (strategy.world, strategy.rank, strategy.is_main) == (1, 0, True)

    model = _Toy()
    wrapped, optimizer, params = strategy.wrap(model, [model.w], lambda ps: torch.optim.AdamW(ps, lr=0.1))
    assert wrapped is model and params == [model.w] and optimizer.param_groups[0]["params"] == [model.w]
    assert not strategy.loss_backward(model, None, cfg, "cpu", print, graphs=False).enabled
    (model.w * 2).sum().backward()
    norm = strategy.clip_grad_norm(model, params, None)  # no limit: the norm, gradients untouched
    assert float(norm) == pytest.approx(2 * 3**0.5) and torch.equal(model.w.grad, torch.full((3,), 2.0))
    strategy.clip_grad_norm(model, params, 1.0)
    assert float(model.w.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    assert (strategy.mean(2.5), strategy.total(7), strategy.my_rows([[1], [2]])) == (2.5, 7, [[1], [2]])
    strategy.barrier()

    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ckpt = strategy.save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {"history": []}, keep=2)
    assert ckpt == tmp_path / "checkpoint-1"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "adapter_model.safetensors",
        "optimizer.pt",
        "rng_state.pt",
        "scheduler.pt",
        "trainer_state.json",
    ]
    assert json.loads((ckpt / "trainer_state.json").read_text()) == {"history": [], "global_step": 1}
    fresh = torch.optim.AdamW([model.w], lr=0.1)
    state = strategy.load_state(ckpt, model, fresh, torch.optim.lr_scheduler.LambdaLR(fresh, lambda step: 1.0))
    assert state["global_step"] == 1 and fresh.state_dict()["state"][0]["step"] == 1

    # The same blocked import stops a multi-process strategy at once: the check above is real.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ImportError):
        pick_strategy(cfg, "cpu")
