"""A bulk prediction job: stream a corpus through the model on every local device, into committed shards.

    summary = run("runs/default/model", ["crawl/*.jsonl"], "preds/", BulkConfig(id_field="id"))

The pipeline, per process:

    read (Grain source, this process's shards only) -> tokenize (background thread, the tokenizer's
    thread pool; under long_text=chunks a long text becomes one token row per window of it) -> sort
    each sort window by length, cut into bucketed calls sharded over the local devices
    (BucketedForward; GraphForward under --backend onnxruntime|openvino, on the CPU) -> pool each
    text's rows (chunks) -> softmax -> write the shard (one row per input row), commit it, record it
    in the manifest

Device calls are asynchronous: window k is dispatched before window k-1's results are written,
so the host writes while the devices compute. Under jax.distributed (flags or the scheduler's
environment) process p of N predicts the shards k with k % N == p; at the end every process waits
for the others and process 0 writes summary.json. Re-running the same command resumes: committed
shards are skipped, the rest redone (see jaxclf.bulk.writer).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from jaxclf import classifier, model_dir
from jaxclf.bulk import reader, summary as summaries
from jaxclf.bulk.forward import BucketedForward, GraphForward
from jaxclf.bulk.reader import BadRow, Chunk
from jaxclf.bulk.spec import BulkConfig
from jaxclf.bulk.writer import SUMMARY_FILE, OutputDir, ShardWriter, now_iso, shard_name
from jaxclf.config import ConfigError
from jaxclf.train.data import DataError

logger = logging.getLogger(__name__)

REGISTRY_ENV = "JAXCLF_REGISTRY"


@dataclasses.dataclass(frozen=True)
class ModelSource:
    path: Path  # the model directory
    ref: str  # what the user named: a directory or NAME@ALIAS / NAME@vN
    version: str  # NAME@vN from a registry, else a content hash (as the server reports it)


def resolve_model(model: str, registry: str | None = None) -> ModelSource:
    """A model directory, or a registry reference (with --registry ROOT or $JAXCLF_REGISTRY), checked."""
    from jaxclf.serve.engine import model_version  # the server's version string, so the two agree

    root = registry or (os.environ.get(REGISTRY_ENV) if not Path(model).is_dir() else None)
    if root is None:
        if not Path(model).is_dir() and "@" in model:
            raise ConfigError(f"--model {model!r} is not a directory; to use a registry version, give "
                              f"--registry ROOT or set {REGISTRY_ENV}")
        path = model_dir.check_files(model)
        return ModelSource(path, model, model_version(path))
    from jaxclf.registry import Registry
    version = Registry(root, create=False).checked(model)
    return ModelSource(version.path, model, version.ref)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


class _Progress:
    """tqdm over input bytes (so the ETA holds for any row size), with this process's rows/s beside it."""

    def __init__(self, total_bytes: int, enabled: bool | None, label: str):
        from tqdm import tqdm
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=label, disable=not enabled,
                        dynamic_ncols=True, mininterval=0.5)
        self.started = time.perf_counter()
        self.rows = 0

    def advance(self, input_bytes: int, rows: int) -> None:
        self.rows += rows
        self.bar.update(max(0, input_bytes - self.bar.n))
        rate = self.rows / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} rows/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


