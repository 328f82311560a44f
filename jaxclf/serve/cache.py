"""ResultCache: a thread-safe LRU map from (model version, text) to its PredictionResult, bounded in entries
and in bytes.

The text itself is not kept: an entry is keyed by the SHA-256 of the text, so a cached 10,000-character
text costs 32 bytes of key, and every entry's size hardly depends on its text. The byte bound counts
each entry's key, result and its containers (`entry_bytes`), so it holds whatever the labels are.
"""

from __future__ import annotations

import collections
import hashlib
import sys
import threading

from jaxclf.config import ConfigError
from jaxclf.serve.config import EngineConfig
from jaxclf.serve.results import PredictionResult

# Per entry, beyond what sys.getsizeof sees: the OrderedDict's hash-table slot and linked-list node.
ENTRY_OVERHEAD_BYTES = 160

Key = tuple[str, bytes]  # (model version, sha256 of the text)


def text_key(version: str, text: str) -> Key:
    return version, hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def entry_bytes(key: Key, value: PredictionResult) -> int:
    """Memory one entry holds: its key, the result and the containers and numbers inside it."""
    size = ENTRY_OVERHEAD_BYTES + sys.getsizeof(key) + sys.getsizeof(key[1]) + sys.getsizeof(value)
    size += sys.getsizeof(value.probabilities) + sum(sys.getsizeof(p) for p in value.probabilities.values())
    size += sys.getsizeof(value.logits) + sum(sys.getsizeof(x) for x in value.logits)
    return size  # the label and version strings are the engine's own, shared by every entry


class ResultCache:
    """Thread-safe LRU map from (model version, text) to PredictionResult, with hit/miss counters.

    capacity: most entries (0 turns the cache off); max_bytes: most bytes of entries (entry_bytes),
    whichever bound is reached first evicts the least recently used. Keyed by version too, so
    engines of two versions may share one cache and never mix answers.
    """

    def __init__(self, capacity: int, max_bytes: int = EngineConfig.cache_max_bytes):
        if capacity < 0:
            raise ConfigError(f"cache_size must be >= 0 (0 disables the cache), got {capacity}")
        if max_bytes < 0:
            raise ConfigError(f"cache_max_bytes must be >= 0 (0 disables the cache), got {max_bytes}")
        self.capacity, self.max_bytes = capacity, max_bytes
        self.hits = self.misses = 0
        self.bytes = 0  # entry_bytes of what is held now
        self._items: collections.OrderedDict[Key, tuple[PredictionResult, int]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> PredictionResult | None:
        """The cached result for (version, text), or None."""
        hashed = text_key(*key)
        with self._lock:
            item = self._items.get(hashed)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(hashed)
            self.hits += 1
            return item[0]

    def put(self, key: tuple[str, str], value: PredictionResult) -> None:
        """Remember the result for (version, text); evicts the least recently used past either bound."""
        if self.capacity == 0 or self.max_bytes == 0:
            return
        hashed = text_key(*key)
        size = entry_bytes(hashed, value)
        if size > self.max_bytes:
            return
        with self._lock:
            previous = self._items.pop(hashed, None)
            if previous is not None:
                self.bytes -= previous[1]
            self._items[hashed] = (value, size)
            self.bytes += size
            while len(self._items) > self.capacity or self.bytes > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self.bytes -= evicted

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
