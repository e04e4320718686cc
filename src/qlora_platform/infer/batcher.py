"""Continuous batching: concurrent generations share every decode step of one model.

    batcher = Batcher(engine, slots=16, max_len=4096)
    result = batcher.run(prompt_ids, params, on_text, cancelled)   # from any thread; blocks

`Engine.run` hands its work here when the engine has a batcher (the server's does on a
GPU), so the server's worker threads each wait on their own request while one thread
owns the model. Each turn that thread admits waiting requests into free rows of a
`StaticDecoder` (those that arrived together share one left-padded prefill, their first
tokens chosen at once; a request's time to first token counts from its arrival), then runs one decode
step for every row and gives each active row its next token; a row whose request ends
(end of sequence, stop string, max tokens, client gone) is free at the next turn. At
batch 1 a 7B decode step is bound by reading the weights, so 16 rows cost about what one
does: that is where the server's throughput comes from (docs/benchmarks.md). Greedy rows
take one batched argmax; others sample row by row with their own settings and seed.
Results equal running each request alone (tests).

Failures stay with the request they belong to: a row whose token choice or text handling
raises ends with that error alone, its row freed, while the others go on; an error of a
whole step (the model's forward) ends every request in flight, those being admitted too.
Every request gets either its result or an error, so no caller waits forever and the
server's generation slot it holds is released.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .generation import Generation, TextRow, left_padded
from .sampling import SamplingParams, choose_next
from .static_decode import StaticDecoder, failure_reason


class Unbatched(Exception):
    """This request is better run on its own (the engine does so): the batcher cannot take it."""


@dataclass
class _Request:
    prompt: list[int]
    params: SamplingParams
    on_text: Callable[[str], None] | None
    cancelled: Callable[[], bool] | None
    text: TextRow
    history: torch.Tensor
    generator: torch.Generator | None
    done: threading.Event = field(default_factory=threading.Event)
    result: Generation | None = None
    error: BaseException | None = None
    start: float = 0.0
    first_token_at: float = 0.0


class Batcher:
    def __init__(self, engine, slots: int = 16, max_len: int = 4096):
        self.engine, self.slots, self.max_len = engine, slots, max_len
        self.waiting: queue.Queue[_Request] = queue.Queue()
        self.active: dict[int, _Request] = {}
        self.decoder: StaticDecoder | None = None  # built by the model's thread (_loop)
        self.next_tokens: list[int] = []  # each row's token for the next step, on the host
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.broken: str | None = None  # why batching is off for good (the engine decodes alone)

    def fits(self, prompt: list[int], params: SamplingParams) -> bool:
        return len(prompt) + params.max_new_tokens < self.max_len

    def run(self, prompt: list[int], params: SamplingParams, on_text=None, cancelled=None) -> Generation:
        """Blocks until the request ends; raises Unbatched when it must run on its own."""
        if self.broken:
            raise Unbatched(self.broken)
        eng = self.engine
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=eng.device).manual_seed(params.seed)
        req = _Request(
            prompt,
            params,
            on_text,
            cancelled,
            TextRow(eng.tokenizer, params.stop),
            torch.tensor([prompt], device=eng.device),
            generator,
            start=time.perf_counter(),
        )
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="qlora-batcher", daemon=True)
                self._thread.start()
        self.waiting.put(req)
        req.done.wait()
        if req.error is not None:
            raise req.error
        assert req.result is not None  # set before done, when there is no error
        return req.result

    # -- the model's thread -------------------------------------------------------------------
    def _loop(self) -> None:
        eng = self.engine
        # Built here: a CUDA graph is captured and replayed by the thread that owns the decoder.
        try:
            self.decoder = StaticDecoder(eng.model, self.slots, self.max_len, eng.cuda_graphs)
        except Exception as err:  # noqa: BLE001 - e.g. a model whose cache is not plain attention
            self.broken = failure_reason(err)
            while True:  # hand everything back to the engine, now and later
                self._fail(self.waiting.get(), Unbatched(self.broken))
        self.next_tokens = [eng.pad_id] * self.slots  # on the host: one copy per step
        eng.model.eval()
        admitting: list[_Request] = []
        while True:
            try:
                self._turn(admitting)
            except Exception as err:  # noqa: BLE001 - fail the requests in flight, keep serving
                for req in admitting + list(self.active.values()):
                    if not req.done.is_set():
                        self._fail(req, err)
                self.active.clear()
                self.next_tokens = [eng.pad_id] * self.slots
            admitting.clear()

    def _turn(self, admitting: list[_Request]) -> None:
        """One admission and decode step; `admitting` holds the requests taken from the queue
        this turn, so the loop can fail them too when the turn breaks before they are active."""
        free = [r for r in range(self.slots) if r not in self.active]
        while len(admitting) < len(free):
            try:  # wait for work only when nothing runs
                admitting.append(self.waiting.get(block=not self.active and not admitting))
            except queue.Empty:
                break
        if admitting:
            self._admit(free[: len(admitting)], admitting)
        if not self.active:
            return
        assert self.decoder is not None
        with torch.no_grad():
            logits = self.decoder.step(torch.tensor(self.next_tokens))  # one copy to the device
        self._advance(logits)
        self.decoder.park([r for r in range(self.slots) if r not in self.active])

    def _admit(self, rows: list[int], reqs: list[_Request]) -> None:
        """Prompts that arrived together share one prefill (left-padded to the longest)."""
        ids, mask = left_padded([r.prompt for r in reqs], self.engine.pad_id, self.engine.device)
        assert self.decoder is not None
        try:
            logits = self.decoder.prefill(ids, mask, row=rows)
        except Exception as err:  # noqa: BLE001 - nothing emitted yet: the engine runs them alone
            for req in reqs:
                self._fail(req, Unbatched(failure_reason(err)))
            return
        now = time.perf_counter()
        for row, req in zip(rows, reqs):
            req.first_token_at = now
            self.active[row] = req
        chosen = self._choose(logits, list(range(len(reqs))), reqs)
        for i, (row, req) in enumerate(zip(rows, reqs)):
            self._settle(row, req, chosen[i])

    def _advance(self, logits: torch.Tensor) -> None:
        rows = sorted(self.active)
        chosen = self._choose(logits, rows, [self.active[r] for r in rows])
        for r in rows:
            self._settle(r, self.active[r], chosen[r])

    def _settle(self, row: int, req: _Request, chosen) -> None:
        """Take the row's token, or end its request alone when choosing or taking it failed."""
        try:
            if isinstance(chosen, BaseException):
                raise chosen
            self._take(row, req, chosen)
        except Exception as err:  # noqa: BLE001 - this request's failure, not the batch's
            self.active.pop(row, None)
            self.next_tokens[row] = self.engine.pad_id
            if not req.done.is_set():
                self._fail(req, err)

    @staticmethod
    def _choose(logits: torch.Tensor, rows: list[int], reqs: list[_Request]) -> dict[int, int | Exception]:
        """Next token of each listed row of logits: one argmax (one device sync) for the greedy
        rows, each other row sampled with its own settings and seed; a row whose sampling
        raises gets the error instead of a token."""
        plain = [r.params.greedy and r.params.repetition_penalty == 1.0 for r in reqs]
        best = logits.argmax(-1).tolist() if any(plain) else []
        chosen = {}
        for row, req, is_plain in zip(rows, reqs, plain):
            if is_plain:
                chosen[row] = best[row]
                continue
            try:
                chosen[row] = int(choose_next(logits[row : row + 1], req.params, req.history, req.generator)[0])
            except Exception as err:  # noqa: BLE001 - ends this row's request only
                chosen[row] = err
        return chosen

    def _take(self, row: int, req: _Request, token: int) -> None:
        """Record a row's new token; finish the request or queue the token for the next step."""
        eng, text = self.engine, req.text
        text.push(token, eng.eos_ids, req.params.ignore_eos)
        piece = text.new_text()
        if piece and req.on_text:
            req.on_text(piece)
        if text.finish is None and len(text.ids) >= req.params.max_new_tokens:
            text.finish = "length"
        if text.finish is None and req.cancelled is not None and req.cancelled():
            text.finish = "cancelled"
        if text.finish is None:
            if req.params.repetition_penalty != 1.0:  # the only reader of the history
                req.history = torch.cat([req.history, torch.tensor([[token]], device=eng.device)], dim=1)
            self.next_tokens[row] = token
            return
        piece = text.new_text()
        if piece and req.on_text:
            req.on_text(piece)
        end = time.perf_counter()
        req.result = Generation(
            text=text.text,
            token_ids=text.ids,
            prompt_tokens=len(req.prompt),
            finish_reason=text.finish,
            prefill_s=req.first_token_at - req.start,
            decode_s=end - req.first_token_at,
        )
        del self.active[row]
        self.next_tokens[row] = eng.pad_id
        req.done.set()

    @staticmethod
    def _fail(req: _Request, err: BaseException) -> None:
        req.error = err
        req.done.set()
