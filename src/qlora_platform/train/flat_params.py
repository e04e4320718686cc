"""Trainable LoRA tensors as views of one flat buffer, so the optimizer sees one tensor.

    flat = FlatParams(trainable)                 # before building the optimizer
    optimizer = build_optimizer([flat.param], cfg, device)
    ... loss.backward(); clip_grad_norm_([flat.param], 1.0); optimizer.step(); flat.zero_grad()

A 7B model with LoRA on seven projections has 448 adapter tensors. bitsandbytes'
8-bit optimizers step them one by one from Python, tens of milliseconds a step: most
of a small batch's budget (docs/benchmarks.md). Laid out back to back,
the same update (Adam is elementwise; the 8-bit states are kept per block of 256
values either way) is one kernel launch, and the gradient norm one reduction.

Each tensor's data and `.grad` become views into the two buffers; autograd then
accumulates into the flat gradient in place. So gradients must be zeroed with
`zero_grad()` here, never set to None (that would detach the views; `check()`
says so instead of training on zeros). PEFT saves aliased tensors by cloning them,
and loading an adapter copies into the views, so checkpoints work unchanged.
"""

from __future__ import annotations

import torch


class FlatParams:
    def __init__(self, params: list[torch.Tensor]):
        if not params:
            raise ValueError("no trainable tensors to flatten")
        dtype, device = params[0].dtype, params[0].device
        if any(p.dtype != dtype or p.device != device for p in params):
            raise ValueError("trainable tensors differ in dtype or device; they cannot share one buffer")
        total = sum(p.numel() for p in params)
        data = torch.empty(total, dtype=dtype, device=device)
        grad = torch.zeros(total, dtype=dtype, device=device)
        offset = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                data[offset : offset + n].copy_(p.reshape(-1))
                p.data = data[offset : offset + n].view_as(p)
                p.grad = grad[offset : offset + n].view_as(p)
                offset += n
        self.views = params
        self.param = torch.nn.Parameter(data)
        self.param.grad = grad

    def zero_grad(self) -> None:
        self.param.grad.zero_()

    def check(self) -> None:
        """Fail loudly if something replaced a view's gradient (e.g. zero_grad(set_to_none=True))."""
        start = self.param.grad.data_ptr()
        end = start + self.param.grad.numel() * self.param.grad.element_size()
        for p in self.views:
            if p.grad is None or not start <= p.grad.data_ptr() < end:
                raise RuntimeError(
                    "a LoRA gradient no longer points into the flat gradient buffer; "
                    "zero gradients with FlatParams.zero_grad(), not set_to_none"
                )
