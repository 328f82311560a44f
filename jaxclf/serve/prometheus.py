"""Prometheus metrics of one app: request, batch and prediction series, the engines' own counters, and
the process's resources.

Each app has its own CollectorRegistry, so many apps can live in one process (tests do). The
engine counters (cache, compilations, queue, drift) are read at scrape time by EngineCollector
from whatever model slot the service holds then; the resource metrics by prometheus-client's
process and platform collectors and jaxclf.serve.resources. METRICS documents every family (a
test checks it against a live /metrics; docs/api.md prints it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from jaxclf.serve.resources import ResourceCollector
from jaxclf.serve.results import BatchRecord

if TYPE_CHECKING:
    from jaxclf.serve.service import Service
    from jaxclf.serve.slot import Arm

LATENCY_BUCKETS_S = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)

# Every metric family /metrics may carry: (name as exposed, labels, what it means). Counters end in _total.
METRICS = (
    ("jaxclf_http_requests_total", "endpoint, method, status",
     "HTTP requests answered; endpoint is the route rule and method a method the app serves, anything else "
     "\"other\" (so labels stay bounded); requests waitress refused itself (413 body, 431 headers, 400 "
     "malformed) count as endpoint=\"other\""),
    ("jaxclf_http_request_duration_seconds", "endpoint", "request latency (histogram)"),
    ("jaxclf_queue_wait_seconds", "version", "enqueue to the start of its batch (histogram)"),
    ("jaxclf_batch_size", "version", "requests per compiled call (histogram)"),
    ("jaxclf_batch_run_seconds", "version", "wall time of one compiled call (histogram)"),
    ("jaxclf_inference_duration_seconds", "version", "time a request spent in its model version (histogram)"),
    ("jaxclf_predictions_total", "version, label", "predictions returned"),
    ("jaxclf_prediction_confidence", "version", "confidence of returned predictions (histogram)"),
    ("jaxclf_ready", "", "1 once every bucket is compiled"),
    ("jaxclf_cache_hits_total", "version", "result cache hits"),
    ("jaxclf_cache_misses_total", "version", "result cache misses"),
    ("jaxclf_compilations_total", "version, kind", "XLA compilations: aot at start-up; request = triggered by a "
                                                   "request (must stay 0)"),
    ("jaxclf_queue_depth", "version", "texts waiting for the batcher"),
    ("jaxclf_rejected_queue_full_total", "version", "texts refused because the queue was full"),
    ("jaxclf_dropped_deadline_total", "version", "texts dropped unrun after their deadline"),
    ("jaxclf_startup_seconds", "version", "model load plus AOT compilation time"),
    ("jaxclf_traffic_weight", "version", "share of the traffic sent to each version"),
    ("jaxclf_model_info", "version, labels, ref", "the models being served"),
    ("jaxclf_drift_psi", "version, kind", "population stability index of live predictions against the eval "
                                          "distributions in metrics.json (after drift_min_samples)"),
    ("jaxclf_drift_window_predictions", "version", "live predictions in the drift window"),
    ("process_cpu_seconds_total", "", "user + system CPU time of the process"),
    ("process_resident_memory_bytes", "", "resident memory (RSS)"),
    ("process_virtual_memory_bytes", "", "virtual memory size"),
    ("process_open_fds", "", "open file descriptors"),
    ("process_max_fds", "", "the file-descriptor limit"),
    ("process_start_time_seconds", "", "start time, seconds since the Unix epoch"),
    ("python_info", "implementation, major, minor, patchlevel, version", "the Python running the server"),
    ("jaxclf_process_threads", "", "OS threads of the process, XLA's included"),
    ("jaxclf_compilation_cache_lookups_total", "result", "persistent XLA cache since start: hit = an executable "
                                                         "loaded instead of compiled, miss = compiled and written"),
    ("jaxclf_device_memory_in_use_bytes", "device, platform", "accelerator memory in use (GPU/TPU; absent on CPU)"),
    ("jaxclf_device_memory_peak_bytes", "device, platform", "peak accelerator memory in use (GPU/TPU)"),
    ("jaxclf_device_memory_limit_bytes", "device, platform", "accelerator memory the process may use (GPU/TPU)"),
)


class ServiceMetrics:
    """Prometheus metrics of one app, in its own registry."""

    def __init__(self, service: "Service"):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("jaxclf_http_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("jaxclf_http_request_duration_seconds", "Request latency by endpoint",
                                 ["endpoint"], registry=r, buckets=LATENCY_BUCKETS_S)
        self.queue_wait = Histogram("jaxclf_queue_wait_seconds", "Time from enqueue to the start of its batch",
                                    ["version"], registry=r, buckets=(.0005, .001, .002, .005, .01, .02, .05, .1,
                                                                      .25, .5, 1, 2.5, 5))
        self.batch_size = Histogram("jaxclf_batch_size", "Requests per compiled call", ["version"], registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_seconds = Histogram("jaxclf_batch_run_seconds", "Wall time of one compiled call", ["version"],
                                       registry=r, buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .25, 1))
        self.inference_seconds = Histogram("jaxclf_inference_duration_seconds",
                                           "Time a request spent in its model version (queue + run)", ["version"],
                                           registry=r, buckets=LATENCY_BUCKETS_S)
        self.predictions = Counter("jaxclf_predictions", "Predictions returned, by model version and label",
                                   ["version", "label"], registry=r)
        self.confidence = Histogram("jaxclf_prediction_confidence", "Confidence of returned predictions",
                                    ["version"], registry=r,
                                    buckets=(.1, .2, .3, .4, .5, .6, .7, .8, .9, .95, .99, 1.0))
        r.register(EngineCollector(service))
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        r.register(ResourceCollector(lambda: [engine.device for engine in service.engines()]))

    def observe_batch(self, record: BatchRecord, version: str) -> None:
        self.batch_size.labels(version).observe(record.size)
        self.batch_seconds.labels(version).observe(record.run_s)
        for wait in record.queue_waits_s:
            self.queue_wait.labels(version).observe(wait)

    def observe_predictions(self, results: Iterable[Mapping[str, Any]], version: str) -> None:
        for p in results:
            self.predictions.labels(version, p["label"]).inc()
            self.confidence.labels(version).observe(p["confidence"])


def _engine_families() -> dict[str, Any]:
    """Empty metric families for the per-version engine counters, by short name."""
    v = ["version"]
    return {
        "cache_hits": CounterMetricFamily("jaxclf_cache_hits", "Result cache hits", labels=v),
        "cache_misses": CounterMetricFamily("jaxclf_cache_misses", "Result cache misses", labels=v),
        "compilations": CounterMetricFamily("jaxclf_compilations", "XLA compilations: aot at start-up; "
                                            "request = triggered by a request (must stay 0)",
                                            labels=["version", "kind"]),
        "queue_depth": GaugeMetricFamily("jaxclf_queue_depth", "Requests waiting for the batcher", labels=v),
        "rejected": CounterMetricFamily("jaxclf_rejected_queue_full",
                                        "Requests refused because the queue was full", labels=v),
        "dropped": CounterMetricFamily("jaxclf_dropped_deadline", "Requests dropped unrun after their deadline",
                                       labels=v),
        "startup": GaugeMetricFamily("jaxclf_startup_seconds", "Model load plus AOT compilation time", labels=v),
        "weight": GaugeMetricFamily("jaxclf_traffic_weight", "Share of the traffic sent to each version",
                                    labels=v),
        "info": InfoMetricFamily("jaxclf_model", "The models being served", labels=v),
        "psi": GaugeMetricFamily("jaxclf_drift_psi", "Population stability index of the live predictions "
                                 "against the model's eval distributions (metrics.json)",
                                 labels=["version", "kind"]),
        "window": GaugeMetricFamily("jaxclf_drift_window_predictions",
                                    "Live predictions in the drift window", labels=v),
    }


def _add_arm(families: dict[str, Any], arm: "Arm") -> None:
    """One served version's counters."""
    engine, version = arm.engine, arm.target.version
    s = engine.stats()
    families["cache_hits"].add_metric([version], s.cache_hits)
    families["cache_misses"].add_metric([version], s.cache_misses)
    families["compilations"].add_metric([version, "aot"], s.aot_compilations)
    families["compilations"].add_metric([version, "request"], s.stray_compilations)
    families["queue_depth"].add_metric([version], s.queue_depth)
    families["rejected"].add_metric([version], s.rejected_queue_full)
    families["dropped"].add_metric([version], s.dropped_deadline)
    families["startup"].add_metric([version], engine.startup_seconds)
    families["info"].add_metric([version], {"labels": ",".join(engine.labels), "ref": arm.target.ref})
    if arm.monitor is not None:
        families["window"].add_metric([version], arm.monitor.samples)
        for kind, value in arm.monitor.values().items():
            families["psi"].add_metric([version, kind], value)


class EngineCollector:
    """Reads the engines' own counters at scrape time (cache, compilations, queue, model info, drift)."""

    def __init__(self, service: "Service"):
        self.service = service

    def collect(self):
        slot = self.service.slot
        yield GaugeMetricFamily("jaxclf_ready", "1 once every bucket is compiled", value=int(slot is not None))
        if slot is None:
            return
        families = _engine_families()
        weights: dict[str, float] = {}
        for arm in slot.arms:  # two references may name the same version
            weights[arm.target.version] = weights.get(arm.target.version, 0.0) + arm.target.weight
        for version, weight in weights.items():
            families["weight"].add_metric([version], weight)
        seen = set()
        for arm in slot.arms:
            if arm.target.version not in seen:
                seen.add(arm.target.version)
                _add_arm(families, arm)
        yield from families.values()
