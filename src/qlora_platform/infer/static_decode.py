"""Decoding over a preallocated (static) KV cache, the one-token step replayed as a CUDA graph.

    decoder = StaticDecoder(model, rows=1, max_len=2048, graphs=True)
    logits = decoder.prefill(ids, mask)              # (B, L) left-padded prompts into rows 0..B-1
    logits = decoder.step(next_ids)                  # (B,) -> (B, V), one token for every row
    logits = decoder.prefill(ids, mask, row=5)       # or one prompt into one row (batcher.py),
                                                     # rows then advance each at its own length

Why: at batch 1 a 7B decode step is a few milliseconds of GPU work but tens of
milliseconds of Python and kernel launches (transformers + PEFT + bitsandbytes:
single-digit tokens/s with NF4 weights; docs/benchmarks.md). With every
tensor of the step at a fixed address (cache, tokens, positions, write columns, mask,
logits), the step is captured once with `torch.cuda.graph` and each later token is
one replay. transformers' mask code checks `torch.cuda.is_current_stream_capturing()`
and then avoids data-dependent branches, so the model's own forward can be captured.

Each row writes its next key/value at its own column (`columns`), so rows of different
lengths (the continuous batcher's requests) share one step; the (rows x max_len) mask
says which columns each row sees, so the query offset the cache reports to transformers'
mask code is simply the last column. The graph records whichever weights ran: a LoRA adapter switched off
or merged afterwards needs another graph, so the engine keys decoders by that state.
Off CUDA (or with graphs=False) the same step runs eagerly; tests compare it token for
token with the dynamic-cache loop. A capture that fails, or whose first replays differ
from eager steps, falls back to eager steps with the reason in `fallback_reason`.
For Llama-family models the step is the platform's own (fast_decode.py: fused kernels
over the same cache tensors), checked once against the model's forward (`fast_reason`
says why it is off); prompts always go through the model's forward.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import StaticLayer


def failure_reason(err: Exception) -> str:
    """One line on why a faster path was given up (kept on the engine, batcher or decoder)."""
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


class _Writes:
    """Where the next forward writes keys/values: a prefill (row slice, from column 0) or a
    decode step (one column per row)."""

    def __init__(self, rows: int, device):
        self.prefill_rows: slice | torch.Tensor | None = None
        self.columns = torch.zeros(rows, dtype=torch.long, device=device)
        self.all_rows = torch.arange(rows, device=device)
        # Where this forward's first query sits for transformers' causal mask (it asks the cache:
        # get_seq_length): 0 for a prefill; for a decode step the last column, so the causal
        # part allows every column and the per-row mask alone decides.
        self.query_offset = torch.zeros((), dtype=torch.long, device=device)


class PositionedLayer(StaticLayer):
    """A static cache layer that writes where the decoder says rather than after its own
    running count (transformers' StaticLayer counts every forward, so a warm-up or check run
    of the same step would shift all later keys)."""

    def __init__(self, max_cache_len: int, writes: _Writes):
        super().__init__(max_cache_len)
        self.writes = writes

    def update(self, key_states, value_states, *args, **kwargs):
        w = self.writes
        if not self.is_initialized:
            rows = w.all_rows.numel()
            self.lazy_initialization(
                key_states.expand(rows, *key_states.shape[1:]), value_states.expand(rows, *value_states.shape[1:])
            )
        if w.prefill_rows is not None:  # the prompt attends to its own columns only
            length = key_states.shape[-2]
            self.keys[w.prefill_rows, :, :length] = key_states
            self.values[w.prefill_rows, :, :length] = value_states
            return self.keys[w.prefill_rows, :, :length], self.values[w.prefill_rows, :, :length]
        self.keys[w.all_rows, :, w.columns] = key_states[:, :, 0]
        self.values[w.all_rows, :, w.columns] = value_states[:, :, 0]
        return self.keys, self.values

    # A device tensor rather than the int transformers declares: a captured CUDA graph reads it
    # without a host sync.
    def get_seq_length(self) -> torch.Tensor:  # type: ignore[override]
        return self.writes.query_offset

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # A prefill's mask spans the prompt's columns; a step's spans the whole cache.
        return (query_length if self.writes.prefill_rows is not None else self.max_cache_len), 0


def positioned_cache(model, max_len: int, writes: _Writes):
    """A StaticCache for `model` whose layers write as `writes` says; ValueError for models
    whose cache is not plain full attention (sliding windows, linear attention)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_len)
    if not all(type(layer) is StaticLayer for layer in cache.layers):
        raise ValueError("this model's cache has sliding or non-attention layers")
    cache.layers = [PositionedLayer(max_len, writes) for _ in cache.layers]
    return cache


