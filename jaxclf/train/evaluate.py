"""Evaluation: logits and true labels -> one report, the same for the training loop, `jaxclf evaluate` and Trainer.

    report = evaluate_classifier(jaxclf.load("runs/default/model"), texts, labels)
    report["accuracy"], report["macro_f1"], report["loss"], report["per_class"]["positive"]["f1"]

The report is what a model directory's metrics.json records under "eval": the metrics of
jaxclf.metrics.classification_report, the mean loss, the expected calibration error ("ece", in
jaxclf.calibration.ECE_BINS equal-width bins) and Brier score ("brier"), and the distributions the
server's drift monitor compares live traffic with (confidence_histogram, predicted_label_counts).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxclf import calibration
from jaxclf.classifier import TextClassifier, softmax
from jaxclf.metrics import classification_report, mean_cross_entropy
from jaxclf.train import batches, data, sharding

CONFIDENCE_BINS = 10  # equal-width bins of the top-class probability over [0, 1]


def evaluation_report(logits: np.ndarray, label_ids: Sequence[int], label_names: Sequence[str]) -> dict[str, Any]:
    """The evaluation report of (N, C) logits against (N,) true label ids; JSON-ready."""
    logits = np.asarray(logits, np.float32)
    y = np.asarray(label_ids, np.int64)
    if logits.shape != (len(y), len(label_names)):
        raise ValueError(f"logits of shape {logits.shape} for {len(y)} labels and {len(label_names)} classes")
    report = classification_report(y, logits.argmax(-1), label_names, loss=mean_cross_entropy(logits, y))
    probs = softmax(logits.astype(np.float64))
    report["ece"] = calibration.expected_calibration_error(probs, y) if len(y) else 0.0
    report["brier"] = calibration.brier_score(probs, y) if len(y) else 0.0
    report["confidence_histogram"] = np.histogram(probs.max(-1), bins=CONFIDENCE_BINS, range=(0, 1))[0].tolist()
    report["predicted_label_counts"] = np.bincount(probs.argmax(-1), minlength=len(label_names)).tolist()
    return report


def evaluate_classifier(clf: TextClassifier, texts: Sequence[str], labels: Sequence[str], *,
                        source: str | os.PathLike = "evaluation data", lines: Sequence[int] | None = None,
                        batch_size: int = 64) -> dict[str, Any]:
    """Evaluate a classifier on labelled texts; a label the model does not know is a DataError naming `source`.

    A calibrated model (config.temperature != 1) also gets "uncalibrated": the ECE, Brier score and
    loss of its logits at temperature 1, i.e. before the export's temperature scaling.
    """
    y = data.label_ids(labels, clf.labels, source, lines=lines)
    logits = clf.logits(list(texts), batch_size=batch_size)
    report = evaluation_report(logits, y, clf.labels)
    temperature = clf.config.temperature
    if temperature != 1.0 and len(y):
        raw = np.asarray(logits, np.float64) * temperature  # the model divides by its temperature last
        probs = softmax(raw)
        report["uncalibrated"] = {"temperature": temperature,
                                  "ece": calibration.expected_calibration_error(probs, y),
                                  "brier": calibration.brier_score(probs, y),
                                  "loss": mean_cross_entropy(raw, y)}
    return report


def sharded_logits(eval_step: Callable, params: Any, ds: batches.TokenizedDataset, *, mesh,
                   global_batch_size: int, buckets: Sequence[int], pad_id: int,
                   pooling: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, C), label ids (N,)) of every TEXT of `ds` on host, computed by a jitted, sharded eval_step.

    Every process runs every batch (the call is collective) and gets the same full result. Under
    long_text=chunks the rows are windows: their logits are pooled per text by `pooling` (the
    model's chunk_pooling), so a long document is scored once, as jaxclf.load(...).logits scores it.
    """
    all_logits, all_labels, all_weights = [], [], []
    for batch in batches.eval_batches(ds, global_batch_size=global_batch_size, buckets=buckets, pad_id=pad_id,
                                   process_index=jax.process_index(), process_count=jax.process_count()):
        all_logits.append(np.asarray(eval_step(params, sharding.global_batch(batch, mesh))))
        all_labels.append(sharding.gather_to_host(batch["labels"]))
        all_weights.append(sharding.gather_to_host(batch["weights"]))
    real = np.concatenate(all_weights) > 0  # the last batch's padding rows have weight 0
    row_logits, row_labels = np.concatenate(all_logits)[real], np.concatenate(all_labels)[real]
    if ds.owner is None:
        return row_logits, row_labels
    return ds.pool(row_logits, pooling), ds.text_labels  # eval batches keep the rows' order
