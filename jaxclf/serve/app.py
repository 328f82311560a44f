"""The HTTP service: a Flask app around a model slot (one InferenceEngine, or several for A/B), under waitress.

    python scripts/serve.py --model runs/default/model --port 8000
    python scripts/serve.py --registry /srv/reg --model sentiment@production --admin-token-file token.txt

One process, many waitress threads, one batcher per model version. The model is loaded in a
background thread once the socket is listening, so /health answers at once and /ready answers 503 +
Retry-After until every bucket is compiled. Nothing forks after JAX has started.

Request handlers read the model slot (jaxclf.model_slot) once per request. POST /admin/reload
(bearer token) resolves the source again and, if the versions changed, builds the new slot beside the
old one, swaps it in and closes the old engines once their requests have drained. Every prediction
also feeds the drift monitor of its version (jaxclf.monitoring), exported as jaxclf_drift_psi.

Every response is JSON (errors: {"error": {"code", "message"}}) except /metrics (Prometheus
text) and /ui (HTML), and carries an X-Request-ID header.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import math
import os
import re
import signal
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Iterable, Mapping

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from werkzeug.exceptions import HTTPException

import jaxclf
from jaxclf.serve import api_schema
from jaxclf.serve import monitoring
from jaxclf.serve.engine import (BatchRecord, DeadlineExceeded, EngineClosedError, InferenceEngine,
                              InferenceError, QueueFullError)
from jaxclf.serve.slot import Arm, DirectorySource, ModelSlot, ModelSource, Target
from jaxclf.serve.ui_page import HTML as UI_HTML

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("jaxclf.access")

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB
DEFAULT_MAX_TEXTS = 64  # texts per /predict/batch request
DEFAULT_MAX_CHARS = 10_000  # characters per text (the tokenizer truncates to the model's limit anyway)
RETRY_AFTER_S = 1  # what 503 and 429 tell clients to wait, in seconds
UNLIMITED_PATHS = ("/health", "/ready", "/metrics")  # probes and scrapes are never rate limited
RETIRE_TIMEOUT_S = 60.0  # longest wait for requests on a replaced model before its engine is closed anyway
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class ApiError(Exception):
    """An error answered as JSON {"error": {"code", "message"}} with `status`."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


def error_response(status: int, code: str, message: str, retry_after: float | None = None) -> Response:
    response = Response(json.dumps({"error": {"code": code, "message": message}}), status=status,
                        mimetype="application/json")
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return response


