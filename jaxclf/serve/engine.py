"""InferenceEngine: a model directory behind ahead-of-time compiled buckets, a dynamic batcher and a cache.

    engine = InferenceEngine(model_path="runs/default/model", device="cpu", max_batch_size=32, cache_size=1000)
    engine.predict_single("a lovely little cafe").predicted_class      # "positive"
    engine.predict_batch(["great", "awful"]).results[1].confidence
    engine.health_check()["status"]                                    # "ok"
    engine.close()

Start-up loads the model directory onto the chosen device and compiles one XLA executable per
(batch size × sequence length) bucket (jaxclf.serve.compilation.compile_buckets). Requests only
ever call those executables: a request is padded up to the nearest bucket, so no request can
trigger a compilation (jaxclf.serve.compilation counts any that would, see `stray_compilations`).

Texts go through the batcher (jaxclf.serve.batcher) and the LRU result cache
(jaxclf.serve.cache); a batch of texts of very different lengths is split into a few calls
(jaxclf.serve.planning.plan_calls). Padding rows and positions are masked, so a text's logits
do not depend on what it was batched with. Every knob is a field of EngineConfig.

A model with long_text="chunks" reads a long text as several windows (jaxclf.long_text): each
window is a row of its own in the same queue and the same compiled buckets, and the text's logits
are its windows' logits pooled by the model's chunk_pooling (jaxclf.serve.documents).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxclf import model_dir
from jaxclf.classifier import load, predictions
from jaxclf.config import ConfigError
from jaxclf.long_text import TextTooLongError, Windows
from jaxclf.serve.batcher import Batcher, QueuedText
from jaxclf.serve.cache import ResultCache
from jaxclf.serve.compilation import (ServingRequest, compile_buckets, enable_compilation_cache,
                                     ensure_compile_listener, release_free_memory)
from jaxclf.serve.config import GRAPH_BACKENDS, EngineConfig, override
from jaxclf.serve.documents import DocumentFuture, DocumentTooLongError, window_parts  # noqa: F401 (API)
from jaxclf.serve.errors import (DeadlineExceeded, EngineClosedError, InferenceError,  # noqa: F401 (API)
                                 QueueFullError)
from jaxclf.serve.planning import default_batch_buckets, model_length_buckets, plan_calls
from jaxclf.serve.results import (BatchPrediction, BatchPredictionResult, BatchRecord,  # noqa: F401 (API)
                                  EngineStats, Prediction, PredictionResult)
from jaxclf.tokenizer import bucket_for, pad_rows

logger = logging.getLogger(__name__)


def model_version(path: str | os.PathLike, length: int = 12) -> str:
    """Short hex content hash of a model directory's weights and config."""
    h = hashlib.sha256()
    for name in (model_dir.CONFIG_FILE, model_dir.WEIGHTS_FILE):
        h.update(name.encode())
        with open(Path(path) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:length]


def resolve_model_path(path: str | os.PathLike) -> Path:
    """The model directory `path` names: itself, or the directory holding it when it names a file there.

    The original framework passed a weights file ("./final-model/model.pt"); any path inside a
    model directory (present or not, as long as the directory has a config.json) means that directory.
    """
    path = Path(path)
    if not path.is_dir() and (path.parent / model_dir.CONFIG_FILE).is_file():
        return path.parent
    return path


def resolve_device(name: str) -> jax.Device:
    """The first JAX device of platform `name` ("auto": JAX's default); ConfigError naming what exists."""
    if name == "auto":
        return jax.devices()[0]
    try:
        return jax.devices(name)[0]
    except RuntimeError:
        present = sorted({d.platform for d in jax.devices()})
        raise ConfigError(f"device {name!r} is not available to JAX on this machine (it has: "
                          f"{', '.join(present)}); use device='auto' or one of those") from None


