"""Per-client rate limiting: token buckets keyed by client address."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict

from jaxclf.config import ConfigError

MAX_CLIENTS = 10_000  # buckets remembered; past that the longest-idle client is forgotten (a fresh, full bucket)


class TokenBucketLimiter:
    """Per-client token buckets: `rate` requests/s sustained, bursts of up to `burst` (default: one second's worth)."""

    def __init__(self, rate: float, burst: int | None = None, max_clients: int = MAX_CLIENTS):
        if not rate > 0:
            raise ConfigError(f"rate_limit must be > 0 requests/s, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1, math.ceil(rate)))
        if self.burst < 1:
            raise ConfigError(f"rate_burst must be >= 1, got {burst}")
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, t)
        self._lock = threading.Lock()

    def acquire(self, client: str) -> float:
        """0 if the request may go ahead, else the seconds until it would."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.pop(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            wait = 0.0
            if tokens >= 1:
                tokens -= 1
            else:
                wait = (1 - tokens) / self.rate
            self._buckets[client] = (tokens, now)  # most recently seen last
            if len(self._buckets) > self.max_clients:  # forget the longest-idle client
                self._buckets.popitem(last=False)
            return wait
