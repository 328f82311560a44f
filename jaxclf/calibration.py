"""Calibrated confidences: temperature scaling, expected calibration error, Brier score, reliability diagram.

    temperature = fit_temperature(eval_logits, eval_labels)   # minimises the NLL of softmax(logits / T)
    probs = softmax(eval_logits / temperature)
    expected_calibration_error(probs, eval_labels), brier_score(probs, eval_labels)

A model stores its temperature in config.json (ModelConfig.temperature) and divides its logits by
it (jaxclf.model, torch_ref.model), so predictions never change and confidences match accuracy.
Training fits it on the evaluation split at export (jaxclf.train.loop). NumPy only (matplotlib for
the diagram, imported when drawn): the scores and the fit run anywhere, torch_ref included.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from jaxclf.errors import JaxclfError

ECE_BINS = 15  # equal-width confidence bins of the expected calibration error (Guo et al., 2017)
TEMPERATURE_RANGE = (1e-2, 1e2)  # the fit searches log T in this interval
_TOLERANCE = 1e-7  # width of the final log T interval: T within 1e-7 relative


class CalibrationError(JaxclfError, ValueError):
    """Logits, probabilities or labels that cannot be scored or fitted; the message names the problem."""


def _checked(scores: np.ndarray, labels: Sequence[int], what: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) float64 scores and (N,) int64 labels, or a CalibrationError naming the mismatch."""
    scores = np.asarray(scores, np.float64)
    y = np.asarray(labels)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise CalibrationError(f"{what} must be a 2-D array (examples, classes >= 2), got shape {scores.shape}")
    if y.shape != (scores.shape[0],):
        raise CalibrationError(f"{what} has {scores.shape[0]} rows but labels have shape {y.shape}")
    if len(y) == 0:
        raise CalibrationError(f"no examples: {what} and labels are empty")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= scores.shape[1]:
        raise CalibrationError(f"labels must be class ids in [0, {scores.shape[1]}), got values "
                               f"{sorted(set(y.tolist()))[:5]}")
    if not np.isfinite(scores).all():
        raise CalibrationError(f"{what} hold NaN or infinite values")
    return scores, y.astype(np.int64)


def softmax(logits: np.ndarray) -> np.ndarray:
    """float64 probabilities (N, C) of logits (any float dtype): the one softmax of predictions and metrics."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / temperature)."""
    z = logits / temperature
    z = z - z.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=-1))
    return float((log_norm - z[np.arange(len(y)), y]).mean())


def negative_log_likelihood(logits: np.ndarray, labels: Sequence[int], temperature: float = 1.0) -> float:
    """Mean NLL (cross-entropy) of integer labels under softmax(logits / temperature)."""
    z, y = _checked(logits, labels, "logits")
    return _nll(z, y, temperature)


def fit_temperature(logits: np.ndarray, labels: Sequence[int]) -> float:
    """The T in TEMPERATURE_RANGE minimising the mean NLL of softmax(logits / T): golden-section search on log T.

    The NLL is convex in 1/T, so unimodal in log T: golden-section finds its minimum without
    derivatives or a starting guess. When every example is right with a margin, the NLL keeps
    falling as T -> 0 and the fit returns the lower bound (see `at_lower_bound`).
    """
    z, y = _checked(logits, labels, "logits")
    lo, hi = math.log(TEMPERATURE_RANGE[0]), math.log(TEMPERATURE_RANGE[1])
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = _nll(z, y, math.exp(a)), _nll(z, y, math.exp(b))
    while hi - lo > _TOLERANCE:
        if fa <= fb:  # the minimum lies in [lo, b]
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = _nll(z, y, math.exp(a))
        else:  # in [a, hi]
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = _nll(z, y, math.exp(b))
    return float(math.exp((lo + hi) / 2.0))


def at_lower_bound(temperature: float) -> bool:
    """True when a fit ran into the smallest temperature: every example right, the NLL falls as T -> 0.

    Such a fit would push every confidence to 1; the data do not say how sharp the model should be.
    (At the upper bound the logits carry almost no information and near-uniform confidences are right.)
    """
    return temperature <= TEMPERATURE_RANGE[0] * (1.0 + 1e-3)