class InferenceEngine:
    """A loaded classifier behind AOT-compiled buckets, a dynamic batcher and an LRU result cache.

    model_path: a model directory (jaxclf.model_dir), or a path inside one.
    config: an EngineConfig; keyword `overrides` change single fields of it (or of the defaults),
        e.g. InferenceEngine(path, max_batch_size=16, cache_size=0).
    version: the model version reported and used in cache keys; default a content hash.
    """

    def __init__(self, model_path: str | os.PathLike, config: EngineConfig | None = None, *,
                 version: str | None = None, **overrides: Any):
        started = time.perf_counter()
        self.engine_config = override(config or EngineConfig(), **overrides)
        self.model_path = resolve_model_path(model_path)
        # Check the buckets and the device before the (slower) load, so a typo fails fast.
        model_config = model_dir.read_config(model_dir.check_files(self.model_path))
        model_dir.check_tokenizer_regex(self.model_path / model_dir.TOKENIZER_FILE,
                                        self.engine_config.allow_regex_tokenizer)
        self.batch_buckets = self.engine_config.batch_buckets or default_batch_buckets(self.max_batch_size)
        self.length_buckets = model_length_buckets(self.engine_config.length_buckets,
                                                   model_dir.max_text_length(self.model_path))
        self.device = resolve_device(self.engine_config.device)
        if self.batching and model_config.chunking is not None and model_config.max_chunks > self.max_queue_size:
            raise ConfigError(f"max_queue_size={self.max_queue_size} cannot hold one long text of this model "
                              f"(max_chunks={model_config.max_chunks} windows, each a queued row); raise "
                              f"max_queue_size to at least {model_config.max_chunks}")

        ensure_compile_listener()
        self._use_compilation_cache(self.engine_config.compilation_cache_dir)
        with jax.default_device(self.device):  # the graph backends compute without JAX weights
            self.classifier = load(self.model_path, with_weights=self.engine_config.backend == "jax",
                                   dtype=self.engine_config.dtype)
        self.config = self.classifier.config  # the ModelConfig
        self.labels = self.classifier.labels
        self.tokenizer = self.classifier.tokenizer
        self.version = version or model_version(self.model_path)

        self.cache = ResultCache(self.engine_config.cache_size, self.engine_config.cache_max_bytes)
        self._lock = threading.Lock()  # guards the counters below
        self._requests = self._batches = self._batched_texts = 0
        self._stray_compiles: list[str] = []
        self._batch_listeners: list[Callable[[BatchRecord], None]] = []
        self._aot_compilations = 0
        self.classifier.model.eval()  # dropout off
        self.backend = self.engine_config.backend
        if self.backend in GRAPH_BACKENDS:  # the exported graph, behind the same buckets (serve.onnx_backend)
            from jaxclf.serve.onnx_backend import graph_runner
            runner = graph_runner(self.backend, self.engine_config.onnx_file, self.model_path, self.config.dtype)
            self._forward: Callable[[tuple[int, int], np.ndarray, np.ndarray], np.ndarray] = runner.run
            self._weights, self._buckets = None, [(b, t) for b in self.batch_buckets for t in self.length_buckets]
        else:
            self._weights, executables = compile_buckets(  # flat leaves on the device
                self.classifier.model, self.device, self.batch_buckets, self.length_buckets,
                self._count_aot_compile)
            self._forward = lambda bucket, ids, mask: executables[bucket](self._weights, ids, mask)
            self._buckets = list(executables)
        self._warm_up()
        release_free_memory()
        self.startup_seconds = time.perf_counter() - started
        self._batcher = Batcher(self._run_queued, self.max_batch_size, self.max_wait_s, self.max_queue_size,
                                self.request_timeout_s, self.engine_config.batch_workers if self.batching else 0)
        logger.info("model %s (version %s) ready on %s (%s backend, %s) in %.2fs: %d buckets, batch buckets %s, "
                    "length buckets %s", self.model_path, self.version, self.device, self.backend, self.config.dtype,
                    self.startup_seconds, len(self._buckets), list(self.batch_buckets), list(self.length_buckets))

    # Knobs read back by the service and its /model/info.
    max_batch_size = property(lambda self: self.engine_config.max_batch_size)
    max_queue_size = property(lambda self: self.engine_config.max_queue_size)
    max_wait_s = property(lambda self: self.engine_config.max_wait_ms / 1000.0)
    request_timeout_s = property(lambda self: self.engine_config.request_timeout_s)
    batching = property(lambda self: self.engine_config.batching)

    # --- start-up ----------------------------------------------------------------------------

    def _warm_up(self) -> None:
        """Run every bucket once, before the engine serves.

        A bucket's first run costs far more than the next: measured on the benchmark model (4 layers,
        d256) on 2 cores, an XLA:CPU executable's first call took 25 ms longer at (1, 16) and 85 ms
        longer at (32, 128) (first use of its kernels and buffers), and ONNX Runtime plans its buffers
        on a shape's first run. Without this, the first requests of each bucket would pay it.
        """
        for b, t in self._buckets:  # np.asarray waits for the run: JAX dispatches asynchronously
            np.asarray(self._forward((b, t), np.full((b, t), self.config.pad_token_id, np.int32),
                                     np.ones((b, t), np.int32)))

    @staticmethod
    def _use_compilation_cache(path: str | None) -> None:
        if path is None:
            return
        try:  # before loading: loading runs small JAX programs that the cache can serve too
            enable_compilation_cache(path)
        except OSError as e:  # e.g. a read-only home directory in a container: slower, not broken
            logger.warning("cannot use the compilation cache at %s (%s); compiling from scratch", path, e)

    # --- accounting --------------------------------------------------------------------------

    def _count_aot_compile(self) -> None:
        with self._lock:
            self._aot_compilations += 1

    def record_stray_compile(self, fun_name: str) -> None:
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
        return self._batcher.depth()

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                requests=self._requests, cache_hits=self.cache.hits, cache_misses=self.cache.misses,
                batches=self._batches, batched_texts=self._batched_texts, queue_depth=self.queue_depth(),
                rejected_queue_full=self._batcher.rejected, dropped_deadline=self._batcher.dropped,
                aot_compilations=self._aot_compilations, stray_compilations=len(self._stray_compiles))

    def health_check(self) -> dict[str, Any]:
        """Whether this engine can serve, with the numbers behind the verdict (JSON-ready).

        status: "ok"; "degraded" when a batcher thread has died or a request triggered a
        compilation (both listed under "problems"); "closed" after close().
        """
        stats = self.stats()
        problems = []
        workers = self._batcher.workers_alive()
        if self.batching and workers < self.engine_config.batch_workers and not self._batcher.closing:
            problems.append(f"{self.engine_config.batch_workers - workers} batcher thread(s) stopped")
        if stats.stray_compilations:
            problems.append(f"{stats.stray_compilations} compilation(s) triggered by requests")
        status = "closed" if self._batcher.closing else "degraded" if problems else "ok"
        return {"status": status, "problems": problems, "model_path": str(self.model_path),
                "model_version": self.version, "device": str(self.device), "platform": self.device.platform,
                "labels": list(self.labels), "backend": self.backend, "dtype": self.config.dtype,
                "compiled_buckets": [list(key) for key in self._buckets],
                "startup_seconds": round(self.startup_seconds, 3), "batching": self.batching,
                "batch_workers_alive": workers, "cache_entries": len(self.cache),
                **{f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}}

    def add_batch_listener(self, listener: Callable[[BatchRecord], None]) -> None:
        """Call `listener(BatchRecord)` after every compiled call (from the thread that ran it)."""
        self._batch_listeners.append(listener)

    # --- running texts -----------------------------------------------------------------------

    def _run(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Logits (len(rows), C) of token-id rows, in one compiled call of the smallest bucket that holds them."""
        n, longest = len(rows), max(len(r) for r in rows)
        b, t = bucket_for(n, self.batch_buckets), bucket_for(longest, self.length_buckets)
        ids, mask = pad_rows(rows, self.config.pad_token_id, (b, t))  # (B, T); padding rows all masked
        logits = np.asarray(self._forward((b, t), ids, mask))  # (B, C)
        with self._lock:
            self._batches += 1
            self._batched_texts += n
        return logits[:n]

    def _run_and_report(self, rows: Sequence[Sequence[int]], waits: Sequence[float]) -> np.ndarray:
        """Logits (len(rows), C) of token rows, in the compiled calls plan_calls picks (one per length
        group); every call is reported to the batch listeners."""
        logits = np.zeros((len(rows), self.config.num_classes), np.float32)
        for group in plan_calls([len(r) for r in rows], self.batch_buckets, self.length_buckets):
            start = time.perf_counter()
            logits[group] = self._run([rows[i] for i in group])
            record = BatchRecord(len(group), bucket_for(len(group), self.batch_buckets),
                                 bucket_for(max(len(rows[i]) for i in group), self.length_buckets),
                                 tuple(waits[i] for i in group), time.perf_counter() - start)
            for listener in self._batch_listeners:
                try:
                    listener(record)
                except Exception:  # a metrics bug must not take the batcher down
                    logger.exception("batch listener %r failed", listener)
        return logits

    def _run_queued(self, items: list[QueuedText]) -> list[PredictionResult | np.ndarray]:
        """The batcher's `run`: one batch of queued rows. A text read in one row gets its result, timed
        from its submission; a window of a longer text its logits row, which its DocumentFuture pools."""
        with ServingRequest(self):
            start = time.monotonic()
            logits = self._run_and_report([i.ids for i in items], [start - i.enqueued_at for i in items])
        out: list[PredictionResult | np.ndarray] = list(logits)
        whole = [k for k, item in enumerate(items) if item.rows_of_text == 1]
        done = time.monotonic()
        for k, result in zip(whole, self._results([items[k].text for k in whole], logits[whole], [1] * len(whole))):
            out[k] = dataclasses.replace(result, processing_time_ms=1000 * (done - items[k].enqueued_at))
        return out

    def _results(self, texts: Sequence[str], logits: np.ndarray, windows: Sequence[int]) -> list[PredictionResult]:
        """Results of texts from their (N, C) logits (pooled already), cached."""
        out = []
        for text, row, k, p in zip(texts, logits, windows, predictions(logits, self.labels)):
            result = PredictionResult(p["label"], p["confidence"], p["probabilities"], tuple(float(x) for x in row),
                                      self.version, windows=k)
            self.cache.put((self.version, text), result)
            out.append(result)
        return out

    def _pooled_result(self, text: str, windows: Windows, logits: np.ndarray, since: float) -> PredictionResult:
        """A text's result from its windows' (k, C) logits, pooled by the model's rule; cached, timed from `since`."""
        pooled = logits if len(logits) == 1 else windows.pool(logits, self.config.chunk_pooling)
        [result] = self._results([text], pooled, [len(logits)])
        return dataclasses.replace(result, processing_time_ms=1000 * (time.monotonic() - since))

    def _cached(self, text: str, since: float) -> PredictionResult | None:
        hit = self.cache.get((self.version, text))
        if hit is None:
            return None
        return dataclasses.replace(hit, cached=True, processing_time_ms=1000 * (time.monotonic() - since))

    def _encode(self, text: str, where: str) -> Windows:
        """The rows the model reads for a text (one, or its windows under chunks); `where` names it in errors.

        DocumentTooLongError past max_chunks under chunk_overflow=refuse; InferenceError if the
        tokenizer fails on it, a Rust panic included.
        """
        encoder = self.classifier.encoder
        try:
            if encoder.chunking is None:  # one row; encode() of one text, not encode_batch's thread pool
                return Windows([encoder.ids_one(text)], np.zeros(1, np.int64), 1)
            return encoder.windows([text])
        except TextTooLongError as e:
            raise DocumentTooLongError(f"{where}: {e}") from None
        except BaseException as e:
            # pyo3's PanicException is a BaseException: it would pass every `except Exception` above us.
            if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                raise
            logger.error("the tokenizer failed on a text of %d characters: %s: %s", len(text), type(e).__name__, e)
            raise InferenceError(f"the tokenizer failed on this text ({type(e).__name__})") from None

    def _prepare(self, texts: Sequence[str], first_index: int = 0) -> list[PredictionResult | Windows]:
        """Per text its cached result or its rows. A full queue refuses before the costly part, tokenizing
        (each text is at least one row; enqueue counts the windows); a text refused by the long-text
        rule refuses the whole request."""
        now = time.monotonic()
        hits: list[PredictionResult | Windows | None] = [self._cached(text, now) for text in texts]
        misses = sum(hit is None for hit in hits)
        with self._lock:
            self._requests += len(texts)
        if misses and self.batching:
            self._batcher.check_room(misses)
        single = len(texts) == 1 and first_index == 0
        return [hit if hit is not None else self._encode(text, "text" if single else f"texts[{first_index + i}]")
                for i, (text, hit) in enumerate(zip(texts, hits))]

    def _enqueue(self, texts: Sequence[str], prepared: Sequence[PredictionResult | Windows],
                 ) -> list[concurrent.futures.Future]:
        """All-or-nothing: every window of every text is queued (a cache hit answered now) or QueueFullError."""
        with ServingRequest(self):
            futures: list[concurrent.futures.Future] = []
            pending: list[QueuedText] = []
            now = time.monotonic()
            deadline = now + self.request_timeout_s
            for text, entry in zip(texts, prepared):
                if isinstance(entry, PredictionResult):
                    future: concurrent.futures.Future = concurrent.futures.Future()
                    future.set_result(entry)
                else:  # every row is at most the model's max length: it fits the largest length bucket
                    k = len(entry.rows)
                    rows = [QueuedText(text, row, now, deadline, concurrent.futures.Future(), k) for row in entry.rows]
                    pending += rows
                    future = rows[0].future if k == 1 else DocumentFuture([r.future for r in rows], functools.partial(
                        self._pooled_result, text, entry, since=now))
                futures.append(future)
            if pending:
                self._batcher.enqueue(pending)  # counts rows: a long document takes its windows' room
            return futures

    def submit(self, text: str) -> concurrent.futures.Future:
        """Queue one text; the future resolves to a PredictionResult or raises an InferenceError."""
        with ServingRequest(self):
            return self._enqueue([text], self._prepare([text]))[0]

    # --- public API ----------------------------------------------------------------------------

    def predict_single(self, text: str) -> PredictionResult:
        """Label, confidence and probabilities of one text."""
        return self.predict_batch([text]).results[0]

    def predict_batch(self, texts: Sequence[str]) -> BatchPredictionResult:
        """Predictions for any number of texts, in request order.

        With batching, the texts' rows join the shared queue (max_queue_size at a time) and may run
        alongside other requests; without, they run in this thread in chunks of max_batch_size texts.
        """
        if isinstance(texts, str):
            raise TypeError("predict_batch takes a list of texts; use predict_single for one text")
        started = time.perf_counter()
        texts = list(texts)
        if not self.batching:
            results = self._predict_unbatched(texts)
        else:
            results = []
            for start in range(0, len(texts), self.max_queue_size):
                chunk = texts[start:start + self.max_queue_size]
                with ServingRequest(self):
                    prepared = self._prepare(chunk, start)
                rows = [1 if isinstance(p, PredictionResult) else len(p.rows) for p in prepared]
                for part in window_parts(rows, self.max_queue_size):  # each part fits an idle queue
                    deadline = time.monotonic() + self.request_timeout_s
                    futures = self._enqueue([chunk[i] for i in part], [prepared[i] for i in part])
                    results += [self._batcher.wait(f, deadline) for f in futures]
        return BatchPredictionResult(results, self.version, 1000 * (time.perf_counter() - started))

    def _predict_unbatched(self, texts: list[str]) -> list[PredictionResult]:
        if self._batcher.closing:
            raise EngineClosedError("the inference engine is shutting down; retry on another replica")
        since = time.monotonic()
        with ServingRequest(self):
            prepared = self._prepare(texts)
            results = [p if isinstance(p, PredictionResult) else None for p in prepared]
            todo = [i for i, r in enumerate(results) if r is None]
            for start in range(0, len(todo), self.max_batch_size):
                chunk = todo[start:start + self.max_batch_size]
                rows = [row for i in chunk for row in prepared[i].rows]  # plan_calls cuts them into batches
                logits = self._run_and_report(rows, [0.0] * len(rows))
                offset = 0
                for i in chunk:
                    k = len(prepared[i].rows)
                    results[i] = self._pooled_result(texts[i], prepared[i], logits[offset:offset + k], since)
                    offset += k
            return results  # type: ignore[return-value]

    async def predict_async(self, text: str) -> PredictionResult:
        """predict_single for asyncio callers; never blocks the event loop."""
        if not self.batching:
            return await asyncio.get_running_loop().run_in_executor(None, self.predict_single, text)
        return await self._batcher.wait_async(self.submit(text))

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop accepting requests, finish the queued ones, stop the batcher. Idempotent."""
        self._batcher.close(timeout)

    def __enter__(self) -> "InferenceEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# The original framework's module-level functions.

def predict_single(text: str, engine: InferenceEngine) -> PredictionResult:
    """`engine.predict_single(text)`."""
    return engine.predict_single(text)


def predict_batch(texts: Sequence[str], engine: InferenceEngine) -> BatchPredictionResult:
    """`engine.predict_batch(texts)`: any number of texts, in order."""
    return engine.predict_batch(texts)
