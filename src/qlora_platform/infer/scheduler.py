"""Admission and execution of generations in the server: bounded, cancellable, drained on exit.

    scheduler = Scheduler(max_active=2, max_queue=8, queue_timeout=30)
    job = scheduler.submit(work, prepare) # None: full (the caller answers 429 + Retry-After)
    async for event in job.events(): ...  # pieces of text, then the final Generation
    job.cancel()                          # the client went away: the worker stops at its next token

At most `max_active` generations run at once (each in its own worker thread; the
engine checks `job.cancelled` between tokens) and at most `max_queue` wait for a
slot; anything beyond is refused at once rather than piling up. A job that waits
longer than `queue_timeout` ends with `QueueTimeout` (503). `prepare(job)`, when
given, runs in the job's thread once the job holds its queue place and before it
waits for a slot: the server tokenizes there, off the event loop and only for
requests it has admitted. The counters feed /metrics.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

_DONE = object()


class QueueTimeout(Exception):
    pass


class Job:
    def __init__(
        self, scheduler: Scheduler, work: Callable, loop: asyncio.AbstractEventLoop, prepare: Callable | None = None
    ):
        self.scheduler, self.work, self.loop, self.prepare = scheduler, work, loop, prepare
        self.queue: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()

    # -- called from the event loop ---------------------------------------------------
    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    async def events(self):
        """Text pieces (str) as produced, then the result object; worker errors are re-raised here."""
        while True:
            item = await self.queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    # -- called from the worker thread -----------------------------------------------
    def emit(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _run(self) -> None:
        s, state = self.scheduler, "waiting"
        try:
            if self.prepare is not None and not self.cancelled:
                self.prepare(self)
            waited = 0.0
            while not s.slots.acquire(timeout=0.1):
                waited += 0.1
                if self.cancelled:
                    return
                if waited >= s.queue_timeout:
                    raise QueueTimeout(f"waited {s.queue_timeout:.0f} s for a free generation slot")
            with s.lock:
                s.waiting -= 1
                s.active += 1
                state = "active"
            if not self.cancelled:
                self.work(self)
        except BaseException as err:  # noqa: BLE001 - handed to the request that owns the job
            self.emit(err)
        finally:
            with s.lock:
                if state == "waiting":
                    s.waiting -= 1
                else:
                    s.active -= 1
                    s.slots.release()
                if s.active == 0 and s.waiting == 0:
                    s.idle.set()
            self.emit(_DONE)


class Scheduler:
    def __init__(self, max_active: int = 1, max_queue: int = 8, queue_timeout: float = 60.0):
        self.max_active, self.max_queue, self.queue_timeout = max_active, max_queue, queue_timeout
        self.slots = threading.Semaphore(max_active)
        self.lock = threading.Lock()
        self.active = self.waiting = 0
        self.idle = threading.Event()
        self.idle.set()

    def submit(self, work: Callable[[Job], None], prepare: Callable[[Job], None] | None = None) -> Job | None:
        """Queue `work(job)` for a worker thread (after `prepare(job)`, which does not hold a slot),
        or None when active + waiting are at their bounds."""
        with self.lock:
            if self.active + self.waiting >= self.max_active + self.max_queue:
                return None
            self.waiting += 1
            self.idle.clear()
        job = Job(self, work, asyncio.get_running_loop(), prepare)
        threading.Thread(target=job._run, name="qlora-generate", daemon=True).start()
        return job

    @property
    def retry_after_s(self) -> int:
        """A hint for clients told to come back: the queue's length in rough generation slots."""
        return max(1, 2 * (self.waiting + self.active) // max(self.max_active, 1))
