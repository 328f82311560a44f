"""InferenceEngine: ahead-of-time compiled buckets, a dynamic batcher and a result cache.

    engine = InferenceEngine(model_path="runs/default/model")
    engine.predict_single("a lovely little cafe").predicted_class   # "positive"
    engine.close()

Start-up loads the model directory and compiles one XLA executable per
(batch size × sequence length) bucket with `jax.jit(...).lower(...).compile()`.
Requests only ever call those executables: a request is padded up to the nearest
bucket, so no request can trigger a compilation (a `jax.monitoring` listener
counts any that would, see `stray_compilations`).

Batching: callers put texts on a bounded queue and wait on a future; a free worker
thread takes up to `max_batch_size` texts (whatever is queued, or what arrives within
`max_wait_ms` of the oldest one), runs them and hands every caller its own row. Texts
of very different lengths are split into a few calls by length (`plan_calls`), so one
long text does not pad a whole batch to its length. The default wait is 0 (continuous
batching): requests that queue while a call runs form the next batch, so a lone request
never waits for company. Padding rows and padding positions are masked, so a text's
logits do not depend on what it was batched with.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxclf import classifier, model_dir
from jaxclf.classifier import predictions
from jaxclf import tokenizer as tokenization
from jaxclf.tokenizer import bucket_for
from jaxclf.tokenizer import pad_rows
from jaxclf.errors import JaxclfError

logger = logging.getLogger(__name__)

# Recorded by JAX around every backend compile (and every load from the persistent cache).
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class InferenceError(JaxclfError, RuntimeError):
    """Base class of the errors a caller of InferenceEngine can act on."""


class QueueFullError(InferenceError):
    """The request queue is full; retry after a short wait (HTTP 503 + Retry-After)."""


class DeadlineExceeded(InferenceError):
    """The request waited longer than `request_timeout_s` and was dropped without being run."""


class EngineClosedError(InferenceError):
    """The engine is shutting down or closed and accepts no new requests."""


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The result for one text."""

    predicted_class: str  # label with the highest probability
    confidence: float  # its probability
    probabilities: dict[str, float]  # every label's probability
    logits: tuple[float, ...]  # float32 logits, in label order
    model_version: str
    cached: bool = False  # served from the result cache

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.predicted_class, "confidence": self.confidence,
                "probabilities": dict(self.probabilities), "model_version": self.model_version}


@dataclasses.dataclass(frozen=True)
class BatchPrediction:
    results: list[Prediction]  # in request order
    model_version: str


@dataclasses.dataclass(frozen=True)
class BatchRecord:
    """What one compiled call did; passed to batch listeners (metrics)."""

    size: int  # requests in the call
    padded_batch: int  # batch bucket it ran in
    padded_length: int  # length bucket it ran in
    queue_waits_s: tuple[float, ...]  # per request: enqueue -> start of the call
    run_s: float  # wall time of the compiled call


# Cost of a compiled call, in padded token slots: batch × length, plus a fixed cost per call worth
# this many slots. Tuned on a 2-core CPU with real tweets (33 tokens median) in 32-text requests:
# 0 -> 632 predictions/s (7.2 calls a request), 64 -> 943, 128 -> 984 (2.7 calls), 256 -> 922,
# one call per request -> 763.
CALL_OVERHEAD_SLOTS = 128


