"""The errors a caller of InferenceEngine can act on; the HTTP layer maps each to a status."""

from __future__ import annotations

from jaxclf.errors import JaxclfError


class InferenceError(JaxclfError, RuntimeError):
    """Base class of the errors a caller of InferenceEngine can act on (HTTP 500 unless a subclass says)."""


class QueueFullError(InferenceError):
    """The request queue is full; retry after a short wait (HTTP 503 + Retry-After)."""


class DeadlineExceeded(InferenceError):
    """The request waited longer than `request_timeout_s` and was dropped without being run."""


class EngineClosedError(InferenceError):
    """The engine is shutting down or closed and accepts no new requests."""