def _bin_of(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Bin index of each confidence in `bins` equal-width bins (lo, hi] of [0, 1]; 0 goes to the first bin."""
    return np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)


def reliability_bins(probs: np.ndarray, labels: Sequence[int], bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin of top-class confidence: {"count", "confidence" (mean), "accuracy"}; NaN when empty."""
    p, y = _checked(probs, labels, "probabilities")
    if not isinstance(bins, int) or bins < 1:
        raise CalibrationError(f"bins must be a positive integer, got {bins!r}")
    confidence, correct = p.max(-1), (p.argmax(-1) == y).astype(np.float64)
    index = _bin_of(confidence, bins)
    count = np.bincount(index, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=bins) / count
    return {"count": count.astype(np.int64), "confidence": mean_conf, "accuracy": accuracy}


def expected_calibration_error(probs: np.ndarray, labels: Sequence[int], bins: int = ECE_BINS) -> float:
    """Sum over equal-width confidence bins of (bin share of examples) x |bin accuracy - bin mean confidence|."""
    r = reliability_bins(probs, labels, bins)
    filled = r["count"] > 0
    gaps = np.abs(r["accuracy"][filled] - r["confidence"][filled])
    return float((r["count"][filled] * gaps).sum() / r["count"].sum())


def brier_score(probs: np.ndarray, labels: Sequence[int]) -> float:
    """Mean over examples of the sum over classes of (p - one-hot label)^2; 0 is perfect, 2 the worst."""
    p, y = _checked(probs, labels, "probabilities")
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(((p - onehot) ** 2).sum(-1).mean())


def calibration_summary(logits: np.ndarray, labels: Sequence[int], temperature: float,
                        bins: int = ECE_BINS) -> dict[str, float]:
    """ECE, Brier and NLL of `logits` before and after dividing them by `temperature`."""
    z, y = _checked(logits, labels, "logits")
    before, after = softmax(z), softmax(z / temperature)
    return {"temperature": float(temperature),
            "ece_before": expected_calibration_error(before, y, bins),
            "ece_after": expected_calibration_error(after, y, bins),
            "brier_before": brier_score(before, y), "brier_after": brier_score(after, y),
            "nll_before": _nll(z, y, 1.0), "nll_after": _nll(z, y, temperature),
            "bins": bins, "examples": int(len(y))}


def fold_temperature(tensors: Mapping[str, np.ndarray], temperature: float) -> dict[str, np.ndarray]:
    """The PyTorch-named tensors with 1/T folded into the classifier head: same logits at temperature 1.

    classifier(x) / T = x @ (W / T).T + b / T, so dividing the head's weight and bias is exact
    up to float32 rounding. Used by the Hugging Face export and by fine-tuning a calibrated model.
    """
    out = dict(tensors)
    if temperature != 1.0:
        for name in ("classifier.weight", "classifier.bias"):
            out[name] = (np.asarray(tensors[name], np.float32) / np.float32(temperature)).astype(np.float32)
    return out


def reliability_diagram(path: str | os.PathLike, labels: Sequence[int], before: np.ndarray,
                        after: np.ndarray | None = None, bins: int = ECE_BINS, title: str = "") -> Path:
    """Write a PNG: accuracy vs confidence per bin with the diagonal, and bin counts, before (and after) scaling.

    before / after: (N, C) probabilities without and with the fitted temperature.
    """
    import matplotlib
    matplotlib.use("Agg")  # files only, never a display
    from matplotlib.figure import Figure

    panels = [("uncalibrated", before)] + ([("temperature-scaled", after)] if after is not None else [])
    fig = Figure(figsize=(5.2 * len(panels), 6.4), dpi=100)
    grid = fig.add_gridspec(2, len(panels), height_ratios=(3, 1), hspace=0.35)
    edges = np.linspace(0.0, 1.0, bins + 1)
    for col, (name, probs) in enumerate(panels):
        r = reliability_bins(probs, labels, bins)
        ece = expected_calibration_error(probs, labels, bins)
        top = fig.add_subplot(grid[0, col])
        filled = r["count"] > 0
        top.bar(edges[:-1][filled], r["accuracy"][filled], width=1.0 / bins, align="edge", color="tab:blue",
                edgecolor="black", alpha=0.8, label="accuracy")
        top.plot(r["confidence"][filled], r["accuracy"][filled], "o", color="tab:orange", ms=4,
                 label="(mean confidence, accuracy)")
        top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        top.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
                title=f"{name}: ECE {ece:.4f}")
        top.legend(loc="upper left", fontsize=8)
        bottom = fig.add_subplot(grid[1, col])
        bottom.bar(edges[:-1], r["count"], width=1.0 / bins, align="edge", color="tab:gray", edgecolor="black")
        bottom.set(xlim=(0, 1), xlabel="confidence", ylabel="examples")
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path)
    return path