class StaticDecoder:
    def __init__(self, model, rows: int, max_len: int, graphs: bool, fast_step: bool = True):
        self.model, self.rows, self.max_len = model, rows, max_len
        self.device = next(model.parameters()).device
        self.writes = _Writes(rows, self.device)
        self.cache = positioned_cache(model, max_len, self.writes)
        self.graphs = graphs and self.device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None  # the engine's cache key, while the engine keeps this decoder
        self.fallback_reason: str | None = None
        self.checks_left = 3
        # The step's inputs and output live at fixed addresses (a graph replays on them).
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        self.mask = torch.zeros(rows, max_len, dtype=torch.long, device=self.device)
        self.mask[:, 0] = 1  # an idle row must see something (no all -inf)
        self._one = torch.ones((), dtype=torch.long, device=self.device)
        self.lengths = [0] * rows  # columns used per row, kept on the host (no sync)
        self.logits = None
        # Decode steps run the platform's own step for Llama-family models (fast_decode.py),
        # checked once against the model's forward; otherwise, or if they differ, the model's.
        self.fast, self.fast_reason, self.fast_checked = None, None, False
        if fast_step:
            from .fast_decode import DecodeStep, Unsupported

            try:
                self.fast = DecodeStep.build(model, self.cache.layers, self.writes, self.mask, max_len)
            except Unsupported as err:
                self.fast_reason = str(err)

    def _forward(self, ids, mask, position):
        return self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, row: int | list[int] = 0) -> torch.Tensor:
        """Prompts (n, L), left-padded, with their 0/1 mask, into rows row..row+n-1 (or the
        n rows listed); returns their last position's logits (n, V)."""
        n, length = ids.shape
        if length >= self.max_len:
            raise ValueError(f"prompt of {length} tokens does not fit a cache of {self.max_len}")
        rows: torch.Tensor | slice
        if isinstance(row, list):
            rows, row_ids = torch.tensor(row, device=self.device), row
        else:
            rows, row_ids = slice(row, row + n), list(range(row, row + n))
        self.mask[rows] = 0
        self.mask[rows, :length] = mask
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        self.position[rows] = position[:, -1:]
        self.writes.columns[rows] = length
        for r in row_ids:
            self.lengths[r] = length
        self.writes.prefill_rows = rows
        self.writes.query_offset.zero_()
        try:
            return self._forward(ids, mask, position)
        finally:
            self.writes.prefill_rows = None
            self.writes.query_offset.fill_(self.max_len - 1)

    @torch.no_grad()
    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (rows,); returns the logits for the token after it (rows, V).
        Every row advances one column; rows without a request just idle along."""
        if max(self.lengths) >= self.max_len:
            raise ValueError(f"the cache of {self.max_len} tokens is full")
        self.token.copy_(next_ids.view(-1, 1))
        self.position += 1
        self.mask.index_put_((self.writes.all_rows, self.writes.columns), self._one)  # no host scalar: no sync
        logits = self._run_step()
        self.writes.columns += 1
        self.lengths = [n + 1 for n in self.lengths]
        return logits

    def park(self, rows: list[int]) -> None:
        """Rows without a request go back to column 0 and see only it, so idling along with
        the others' steps never fills their cache (the batcher parks its free rows)."""
        if not rows:
            return
        index = torch.tensor(rows, device=self.device)
        self.writes.columns[index] = 0
        self.position[index] = 0
        self.mask[index] = 0
        self.mask[index, 0] = 1
        for r in rows:
            self.lengths[r] = 0

    def _eager_step(self):
        if self.fast is not None:
            return self.fast(self.token, self.position)
        return self._forward(self.token, self.mask, self.position)

    def _check_fast_step(self):
        """The first step runs both ways (the model's forward rewrites the same cache column):
        a model the fused step gets wrong keeps the model's forward, with the reason."""
        self.fast_checked = True
        fast = self.fast(self.token, self.position)
        stock = self._forward(self.token, self.mask, self.position)
        # bf16 rounding through 32 layers moves a 7B's logits by a few percent of their range; a
        # wrong kernel or an unknown layer variant moves them by about all of it.
        gap = (fast.float() - stock.float()).abs().max()
        if gap > 0.2 * stock.float().abs().max() + 1e-3:
            self.fast, self.fast_reason = None, f"the fused step differed from the model's forward ({gap:.3g})"
        return stock

    def _run_step(self):
        if self.fast is not None and not self.fast_checked:
            return self._check_fast_step()
        if not self.graphs:
            return self._eager_step()
        if self.graph is None:
            self._capture()
            if self.graph is None:  # capture failed: eager from now on
                return self._eager_step()
        self.graph.replay()
        if self.checks_left > 0:
            # The first replays are checked against an eager step (which rewrites the same
            # keys/values): a graph that baked in a value it should have read would show here.
            self.checks_left -= 1
            eager = self._eager_step()
            if not torch.allclose(eager.float(), self.logits.float(), rtol=2e-2, atol=2e-2):
                self.graphs, self.graph = False, None
                self.fallback_reason = "a replayed step differed from the eager one"
                return eager
        return self.logits

    def _capture(self) -> None:
        # Warm up on a side stream (allocator and cuBLAS settle), then capture. The warm-up
        # writes this step's keys/values exactly as the replay will, so the cache stays right.
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._eager_step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a server thread generating on the dynamic path meanwhile is not
            # an error for this capture, nor this capture for it.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.logits = self._eager_step()
            self.graph = graph
        except Exception as err:  # noqa: BLE001 - any capture failure means eager steps
            self.graphs, self.graph = False, None
            self.fallback_reason = failure_reason(err)