def plan_calls(lengths: Sequence[int], batch_buckets: Sequence[int],
               length_buckets: Sequence[int]) -> list[list[int]]:
    """Split rows of these token lengths into compiled calls that pad the least.

    One call pads every row to the longest one, so a single 60-token text among 31 short
    ones would double the work of a (32, 32) batch. Rows are sorted by length and cut into
    consecutive groups (each at most the largest batch bucket) minimising the padded
    slots b × t summed over calls plus CALL_OVERHEAD_SLOTS per call (an exact dynamic
    programme, O(n × largest batch bucket)). Returns groups of row indices.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n, largest = len(order), batch_buckets[-1]
    padded_batch = [0] + [bucket_for(k, batch_buckets) for k in range(1, largest + 1)]
    best = [0.0] + [float("inf")] * n  # best[i]: cheapest plan of the i shortest rows
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        t = bucket_for(lengths[order[i - 1]], length_buckets)  # the group's longest row
        for j in range(max(0, i - largest), i):
            cost = best[j] + padded_batch[i - j] * t + CALL_OVERHEAD_SLOTS
            if cost < best[i]:
                best[i], cut[i] = cost, j
    groups, i = [], n
    while i > 0:
        groups.append(order[cut[i]:i])
        i = cut[i]
    return groups[::-1]


@dataclasses.dataclass(frozen=True)
class EngineStats:
    requests: int  # texts asked for, cached or not
    cache_hits: int
    cache_misses: int
    batches: int  # compiled calls run
    batched_texts: int  # texts run through compiled calls
    queue_depth: int
    rejected_queue_full: int
    dropped_deadline: int  # dropped unrun because their deadline passed
    aot_compilations: int  # executables compiled at start-up
    stray_compilations: int  # compiles triggered while serving a request; must stay 0


class ResultCache:
    """Thread-safe LRU map from (model version, text) to Prediction, with hit/miss counters."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"cache_size must be >= 0 (0 disables the cache), got {capacity}")
        self.capacity = capacity
        self.hits = self.misses = 0
        self._items: collections.OrderedDict[tuple[str, str], Prediction] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> Prediction | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple[str, str], value: Prediction) -> None:
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


# --- compile accounting --------------------------------------------------------------------------
# The listener is process-wide; a thread-local says which engine (if any) is serving a request on
# the compiling thread, so a compile is blamed on a request only when a request caused it.
_request_scope = threading.local()
_listener_lock = threading.Lock()
_listener_registered = False


def _on_compile_event(event: str, duration: float, **kwargs: Any) -> None:
    if event != _BACKEND_COMPILE_EVENT:
        return
    engine = getattr(_request_scope, "engine", None)
    if engine is not None:
        engine._record_stray_compile(kwargs.get("fun_name", "?"))


def _ensure_compile_listener() -> None:
    global _listener_registered
    with _listener_lock:
        if not _listener_registered:
            jax.monitoring.register_event_duration_secs_listener(_on_compile_event)
            _listener_registered = True


class _ServingRequest:
    """Context manager marking the current thread as serving a request of `engine`."""

    def __init__(self, engine: "InferenceEngine"):
        self.engine = engine

    def __enter__(self):
        self.previous = getattr(_request_scope, "engine", None)
        _request_scope.engine = self.engine

    def __exit__(self, *exc):
        _request_scope.engine = self.previous


