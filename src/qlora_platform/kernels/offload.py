"""Gradient checkpointing that parks each layer's input in pinned CPU memory.

    enable_offloaded_checkpointing(model)   # transformers model with GradientCheckpointingLayer blocks

Plain checkpointing keeps one (batch x seq x hidden) input per decoder layer on
the GPU: 4 GiB for a 7B model at b4 x s4096. Here forward copies that input to
pinned host memory on a side stream (the GPU tensor is released once the copy
is done) and runs the layer without keeping anything. Backward copies the input
back, recomputes the layer with gradients and backpropagates through it; while
one layer does that, the next one down is already being copied in (double
buffering), so the PCIe traffic hides behind compute. Pinned buffers are pooled
across steps and shapes by byte size, within a bound (`HostPool`; pinning is slow). On the
CPU it is ordinary checkpointing.

A layer's forward may park more than its input (`replay_of(layer).keep(name, t)` in the
first pass) and find it again in the recompute (`replay_of(layer).kept[name]`), so that the
recompute skips what it would only compute to reproduce t (kernels/decoder_layer.py). The
replay is the model's own: its Offloader holds the one of the layer it runs now, and a layer
finds that Offloader through the checkpoint function `use_offloader` gave it, so two models in
one process never see each other's.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch


def _round_bytes(n: int, granule: int) -> int:
    """A pool size class: powers of two below `granule`, whole granules above, so that the
    tensors of nearby shapes share buffers while rounding wastes little."""
    if n <= granule:
        return max(512, 1 << max(n - 1, 0).bit_length())
    return -(-n // granule) * granule


def _default_limit() -> int:
    """A quarter of the machine's memory: checkpoints beyond that go through pageable memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class HostPool:
    """Host buffers reused by byte size across shapes and dtypes, with a bound.

    `take(like)` hands out a view, shaped and typed like `like`, of a byte buffer whose size is
    rounded up (`_round_bytes`); `give(view)` returns it. A free buffer of the same size class
    is reused first, else the smallest free one at most `stretch` times as large. The bytes
    held (lent and free) stay within `limit`: free buffers are released least recently used
    first when a new one would pass it, and if lent buffers alone fill it the pool hands out
    an unpooled buffer instead (pageable when pinning: slower copies, bounded memory) and drops
    it when given back. `limit=None`: unbounded (buffers that a CUDA graph recorded must never
    be released). pin=False allocates ordinary memory, so the policy is testable on the CPU."""

    def __init__(self, limit: int | None = None, pin: bool = True, granule: int = 2 << 20, stretch: float = 2.0):
        self.limit, self.pin, self.granule, self.stretch = limit, pin, granule, stretch
        self.free: dict[int, list[torch.Tensor]] = {}  # size class -> idle buffers
        self.idle: dict[int, int] = {}  # data_ptr -> size, least recently given first
        self.lent: dict[int, torch.Tensor] = {}  # data_ptr -> buffer handed out
        self.held = 0  # bytes of pooled buffers, lent or free
        self.allocated = self.released = self.unpooled = 0  # counts, for tests and logs

    def take(self, like: torch.Tensor, pin: bool | None = None) -> torch.Tensor:
        need = like.numel() * like.element_size()
        size = _round_bytes(need, self.granule)
        buf = self._reuse(size)
        if buf is None:
            pin = self.pin if pin is None else pin
            if self.limit is not None and self.held + size > self.limit:
                self._release(self.held + size - self.limit)
            if self.limit is not None and self.held + size > self.limit:
                self.unpooled += 1  # lent buffers fill the bound: one outside the pool
                return torch.empty(like.shape, dtype=like.dtype, pin_memory=False)
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
            self.held += size
            self.allocated += 1
        self.lent[buf.data_ptr()] = buf
        return buf[:need].view(like.dtype).view(like.shape)

    def give(self, view: torch.Tensor) -> None:
        buf = self.lent.pop(view.data_ptr(), None)
        if buf is None:
            return  # unpooled: dropped
        self.free.setdefault(buf.numel(), []).append(buf)
        self.idle[buf.data_ptr()] = buf.numel()

    def _reuse(self, size: int) -> torch.Tensor | None:
        fits = [s for s, bufs in self.free.items() if bufs and size <= s <= size * self.stretch]
        if not fits:
            return None
        buf = self.free[min(fits)].pop()
        del self.idle[buf.data_ptr()]
        return buf

    def _release(self, nbytes: int) -> None:
        """Free idle buffers, least recently given back first, until nbytes are released."""
        for ptr in list(self.idle):
            if nbytes <= 0:
                break
            size = self.idle.pop(ptr)
            bufs = self.free[size]
            bufs[:] = [b for b in bufs if b.data_ptr() != ptr]
            self.held -= size
            self.released += 1
            nbytes -= size


