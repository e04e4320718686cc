"""Decoding over a preallocated (static) KV cache, the one-token step replayed as a CUDA graph.

    decoder = StaticDecoder(model, batch=1, max_len=2048, graphs=True)
    logits = decoder.prefill(ids, mask)              # (B, L) left-padded prompt -> (B, V)
    logits = decoder.step(next_ids)                  # (B,) -> (B, V), one token for every row

Why: at batch 1 a 7B decode step is a few milliseconds of GPU work but tens of
milliseconds of Python and kernel launches (transformers + PEFT + bitsandbytes:
8 tokens/s on an H100 with NF4 weights; see the generation issue). With every
tensor of the step at a fixed address (cache, token, position, mask, logits), the
step is captured once with `torch.cuda.graph` and each later token is one replay.
transformers' mask code checks `torch.cuda.is_current_stream_capturing()` and then
avoids data-dependent branches, so the model's own forward can be captured.

The graph records whichever weights ran: a LoRA adapter switched off (`disable_adapter`)
or merged afterwards needs another graph, so the engine keys decoders by that state.
Off CUDA (or with graphs=False) the same static step runs eagerly; tests compare it
token for token with the dynamic-cache loop. A capture that fails falls back to eager
steps with the reason in `fallback_reason`, and so does a graph whose first replays
differ from eager steps.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import StaticLayer


class PositionedLayer(StaticLayer):
    """A static cache layer that writes where the decoder says (`position`, one tensor shared by
    all layers) instead of after its own running count: transformers' StaticLayer counts every
    forward, so warm-up or check steps of the same token would shift all later keys."""

    def __init__(self, max_cache_len: int, position: torch.Tensor):
        super().__init__(max_cache_len)
        self.position = position

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        columns = self.position + torch.arange(key_states.shape[-2], device=self.device)
        self.keys.index_copy_(2, columns, key_states)
        self.values.index_copy_(2, columns, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.position if self.is_initialized else 0


def positioned_cache(model, max_len: int, position: torch.Tensor):
    """A StaticCache for `model` whose layers write at `position`; ValueError for models whose
    cache is not plain full attention (sliding windows, linear attention)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_len)
    if not all(type(layer) is StaticLayer for layer in cache.layers):
        raise ValueError("this model's cache has sliding or non-attention layers")
    cache.layers = [PositionedLayer(max_len, position) for _ in cache.layers]
    return cache


class StaticDecoder:
    def __init__(self, model, batch: int, max_len: int, graphs: bool):
        self.model, self.batch, self.max_len = model, batch, max_len
        self.device = next(model.parameters()).device
        self.cache_position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.cache = positioned_cache(model, max_len, self.cache_position)
        self.graphs = graphs and self.device.type == "cuda"
        self.graph = None
        self.fallback_reason: str | None = None
        # The step's inputs and output live at fixed addresses (a graph replays on them).
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.mask = torch.zeros(batch, max_len, dtype=torch.long, device=self.device)
        self.logits = None
        self.length = 0
        self.checks_left = 3

    def _forward(self, ids, position, cache_position):
        return self.model(input_ids=ids, attention_mask=self.mask, position_ids=position,
                          cache_position=cache_position, past_key_values=self.cache, use_cache=True,
                          logits_to_keep=1).logits[:, -1]

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Left-padded prompts (B, L) with their 0/1 mask; returns the last position's logits."""
        length = ids.shape[1]
        if length >= self.max_len:
            raise ValueError(f"prompt of {length} tokens does not fit a cache of {self.max_len}")
        self.mask.zero_()       # earlier requests' keys stay in the cache, masked out
        self.mask[:, :length] = mask
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        self.position.copy_(position[:, -1:])
        self.cache_position.zero_()
        self.length = length
        return self._forward(ids, position, torch.arange(length, device=self.device))

    @torch.no_grad()
    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); returns the logits for the token after it (B, V)."""
        if self.length >= self.max_len:
            raise ValueError(f"the cache of {self.max_len} tokens is full")
        self.token.copy_(next_ids.view(-1, 1))
        self.position += 1
        self.cache_position.fill_(self.length)
        self.mask[:, self.length] = 1
        self.length += 1
        if not self.graphs:
            return self._forward(self.token, self.position, self.cache_position)
        if self.graph is None:
            self._capture()
            if self.graph is None:   # capture failed: eager from now on
                return self._forward(self.token, self.position, self.cache_position)
        self.graph.replay()
        if self.checks_left > 0:
            # The first replays are checked against an eager step (which rewrites the same
            # key/value): a graph that baked in a value it should have read would show here.
            self.checks_left -= 1
            eager = self._forward(self.token, self.position, self.cache_position)
            if not torch.allclose(eager.float(), self.logits.float(), rtol=2e-2, atol=2e-2):
                self.graphs, self.graph = False, None
                self.fallback_reason = "a replayed step differed from the eager one"
                return eager
        return self.logits

    def _capture(self) -> None:
        # Warm up on a side stream (allocator and cuBLAS settle), then capture. The warm-up
        # writes this position's key/value exactly as the replay will, so the cache stays right.
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(self.token, self.position, self.cache_position)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a server thread generating on the dynamic path meanwhile is not
            # an error for this capture, nor this capture for it.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.logits = self._forward(self.token, self.position, self.cache_position)
            self.graph = graph
        except Exception as err:  # noqa: BLE001 - any capture failure means eager steps
            self.graphs, self.graph = False, None
            self.fallback_reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
