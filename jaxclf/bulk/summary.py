"""What a bulk job produced: per-shard statistics in the manifests, and summary.json once every shard is in.

summary.json: the model (reference, directory, version), the input row count, predictions per label,
a histogram of confidences (CONFIDENCE_BINS equal bins over [0, 1]), the bad rows (all counted, the
first BAD_ROWS_LISTED listed as `file:line: problem`), and throughput: per process its predictions
and the seconds it spent on them (start-up apart; compiling each bucket on first use included, and
also given apart), summed over resumed runs.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from jaxclf.bulk.reader import BadRow

CONFIDENCE_BINS = 20
BAD_ROWS_LISTED = 1000  # summary.json lists this many bad rows; the manifests keep every one


def confidence_counts(confidence: np.ndarray) -> np.ndarray:
    """int64 (CONFIDENCE_BINS,): how many confidences fall in each bin of [0, 1] (1.0 in the last)."""
    return np.histogram(confidence, bins=CONFIDENCE_BINS, range=(0.0, 1.0))[0]


def shard_entry(block: int, file: str, size: int, first_position: int, rows: int, labels: Sequence[str],
                label_ids: np.ndarray, confidence: np.ndarray, bad: Sequence[BadRow]) -> dict[str, Any]:
    """The manifest record of one committed shard: what it covers and what it holds."""
    counts = np.bincount(label_ids, minlength=len(labels)) if len(label_ids) else np.zeros(len(labels), int)
    return {
        "block": block, "file": file, "bytes": size,
        "first_position": first_position, "rows": rows,  # input positions [first, first + rows)
        "predictions": int(len(label_ids)),
        "label_counts": {label: int(n) for label, n in zip(labels, counts)},
        "confidence_counts": [int(n) for n in (confidence_counts(confidence) if len(confidence)
                                               else np.zeros(CONFIDENCE_BINS, int))],
        "bad_rows": [{"position": b.position, "row": b.where, "problem": b.problem} for b in bad],
    }


def build_summary(job: Mapping[str, Any], committed: Mapping[int, Mapping[str, Any]],
                  manifests: Sequence[Mapping[str, Any]], total_rows: int, output: str) -> dict[str, Any]:
    """summary.json from job.json, the committed shards (block -> entry) and every process's manifest."""
    labels = job["labels"]
    entries = [committed[block] for block in sorted(committed)]
    label_counts = {label: sum(e["label_counts"][label] for e in entries) for label in labels}
    histogram = np.sum([e["confidence_counts"] for e in entries], axis=0, dtype=np.int64) if entries \
        else np.zeros(CONFIDENCE_BINS, np.int64)
    bad = [b for e in entries for b in e["bad_rows"]]
    processes = []
    for manifest in manifests:
        runs = manifest.get("runs", [])
        predictions = sum(r["predictions"] for r in runs)
        seconds = sum(r["seconds"] for r in runs)
        processes.append({"process": manifest["process"], "runs": len(runs), "predictions": predictions,
                          "seconds": round(seconds, 3), "startup_seconds": round(sum(r["startup_seconds"]
                                                                                    for r in runs), 3),
                          "compile_seconds": round(sum(r["compile_seconds"] for r in runs), 3),
                          "devices": max((r["devices"] for r in runs), default=0),
                          "rows_per_second": round(predictions / seconds, 1) if seconds > 0 else None})
    return {
        "model": job["model"],
        "output": {"directory": output, "format": job["output_format"], "shards": len(entries)},
        "rows": total_rows,
        "predictions": sum(e["predictions"] for e in entries),
        "label_counts": label_counts,
        "confidence_histogram": {"edges": np.linspace(0.0, 1.0, CONFIDENCE_BINS + 1).round(4).tolist(),
                                 "counts": histogram.tolist()},
        "bad_rows": {"count": len(bad), "listed": [f"{b['row']}: {b['problem']}" for b in bad[:BAD_ROWS_LISTED]]},
        "throughput": {
            # Processes run side by side: the job's rate is the sum of theirs.
            "rows_per_second": round(sum(p["rows_per_second"] or 0.0 for p in processes), 1),
            "processes": processes,
        },
    }
