"""Service: the run-time state of one app: its model slot (loading, A/B arms, reloads, retiring), its
limits, its metrics and drift monitors.

Request handlers read the model slot (jaxclf.serve.slot) once per request, through `lease()`.
`reload()` resolves the source again and, if the versions changed, builds the new slot beside the
old one, swaps it in and closes the old engines once their requests have drained.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import threading
import time
from typing import Any

from jaxclf.serve import monitoring
from jaxclf.serve.access import OTHER, loggable
from jaxclf.serve.config import EngineConfig, ServeConfig
from jaxclf.serve.engine import InferenceEngine
from jaxclf.serve.limits import TokenBucketLimiter, proxy_networks
from jaxclf.serve.prometheus import ServiceMetrics
from jaxclf.serve.responses import RETRY_AFTER_S, ApiError
from jaxclf.serve.slot import Arm, DirectorySource, ModelSlot, ModelSource, Target

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("jaxclf.access")

RETIRE_TIMEOUT_S = 60.0  # longest wait for requests on a replaced model before its engine is closed anyway
# What a client is told when the model failed to load; the cause (paths, exception text) goes to the log only.
LOAD_FAILED_MESSAGE = "the model failed to load; the server log has the cause"


class Service:
    """Run-time state of one app: the model slot once loaded, the limits, the metrics, reloads."""

    def __init__(self, model: InferenceEngine | ModelSource | str | os.PathLike,
                 engine_config: EngineConfig, serve_config: ServeConfig):
        self.engine_config, self.serve_config = engine_config, serve_config
        if serve_config.admin_token is not None and len(serve_config.admin_token) < 16:
            logger.warning("the admin token is only %d characters; use 16 or more random ones",
                           len(serve_config.admin_token))
        self.limiter = (TokenBucketLimiter(serve_config.rate_limit, serve_config.rate_burst)
                        if serve_config.rate_limit else None)
        self.cors_origins = frozenset(serve_config.cors_origins)
        self.trusted_proxies = proxy_networks(serve_config.trusted_proxies)
        self.metrics = ServiceMetrics(self)
        self.slot: ModelSlot | None = None  # replaced whole, never mutated: read it once per request
        self.load_error: str | None = None  # for the log and the operator, never sent to clients
        self.draining = False  # set on SIGTERM: /ready turns 503 so load balancers stop routing here
        self._loader: threading.Thread | None = None
        self._lock = threading.Lock()  # start_loading
        self._swap_lock = threading.Lock()  # slot swaps and lease counts
        self._reload_lock = threading.Lock()  # one reload at a time
        self._retiring: list[threading.Thread] = []
        if isinstance(model, InferenceEngine):
            self.source: ModelSource | None = None  # nothing to reload from
            self.model_path = model.model_path
            target = Target(model.version, model.model_path, 1.0, model.model_path.name)
            self._install(self._build_slot([target], given=model))
        elif isinstance(model, (str, os.PathLike)):
            self.source = DirectorySource(model)
            self.model_path = model
        else:
            self.source = model
            self.model_path = model.describe()

    # Limits the routes and /model/info read.
    max_texts = property(lambda self: self.serve_config.max_texts)
    max_chars = property(lambda self: self.serve_config.max_chars)
    max_body_bytes = property(lambda self: self.serve_config.max_body_bytes)
    admin_token = property(lambda self: self.serve_config.admin_token)

    @property
    def engine(self) -> InferenceEngine | None:
        """The engine of the primary (largest-share) version, once loaded."""
        slot = self.slot
        return slot.primary.engine if slot is not None else None

    def engines(self) -> list[InferenceEngine]:
        """The engines being served now (none while loading)."""
        slot = self.slot
        return slot.engines if slot is not None else []

    # --- loading -------------------------------------------------------------------------------

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
                engine = given or InferenceEngine(t.path, self.engine_config, version=t.version)
                new_engines.append(engine)
                self._record_batches(engine)
                built[t.version] = (engine, self._drift_monitor(t.version, engine))
        except BaseException:
            for engine in new_engines:
                if engine is not given:
                    engine.close()
            raise
        return ModelSlot([Arm(t, *built[t.version]) for t in targets])

    def _record_batches(self, engine: InferenceEngine) -> None:
        version = engine.version  # bound here, once per engine
        engine.add_batch_listener(lambda record: self.metrics.observe_batch(record, version))

    def _drift_monitor(self, version: str, engine: InferenceEngine) -> monitoring.DriftMonitor | None:
        c = self.serve_config
        return monitoring.DriftMonitor.from_metrics(version, engine.labels, engine.classifier.metrics,
                                                    window=c.drift_window, threshold=c.drift_threshold,
                                                    min_samples=c.drift_min_samples)

    def _install(self, slot: ModelSlot) -> ModelSlot | None:
        """Make `slot` the one requests get; returns the previous one."""
        with self._swap_lock:
            previous, self.slot = self.slot, slot
        return previous

    def wait_ready(self, timeout: float) -> bool:
        """True once the model is loaded; False on timeout or failure."""
        deadline = time.monotonic() + timeout
        while self.slot is None and self.load_error is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.slot is not None

    def ready_engine(self) -> InferenceEngine:
        """The primary engine, or the right 503: still loading, or the load failed."""
        engine = self.engine
        if engine is not None:
            return engine
        raise self.not_ready()

    def not_ready(self) -> ApiError:
        """The 503 (always with Retry-After) for a request that found no model: still loading, or failed."""
        if self.load_error is not None:
            return ApiError(503, "model_load_failed", LOAD_FAILED_MESSAGE, retry_after=RETRY_AFTER_S)
        return ApiError(503, "not_ready", "the model is still loading and compiling; retry shortly",
                        retry_after=RETRY_AFTER_S)

    # --- requests ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self):
        """The current slot, held for one request: a reload closes its engines only after it is released."""
        with self._swap_lock:
            slot = self.slot
            if slot is not None:
                slot.enter()
        if slot is None:  # decided on this snapshot: the loader may install a slot right now
            raise self.not_ready()
        try:
            yield slot
        finally:
            slot.exit()

    def record_refusal(self, status: int, peer: str | None, code: str) -> None:
        """Count and log a request the WSGI server refused before the app saw it (413, 431, 400)."""
        self.metrics.requests.labels(OTHER, OTHER, str(status)).inc()
        access_logger.info('%s "(refused by the server: %s)" %d', loggable(peer, 64), code, status)

    def observe(self, arm: Arm, results: list[dict[str, Any]]) -> None:
        self.metrics.observe_predictions(results, arm.target.version)
        if arm.monitor is not None:
            arm.monitor.observe_many(results)

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

    # --- reloads -------------------------------------------------------------------------------

    def reload(self) -> dict[str, Any]:
        """Serve what the source names now; a no-op when that is what is served already."""
        if self.source is None:
            raise ApiError(409, "reload_unavailable", "this app was given an engine object, not a model source; "
                                                      "there is nothing to reload from")
        if not self._reload_lock.acquire(blocking=False):
            raise ApiError(409, "reload_in_progress", "another reload is running; retry when it has finished",
                           retry_after=RETRY_AFTER_S)
        try:
            return self._reload_locked()
        finally:
            self._reload_lock.release()

    def _reload_locked(self) -> dict[str, Any]:
        current = self.slot
        if current is None:
            raise self.not_ready()
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

    def close(self, deadline: float | None = None) -> bool:
        """Close every engine, after a load or retirement in progress has finished, all by `deadline`
        (time.monotonic(); default shutdown_timeout_s from now). True if everything stopped in time.

        A loader still compiling is waited for: a process that exits normally while a thread is
        inside an XLA compile aborts (SIGABRT); past the deadline the caller must exit hard (os._exit).
        """
        if deadline is None:
            deadline = time.monotonic() + self.serve_config.shutdown_timeout_s

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        stopped = True
        if self._loader is not None:
            self._loader.join(left())
            if self._loader.is_alive():
                logger.warning("the model is still loading at the shutdown deadline; exiting anyway")
                stopped = False
        for thread in self._retiring:
            thread.join(left())
            stopped = stopped and not thread.is_alive()
        slot = self.slot
        if slot is not None:
            for engine in slot.engines:
                engine.close(timeout=left())
        return stopped
