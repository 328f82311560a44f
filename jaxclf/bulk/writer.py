"""The output directory of a bulk job: numbered shards committed atomically, and a manifest of what each covers.

    OUTPUT/job.json               what the job is (inputs, fields, shard size, model version, format)
    OUTPUT/part-000000.jsonl      predictions of input rows [0, shard_rows), in input order
    OUTPUT/part-000001.jsonl      ... [shard_rows, 2 × shard_rows), and so on (or .parquet)
    OUTPUT/manifest-p00000.json   the shards process 0 committed: rows covered, bad rows, label counts
    OUTPUT/summary.json           written once every shard is committed (jaxclf.bulk.summary)

Shard k always holds input rows [k × shard_rows, (k+1) × shard_rows), whichever process wrote it,
so the shards of an N-process run are the files of a 1-process run. A shard is written to a
temporary file, flushed to disk and renamed into place, and only then recorded in its process's
manifest (itself replaced atomically): a shard that a manifest lists is complete. After a kill, the
same command skips the listed shards and redoes the rest: every row ends up exactly once.

JSON Lines rows: {"id", "label", "confidence", "probabilities": {label: p}} (+ "logits": [...]).
Parquet columns: id (int64 input positions, or the id field as a string), label, confidence,
probabilities (a struct with one float64 field per label), logits (list<float32>, with --logits).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from jaxclf.errors import JaxclfError

json_string = json.encoder.encode_basestring_ascii  # a str as a JSON string literal (json's own C function)

FORMAT = "jaxclf-bulk-predictions"
FORMAT_VERSION = 1
JOB_FILE, SUMMARY_FILE = "job.json", "summary.json"
SHARD_EXTENSIONS = {"jsonl": ".jsonl", "parquet": ".parquet"}


class OutputError(JaxclfError, ValueError):
    """The output directory holds something else than this job's output (another job, foreign files)."""


def shard_name(block: int, fmt: str) -> str:
    return f"part-{block:06d}{SHARD_EXTENSIONS[fmt]}"


def manifest_name(process_index: int) -> str:
    return f"manifest-p{process_index:05d}.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary(path: Path, process_index: int) -> Path:
    # Per process: two processes may write the same file name (job.json, summary.json) at once.
    return path.with_name(f".{path.name}.tmp-p{process_index}")


def commit_file(tmp: Path, path: Path) -> None:
    """Make a fully written temporary file durable, then rename it to `path` in one step."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any, process_index: int = 0) -> None:
    tmp = _temporary(path, process_index)
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    commit_file(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise OutputError(f"{path}: cannot read it as JSON ({e}); it was not written by jaxclf predict") from e


class OutputDir:
    """One job's output directory, seen from one process."""

    def __init__(self, path: str | os.PathLike, process_index: int = 0):
        self.path = Path(path)
        self.process_index = process_index
        self.manifest_path = self.path / manifest_name(process_index)

    # --- the job's identity -------------------------------------------------------------------

    def clear(self) -> None:
        """Delete a previous job's files (only files this module writes); for --restart."""
        if not self.path.is_dir():
            return
        for entry in self.path.iterdir():
            name = entry.name.lstrip(".")
            if entry.is_file() and (name.startswith(("part-", "manifest-p", JOB_FILE, SUMMARY_FILE))):
                entry.unlink()

    def prepare(self, settings: Mapping[str, Any]) -> None:
        """Create the directory and job.json, or check that the job there is this one."""
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"--output {self.path} is a file; give a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        job_file = self.path / JOB_FILE
        settings = {"format": FORMAT, "format_version": FORMAT_VERSION, **settings}
        if job_file.exists():
            previous = read_json(job_file)
            changed = [f"{key}: was {previous.get(key)!r}, now {settings.get(key)!r}"
                       for key in sorted(set(previous) | set(settings)) if previous.get(key) != settings.get(key)]
            if changed:
                raise OutputError(f"{self.path} holds the output of a different job ({'; '.join(changed)}); "
                                  f"use another --output, or --restart to delete it and start over")
        else:
            foreign = sorted(p.name for p in self.path.iterdir() if not p.name.startswith("."))
            if any(name.startswith(("part-", "manifest-p")) for name in foreign):
                raise OutputError(f"{self.path} holds shards but no {JOB_FILE}; use an empty --output "
                                  f"directory, or --restart")
            write_json_atomic(job_file, settings, self.process_index)
        for stale in self.path.glob(f".*.tmp-p{self.process_index}"):  # left by a killed run of this process
            stale.unlink()

    def job(self) -> dict[str, Any]:
        return read_json(self.path / JOB_FILE)

    # --- manifests ----------------------------------------------------------------------------

    def manifests(self) -> list[dict[str, Any]]:
        return [read_json(p) for p in sorted(self.path.glob("manifest-p*.json"))]

    def own_manifest(self) -> dict[str, Any]:
        if self.manifest_path.exists():
            return read_json(self.manifest_path)
        return {"process": self.process_index, "shards": [], "runs": []}

    def committed(self) -> dict[int, dict[str, Any]]:
        """block -> manifest entry, for every shard some process committed and whose file is intact."""
        out = {}
        for manifest in self.manifests():
            for entry in manifest["shards"]:
                shard = self.path / entry["file"]
                if shard.is_file() and shard.stat().st_size == entry["bytes"]:
                    out[entry["block"]] = entry
        return out

    def save_manifest(self, manifest: Mapping[str, Any]) -> None:
        write_json_atomic(self.manifest_path, manifest, self.process_index)

    def write_json(self, name: str, obj: Any) -> None:
        write_json_atomic(self.path / name, obj, self.process_index)