class Offloader:
    """Moves each checkpointed layer's saved tensors (its input, and whatever the layer's
    forward keeps through `LayerReplay.keep`) to the host and back; one per model.
    On a CPU device the tensors simply stay where they are (tests use this).

    Every device buffer is allocated on the compute stream and no tensor is handed to the
    allocator from the side stream (no `record_stream`): a parked tensor stays referenced
    until the compute stream waits for its copy at the end of its layer, and a prefetched one
    is written by the side stream only after it waited for the compute stream. The same
    code then also runs inside a CUDA graph capture (train/cuda_graph.py), where memory
    freed this way is reused within the graph instead of held to the end of the capture."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        # The last layer's entry stays on the device (`use_offloader` sets which that is): its
        # backward comes right after the loss, so a round trip would only leave the GPU waiting
        # for the copy back at backward's start.
        self.last: int | None = None
        self.on_gpu = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.on_gpu else None
        # Eager steps draw on a bounded pool; CUDA graphs on one of their own, never released
        # (a graph writes its buffers on every replay) and shared by all graphs: they replay one
        # after another on one stream, so a buffer is free again when its graph's replay ends.
        self.pool = HostPool(limit=_default_limit(), pin=self.on_gpu)
        self.graph_pool = HostPool(limit=None, pin=self.on_gpu)
        self.saved: list[list | None] = []  # per layer, in forward order: (name, host copy or as is, parked)
        self.prefetched: dict[int, tuple[list[torch.Tensor], torch.cuda.Event]] = {}
        self._pending: list[tuple[torch.Tensor, torch.cuda.Event]] = []  # host buffers being read
        self._parking: list[tuple[int, torch.Tensor, torch.cuda.Event]] = []  # device tensors being copied out
        self.graph_owned: list[torch.Tensor] | None = None  # set while a CUDA graph is captured
        self.replay: LayerReplay | None = None  # the pass of the checkpointed layer running now

    @contextlib.contextmanager
    def replaying(self, replay: LayerReplay):
        """`replay` is the pass of the layer that runs inside this block (`replay_of` finds it)."""
        outer, self.replay = self.replay, replay
        try:
            yield replay
        finally:
            self.replay = outer

    def save(self, x: torch.Tensor) -> int:
        """Start a layer's entry with its input; returns the entry's index."""
        self.saved.append([])
        idx = len(self.saved) - 1
        self.add(idx, "input", x)
        return idx

    def done_with(self, idx: int) -> None:
        """Entry idx's layer has run: its parked tensors are dropped once the compute stream has
        waited for their copies (issued during the layer, so normally finished by now)."""
        self._release_parked(before=idx + 1)

    def add(self, idx: int, name: str, x, park: bool = True) -> None:
        """Park one more tensor of entry idx; the copy starts now, behind the work that made x.
        With park=False (small tensors, or anything else) x stays on the device as it is."""
        entry = self._entry(idx)
        if not self.on_gpu or not park or idx == self.last:
            entry.append((name, x, False))
            return
        if self.graph_owned is not None:
            host = self.graph_pool.take(x)
            self.graph_owned.append(host)  # the graph writes this buffer on every replay
        else:
            host = self.pool.take(x)
        stream = self._side_stream()
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            host.copy_(x, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        self._parking.append((idx, x, copied))  # x stays alive until compute waits for `copied`
        entry.append((name, host, True))

    def _entry(self, idx: int) -> list:
        entry = self.saved[idx]
        if entry is None:
            raise RuntimeError(f"checkpoint entry {idx} was loaded already")
        return entry

    def _side_stream(self) -> torch.cuda.Stream:
        if self.stream is None:
            raise RuntimeError("tensors are parked on the host from a CUDA device only")
        return self.stream

    def _release_parked(self, before: int) -> None:
        """Drop device tensors of entries < before once the compute stream waits for their copies."""
        keep = []
        for idx, x, copied in self._parking:  # empty off CUDA
            if idx < before:
                torch.cuda.current_stream(self.device).wait_event(copied)
            else:
                keep.append((idx, x, copied))
        self._parking = keep

    def _start_load(self, idx: int) -> None:
        if idx < 0 or idx >= len(self.saved) or idx in self.prefetched or self.saved[idx] is None:
            return
        entry = self._entry(idx)
        gpus = [
            torch.empty(host.shape, dtype=host.dtype, device=self.device) if parked else host
            for _, host, parked in entry
        ]
        stream = self._side_stream()
        stream.wait_stream(torch.cuda.current_stream(self.device))  # gpus' memory is free by then
        with torch.cuda.stream(stream):
            for gpu, (_, host, parked) in zip(gpus, entry):
                if parked:
                    gpu.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        self.prefetched[idx] = (gpus, done)

    def load(self, idx: int) -> dict:
        """Entry idx back on the device, by name ("input" and what the layer kept); the next
        entry down starts copying."""
        if not self.on_gpu:
            entry, self.saved[idx] = self._entry(idx), None
            self._forget_if_done()
            return {name: x for name, x, _ in entry}
        self._release_parked(before=len(self.saved))  # forward is over
        self._start_load(idx)
        self._start_load(idx - 1)  # the layer backward reaches next: overlap its copy
        gpus, done = self.prefetched.pop(idx)
        torch.cuda.current_stream(self.device).wait_event(done)
        entry = self._entry(idx)
        if self.graph_owned is None:
            self._pending += [(host, done) for _, host, parked in entry if parked]
        self.saved[idx] = None
        self._forget_if_done()
        self._recycle()
        return {name: gpu for (name, _, _), gpu in zip(entry, gpus)}

    def _forget_if_done(self) -> None:
        if all(e is None for e in self.saved):
            self.saved.clear()

    def _recycle(self) -> None:
        """Host buffers go back to the pool once the copy that read them has finished."""
        if self.graph_owned is not None:
            return  # events recorded in a capture cannot be queried
        still = []
        for buf, done in self._pending:
            if done.query():
                self.pool.give(buf)
            else:
                still.append((buf, done))
        self._pending = still

    def settle(self) -> None:
        """Wait for every copy and return every host buffer to the pool (before a capture)."""
        if self.on_gpu:
            torch.cuda.synchronize(self.device)
            for buf, _ in self._pending:
                self.pool.give(buf)
        self._pending, self._parking = [], []

    def reset(self) -> None:
        """Forget a pass that did not finish (a failed capture, a test); its host buffers go back to the pool."""
        for entry in self.saved:
            for _, buf, parked in entry or []:
                if parked:
                    self.pool.give(buf)  # a graph's buffer is not the eager pool's: ignored
        self.saved, self.prefetched, self._parking = [], {}, []
        self.replay = None

    @contextlib.contextmanager
    def capturing(self, owned: list):
        """Inside a CUDA graph capture: host buffers taken now belong to the graph (`owned`); once
        the capture ends they go back to the graphs' pool for the next capture to share."""
        self.settle()
        self.graph_owned = owned
        try:
            yield
        finally:
            self.graph_owned = None
            self._parking = []
            for buf in owned:
                self.graph_pool.give(buf)


