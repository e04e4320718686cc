"""Forward and backward of a training batch, replayed from a CUDA graph when its shape repeats.

    run = LossBackward(lambda **batch: summed_nll(model, fused, batch.pop("labels"), **batch),
                       device="cuda", offloader=offloader)
    loss = run(batch, scale=1 / n_labels)     # gradients accumulated into the .grad buffers
    run(batch, scale, graphable=False)         # always eager (e.g. a batch with an attention mask)

Why: a 7B QLoRA step at b2 x s1024 launches about 4,800 kernels for 0.16 s of GPU work, but
Python and the launches take 0.28-0.43 s of host time (benchmarks/results/
profile_qlora_platform_b2s1024_h100_3a210c1.txt): the GPU waits on the host. Replaying the recorded
kernels costs the host almost nothing, so small batches run at the GPU's speed.

How: the first batch of a shape runs eagerly (it compiles kernels, builds cuBLAS/cuDNN plans
and shows how much memory the step takes); the second is captured into a graph (forward,
loss scaled by a tensor, backward into the existing gradient buffers, offloaded checkpoints
included: kernels/offload.py keeps its copies capturable) and replayed from then on, with the
batch copied into the graph's input tensors. All graphs share one memory pool (and the
offloader's pinned host buffers: they replay one after another on one stream). Only batches
that need no attention mask are offered (`graphable`): right-padded batches (causal
attention keeps real tokens off the pads) and packed rows with their boundaries as a tensor
(`cu_seq_lens`, variable-length attention); train/batching.py gives both a few fixed shapes.
Under capture transformers cannot look at the batch and builds a dense causal mask; the
batch itself says when that mask is plain causal and may be dropped (train/model.summed_nll).
`capture_context`, if given, is entered around the capture.

When a graph is not made (the batch runs eagerly): not CUDA; `graphable=False`; more shapes
than `max_graphs`; too little free memory to hold the graph's working memory next to an eager
step's (on an 8 GB card a large batch stays eager rather than risk running out); or the
capture failed because something in the step waits on the GPU (transformers' attention-mask
checks do when a mask is passed). A failed capture is said once and the shape stays eager.
Gradients must live in buffers that persist across steps (FlatParams): a graph accumulates
into the same addresses on every replay.
"""

from __future__ import annotations

import contextlib

import torch


class _Graph:
    def __init__(self, graph, inputs: dict, scale: torch.Tensor, loss: torch.Tensor, owned: list):
        self.graph, self.inputs, self.scale, self.loss = graph, inputs, scale, loss
        self.owned = owned  # pinned host buffers the graph copies checkpoints through

    def replay(self, batch: dict, scale: float) -> torch.Tensor:
        for name, t in batch.items():
            self.inputs[name].copy_(t, non_blocking=True)
        self.scale.fill_(scale)
        self.graph.replay()
        return self.loss.clone()


class LossBackward:
    def __init__(
        self, loss_fn, device, offloader=None, max_graphs: int = 4, log=print, capture_context=contextlib.nullcontext
    ):
        self.loss_fn, self.device, self.offloader = loss_fn, torch.device(device), offloader
        self.capture_context = capture_context  # entered around the capture
        self.max_graphs, self.log = max_graphs, log
        self.enabled = self.device.type == "cuda"
        self.graphs: dict[tuple, _Graph | None] = {}  # None: this shape stays eager
        self.seen: dict[tuple, int] = {}  # eager runs per shape: bytes the step took
        self.pool = torch.cuda.graph_pool_handle() if self.enabled else None
        # Every step, eager or captured, runs on this one stream: cuBLAS keeps a workspace per
        # stream (64 MiB on Hopper), so capturing on a stream of its own beside eager steps on the
        # default one would hold two (measured in docs/lab-log.md, "CUDA graphs, folded LoRA").
        self.stream = torch.cuda.Stream(self.device) if self.enabled else None

    def eager(self, batch: dict, scale: float) -> torch.Tensor:
        loss = self.loss_fn(**batch) * scale
        loss.backward()
        return loss.detach()

    def __call__(self, batch: dict, scale: float, graphable: bool = True) -> torch.Tensor:
        if not self.enabled:
            return self.eager(batch, scale)
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            loss = self._step(batch, scale, graphable)
        caller.wait_stream(self.stream)  # the optimizer and the caller's next work come after
        return loss

    def _step(self, batch: dict, scale: float, graphable: bool) -> torch.Tensor:
        if not graphable:
            return self.eager(batch, scale)
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(batch.items()))
        graph = self.graphs.get(key)
        if graph is not None:
            return graph.replay(batch, scale)
        if key in self.graphs or (key not in self.seen and len(self.seen) >= self.max_graphs):
            return self.eager(batch, scale)
        if key not in self.seen:  # first of its shape: eager, measuring its working memory
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            loss = self.eager(batch, scale)
            self.seen[key] = torch.cuda.max_memory_allocated(self.device) - base
            return loss
        graph = self._capture(key, batch)
        self.graphs[key] = graph
        return graph.replay(batch, scale) if graph is not None else self.eager(batch, scale)

    def _capture(self, key: tuple, batch: dict) -> _Graph | None:
        working = self.seen[key]
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        if free < 2 * working:  # the graph's pool and, beside it, one eager step of another shape
            self.log(
                f"CUDA graphs: batch shape {_shape(key)} stays eager: the step's "
                f"{working / 2**30:.2f} GiB of working memory twice exceeds the "
                f"{free / 2**30:.2f} GiB free"
            )
            return None
        inputs = {name: t.clone() for name, t in batch.items()}
        scale = torch.ones((), dtype=torch.float32, device=self.device)
        owned: list[torch.Tensor] = []
        graph = torch.cuda.CUDAGraph()
        parking = self.offloader.capturing(owned) if self.offloader is not None else contextlib.nullcontext()
        try:
            with (
                parking,
                self.capture_context(),
                torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"),
            ):
                loss = self.loss_fn(**inputs) * scale
                loss.backward()
        except RuntimeError as err:
            if self.offloader is not None:
                self.offloader.reset()
            torch.cuda.synchronize(self.device)
            _end_generator_capture()
            first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            self.log(f"CUDA graphs: batch shape {_shape(key)} stays eager: the step could not be captured ({first})")
            return None
        return _Graph(graph, inputs, scale, loss.detach(), owned)


def _end_generator_capture() -> None:
    """A capture that failed leaves the CUDA random generator in capture mode (its epilogue never
    ran), and every later random draw (dropout, init) would fail; an empty capture closes it."""
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        pass


def _shape(key: tuple) -> str:
    return ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape, _ in key)
