"""ResultCache: a thread-safe LRU map from (model version, text) to its PredictionResult."""

from __future__ import annotations

import collections
import threading

from jaxclf.config import ConfigError
from jaxclf.serve.results import PredictionResult


class ResultCache:
    """Thread-safe LRU map from (model version, text) to PredictionResult, with hit/miss counters.

    Keyed by version too, so engines of two versions may share one cache and never mix answers.
    """

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ConfigError(f"cache_size must be >= 0 (0 disables the cache), got {capacity}")
        self.capacity = capacity
        self.hits = self.misses = 0
        self._items: collections.OrderedDict[tuple[str, str], PredictionResult] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> PredictionResult | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple[str, str], value: PredictionResult) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
