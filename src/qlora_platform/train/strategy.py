"""Where a run's steps run: one process on one device, or several through accelerate.

The trainer holds one strategy object and calls it instead of asking which one it has:

    strategy = pick_strategy(cfg, device)      # train/distributed.py: SingleDevice unless WORLD_SIZE > 1
    model, optimizer, params = strategy.wrap(model, params, make_optimizer)
    run = strategy.loss_backward(model, fused, cfg, device, log, graphs=flat is not None)
    grad_norm = strategy.clip_grad_norm(model, params, cfg.training.max_grad_norm)
    strategy.save_checkpoint(out, step, model, optimizer, scheduler, state, keep)

`SingleDevice` (here) is the plain path and the only one with the fast path (the adapter in one
flat buffer, the logits-free loss, CUDA graphs, patched layers); `Distributed`
(train/distributed.py) is accelerate's DDP, torch's FSDP or DeepSpeed ZeRO-3. Both implement
every method of `Strategy`; the strategy is handed what it works on (model, optimizer, paths,
state) and keeps no reference to the trainer. `SingleDevice` imports nothing of accelerate.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: cli.py's launcher imports distributed.py, and with it this module
    import torch

    from ..config import Config


class Strategy(ABC):
    """What the trainer asks of the engine that runs its steps."""

    world: int = 1  # processes taking part
    rank: int = 0  # this process's index among them
    is_main: bool = True  # this process writes files and logs
    fast_path: bool = False  # whether the one-process fast path (flat buffer, fused loss, graphs) applies

    @abstractmethod
    def wrap(self, model, params: list, make_optimizer) -> tuple:
        """(the model as the engine runs it, its optimizer over `params` or the engine's own share
        of them, the tensors that optimizer steps and whose gradients are clipped)."""

    @abstractmethod
    def loss_backward(self, model, fused, cfg: Config, device: str, log, graphs: bool):
        """`run(batch, scale, graphable)`: forward and backward of one micro-batch, gradients
        accumulated, returning the scaled summed loss (detached); it has `enabled`, whether it
        may replay from CUDA graphs (only where `graphs`)."""

    @abstractmethod
    def clip_grad_norm(self, model, params: list, max_norm: float | None) -> torch.Tensor:
        """Clip the gradients to `max_norm` (none given: no clipping) and return their total norm."""

    @abstractmethod
    def mean(self, value: float) -> float:
        """The mean of `value` over the processes."""

    @abstractmethod
    def total(self, value: int) -> int:
        """The sum of `value` over the processes."""

    @abstractmethod
    def barrier(self) -> None:
        """Wait until every process gets here."""

    @abstractmethod
    def my_rows(self, rows: list) -> list:
        """This process's share of a global batch's rows (the same plan on every process)."""

    @abstractmethod
    def save_adapter(self, model, path: Path) -> None:
        """The LoRA adapter's files (PEFT's format) in `path`, written by the main process."""

    @abstractmethod
    def save_checkpoint(
        self, out: Path, step: int, model, optimizer, scheduler, state: dict, keep: int, extra=None
    ) -> Path:
        """checkpoint-`step` in `out` (atomic, the newest `keep` kept) with `state` as its
        trainer_state.json; `extra(folder)` (the main process) adds files beside the adapter
        before it is published. Returns its path."""

    @abstractmethod
    def load_state(self, ckpt: Path, model, optimizer, scheduler) -> dict:
        """This process's optimizer, the scheduler and the RNG from `ckpt` (whose adapter the
        model already holds); returns the saved trainer state."""


class SingleDevice(Strategy):
    """One process on one device: plain PyTorch, with the fast path where the config asks for it."""

    fast_path = True

    def __init__(self, device: str):
        self.device = device

    def wrap(self, model, params: list, make_optimizer) -> tuple:
        return model, make_optimizer(params), params

    def loss_backward(self, model, fused, cfg: Config, device: str, log, graphs: bool):
        from .model import loss_backward

        run = loss_backward(model, fused, cfg, device, log)
        # CUDA graphs need gradients that stay put between steps: the flat buffer.
        run.enabled = run.enabled and graphs
        return run

    def clip_grad_norm(self, model, params: list, max_norm: float | None) -> torch.Tensor:
        import torch

        return torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))

    def mean(self, value: float) -> float:
        return float(value)

    def total(self, value: int) -> int:
        return value

    def barrier(self) -> None:
        pass

    def my_rows(self, rows: list) -> list:
        return rows

    def save_adapter(self, model, path: Path) -> None:
        model.save_pretrained(path, safe_serialization=True)

    def save_checkpoint(
        self, out: Path, step: int, model, optimizer, scheduler, state: dict, keep: int, extra=None
    ) -> Path:
        from .checkpoint import save_checkpoint

        return save_checkpoint(out, step, model, optimizer, scheduler, state, keep=keep, extra=extra)

    def load_state(self, ckpt: Path, model, optimizer, scheduler) -> dict:
        from .checkpoint import load_training_state

        device = next(p.device for p in model.parameters() if p.requires_grad)
        return load_training_state(ckpt, optimizer, scheduler, device)
