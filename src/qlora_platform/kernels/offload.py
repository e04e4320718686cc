"""Gradient checkpointing that parks each layer's input in pinned CPU memory.

    enable_offloaded_checkpointing(model)   # transformers model with GradientCheckpointingLayer blocks

Plain checkpointing keeps one (batch x seq x hidden) input per decoder layer on
the GPU: 4 GiB for a 7B model at b4 x s4096. Here forward copies that input to
pinned host memory on a side stream (the GPU tensor is released once the copy
is done) and runs the layer without keeping anything. Backward copies the input
back, recomputes the layer with gradients and backpropagates through it; while
one layer does that, the next one down is already being copied in (double
buffering), so the PCIe traffic hides behind compute. Pinned buffers are pooled
across steps (pinning is slow). On the CPU it is ordinary checkpointing.
"""
from __future__ import annotations

import functools

import torch


class _HostPool:
    """Pinned host buffers reused across steps, keyed by shape and dtype."""

    def __init__(self):
        self.free: dict[tuple, list[torch.Tensor]] = {}

    def take(self, like: torch.Tensor) -> torch.Tensor:
        key = (tuple(like.shape), like.dtype)
        bucket = self.free.get(key)
        if bucket:
            return bucket.pop()
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)

    def give(self, buf: torch.Tensor) -> None:
        self.free.setdefault((tuple(buf.shape), buf.dtype), []).append(buf)


class Offloader:
    """Moves saved layer inputs to the host and back; one per model."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.pool = _HostPool()
        self.saved: list[dict] = []   # in forward order
        self.prefetched: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self._pending: list[tuple[torch.Tensor, torch.cuda.Event]] = []

    def save(self, x: torch.Tensor) -> int:
        host = self.pool.take(x)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host.copy_(x, non_blocking=True)
        x.record_stream(self.stream)   # the allocator keeps x until the copy is done
        self.saved.append({"host": host, "requires_grad": x.requires_grad})
        return len(self.saved) - 1

    def _start_load(self, idx: int) -> None:
        if idx < 0 or idx >= len(self.saved) or idx in self.prefetched or self.saved[idx] is None:
            return
        host = self.saved[idx]["host"]
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            gpu = torch.empty(host.shape, dtype=host.dtype, device=self.device)
            gpu.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.prefetched[idx] = (gpu, done)

    def load(self, idx: int) -> torch.Tensor:
        self._start_load(idx)
        self._start_load(idx - 1)          # the layer backward reaches next: overlap its copy
        gpu, done = self.prefetched.pop(idx)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(done)
        gpu.record_stream(compute)
        self._pending.append((self.saved[idx]["host"], done))
        self.saved[idx] = None
        if all(e is None for e in self.saved):
            self.saved.clear()
        self._recycle()
        return gpu

    def _recycle(self) -> None:
        """Host buffers go back to the pool once the copy that read them has finished."""
        still = []
        for buf, done in self._pending:
            if done.query():
                self.pool.give(buf)
            else:
                still.append((buf, done))
        self._pending = still


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, offloader, hidden, *args):
        ctx.run, ctx.offloader, ctx.args = run, offloader, args
        ctx.idx = offloader.save(hidden)
        with torch.no_grad():
            return run(hidden, *args)

    @staticmethod
    def backward(ctx, grad):
        hidden = ctx.offloader.load(ctx.idx).detach().requires_grad_(True)
        with torch.enable_grad():
            out = ctx.run(hidden, *ctx.args)
        torch.autograd.backward(out, grad)
        return (None, None, hidden.grad) + (None,) * len(ctx.args)


def offloaded_checkpoint(offloader: Offloader, run, hidden, *args):
    if not torch.is_grad_enabled():
        return run(hidden, *args)
    return _OffloadedCheckpoint.apply(run, offloader, hidden, *args)


def enable_offloaded_checkpointing(model) -> Offloader | None:
    """Checkpoint every decoder layer with its input offloaded; None off the GPU (plain checkpointing)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return None
    offloader = Offloader(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    func = functools.partial(offloaded_checkpoint, offloader)
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = func
    return offloader
