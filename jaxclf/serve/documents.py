"""A text in the engine as one or more window rows, and the future that joins their logits back into one result.

Under ModelConfig.long_text = "chunks" a text longer than the model is read as several windows
(jaxclf.long_text); every other text is one window. Each window is queued as its own row (a
QueuedText with its own future), so the windows of a long document share the batcher and the
compiled (batch × length) buckets with every other text: a window is at most max_length tokens and
always fits the largest length bucket, so a document never compiles anything. A DocumentFuture
resolves once all of its windows have their logits: `finish` pools them (the model's
chunk_pooling) into the text's result.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, Callable, Sequence

import numpy as np

from jaxclf import long_text
from jaxclf.serve.errors import DeadlineExceeded, InferenceError


class DocumentTooLongError(InferenceError, long_text.TextTooLongError):
    """A text needs more than max_chunks windows and the model's chunk_overflow is "refuse" (HTTP 413)."""


def window_parts(window_counts: Sequence[int], limit: int) -> list[range]:
    """Consecutive runs of texts whose windows add up to at most `limit` (a text alone may not fit: its own run).

    predict_batch queues one run at a time, so a request of long documents never asks the queue
    for more rows than it can ever hold.
    """
    parts, start, rows = [], 0, 0
    for i, count in enumerate(window_counts):
        if i > start and rows + count > limit:
            parts.append(range(start, i))
            start, rows = i, 0
        rows += count
    if start < len(window_counts):
        parts.append(range(start, len(window_counts)))
    return parts


class DocumentFuture(concurrent.futures.Future):
    """The result of one text: resolves to `finish(logits)` once each window future has its (C,) logits row.

    `finish` gets the windows' logits stacked (k, C) in window order and runs in the thread that
    finished the last window (a batcher worker). The first window to fail fails the text.
    cancel() (a caller's deadline) cancels the windows still queued; the text counts as cancelled
    only if none of them had started, else it waits for them as a running request would.
    """

    def __init__(self, windows: Sequence[concurrent.futures.Future], finish: Callable[[np.ndarray], Any]):
        super().__init__()
        self._windows = list(windows)
        self._finish = finish
        self._left = len(self._windows)
        self._count_lock = threading.Lock()
        for window in self._windows:
            window.add_done_callback(self._window_done)

    def _window_done(self, window: concurrent.futures.Future) -> None:
        if window.cancelled():
            return  # only cancel() cancels windows, and it settles the text itself
        error = window.exception()
        if error is not None:
            self._settle(error=error)
            return
        with self._count_lock:
            self._left -= 1
            last = self._left == 0
        if last:
            try:
                result = self._finish(np.stack([w.result() for w in self._windows]))
            except Exception as e:  # e.g. a cache bug: the caller gets it instead of a hang
                self._settle(error=InferenceError(f"inference failed: {type(e).__name__}: {e}"))
                return
            self._settle(result=result)

    def _settle(self, result: Any = None, error: BaseException | None = None) -> None:
        try:
            if error is not None:
                self.set_exception(error)
            else:
                self.set_result(result)
        except concurrent.futures.InvalidStateError:
            pass  # already failed by another window, or cancelled

    def cancel(self) -> bool:
        cancelled = [window.cancel() for window in self._windows]
        if all(cancelled):
            return super().cancel()
        if any(cancelled):  # some windows ran or run, the rest never will: the text cannot be completed
            self._settle(error=DeadlineExceeded(
                f"{sum(cancelled)} of the text's {len(cancelled)} windows were still queued at the request's "
                f"deadline and were dropped; the server is overloaded"))
        return False