class TokenBucketLimiter:
    """Per-client token buckets: `rate` requests/s sustained, bursts of up to `burst`."""

    def __init__(self, rate: float, burst: int | None = None, max_clients: int = 10_000):
        if not rate > 0:
            raise ValueError(f"rate_limit must be > 0 requests/s, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1, math.ceil(rate)))
        if self.burst < 1:
            raise ValueError(f"rate_burst must be >= 1, got {burst}")
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


class ServiceMetrics:
    """Prometheus metrics of one app, in its own registry (many apps can live in one process)."""

    def __init__(self, service: "Service"):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("jaxclf_http_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("jaxclf_http_request_duration_seconds", "Request latency by endpoint",
                                 ["endpoint"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.queue_wait = Histogram("jaxclf_queue_wait_seconds", "Time from enqueue to the start of its batch",
                                    ["version"], registry=r, buckets=(.0005, .001, .002, .005, .01, .02, .05, .1,
                                                                      .25, .5, 1, 2.5, 5))
        self.batch_size = Histogram("jaxclf_batch_size", "Requests per compiled call", ["version"], registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_seconds = Histogram("jaxclf_batch_run_seconds", "Wall time of one compiled call", ["version"],
                                       registry=r, buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .25, 1))
        self.inference_seconds = Histogram("jaxclf_inference_duration_seconds",
                                           "Time a request spent in its model version (queue + run)", ["version"],
                                           registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5,
                                                                1, 2.5, 5, 10))
        self.predictions = Counter("jaxclf_predictions", "Predictions returned, by model version and label",
                                   ["version", "label"], registry=r)
        self.confidence = Histogram("jaxclf_prediction_confidence", "Confidence of returned predictions",
                                    ["version"], registry=r,
                                    buckets=(.1, .2, .3, .4, .5, .6, .7, .8, .9, .95, .99, 1.0))
        r.register(_EngineCollector(service))

    def observe_batch(self, record: BatchRecord, version: str) -> None:
        self.batch_size.labels(version).observe(record.size)
        self.batch_seconds.labels(version).observe(record.run_s)
        for wait in record.queue_waits_s:
            self.queue_wait.labels(version).observe(wait)

    def observe_predictions(self, results: Iterable[Mapping[str, Any]], version: str) -> None:
        for p in results:
            self.predictions.labels(version, p["label"]).inc()
            self.confidence.labels(version).observe(p["confidence"])


class _EngineCollector:
    """Reads the engine's own counters at scrape time (cache, compilations, queue, model info)."""

    def __init__(self, service: "Service"):
        self.service = service

    def collect(self):
        slot = self.service.slot
        yield GaugeMetricFamily("jaxclf_ready", "1 once every bucket is compiled", value=int(slot is not None))
        if slot is None:
            return
        v = ["version"]
        families = {
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
        weights: dict[str, float] = {}
        for arm in slot.arms:  # two references may name the same version
            weights[arm.target.version] = weights.get(arm.target.version, 0.0) + arm.target.weight
        for version, weight in weights.items():
            families["weight"].add_metric([version], weight)
        seen = set()
        for arm in slot.arms:
            engine, version = arm.engine, arm.target.version
            if version in seen:
                continue
            seen.add(version)
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
        yield from families.values()


class Service:
    """Run-time state of one app: the model slot once loaded, the limits, the metrics, reloads."""

    def __init__(self, model: InferenceEngine | ModelSource | str | os.PathLike,
                 engine_options: Mapping[str, Any] | None, max_body_bytes: int, max_texts: int, max_chars: int,
                 rate_limit: float | None, rate_burst: int | None, cors_origins: Iterable[str] | None,
                 admin_token: str | None = None, drift_options: Mapping[str, Any] | None = None):
        for name, value in (("max_body_bytes", max_body_bytes), ("max_texts", max_texts),
                            ("max_chars", max_chars)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if admin_token is not None and not admin_token.strip():
            raise ValueError("admin_token must not be empty; leave it unset to turn /admin endpoints off")
        if admin_token is not None and len(admin_token) < 16:
            logger.warning("the admin token is only %d characters; use 16 or more random ones", len(admin_token))
        self.max_body_bytes, self.max_texts, self.max_chars = max_body_bytes, max_texts, max_chars
        self.limiter = TokenBucketLimiter(rate_limit, rate_burst) if rate_limit else None
        self.cors_origins = frozenset(cors_origins or ())
        self.admin_token = admin_token
        self.drift_options = dict(drift_options or {})
        self.metrics = ServiceMetrics(self)
        self.slot: ModelSlot | None = None  # replaced whole, never mutated: read it once per request
        self.load_error: str | None = None
        self.draining = False  # set on SIGTERM: /ready turns 503 so load balancers stop routing here
        self._loader: threading.Thread | None = None
        self._lock = threading.Lock()  # start_loading
        self._swap_lock = threading.Lock()  # slot swaps and lease counts
        self._reload_lock = threading.Lock()  # one reload at a time
        self._retiring: list[threading.Thread] = []
        self.engine_options = dict(engine_options or {})
        if isinstance(model, InferenceEngine):
            self.source: ModelSource | None = None  # nothing to reload from
            self.model_path = model.model_path
            target = Target(model.version, model.model_path, 1.0, str(model.model_path))
            self._install(self._build_slot([target], given=model))
        elif isinstance(model, (str, os.PathLike)):
            self.source = DirectorySource(model, version=self.engine_options.pop("version", None))
            self.model_path = model
        else:
            self.source = model
            self.model_path = model.describe()

    @property
    def engine(self) -> InferenceEngine | None:
        """The engine of the primary (largest-share) version, once loaded."""
        slot = self.slot
        return slot.primary.engine if slot is not None else None

    def start_loading(self) -> None:
        """Load and compile in a background thread (no-op if already started or loaded)."""
        with self._lock:
            if self.slot is not None or self._loader is not None:
                return
            self._loader = threading.Thread(target=self._load, name="jaxclf-loader", daemon=True)
            self._loader.start()

    def _load(self) -> None:
        try:
            slot = self._build_slot(self.source.resolve())
        except Exception as e:
            logger.exception("loading model %s failed", self.model_path)
            self.load_error = f"loading model {self.model_path} failed: {type(e).__name__}: {e}"
            return
        self._install(slot)
        logger.info("serving %s", ", ".join(f"{a.target.version} ({a.target.weight:.0%})" for a in slot.arms))

    def _build_slot(self, targets: list[Target], reuse: ModelSlot | None = None,
                    given: InferenceEngine | None = None) -> ModelSlot:
        """Engines for the targets, every bucket compiled: reused from `reuse` where the version is the same."""
        old = {a.target.version: a for a in reuse.arms} if reuse is not None else {}
        built: dict[str, tuple[InferenceEngine, Any]] = {}
        new_engines = []
        try:
            for t in targets:
                if t.version in built:
                    continue
                if t.version in old:
                    built[t.version] = (old[t.version].engine, old[t.version].monitor)
                    continue
                engine = given or InferenceEngine(t.path, **{**self.engine_options, "version": t.version})
                new_engines.append(engine)
                self._attach(engine)
                monitor = monitoring.DriftMonitor.from_metrics(t.version, engine.labels, engine.classifier.metrics,
                                                               **self.drift_options)
                built[t.version] = (engine, monitor)
        except BaseException:
            for engine in new_engines:
                if engine is not given:
                    engine.close()
            raise
        return ModelSlot([Arm(t, *built[t.version]) for t in targets])

    def _attach(self, engine: InferenceEngine) -> None:
        if engine.batching and self.max_texts > engine.max_queue_size:
            logger.warning("max_texts=%d is larger than the queue (max_queue_size=%d); using %d",
                           self.max_texts, engine.max_queue_size, engine.max_queue_size)
            self.max_texts = engine.max_queue_size
        version = engine.version
        engine.add_batch_listener(lambda record: self.metrics.observe_batch(record, version))

    def _install(self, slot: ModelSlot) -> ModelSlot | None:
        """Make `slot` the one requests get; returns the previous one."""
        with self._swap_lock:
            previous, self.slot = self.slot, slot
        return previous

    @contextlib.contextmanager
    def lease(self):
        """The current slot, held for one request: a reload closes its engines only after it is released."""
        with self._swap_lock:
            slot = self.slot
            if slot is not None:
                slot.enter()
        if slot is None:
            self.ready_engine()  # raises the right 503
        try:
            yield slot
        finally:
            slot.exit()

    def observe(self, arm: Arm, results: list[dict[str, Any]]) -> None:
        self.metrics.observe_predictions(results, arm.target.version)
        if arm.monitor is not None:
            arm.monitor.observe_many(results)

    def reload(self) -> dict[str, Any]:
        """Serve what the source names now; a no-op when that is what is served already."""
        if self.source is None:
            raise ApiError(409, "reload_unavailable", "this app was given an engine object, not a model source; "
                                                      "there is nothing to reload from")
        if not self._reload_lock.acquire(blocking=False):
            raise ApiError(409, "reload_in_progress", "another reload is running; retry when it has finished",
                           retry_after=RETRY_AFTER_S)
        try:
            current = self.slot
            if current is None:
                self.ready_engine()
            started = time.perf_counter()
            try:
                targets = self.source.resolve()
            except (ValueError, OSError) as e:  # RegistryError is a ValueError: alias gone, hash mismatch, ...
                raise ApiError(409, "reload_failed", f"cannot resolve {self.source.describe()}: {e}; still "
                                                     f"serving {', '.join(current.versions)}") from None
            if [(t.version, t.weight) for t in targets] == current.signature():
                return {"reloaded": False, "serving": current.describe(),
                        "message": f"already serving {', '.join(current.versions)}"}
            try:
                slot = self._build_slot(targets, reuse=current)
            except Exception as e:
                logger.exception("reload: building %s failed", [t.version for t in targets])
                raise ApiError(500, "reload_failed", f"loading {', '.join(t.version for t in targets)} failed: "
                                                     f"{type(e).__name__}: {e}; still serving "
                                                     f"{', '.join(current.versions)}") from None
            self._install(slot)
            self._retire(current, keep=slot.engines)
            seconds = time.perf_counter() - started
            logger.info("reloaded: now serving %s (was %s), built in %.2fs", ", ".join(slot.versions),
                        ", ".join(current.versions), seconds)
            return {"reloaded": True, "serving": slot.describe(), "previous": current.describe(),
                    "seconds": round(seconds, 3)}
        finally:
            self._reload_lock.release()

    def _retire(self, slot: ModelSlot, keep: list[InferenceEngine]) -> None:
        """Close the engines of a replaced slot (those not kept) once no request holds it, in the background."""
        closing = [e for e in slot.engines if not any(e is k for k in keep)]
        if not closing:
            return

        def run() -> None:
            if not slot.wait_idle(RETIRE_TIMEOUT_S):
                logger.warning("%d request(s) still hold the replaced model after %.0fs; closing it anyway",
                               slot.in_flight, RETIRE_TIMEOUT_S)
            for engine in closing:
                engine.close()
                logger.info("closed the engine of %s", engine.version)

        thread = threading.Thread(target=run, name="jaxclf-retire", daemon=True)
        thread.start()
        self._retiring = [t for t in self._retiring if t.is_alive()] + [thread]

    def check_admin(self, authorization: str | None) -> None:
        """Refuse (404 off, 401 no bearer token, 403 wrong token) unless the request carries the admin token."""
        if self.admin_token is None:
            raise ApiError(404, "admin_disabled", "admin endpoints are off; start the server with --admin-token "
                                                  "or JAXCLF_ADMIN_TOKEN to turn them on")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "unauthorized", "send the admin token as 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"),
                                   self.admin_token.encode("utf-8", "surrogateescape")):
            raise ApiError(403, "forbidden", "the admin token is not valid")

    def wait_ready(self, timeout: float) -> bool:
        """True once the model is loaded; False on timeout or failure."""
        deadline = time.monotonic() + timeout
        while self.slot is None and self.load_error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.slot is not None

    def ready_engine(self) -> InferenceEngine:
        engine = self.engine
        if engine is not None:
            return engine
        if self.load_error is not None:
            raise ApiError(503, "model_load_failed", self.load_error)
        raise ApiError(503, "not_ready", "the model is still loading and compiling; retry shortly",
                       retry_after=RETRY_AFTER_S)

    def close(self) -> None:
        for thread in self._retiring:
            thread.join(RETIRE_TIMEOUT_S)
        slot = self.slot
        if slot is not None:
            for engine in slot.engines:
                engine.close()


# --- request handling ------------------------------------------------------------------------------

def _json_body(schema: dict[str, Any]) -> Any:
    """The request's JSON body, checked against `schema`; ApiError naming what is wrong otherwise."""
    if request.mimetype != "application/json":
        got = request.headers.get("Content-Type") or "none"
        raise ApiError(415, "unsupported_media_type", f"Content-Type must be application/json, got {got!r}")
    raw = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ApiError(400, "invalid_json", f"request body is not UTF-8 (bad byte at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {e.msg} at line {e.lineno} "
                                            f"column {e.colno}") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer with > 4300 digits, absurd nesting
        raise ApiError(400, "invalid_json", f"request body cannot be parsed: {e}") from None
    violation = api_schema.validate(body, schema)
    if violation is not None:
        status, code = {"maxLength": (413, "text_too_long"), "maxItems": (413, "too_many_texts"),
                        "minLength": (422, "empty_text"), "minItems": (422, "empty_list")}.get(
            violation.keyword, (400, "invalid_request"))
        raise ApiError(status, code, violation.message)
    return body


def _predict(engine: InferenceEngine, texts: list[str]) -> list[dict[str, Any]]:
    try:
        results = engine.predict_batch(texts).results
    except QueueFullError as e:
        raise ApiError(503, "queue_full", str(e), retry_after=RETRY_AFTER_S) from None
    except DeadlineExceeded as e:
        raise ApiError(503, "deadline_exceeded", str(e), retry_after=RETRY_AFTER_S) from None
    except EngineClosedError as e:
        raise ApiError(503, "shutting_down", str(e), retry_after=RETRY_AFTER_S) from None
    except InferenceError as e:
        raise ApiError(500, "inference_failed", str(e)) from None
    return [r.to_dict() for r in results]


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json")


def _endpoint() -> str:
    """A bounded label for metrics: the route rule, never the raw path."""
    return request.url_rule.rule if request.url_rule is not None else "(unmatched)"


def create_app(engine_or_path: InferenceEngine | ModelSource | str | os.PathLike, *,
               cors_origins: Iterable[str] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_texts: int = DEFAULT_MAX_TEXTS, max_chars: int = DEFAULT_MAX_CHARS,
               rate_limit: float | None = None, rate_burst: int | None = None,
               engine_options: Mapping[str, Any] | None = None, load_now: bool = True,
               admin_token: str | None = None, drift_window: int = monitoring.DEFAULT_WINDOW,
               drift_threshold: float = monitoring.DEFAULT_THRESHOLD,
               drift_min_samples: int = monitoring.DEFAULT_MIN_SAMPLES) -> Flask:
    """The Flask app serving `engine_or_path`.

    A path (or a jaxclf.model_slot source, e.g. RegistrySource for NAME@ALIAS references with an
    A/B split) is loaded into InferenceEngine(**engine_options) in a background thread; with
    load_now=False that waits for `app.extensions["jaxclf"].start_loading()` (serve() calls it
    once the socket listens). rate_limit: requests/s per client IP (off when None), bursts of
    rate_burst. cors_origins: origins allowed to call from a browser ("*" for any; off when None).
    admin_token: turns on POST /admin/reload for requests carrying it as a bearer token.
    drift_*: rolling window, PSI threshold and minimum sample of the drift monitors.
    """
    service = Service(engine_or_path, engine_options, max_body_bytes, max_texts, max_chars,
                      rate_limit, rate_burst, cors_origins, admin_token=admin_token,
                      drift_options={"window": drift_window, "threshold": drift_threshold,
                                     "min_samples": drift_min_samples})
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.extensions["jaxclf"] = service
    metrics = service.metrics

    @app.before_request
    def _start():
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        g.started = time.perf_counter()
        if service.limiter is not None and request.method != "OPTIONS" and request.path not in UNLIMITED_PATHS:
            wait = service.limiter.acquire(request.remote_addr or "unknown")
            if wait > 0:
                raise ApiError(429, "rate_limited", f"more than {service.limiter.rate:g} requests/s "
                                                    f"(burst {service.limiter.burst:g}) from this client; "
                                                    f"retry in {wait:.2f}s", retry_after=wait)

    @app.after_request
    def _finish(response: Response) -> Response:
        request_id = g.get("request_id") or uuid.uuid4().hex
        response.headers["X-Request-ID"] = request_id
        response.headers["X-Content-Type-Options"] = "nosniff"
        origin = request.headers.get("Origin")
        if origin and ("*" in service.cors_origins or origin in service.cors_origins):
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in service.cors_origins else origin
            response.headers["Access-Control-Expose-Headers"] = "X-Request-ID, Retry-After"
            response.headers.add("Vary", "Origin")
            if request.method == "OPTIONS":
                response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
                response.headers["Access-Control-Allow-Headers"] = "Content-Type, X-Request-ID"
                response.headers["Access-Control-Max-Age"] = "600"
        endpoint = _endpoint()
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        metrics.requests.labels(endpoint, request.method, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(elapsed)
        access_logger.info('%s "%s %s" %d %.1fms id=%s', request.remote_addr, request.method, request.path,
                           response.status_code, 1000 * elapsed, request_id)
        return response

    @app.errorhandler(ApiError)
    def _api_error(e: ApiError):
        return error_response(e.status, e.code, e.message, e.retry_after)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        if e.code is None or e.code < 400:  # redirects (e.g. a trailing slash) stay as they are
            return e
        code = re.sub(r"[^a-z0-9]+", "_", (e.name or "error").lower()).strip("_")
        message = e.description or e.name
        if e.code == 404:
            message = f"no such endpoint: {request.method} {request.path}; see /openapi.json"
        elif e.code == 405:
            message = f"{request.method} is not allowed on {request.path}; allowed: {', '.join(e.valid_methods or [])}"
        elif e.code == 413:
            message = f"request body is over the limit of max_body_bytes={service.max_body_bytes} bytes"
        response = error_response(e.code, code, message)
        if e.code == 405 and e.valid_methods:
            response.headers["Allow"] = ", ".join(e.valid_methods)
        return response

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        request_id = g.get("request_id", "?")
        logger.exception("unhandled error in %s %s (request id %s)", request.method, request.path, request_id)
        return error_response(500, "internal_error", f"internal error; the server log has the details "
                                                     f"under request id {request_id}")

    @app.get("/")
    def index():
        slot = service.slot
        endpoints = ["GET /health", "GET /ready", "GET /model/info", "POST /predict", "POST /predict/batch",
                     "GET /metrics", "GET /openapi.json", "GET /ui"]
        if service.admin_token is not None:
            endpoints.append("POST /admin/reload")
        return _json({"service": "jaxclf", "jaxclf_version": jaxclf.__version__,
                      "ready": slot is not None, "model_version": slot.primary.target.version if slot else None,
                      "model_versions": slot.describe() if slot else [], "endpoints": endpoints})

    @app.get("/health")
    def health():
        if service.load_error is not None:
            raise ApiError(503, "model_load_failed", service.load_error)
        return _json({"status": "ok"})

    @app.get("/ready")
    def ready():
        if service.draining:  # requests already received still complete; new traffic should go elsewhere
            raise ApiError(503, "shutting_down", "the server is shutting down; retry on another replica",
                           retry_after=RETRY_AFTER_S)
        engine = service.ready_engine()
        slot = service.slot
        return _json({"ready": True, "model_version": engine.version, "compilations": engine.compilations,
                      "startup_seconds": round(engine.startup_seconds, 3), "model_versions": slot.describe()})

    @app.get("/model/info")
    def model_info():
        engine = service.ready_engine()
        return _json({
            "model_version": engine.version, "labels": engine.labels, "config": engine.config.to_dict(),
            "metrics": engine.classifier.metrics,
            "serving": {"batching": engine.batching, "max_batch_size": engine.max_batch_size,
                        "max_wait_ms": engine.max_wait_s * 1000, "max_queue_size": engine.max_queue_size,
                        "batch_buckets": list(engine.batch_buckets), "length_buckets": list(engine.length_buckets),
                        "cache_size": engine.cache.capacity, "request_timeout_s": engine.request_timeout_s,
                        "compilations": engine.compilations, "startup_seconds": engine.startup_seconds,
                        "max_texts": service.max_texts, "max_chars": service.max_chars,
                        "max_body_bytes": service.max_body_bytes},
            "model_versions": service.slot.describe()})

    def _run(texts: list[str], body: Mapping[str, Any]) -> tuple[Arm, list[dict[str, Any]]]:
        """Lease the slot once, pick the version by the request key, predict, record."""
        key = body.get("key", request.headers.get("X-Request-Key"))
        with service.lease() as slot:
            arm = slot.pick(key)
            started = time.perf_counter()
            results = _predict(arm.engine, texts)
            metrics.inference_seconds.labels(arm.target.version).observe(time.perf_counter() - started)
        service.observe(arm, results)
        return arm, results

    @app.post("/predict")
    def predict():
        body = _json_body(api_schema.predict_request(service.max_chars))
        _, [result] = _run([body["text"]], body)
        return _json(result)

    @app.post("/predict/batch")
    def predict_batch():
        body = _json_body(api_schema.batch_request(service.max_texts, service.max_chars))
        arm, results = _run(body["texts"], body)
        for r in results:
            del r["model_version"]  # said once for the whole batch
        return _json({"predictions": results, "model_version": arm.engine.version})

    @app.post("/admin/reload")
    def admin_reload():
        service.check_admin(request.headers.get("Authorization"))
        return _json(service.reload())

    @app.get("/metrics")
    def prometheus_metrics():
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json")
    def openapi():
        return _json(api_schema.openapi_document(service.max_texts, service.max_chars, jaxclf.__version__))

    @app.get("/ui")
    def ui():
        response = Response(UI_HTML, mimetype="text/html")
        # The page only talks to this server; nothing external may load.
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'")
        return response

    if load_now:
        service.start_loading()
    return app


# --- running under waitress ------------------------------------------------------------------------

def serve(app: Flask, host: str = "127.0.0.1", port: int = 8000, threads: int = 16,
          shutdown_timeout_s: float = 30.0) -> int:
    """Serve `app` with waitress until SIGTERM/SIGINT; returns the process exit code.

    Listens first, then loads the model (the app's /ready says when it is done). On SIGTERM:
    stop accepting connections, let every request already received finish and its response be
    written (up to shutdown_timeout_s), drain the batcher, return 0. A failed model load returns 1,
    an address that cannot be bound 2.
    """
    from waitress import wasyncore
    from waitress.server import BaseWSGIServer, create_server

    service: Service = app.extensions["jaxclf"]
    socket_map: dict = {}  # ours, so we can drive waitress's event loop ourselves
    try:
        server = create_server(app, map=socket_map, host=host, port=port, threads=threads, ident="jaxclf")
    except OSError as e:
        logger.error("cannot listen on %s:%s: %s; pick another --port or stop what holds it", host, port, e)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    listeners = [obj for obj in socket_map.values() if isinstance(obj, BaseWSGIServer)]
    for listener in listeners:  # more than one when a host name resolves to several addresses
        print(f"jaxclf: listening on http://{listener.effective_host}:{listener.effective_port}", flush=True)
    service.start_loading()

    def pump(timeout: float) -> None:
        wasyncore.loop(timeout=timeout, map=socket_map, count=1)

    while not stop.is_set() and service.load_error is None:
        pump(0.2)
    if service.load_error is not None:
        logger.error("%s", service.load_error)
        server.task_dispatcher.shutdown()
        wasyncore.close_all(socket_map)
        return 1

    logger.info("shutting down: no new connections; finishing requests in flight")
    service.draining = True
    # Close only the listening sockets (the base-class close): waitress's own close() also closes the
    # trigger its worker threads use to wake this loop, which the responses still need.
    for listener in listeners:
        wasyncore.dispatcher.close(listener)
    dispatcher = server.task_dispatcher

    def idle() -> bool:
        channels = [c for c in socket_map.values() if hasattr(c, "requests")]
        return not dispatcher.queue and all(
            not c.requests and c.request is None and not c.total_outbufs_len for c in channels)

    deadline = time.monotonic() + shutdown_timeout_s
    quiet = 0
    while quiet < 3 and time.monotonic() < deadline:  # idle three polls in a row: nothing in flight
        pump(0.05)
        quiet = quiet + 1 if idle() else 0
    if quiet < 3:
        logger.warning("shutdown timeout (%.0fs) reached with requests still in flight", shutdown_timeout_s)
    service.close()
    dispatcher.shutdown(cancel_pending=False, timeout=5)
    wasyncore.close_all(socket_map)
    logger.info("shut down cleanly")
    return 0