class _ShardAssembler:
    """Turns finished windows into shards: one open shard at a time, committed when its block ends."""

    def __init__(self, out: OutputDir, config: BulkConfig, labels: Sequence[str], run: dict[str, Any]):
        self.out, self.config, self.labels = out, config, list(labels)
        self.manifest = out.own_manifest()
        self.manifest["runs"].append(run)
        self.run = run
        self.run_started = time.perf_counter()
        self.writer: ShardWriter | None = None
        self._label_ids: list[np.ndarray] = []
        self._confidence: list[np.ndarray] = []
        self._bad: list[BadRow] = []

    def add(self, chunk: Chunk, logits: np.ndarray) -> None:
        if self.writer is not None and self.writer.block != chunk.block:
            self.commit(rows=self.config.shard_rows)  # a later block started: this one is whole
        if self.writer is None:
            self.writer = ShardWriter(self.out, chunk.block, self.config.format, self.labels, self.config.logits,
                                      ids_are_positions=self.config.id_field is None)
        probabilities = classifier.softmax(logits)
        self.writer.add(chunk.ids, logits, probabilities)
        self._label_ids.append(probabilities.argmax(axis=1))
        self._confidence.append(probabilities.max(axis=1))
        self._bad.extend(chunk.bad)

    def commit(self, rows: int) -> None:
        """Put the open shard in place and record it (covering `rows` input rows) in the manifest."""
        writer, self.writer = self.writer, None
        if writer is None:
            return
        size = writer.commit()
        label_ids = np.concatenate(self._label_ids) if self._label_ids else np.zeros(0, np.int64)
        confidence = np.concatenate(self._confidence) if self._confidence else np.zeros(0)
        entry = summaries.shard_entry(writer.block, shard_name(writer.block, self.config.format), size,
                                      writer.block * self.config.shard_rows, rows, self.labels, label_ids,
                                      confidence, sorted(self._bad, key=lambda b: b.position))
        self._label_ids, self._confidence, self._bad = [], [], []
        self.manifest["shards"].append(entry)
        self.run["predictions"] += entry["predictions"]
        self.run["seconds"] = round(time.perf_counter() - self.run_started, 3)
        self.out.save_manifest(self.manifest)
        logger.debug("committed %s: %d predictions, %d bad rows", entry["file"], entry["predictions"],
                     len(entry["bad_rows"]))

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.discard()
            self.writer = None


def job_settings(source: ModelSource, labels: Sequence[str], files: Sequence[reader.InputFile],
                 config: BulkConfig) -> dict[str, Any]:
    """What makes the output of a job: a resumed run must match it exactly (job.json)."""
    return {"model_version": source.version, "labels": list(labels),
            "inputs": [f.fingerprint() for f in files], "text_field": config.text_field,
            "id_field": config.id_field, "shard_rows": config.shard_rows, "output_format": config.format,
            "logits": config.logits, **({"dtype": config.dtype} if config.dtype else {}),
            **({"backend": config.backend} if config.backend != "jax" else {})}


def _check_parquet(config: BulkConfig) -> None:
    if config.format == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise ConfigError("--format parquet needs pyarrow: pip install 'jaxclf[parquet]'") from None


def run(model: str, inputs: Sequence[str], output: str | os.PathLike, config: BulkConfig = BulkConfig(),
        registry: str | None = None) -> dict[str, Any]:
    """Predict every row of `inputs` into shards under `output`; returns summary.json's content.

    In a multi-process job every process returns the summary too (process 0 writes the file).
    """
    started = time.perf_counter()
    process, processes = jax.process_index(), jax.process_count()
    source = resolve_model(str(model), registry)
    files = reader.resolve_inputs(list(inputs), config.input_format)
    reader.check_fields(files, config)
    _check_parquet(config)
    out = OutputDir(output, process)
    if config.restart and process == 0:
        out.clear()
    _barrier("jaxclf-bulk-restart")  # nobody writes before process 0 has cleared
    if config.compilation_cache:
        from jaxclf.serve.compilation import enable_compilation_cache
        enable_compilation_cache(config.compilation_cache)  # before loading: loading compiles too
    clf = classifier.load(source.path, dtype=config.dtype, with_weights=config.backend == "jax")
    out.prepare(job_settings(source, clf.labels, files, config))
    done = out.committed()
    if config.backend == "jax":
        forward = BucketedForward(clf, config.batch_size)
    else:  # the exported graph on this host's CPU, as the serving engine runs it
        from jaxclf.serve.onnx_backend import graph_runner
        forward = GraphForward(clf.config, config.batch_size,
                               graph_runner(config.backend, config.onnx_file, source.path, clf.config.dtype))
    run_record = {"started_at": now_iso(), "process_count": processes, "devices": forward.num_devices,
                  "startup_seconds": round(time.perf_counter() - started, 3), "predictions": 0, "seconds": 0.0,
                  "compile_seconds": 0.0}
    logger.info("process %d of %d: %s (version %s) on %d device(s); %d shard(s) already committed in %s",
                process, processes, source.path, source.version, forward.num_devices, len(done), out.path)

    def wanted(block: int) -> bool:
        return block % processes == process and block not in done

    assembler = _ShardAssembler(out, config, clf.labels, run_record)
    progress = _Progress(sum(f.size for f in files), config.progress,
                         "predict" if processes == 1 else f"predict p{process}")
    total_rows = _stream(reader.chunk_stream(files, config, clf.encoder, wanted), forward, assembler, config,
                         progress)
    logger.info("process %d: %d predictions in %.1fs (%d buckets compiled in %.1fs)", process,
                run_record["predictions"], run_record["seconds"], forward.compilations, forward.compile_seconds)
    _barrier("jaxclf-bulk-done")
    return _finish(out, source, total_rows, config)


