"""The dynamic batcher: a bounded queue of texts and the worker threads that run them in batches.

Callers put rows on the queue (a text, or one window of a long text: jaxclf.serve.documents) and
wait on a future; a free worker takes up to `max_batch_size` rows (whatever is queued, or what
arrives within `max_wait_s` of the oldest one) and hands them to `run`, which returns one result
per row. The queue's room (max_queue_size) is counted in rows, so a long document takes its windows' room. With max_wait_s = 0 (continuous batching) requests
that queue while a call runs form the next batch, so a lone request never waits for company.

A full queue refuses at once (QueueFullError); a text still queued at its deadline is dropped
unrun (DeadlineExceeded). The batcher knows nothing of JAX or models: `run` does the work.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Sequence

from jaxclf.serve.errors import DeadlineExceeded, EngineClosedError, InferenceError, QueueFullError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class QueuedText:
    """One row waiting in the queue: a text, or one window of a long text."""

    text: str  # the text it is (a window of)
    ids: list[int]  # the row's token ids, encoded by the caller's thread
    enqueued_at: float  # time.monotonic()
    deadline: float  # time.monotonic() past which it is dropped unrun
    future: concurrent.futures.Future
    rows_of_text: int = 1  # rows its text is read as: more than 1 for a long text under long_text=chunks


def not_started(timeout_s: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"request not started within request_timeout_s={timeout_s}; "
                            f"dropped without running (the server is overloaded)")


def not_finished(timeout_s: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"request did not finish within 2 × request_timeout_s={timeout_s}")


class Batcher:
    """A bounded queue and `workers` threads that call `run(texts) -> results` on batches of it."""

    def __init__(self, run: Callable[[list[QueuedText]], Sequence[Any]], max_batch_size: int, max_wait_s: float,
                 max_queue_size: int, request_timeout_s: float, workers: int):
        self.run, self.max_batch_size, self.max_wait_s = run, max_batch_size, max_wait_s
        self.max_queue_size, self.request_timeout_s = max_queue_size, request_timeout_s
        self._queue: collections.deque[QueuedText] = collections.deque()
        self._cond = threading.Condition()  # guards the queue, the counters and `closing`
        self.closing = False
        self._rejected = self._dropped = 0
        # Several workers: while one runs a compiled call (JAX releases the GIL), the next gathers
        # what queued meanwhile, so batching never serialises the device behind one thread.
        self._workers = [threading.Thread(target=self._worker_loop, name=f"jaxclf-batcher-{i}", daemon=True)
                         for i in range(workers)]
        for worker in self._workers:
            worker.start()

    # --- callers ---------------------------------------------------------------------------------

    def check_room(self, count: int) -> None:
        """QueueFullError / EngineClosedError now if `count` more rows would be refused.

        For callers to refuse before the costly part (tokenizing); enqueue() checks again, atomically.
        """
        with self._cond:
            self._check_room_locked(count)

    def _check_room_locked(self, count: int) -> None:
        if self.closing:
            raise EngineClosedError("the inference engine is shutting down; retry on another replica")
        if len(self._queue) + count > self.max_queue_size:
            self._rejected += count
            raise QueueFullError(
                f"request queue is full ({len(self._queue)} of max_queue_size={self.max_queue_size} "
                f"queued, {count} more asked for); retry shortly")

    def enqueue(self, items: Sequence[QueuedText]) -> None:
        """All or nothing: every item is queued, or QueueFullError / EngineClosedError and none is."""
        with self._cond:
            self._check_room_locked(len(items))
            self._queue.extend(items)
            self._cond.notify_all()

    def wait(self, future: concurrent.futures.Future, deadline: float) -> Any:
        """The future's result; DeadlineExceeded if it is still queued at the deadline."""
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            pass
        if future.cancel():  # still queued: the worker will skip it
            raise not_started(self.request_timeout_s)
        # Already running: a compiled call takes milliseconds, so this wait is short.
        try:
            return future.result(timeout=self.request_timeout_s)
        except concurrent.futures.TimeoutError:
            raise not_finished(self.request_timeout_s) from None

    async def wait_async(self, future: concurrent.futures.Future) -> Any:
        """wait() for asyncio callers, with the deadline request_timeout_s from now; never blocks the loop."""
        waiting = asyncio.wrap_future(future)
        try:
            # shield: a timeout must not cancel the future here; the rule below decides.
            return await asyncio.wait_for(asyncio.shield(waiting), timeout=self.request_timeout_s)
        except asyncio.TimeoutError:
            pass
        if future.cancel():
            raise not_started(self.request_timeout_s)
        try:
            return await asyncio.wait_for(waiting, timeout=self.request_timeout_s)
        except asyncio.TimeoutError:
            raise not_finished(self.request_timeout_s) from None

    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    @property
    def rejected(self) -> int:
        """Texts refused because the queue was full."""
        with self._cond:
            return self._rejected

    @property
    def dropped(self) -> int:
        """Texts dropped unrun: their deadline passed, or their caller gave up, while queued."""
        with self._cond:
            return self._dropped

    def workers_alive(self) -> int:
        return sum(worker.is_alive() for worker in self._workers)

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop accepting, finish what is queued, stop the workers. Idempotent."""
        with self._cond:
            self.closing = True
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in self._workers:
            worker.join(None if deadline is None else max(deadline - time.monotonic(), 0))
        if self.workers_alive():
            logger.warning("batcher still busy after %.1fs; %d request(s) queued", timeout, self.depth())

    # --- workers ---------------------------------------------------------------------------------

    def _take_batch(self) -> list[QueuedText] | None:
        """Block until there is work; None once closing and drained."""
        with self._cond:
            while not self._queue and not self.closing:
                self._cond.wait()
            if not self._queue:
                return None
            # Wait for a full batch, but never longer than max_wait after the oldest request arrived.
            flush_at = self._queue[0].enqueued_at + self.max_wait_s
            while len(self._queue) < self.max_batch_size and not self.closing:
                remaining = flush_at - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch_size))]

    def _still_wanted(self, batch: list[QueuedText], start: float) -> list[QueuedText]:
        """The texts of `batch` to run; the others are dropped (expired, or their caller gave up)."""
        live = []
        for item in batch:
            if not item.future.set_running_or_notify_cancel():  # the caller gave up while it was queued
                self._count_dropped()
            elif start > item.deadline:
                self._count_dropped()
                item.future.set_exception(DeadlineExceeded(
                    f"request waited {start - item.enqueued_at:.3f}s in the queue, longer than "
                    f"request_timeout_s={self.request_timeout_s}; it was dropped without running"))
            else:
                live.append(item)
        return live

    def _count_dropped(self) -> None:
        with self._cond:
            self._dropped += 1

    def _worker_loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            live = self._still_wanted(batch, time.monotonic())
            if not live:
                continue
            try:
                results = self.run(live)
            except Exception as e:  # keep serving; every caller of this batch gets the error
                logger.exception("batch of %d failed", len(live))
                for item in live:
                    item.future.set_exception(InferenceError(f"inference failed: {e}"))
                continue
            for item, result in zip(live, results):
                item.future.set_result(result)
