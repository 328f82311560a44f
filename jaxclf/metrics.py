"""Evaluation metrics of a classifier: accuracy, macro-F1/precision/recall, per-class scores, confusion matrix, loss.

Plain numpy (no JAX): jaxclf.train.evaluate builds the full evaluation report on top of these.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts; rows are true classes, columns predictions."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return cm


def mean_cross_entropy(logits: np.ndarray, y_true: Sequence[int]) -> float:
    """Mean softmax cross-entropy of (N, C) logits against integer labels, computed in float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=-1))
    y = np.asarray(y_true, np.int64)
    return float((log_norm - z[np.arange(len(y)), y]).mean()) if len(y) else 0.0


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str],
                          loss: float | None = None) -> dict[str, Any]:
    """JSON-ready metrics. A class never predicted (or absent) has precision (recall) 0, as sklearn's zero_division=0."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    cm = confusion_matrix(y_true, y_pred, len(labels))
    tp = np.diag(cm).astype(np.float64)
    predicted, actual = cm.sum(0).astype(np.float64), cm.sum(1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    out: dict[str, Any] = {
        "accuracy": float(tp.sum() / max(len(y_true), 1)),
        "macro_f1": float(f1.mean()) if len(labels) else 0.0,
        "macro_precision": float(precision.mean()) if len(labels) else 0.0,
        "macro_recall": float(recall.mean()) if len(labels) else 0.0,
        "num_examples": int(len(y_true)),
        "per_class": {label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for label, p, r, f, s in zip(labels, precision, recall, f1, actual)},
        "confusion_matrix": cm.tolist(),
        "labels": list(labels),
    }
    if loss is not None:
        out["loss"] = float(loss)
    return out
