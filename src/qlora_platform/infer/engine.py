"""The generation engine that `chat`, `generate`, `serve` and `eval` share.

A decode loop of our own over a Hugging Face model (base, 4-bit or with a LoRA
adapter) rather than `model.generate`, because every caller needs what
`generate` does not give: prefill and decode timed apart, text streamed as it
is produced, stop strings that are never half-emitted, a cancel hook for
clients that go away, and batches of prompts of different lengths (left padding).

    engine = Engine(model, tokenizer)
    ids = engine.encode_chat([{"role": "user", "content": "Hi"}])
    for piece in engine.stream(ids, SamplingParams(max_new_tokens=64)):
        print(piece, end="")
    result = engine.last                      # Generation: text, tokens, timings
    results = engine.generate([ids_a, ids_b], SamplingParams())   # batched
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from ..data.tools import template_inputs
from ..errors import UserError
from .generation import Generation, TextRow, left_padded
from .sampling import SamplingParams, choose_next

if TYPE_CHECKING:
    from .batcher import Batcher
    from .static_decode import StaticDecoder


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        max_context: int | None = None,
        static_cache: bool | None = None,
        cuda_graphs: bool | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        # On CUDA: a preallocated KV cache and the decode step replayed as a CUDA graph
        # (static_decode.py). The CPU keeps the dynamic cache (no replay to gain, and a static
        # cache would attend over its whole length every step).
        on_gpu = self.device.type == "cuda"
        self.static_cache = on_gpu if static_cache is None else static_cache
        self.cuda_graphs = on_gpu if cuda_graphs is None else cuda_graphs
        self._decoders: dict[tuple, StaticDecoder] = {}
        self._decoder_lock = threading.Lock()
        self._busy: set[tuple] = set()
        self.static_fallback_reason: str | None = None
        self.batcher: Batcher | None = None
        self._lora_layer = next(
            (m for m in model.modules() if hasattr(m, "disable_adapters") and hasattr(m, "merged")), None
        )
        config = getattr(model, "config", None)
        self.max_context = max_context or getattr(config, "max_position_embeddings", None) or 2048
        eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        gen_cfg = getattr(model, "generation_config", None)
        extra = getattr(gen_cfg, "eos_token_id", None)
        self.eos_ids |= set(extra if isinstance(extra, list) else [extra]) - {None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)
        self.last: Generation | None = None

    def warm_up(self) -> None:
        """One short generation before serving concurrent callers: bitsandbytes repacks 4-bit CPU
        weights on their first inference forward, in place, and two threads doing that at once
        corrupt the layer's state."""
        self.generate([self.encode_text("Hello")], SamplingParams(max_new_tokens=2, ignore_eos=True))

    # -- prompts ------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None, answer_prefix: str = "") -> list[int]:
        """Messages -> prompt ids through the tokenizer's own (sandboxed Jinja) chat template; with tools
        (or tool turns), in the template's tool format or the platform's (data/tools.py), as training renders
        them. `answer_prefix` is text the answer starts with, tokenized with the prompt as training tokenizes
        the whole conversation."""
        messages, tools = template_inputs(self.tokenizer, messages, tools)
        try:
            if answer_prefix:
                text = self.tokenizer.apply_chat_template(
                    messages, tools=tools, add_generation_prompt=True, tokenize=False
                )
                ids = self.tokenizer(text + answer_prefix, add_special_tokens=False)["input_ids"]
            else:
                ids = self.tokenizer.apply_chat_template(
                    messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=True
                )["input_ids"]
        except Exception as err:  # noqa: BLE001 - template errors come as several types
            raise UserError(f"the chat template cannot render these messages: {str(err).splitlines()[0]}") from None
        return list(ids)

    def encode_text(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    # -- generation -----------------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        cancelled: Callable[[], bool] | None = None,
        on_step: Callable[[], None] | None = None,
    ) -> list[Generation]:
        """Run prompts together to the end (greedy results equal one-at-a-time runs up to float noise);
        `on_step()` is called after each decode step (a progress bar)."""
        results: list[Generation] = []
        for _ in self._steps(prompts, params, cancelled, results):
            if on_step is not None:
                on_step()
        return results

    def enable_batching(self, slots: int, max_len: int | None = None) -> None:
        """Concurrent `run` calls share decode steps from now on (batcher.py); the server turns
        this on for GPUs. Requests longer than max_len still run on their own."""
        from .batcher import Batcher

        self.batcher = Batcher(self, slots, max_len or min(self.max_context, 4096))

    def run(
        self,
        prompt: list[int],
        params: SamplingParams,
        on_text: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Generation:
        """One prompt; `on_text(piece)` is called as text becomes final. Safe to call from several threads."""
        if self.batcher is not None and prompt and self.batcher.fits(prompt, params):
            from .batcher import Unbatched

            params.validate(self.max_context, len(prompt))
            try:
                return self.batcher.run(prompt, params, on_text, cancelled)
            except Unbatched:
                pass  # decoded alone below (why: self.batcher.broken, if for good)
        results: list[Generation] = []
        for piece in self._pieces(prompt, params, cancelled, results):
            if on_text:
                on_text(piece)
        return results[0]

    def stream(
        self, prompt: list[int], params: SamplingParams, cancelled: Callable[[], bool] | None = None
    ) -> Iterator[str]:
        """Text pieces of one prompt as they are decoded; `self.last` holds the full result after
        (one caller at a time: concurrent callers use `run`)."""
        results: list[Generation] = []
        yield from self._pieces(prompt, params, cancelled, results)
        self.last = results[0]

    def _pieces(self, prompt, params, cancelled, results) -> Iterator[str]:
        row = None
        for rows in self._steps([prompt], params, cancelled, results):
            row = rows[0]
            piece = row.new_text()
            if piece:
                yield piece
        piece = row.new_text() if row else ""
        if piece:
            yield piece

    # -- decoding -------------------------------------------------------------------------
    def _adapter_state(self) -> tuple | None:
        layer = self._lora_layer
        if layer is None:
            return None
        return (bool(layer.disable_adapters), bool(layer.merged), tuple(layer.active_adapters))

    def _claim_static_decoder(self, batch: int, needed: int):
        """The StaticDecoder for this batch, length and adapter state, or None (dynamic cache)
        when static decoding is off or another generation is using it. Lengths round up to 256
        so one captured graph serves many requests; two decoders are kept at most."""
        if not self.static_cache:
            return None
        from .static_decode import StaticDecoder

        max_len = min(-(-needed // 256) * 256, max(self.max_context, needed))
        key = (batch, max_len, self._adapter_state())
        with self._decoder_lock:
            if key in self._busy:
                return None
            decoder = self._decoders.pop(key, None)
            if decoder is None and len(self._decoders) >= 2:
                self._decoders.pop(next(iter(self._decoders)))
            self._busy.add(key)
        if decoder is None:
            try:
                decoder = StaticDecoder(self.model, batch, max_len, self.cuda_graphs)
            except Exception as err:  # noqa: BLE001 - a model without static-cache support
                self._static_failed(key, err)
                return None
        decoder.key = key
        return decoder

    def _static_failed(self, key: tuple, err: Exception) -> None:
        """This model cannot decode on a static cache: the dynamic cache from now on, and why."""
        self.static_cache = False
        from .static_decode import failure_reason

        self.static_fallback_reason = failure_reason(err)
        with self._decoder_lock:
            self._busy.discard(key)
            self._decoders.clear()

    def _release(self, decoder) -> None:
        with self._decoder_lock:
            self._busy.discard(decoder.key)
            self._decoders[decoder.key] = decoder

    @torch.no_grad()
    def _steps(
        self, prompts: list[list[int]], params: SamplingParams, cancelled, results: list[Generation]
    ) -> Iterator[list[TextRow]]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise UserError("empty prompt: there is nothing to continue")
        longest = max(len(p) for p in prompts)
        params.validate(self.max_context, longest)
        was_training = self.model.training
        self.model.eval()
        dev, batch = self.device, len(prompts)
        ids, mask = left_padded(prompts, self.pad_id, dev)
        history = ids.clone()
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=dev).manual_seed(params.seed)
        rows = [TextRow(self.tokenizer, params.stop) for _ in prompts]
        start = time.perf_counter()
        clock = {"first": None}
        decoder = self._claim_static_decoder(batch, longest + params.max_new_tokens)
        try:
            logits = None
            if decoder is not None:
                try:
                    logits = decoder.prefill(ids, mask)
                except Exception as err:  # noqa: BLE001 - nothing emitted yet: go dynamic
                    self._static_failed(decoder.key, err)
                    decoder = None
            if decoder is not None:
                yield from self._static_loop(decoder, logits, params, history, generator, rows, cancelled, clock)
            else:
                yield from self._dynamic_loop(ids, mask, params, history, generator, rows, cancelled, clock)
        finally:
            if decoder is not None:
                self._release(decoder)
            if was_training:
                self.model.train()
        end = time.perf_counter()
        first_token_at = clock["first"] or end
        for r in rows:
            r.finish = r.finish or "length"
        results[:] = [
            Generation(
                text=r.text,
                token_ids=r.ids,
                prompt_tokens=len(p),
                finish_reason=r.finish or "length",
                prefill_s=first_token_at - start,
                decode_s=end - first_token_at,
            )
            for r, p in zip(rows, prompts)
        ]

    def _read(self, rows: list[TextRow], tokens: list[int], params: SamplingParams, clock: dict) -> None:
        if clock["first"] is None:
            clock["first"] = time.perf_counter()
        for row, tok in zip(rows, tokens):
            if row.finish is None:
                row.push(tok, self.eos_ids, params.ignore_eos)

    def _dynamic_loop(self, ids, mask, params, history, generator, rows, cancelled, clock):
        """transformers' dynamic cache, one forward a token (the CPU path)."""
        from transformers import DynamicCache

        cache, dev, batch = DynamicCache(), ids.device, ids.shape[0]
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        step_input = ids
        for _ in range(params.max_new_tokens):
            out = self.model(
                input_ids=step_input,
                attention_mask=mask,
                position_ids=position,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = out.past_key_values
            next_ids = choose_next(out.logits[:, -1], params, history, generator)
            tokens = next_ids.tolist()  # also the device sync that makes the timings true
            self._read(rows, tokens, params, clock)
            yield rows
            if all(r.finish for r in rows) or self._cancel(rows, cancelled):
                break
            # Finished rows keep stepping with a pad token (their output is ignored).
            step_input = torch.tensor(
                [t if r.finish is None else self.pad_id for r, t in zip(rows, tokens)], device=dev
            ).unsqueeze(1)
            history = torch.cat([history, step_input], dim=1)
            mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=dev)], dim=1)
            position = position[:, -1:] + 1

    def _static_loop(self, decoder, logits, params, history, generator, rows, cancelled, clock):
        """The static decoder, one step ahead of the host: each token is chosen on the device
        and fed straight to the next step, which is queued before the host reads the token,
        so the GPU never waits for detokenisation and stop checks. Finished rows keep stepping
        on whatever they drew (their output is ignored), and a generation that stops early
        has run one step more than it shows."""
        next_ids = choose_next(logits, params, history, generator)
        on_gpu = next_ids.is_cuda
        host = torch.empty(next_ids.shape, dtype=next_ids.dtype, pin_memory=on_gpu)
        for step in range(params.max_new_tokens):
            host.copy_(next_ids, non_blocking=on_gpu)
            copied = torch.cuda.Event() if on_gpu else None
            if copied is not None:
                copied.record()
            following = None
            if step + 1 < params.max_new_tokens:
                if params.repetition_penalty != 1.0:  # the history's only reader
                    history = torch.cat([history, next_ids.unsqueeze(1)], dim=1)
                following = choose_next(decoder.step(next_ids), params, history, generator)
            if copied is not None:
                copied.synchronize()
            self._read(rows, host.tolist(), params, clock)
            yield rows
            if all(r.finish for r in rows) or self._cancel(rows, cancelled):
                break
            next_ids = following

    @staticmethod
    def _cancel(rows: list[TextRow], cancelled) -> bool:
        if cancelled is not None and cancelled():
            for r in rows:
                r.finish = r.finish or "cancelled"
            return True
        return False