class LayerReplay:
    """What a checkpointed layer's forward is told about the pass it runs in.

    First pass (no gradients): `keep(name, t)` parks t with the layer's input (park=False:
    leaves it on the device, for small tensors). Recompute in backward: `recompute` is True
    and `kept` maps those names to the tensors again, so the layer may skip work whose
    result it kept (kernels/decoder_layer.py). The layer reaches it through `replay_of(layer)`
    while its Offloader runs it (`Offloader.replaying`)."""

    def __init__(self, offloader: Offloader | None = None, idx: int = -1, kept: dict | None = None):
        self.offloader, self.idx = offloader, idx
        self.recompute = kept is not None
        self.kept = kept or {}

    def keep(self, name: str, t, park: bool = True) -> None:
        if self.offloader is None:
            raise RuntimeError("only a first pass keeps tensors; this replay has no Offloader to park them with")
        self.offloader.add(self.idx, name, t, park)


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, offloader, hidden, *args):
        ctx.run, ctx.offloader, ctx.args = run, offloader, args
        ctx.idx = offloader.save(hidden)
        with torch.no_grad(), offloader.replaying(LayerReplay(offloader, ctx.idx)):
            out = run(hidden, *args)
        offloader.done_with(ctx.idx)
        return out

    @staticmethod
    def backward(ctx, grad):
        kept = ctx.offloader.load(ctx.idx)
        hidden = kept.pop("input").detach().requires_grad_(True)
        with torch.enable_grad(), ctx.offloader.replaying(LayerReplay(kept=kept)):
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
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if device.type != "cuda":
        return None
    return use_offloader(model, Offloader(device))


def layer_offloader(module) -> Offloader | None:
    """The Offloader that checkpoints `module` (a decoder layer), if `use_offloader` gave it one."""
    func = getattr(module, "_gradient_checkpointing_func", None)
    if isinstance(func, functools.partial) and func.func is offloaded_checkpoint:
        return func.args[0]
    return None


def replay_of(module) -> LayerReplay | None:
    """The pass `module` runs in while its model's Offloader runs it as a checkpoint (its first
    pass, or the recompute in backward); None otherwise."""
    offloader = layer_offloader(module)
    return offloader.replay if offloader is not None else None


def offloader_of(model) -> Offloader | None:
    """The Offloader a model's checkpointed layers use, if any."""
    for module in model.modules():
        offloader = layer_offloader(module)
        if offloader is not None:
            return offloader
    return None


def use_offloader(model, offloader: Offloader) -> Offloader:
    """Route the model's gradient checkpointing (already enabled) through `offloader`."""
    func = functools.partial(offloaded_checkpoint, offloader)
    layers = 0
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = func
            layers += 1
    offloader.last = layers - 1 if layers else None  # its entry stays on the device
    return offloader