def enable_compilation_cache(path: str | os.PathLike) -> None:
    """Persist XLA executables under `path` so a restart loads instead of compiling.

    The thresholds are lowered so the small programs of a text classifier are cached too.
    These are process-wide JAX settings.
    """
    path = str(Path(path).expanduser())
    Path(path).mkdir(parents=True, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        # JAX decides once per process whether to use the cache; start over so the new dir counts
        # even if something was compiled before this call.
        from jax.experimental.compilation_cache import compilation_cache
        compilation_cache.reset_cache()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def model_version(path: str | os.PathLike, length: int = 12) -> str:
    """Short hex content hash of a model directory's weights and config."""
    h = hashlib.sha256()
    for name in (model_dir.CONFIG_FILE, model_dir.WEIGHTS_FILE):
        h.update(name.encode())
        with open(Path(path) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:length]


def default_batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two up to max_batch_size, which is always the last bucket."""
    return tokenization.length_buckets(max_batch_size, smallest=1)


def _check_buckets(name: str, buckets: Sequence[int], largest: int, largest_name: str) -> tuple[int, ...]:
    values = tuple(buckets)
    if not values or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in values):
        raise ValueError(f"{name} must be a non-empty list of positive integers, got {list(values)}")
    if list(values) != sorted(set(values)):
        raise ValueError(f"{name} must be strictly increasing, got {list(values)}")
    if values[-1] != largest:
        raise ValueError(f"the largest of {name} must equal {largest_name}={largest} so every request "
                         f"fits a bucket; got {list(values)}")
    return values


@dataclasses.dataclass
class _Request:
    """One text waiting in the queue."""

    text: str
    ids: list[int]
    enqueued_at: float  # time.monotonic()
    deadline: float
    future: concurrent.futures.Future


class InferenceEngine:
    """A loaded classifier behind AOT-compiled buckets, a dynamic batcher and an LRU result cache.

    model_path: a model directory (see jaxclf.model_dir).
    max_batch_size: most texts in one compiled call; also the largest batch bucket.
    cache_size: entries of the (model version, text) -> Prediction LRU cache; 0 disables it.
    max_wait_ms: how long a worker waits for a batch to fill, from the oldest request's arrival;
        0 (default) takes what is queued, best on CPU where a bigger batch saves little per text.
    max_queue_size: queued texts beyond which submissions raise QueueFullError.
    batch_buckets / length_buckets: shapes compiled at start-up; default powers of two up to
        max_batch_size, and the classifier's length_buckets up to max_position_embeddings.
    compilation_cache_dir: persistent XLA cache (process-wide setting); None leaves JAX's as is.
    request_timeout_s: a request not started by then is dropped unrun (DeadlineExceeded).
    batching: False runs every call alone in the caller's thread (for comparison benchmarks).
    version: the model version reported and used in cache keys; default a content hash.
    num_workers: batcher threads; two keep the device busy while the next batch is gathered.
    """

    def __init__(self, model_path: str | os.PathLike, max_batch_size: int = 32, cache_size: int = 1000,
                 max_wait_ms: float = 0, max_queue_size: int = 256,
                 batch_buckets: Sequence[int] | None = None, length_buckets: Sequence[int] | None = None,
                 compilation_cache_dir: str | os.PathLike | None = None, request_timeout_s: float = 10.0,
                 batching: bool = True, version: str | None = None, num_workers: int = 2):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {request_timeout_s}")
        started = time.perf_counter()
        self.model_path = Path(model_path)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.request_timeout_s = request_timeout_s
        self.batching = batching

        # Check the buckets against the config before the (slower) load, so a typo fails fast.
        config = model_dir.read_config(model_dir.check_files(self.model_path))
        self.batch_buckets = _check_buckets(
            "batch_buckets", batch_buckets if batch_buckets is not None
            else default_batch_buckets(max_batch_size), max_batch_size, "max_batch_size")
        self.length_buckets = _check_buckets(
            "length_buckets", length_buckets if length_buckets is not None
            else tokenization.length_buckets(config.max_position_embeddings, midpoints=True),
            config.max_position_embeddings, "max_position_embeddings")

        _ensure_compile_listener()
        if compilation_cache_dir is not None:
            # Before loading: loading runs small JAX programs that the cache can serve too.
            enable_compilation_cache(compilation_cache_dir)
        self.classifier = classifier.load(self.model_path)
        self.config = self.classifier.config
        self.labels = self.classifier.labels
        self.tokenizer = self.classifier.tokenizer
        self.version = version or model_version(self.model_path)

        self.cache = ResultCache(cache_size)
        self._lock = threading.Lock()  # guards the counters below
        self._requests = self._batches = self._batched_texts = 0
        self._rejected = self._dropped = 0
        self._stray_compiles: list[str] = []
        self._batch_listeners: list[Callable[[BatchRecord], None]] = []

        self._aot_compilations = 0
        self._executables = self._compile_buckets()
        self.startup_seconds = time.perf_counter() - started

        self._queue: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        # Several workers: while one runs a compiled call (JAX releases the GIL), the next gathers
        # what queued meanwhile, so batching never serialises the device behind one thread.
        self._workers = [threading.Thread(target=self._worker_loop, name=f"jaxclf-batcher-{i}", daemon=True)
                         for i in range(num_workers if batching else 0)]
        for worker in self._workers:
            worker.start()
        logger.info("model %s (version %s) ready in %.2fs: %d executables, batch buckets %s, "
                    "length buckets %s", self.model_path, self.version, self.startup_seconds,
                    len(self._executables), list(self.batch_buckets), list(self.length_buckets))

    # --- start-up ----------------------------------------------------------------------------

    def _compile_buckets(self) -> dict[tuple[int, int], Any]:
        """One executable per (batch, length) bucket, compiled now so requests never compile.

        The model is traced once, with symbolic (batch, length) shapes (jax.export), and that
        program is specialised to each bucket; tracing the NNX model per bucket would cost
        ~60 ms of Python each. Compiles (or persistent-cache loads) run in a small thread
        pool while the next bucket is specialised.
        """
        self.classifier.model.eval()  # dropout off
        graphdef, state = nnx.split(self.classifier.model)
        leaves, treedef = jax.tree.flatten(state)
        # Passing flat leaves skips re-flattening the nnx.State pytree on every request.
        self._weights = leaves

        def forward(leaves, input_ids, attention_mask):
            model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            return model(input_ids, attention_mask)  # (B, C) float32

        weight_specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
        jitted = jax.jit(forward)
        try:
            b, t = jax.export.symbolic_shape(
                "b, t", constraints=[f"t <= {self.config.max_position_embeddings}"])
            spec = jax.ShapeDtypeStruct((b, t), jnp.int32)
            jitted = jax.jit(jax.export.export(jitted)(weight_specs, spec, spec).call)
        except Exception as e:  # shape polymorphism is an optimisation; tracing per bucket is correct too
            logger.warning("symbolic-shape export failed (%s: %s); tracing the model once per bucket",
                           type(e).__name__, e)

        def compile_one(lowered):
            executable = lowered.compile()
            with self._lock:
                self._aot_compilations += 1
            return executable

        with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="jaxclf-compile") as pool:
            futures = {}
            for b in self.batch_buckets:
                for t in self.length_buckets:
                    spec = jax.ShapeDtypeStruct((b, t), jnp.int32)
                    futures[(b, t)] = pool.submit(compile_one, jitted.lower(weight_specs, spec, spec))
            return {key: future.result() for key, future in futures.items()}

    # --- accounting --------------------------------------------------------------------------

    def _record_stray_compile(self, fun_name: str) -> None:
        logger.error("a request triggered an XLA compilation of %s; requests should only run the "
                     "executables compiled at start-up", fun_name)
        with self._lock:
            self._stray_compiles.append(fun_name)

    @property
    def aot_compilations(self) -> int:
        return self._aot_compilations

    @property
    def stray_compilations(self) -> int:
        with self._lock:
            return len(self._stray_compiles)

    @property
    def compilations(self) -> int:
        """Executables compiled at start-up plus any compile a request triggered (should be none)."""
        return self.aot_compilations + self.stray_compilations

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def stats(self) -> EngineStats:
        depth = self.queue_depth()  # before taking _lock: _submit_many takes _cond, then _lock
        with self._lock:
            return EngineStats(
                requests=self._requests, cache_hits=self.cache.hits, cache_misses=self.cache.misses,
                batches=self._batches, batched_texts=self._batched_texts, queue_depth=depth,
                rejected_queue_full=self._rejected, dropped_deadline=self._dropped,
                aot_compilations=self._aot_compilations, stray_compilations=len(self._stray_compiles))

    def add_batch_listener(self, listener: Callable[[BatchRecord], None]) -> None:
        """Call `listener(BatchRecord)` after every compiled call (from the thread that ran it)."""
        self._batch_listeners.append(listener)

    # --- running a batch ---------------------------------------------------------------------

    def _run(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Logits (len(rows), C) of token-id rows, in one compiled call of the smallest bucket that holds them."""
        n, longest = len(rows), max(len(r) for r in rows)
        b, t = bucket_for(n, self.batch_buckets), bucket_for(longest, self.length_buckets)
        ids, mask = pad_rows(rows, self.config.pad_token_id, (b, t))  # (B, T); padding rows all masked
        logits = np.asarray(self._executables[(b, t)](self._weights, ids, mask))  # (B, C)
        with self._lock:
            self._batches += 1
            self._batched_texts += n
        return logits[:n]

    def _predictions(self, texts: Sequence[str], logits: np.ndarray) -> list[Prediction]:
        out = []
        for text, row, p in zip(texts, logits, predictions(logits, self.labels)):
            result = Prediction(p["label"], p["confidence"], p["probabilities"],
                                tuple(float(x) for x in row), self.version)
            self.cache.put((self.version, text), result)
            out.append(result)
        return out

    def _run_and_report(self, texts: Sequence[str], rows: Sequence[Sequence[int]],
                        waits: Sequence[float]) -> list[Prediction]:
        """Run rows in the compiled calls plan_calls picks (one per length group), report each call."""
        logits = np.zeros((len(rows), self.config.num_classes), np.float32)
        for group in plan_calls([len(r) for r in rows], self.batch_buckets, self.length_buckets):
            start = time.perf_counter()
            logits[group] = self._run([rows[i] for i in group])
            run_s = time.perf_counter() - start
            record = BatchRecord(len(group), bucket_for(len(group), self.batch_buckets),
                                 bucket_for(max(len(rows[i]) for i in group), self.length_buckets),
                                 tuple(waits[i] for i in group), run_s)
            for listener in self._batch_listeners:
                try:
                    listener(record)
                except Exception:  # a metrics bug must not take the batcher down
                    logger.exception("batch listener %r failed", listener)
        return self._predictions(texts, logits)

    def _encode(self, text: str) -> list[int]:
        # Truncated to the model's max length, so every text fits the largest bucket.
        return self.classifier.encoder.ids_one(text)

    # --- the batcher ---------------------------------------------------------------------------

    def submit(self, text: str) -> concurrent.futures.Future:
        """Queue one text; the future resolves to a Prediction or raises an InferenceError."""
        return self._submit_many([text])[0]

    def _submit_many(self, texts: Sequence[str]) -> list[concurrent.futures.Future]:
        """All-or-nothing: either every text is queued (or answered from the cache) or QueueFullError."""
        with _ServingRequest(self):
            futures: list[concurrent.futures.Future] = []
            pending: list[_Request] = []
            now = time.monotonic()
            for text in texts:
                future: concurrent.futures.Future = concurrent.futures.Future()
                hit = self.cache.get((self.version, text))
                if hit is not None:
                    future.set_result(dataclasses.replace(hit, cached=True))
                else:
                    pending.append(_Request(text, self._encode(text), now, now + self.request_timeout_s,
                                            future))
                futures.append(future)
            with self._lock:
                self._requests += len(texts)
            if not pending:
                return futures
            with self._cond:
                if self._closing:
                    raise EngineClosedError("the inference engine is shutting down; retry on another replica")
                if len(self._queue) + len(pending) > self.max_queue_size:
                    with self._lock:
                        self._rejected += len(pending)
                    raise QueueFullError(
                        f"request queue is full ({len(self._queue)} of max_queue_size={self.max_queue_size} "
                        f"queued, {len(pending)} more asked for); retry shortly")
                self._queue.extend(pending)
                self._cond.notify_all()
            return futures

    def _take_batch(self) -> list[_Request] | None:
        """Block until there is work; None once closing and drained."""
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                return None
            # Wait for a full batch, but never longer than max_wait after the oldest request arrived.
            flush_at = self._queue[0].enqueued_at + self.max_wait_s
            while len(self._queue) < self.max_batch_size and not self._closing:
                remaining = flush_at - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch_size))]

    def _worker_loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            start = time.monotonic()
            live = []
            for request in batch:
                if not request.future.set_running_or_notify_cancel():
                    self._count_dropped()  # the caller gave up (its deadline passed) while queued
                elif start > request.deadline:
                    self._count_dropped()
                    request.future.set_exception(DeadlineExceeded(
                        f"request waited {start - request.enqueued_at:.3f}s in the queue, longer than "
                        f"request_timeout_s={self.request_timeout_s}; it was dropped without running"))
                else:
                    live.append(request)
            if not live:
                continue
            try:
                with _ServingRequest(self):
                    results = self._run_and_report([r.text for r in live], [r.ids for r in live],
                                                   [start - r.enqueued_at for r in live])
            except Exception as e:  # keep serving; every caller of this batch gets the error
                logger.exception("batch of %d failed", len(live))
                for r in live:
                    r.future.set_exception(InferenceError(f"inference failed: {e}"))
                continue
            for r, result in zip(live, results):
                r.future.set_result(result)

    def _count_dropped(self) -> None:
        with self._lock:
            self._dropped += 1

    def _wait(self, future: concurrent.futures.Future, deadline: float) -> Prediction:
        """The future's result; DeadlineExceeded if it is still queued at the deadline."""
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            pass
        if future.cancel():  # still queued: the worker will skip it
            raise DeadlineExceeded(f"request not started within request_timeout_s={self.request_timeout_s}; "
                                   f"dropped without running (the server is overloaded)")
        # Already running: a compiled call takes milliseconds, so this wait is short.
        try:
            return future.result(timeout=self.request_timeout_s)
        except concurrent.futures.TimeoutError:
            raise DeadlineExceeded(f"request did not finish within 2 × request_timeout_s="
                                   f"{self.request_timeout_s}") from None

    # --- public API ----------------------------------------------------------------------------

    def predict_single(self, text: str) -> Prediction:
        """Label, confidence and probabilities of one text."""
        return self.predict_batch([text]).results[0]

    def predict_batch(self, texts: Sequence[str]) -> BatchPrediction:
        """Predictions for many texts, in request order.

        With batching, the texts join the shared queue and may run alongside other requests;
        without, they run in this thread in chunks of max_batch_size.
        """
        if isinstance(texts, str):
            raise TypeError("predict_batch takes a list of texts; use predict_single for one text")
        texts = list(texts)
        if not texts:
            return BatchPrediction([], self.version)
        if not self.batching:
            return BatchPrediction(self._predict_unbatched(texts), self.version)
        if len(texts) > self.max_queue_size:
            raise QueueFullError(f"{len(texts)} texts can never fit a queue of max_queue_size="
                                 f"{self.max_queue_size}; send at most {self.max_queue_size} per call")
        deadline = time.monotonic() + self.request_timeout_s
        futures = self._submit_many(texts)
        return BatchPrediction([self._wait(f, deadline) for f in futures], self.version)

    def _predict_unbatched(self, texts: list[str]) -> list[Prediction]:
        if self._closing:
            raise EngineClosedError("the inference engine is shutting down; retry on another replica")
        with _ServingRequest(self):
            results: list[Prediction | None] = []
            todo = []
            for i, text in enumerate(texts):
                hit = self.cache.get((self.version, text))
                results.append(dataclasses.replace(hit, cached=True) if hit is not None else None)
                if hit is None:
                    todo.append(i)
            with self._lock:
                self._requests += len(texts)
            for start in range(0, len(todo), self.max_batch_size):
                chunk = todo[start:start + self.max_batch_size]
                chunk_texts = [texts[i] for i in chunk]
                done = self._run_and_report(chunk_texts, [self._encode(t) for t in chunk_texts],
                                            [0.0] * len(chunk))
                for i, result in zip(chunk, done):
                    results[i] = result
            return results  # type: ignore[return-value]

    async def predict_async(self, text: str) -> Prediction:
        """predict_single for asyncio callers; never blocks the event loop."""
        if not self.batching:
            return await asyncio.get_running_loop().run_in_executor(None, self.predict_single, text)
        future = self.submit(text)
        waiting = asyncio.wrap_future(future)
        try:
            # shield: a timeout must not cancel the future here; the rule below decides.
            return await asyncio.wait_for(asyncio.shield(waiting), timeout=self.request_timeout_s)
        except asyncio.TimeoutError:
            pass
        if future.cancel():  # still queued: the worker will skip it
            raise DeadlineExceeded(f"request not started within request_timeout_s={self.request_timeout_s}; "
                                   f"dropped without running (the server is overloaded)")
        try:
            return await asyncio.wait_for(waiting, timeout=self.request_timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"request did not finish within 2 × request_timeout_s="
                                   f"{self.request_timeout_s}") from None

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop accepting requests, finish the queued ones, stop the worker. Idempotent."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in self._workers:
            worker.join(None if deadline is None else max(deadline - time.monotonic(), 0))
        if any(worker.is_alive() for worker in self._workers):
            logger.warning("batcher still busy after %.1fs; %d request(s) queued", timeout, self.queue_depth())

    def __enter__(self) -> "InferenceEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