def _stream(stream, forward: BucketedForward | GraphForward, assembler: _ShardAssembler, config: BulkConfig,
            progress: _Progress) -> int:
    """Run every chunk through the model into the assembler; returns the input's row count."""
    chunks = iter(stream)
    pending: tuple[Chunk, list] | None = None
    try:
        for chunk in chunks:
            if chunk.total_rows is not None:
                break
            if chunk.bad and not config.skip_bad:
                raise DataError(f"{chunk.bad[0]} (--skip-bad counts and lists bad rows instead of failing)")
            calls = forward.dispatch(chunk.tokens)  # queued on the devices; the previous window is written now
            if pending is not None:
                _write(pending, forward, assembler, progress)
            pending = (chunk, calls)
        else:
            raise RuntimeError("the input stream ended without its row count")  # iter_chunks always sends it
        if pending is not None:
            _write(pending, forward, assembler, progress)
        total_rows = chunk.total_rows
        if total_rows == 0:
            raise DataError("the input has no rows (every file is empty or blank)")
        last_block = (total_rows - 1) // config.shard_rows
        if assembler.writer is not None:
            block = assembler.writer.block
            assembler.commit(rows=config.shard_rows if block < last_block
                             else total_rows - block * config.shard_rows)
        return total_rows
    finally:
        assembler.discard()
        progress.close()
        chunks.close()


def _write(pending: tuple[Chunk, list], forward: BucketedForward | GraphForward, assembler: _ShardAssembler,
           progress: _Progress) -> None:
    chunk, calls = pending
    assembler.run["compile_seconds"] = round(forward.compile_seconds, 3)  # saved with the next commit
    logits = forward.gather(calls, len(chunk.tokens))  # one row per window
    if len(chunk.tokens) != len(chunk.positions):  # long_text=chunks: one text, several windows
        logits = chunk.windows.pool(logits, forward.config.chunk_pooling)
    assembler.add(chunk, logits)
    progress.advance(chunk.input_bytes, len(chunk.positions))


def _finish(out: OutputDir, source: ModelSource, total_rows: int, config: BulkConfig) -> dict[str, Any]:
    """summary.json once every shard is committed (by process 0), else an error naming the missing shards."""
    committed = out.committed()
    blocks = math.ceil(total_rows / config.shard_rows)
    missing = [b for b in range(blocks) if b not in committed]
    if missing:
        raise DataError(f"{len(missing)} of {blocks} shards are not committed in {out.path} (first: "
                        f"{shard_name(missing[0], config.format)}); a process stopped early: rerun the same "
                        f"command to finish them")
    job = out.job()
    job["model"] = {"ref": source.ref, "path": str(source.path), "version": source.version}
    result = summaries.build_summary(job, committed, out.manifests(), total_rows, str(out.path))
    if out.process_index == 0:
        out.write_json(SUMMARY_FILE, result)
    return result
