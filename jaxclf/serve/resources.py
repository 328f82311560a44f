"""Resource metrics of the serving process, read at scrape time.

- process: CPU seconds, resident and virtual memory, open and maximum file descriptors, start time
  (prometheus-client's ProcessCollector, registered by ServiceMetrics), and OS threads, XLA's
  included (`jaxclf_process_threads`; the process collector has no thread count);
- accelerators: memory in use, its peak and the limit of each device a served model runs on, where
  the JAX backend reports them (`device.memory_stats()`: GPU and TPU; the CPU backend reports
  nothing, so on CPU these series are absent);
- the persistent XLA compilation cache: lookups that loaded an executable (hit) and compiles that
  wrote a new one (miss), counted from JAX's own monitoring events since the process started.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Iterable

import jax
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# jax.monitoring events of the persistent compilation cache (jax/_src/compiler.py, compilation_cache.py).
CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "hit", "/jax/compilation_cache/cache_misses": "miss"}
# memory_stats() key -> (metric, help)
DEVICE_MEMORY = {
    "bytes_in_use": ("jaxclf_device_memory_in_use_bytes", "Accelerator memory in use (where the backend reports it)"),
    "peak_bytes_in_use": ("jaxclf_device_memory_peak_bytes", "Peak accelerator memory in use since start"),
    "bytes_limit": ("jaxclf_device_memory_limit_bytes", "Accelerator memory the process may use"),
}

_cache_counts = dict.fromkeys(CACHE_EVENTS.values(), 0)
_cache_lock = threading.Lock()
_listening = False


def _on_event(event: str, **_: object) -> None:
    result = CACHE_EVENTS.get(event)
    if result is not None:
        with _cache_lock:
            _cache_counts[result] += 1


def ensure_cache_listener() -> None:
    """Count the compilation-cache events from now on (process-wide, registered once)."""
    global _listening
    with _cache_lock:
        if not _listening:
            jax.monitoring.register_event_listener(_on_event)
            _listening = True


def compilation_cache_counts() -> dict[str, int]:
    """{"hit": n, "miss": n} since ensure_cache_listener() was first called."""
    with _cache_lock:
        return dict(_cache_counts)


def os_threads() -> int:
    """Threads of this process as the OS sees them (Python's and XLA's); Python's count where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return threading.active_count()


def device_memory(device: jax.Device) -> dict[str, int]:
    """The memory_stats() entries of DEVICE_MEMORY that `device` reports; {} on CPU."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # a backend without the call, or a device that went away: report nothing for it
        return {}
    return {key: int(stats[key]) for key in DEVICE_MEMORY if isinstance(stats.get(key), (int, float))}


class ResourceCollector:
    """Threads, accelerator memory of `devices()` and compilation-cache counts, at scrape time."""

    def __init__(self, devices: Callable[[], Iterable[jax.Device]]):
        self.devices = devices
        ensure_cache_listener()

    def collect(self):
        yield GaugeMetricFamily("jaxclf_process_threads", "OS threads of the process, XLA's included",
                                value=os_threads())
        cache = CounterMetricFamily("jaxclf_compilation_cache_lookups",
                                    "Persistent XLA cache: hit = an executable loaded instead of compiled, "
                                    "miss = compiled and written", labels=["result"])
        for result, count in compilation_cache_counts().items():
            cache.add_metric([result], count)
        yield cache
        families = {key: GaugeMetricFamily(name, text, labels=["device", "platform"])
                    for key, (name, text) in DEVICE_MEMORY.items()}
        seen = set()
        for device in self.devices():
            if device in seen:
                continue
            seen.add(device)
            for key, value in device_memory(device).items():
                families[key].add_metric([str(device), device.platform], value)
        yield from (family for family in families.values() if family.samples)