class ShardWriter:
    """Predictions of one block, written to a temporary file; commit() puts the shard in place."""

    def __init__(self, out: OutputDir, block: int, fmt: str, labels: Sequence[str], with_logits: bool,
                 ids_are_positions: bool):
        self.out, self.block, self.fmt = out, block, fmt
        self.labels, self.with_logits = list(labels), with_logits
        self.ids_are_positions = ids_are_positions
        self.path = out.path / shard_name(block, fmt)
        self.tmp = _temporary(self.path, out.process_index)
        self.rows = 0
        if fmt == "jsonl":
            self._file = open(self.tmp, "w", encoding="utf-8")
        else:
            self._columns: dict[str, list] = {"id": [], "label": [], "confidence": [], "probabilities": [],
                                              "logits": []}

    def add(self, ids: Sequence[Any], logits: np.ndarray, probabilities: np.ndarray) -> None:
        """Rows in input order: ids (N,), float32 logits (N, C), float64 probabilities (N, C)."""
        best = probabilities.argmax(axis=1)
        confidence = probabilities[np.arange(len(best)), best]
        if self.fmt == "jsonl":
            self._add_jsonl(ids, best, confidence, logits, probabilities)
        else:
            c = self._columns
            c["id"].extend(ids if self.ids_are_positions else [str(i) for i in ids])
            c["label"].extend(self.labels[k] for k in best)
            c["confidence"].extend(confidence.tolist())
            c["probabilities"].append(probabilities)
            c["logits"].append(logits)
        self.rows += len(best)

    def _add_jsonl(self, ids, best, confidence, logits, probabilities) -> None:
        if not np.isfinite(logits).all():  # NaN/inf: json.dumps writes them as it can; %r would not be JSON
            lines = [json.dumps(self._record(*row)) for row in zip(ids, best.tolist(), confidence.tolist(),
                                                                    probabilities.tolist(), logits.tolist())]
        else:
            # A fixed template is ~4x faster than json.dumps on a dict; %r of a float is what json writes.
            template, labels = self._template(), self._label_json
            ids = [str(i) if type(i) is int else json_string(i) for i in ids]  # ids are ints or strings
            if self.with_logits:
                lines = [template % (i, labels[b], c, *p, *l) for i, b, c, p, l in
                         zip(ids, best.tolist(), confidence.tolist(), probabilities.tolist(), logits.tolist())]
            else:
                lines = [template % (i, labels[b], c, *p) for i, b, c, p in
                         zip(ids, best.tolist(), confidence.tolist(), probabilities.tolist())]
        if lines:
            self._file.write("\n".join(lines) + "\n")

    def _record(self, row_id, best, confidence, probabilities, logits) -> dict[str, Any]:
        record = {"id": row_id, "label": self.labels[best], "confidence": confidence,
                  "probabilities": dict(zip(self.labels, probabilities))}
        if self.with_logits:
            record["logits"] = logits
        return record

    def _template(self) -> str:
        """One JSON line as a %-format: id (JSON), label (JSON), confidence, probabilities..., logits..."""
        if not hasattr(self, "_line_template"):
            self._label_json = [json.dumps(label, ensure_ascii=False) for label in self.labels]
            probs = ", ".join(f"{label.replace('%', '%%')}: %r" for label in self._label_json)
            line = '{"id": %s, "label": %s, "confidence": %r, "probabilities": {' + probs + "}"
            if self.with_logits:
                line += ', "logits": [' + ", ".join(["%r"] * len(self.labels)) + "]"
            self._line_template = line + "}"
        return self._line_template

    def _write_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        c = self._columns
        probs = np.concatenate(c["probabilities"]) if c["probabilities"] else np.zeros((0, len(self.labels)))
        columns = {
            "id": pa.array(c["id"], type=pa.int64() if self.ids_are_positions else pa.string()),
            "label": pa.array(c["label"], type=pa.string()),
            "confidence": pa.array(c["confidence"], type=pa.float64()),
            "probabilities": pa.StructArray.from_arrays(
                [pa.array(probs[:, k], type=pa.float64()) for k in range(len(self.labels))], names=self.labels),
        }
        if self.with_logits:
            logits = (np.concatenate(c["logits"]) if c["logits"] else np.zeros((0, len(self.labels)), np.float32))
            columns["logits"] = pa.FixedSizeListArray.from_arrays(
                pa.array(logits.reshape(-1), type=pa.float32()), len(self.labels))
        pq.write_table(pa.table(columns), self.tmp)

    def commit(self) -> int:
        """Flush, fsync and rename the shard into place; returns its size in bytes."""
        if self.fmt == "jsonl":
            self._file.close()
        else:
            self._write_parquet()
        commit_file(self.tmp, self.path)
        return self.path.stat().st_size

    def discard(self) -> None:
        if self.fmt == "jsonl":
            self._file.close()
        self.tmp.unlink(missing_ok=True)


def read_shard(path: Path, fmt: str) -> Iterator[dict[str, Any]]:
    """The rows of one shard as dicts (Parquet probabilities come back as {label: p})."""
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)
    else:
        import pyarrow.parquet as pq
        yield from pq.read_table(path).to_pylist()


def read_predictions(output: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Every prediction of a finished (or partial) job, merged across processes, in input order."""
    out = OutputDir(output)
    fmt = out.job()["output_format"]
    for block, entry in sorted(out.committed().items()):
        yield from read_shard(out.path / entry["file"], fmt)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
