"""Drift monitoring: live prediction distributions against the ones recorded at evaluation time.

A model directory's metrics.json records, on the validation set, a 10-bin histogram of the
confidence (the max probability) over [0, 1] and the count of each predicted label:

    {"eval": {"confidence_histogram": [0, 0, 3, 41, ...], "predicted_label_counts": [120, 31, 97], ...}}

A DriftMonitor keeps the same two distributions over a rolling window of the last `window` live
predictions and compares each with its reference by the population stability index

    PSI = sum_i (live_i - ref_i) * ln(live_i / ref_i)     (proportions; empty bins count as `eps`)

Rule of thumb: below 0.1 no real change, 0.1-0.2 some, above 0.2 (the default threshold) a
shift worth a look. A warning is logged when a PSI rises past the threshold, once per crossing.
It re-arms only once the PSI has fallen below REARM_FRACTION of the threshold (logged at info):
a window sliding over a borderline stream wobbles around the threshold, and must not warn at
every wobble.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from typing import Any, Mapping, Sequence

from jaxclf.config import ConfigError
from jaxclf.serve.config import ServeConfig  # the window, threshold and minimum sample defaults

logger = logging.getLogger(__name__)

EPS = 1e-4  # proportion given to an empty bin, so ln() stays finite
REARM_FRACTION = 0.8  # after a warning, PSI must fall below this fraction of the threshold to warn again
KINDS = ("confidence", "label")


def psi(reference: Sequence[float], live: Sequence[float], eps: float = EPS) -> float:
    """Population stability index between two histograms over the same bins (counts or proportions)."""
    if len(reference) != len(live):
        raise ValueError(f"histograms must have the same bins, got {len(reference)} and {len(live)}")
    total_ref, total_live = float(sum(reference)), float(sum(live))
    if total_ref <= 0 or total_live <= 0:
        raise ValueError("histograms must not be empty")
    out = 0.0
    for r, a in zip(reference, live):
        p, q = max(r / total_ref, eps), max(a / total_live, eps)
        out += (q - p) * math.log(q / p)
    return out


def confidence_bin(confidence: float, bins: int) -> int:
    """The bin of np.histogram(..., bins, range=(0, 1)) holding `confidence` (1.0 goes in the last)."""
    return min(max(int(confidence * bins), 0), bins - 1)


class DriftMonitor:
    """Rolling-window PSI of one served model's live confidences and labels against its reference.

    labels: the model's labels in id order; reference_confidence: histogram over [0, 1] in equal
    bins; reference_labels: count per label. Thread-safe; observe() is O(1).
    """

    def __init__(self, version: str, labels: Sequence[str], reference_confidence: Sequence[float],
                 reference_labels: Sequence[float], window: int = ServeConfig.drift_window,
                 threshold: float = ServeConfig.drift_threshold, min_samples: int = ServeConfig.drift_min_samples):
        if window < 1:
            raise ConfigError(f"drift window must be >= 1 prediction, got {window}")
        if not threshold > 0:
            raise ConfigError(f"drift threshold must be > 0, got {threshold}")
        if len(reference_labels) != len(labels):
            raise ValueError(f"reference has {len(reference_labels)} label counts for {len(labels)} labels")
        for name, hist in (("confidence", reference_confidence), ("label", reference_labels)):
            if not hist or any(not isinstance(x, (int, float)) or x < 0 for x in hist) or sum(hist) <= 0:
                raise ValueError(f"reference {name} histogram must hold non-negative numbers with a positive "
                                 f"sum, got {list(hist)}")
        self.version = version
        self.label_index = {label: i for i, label in enumerate(labels)}
        self.reference = {"confidence": list(reference_confidence), "label": list(reference_labels)}
        self.window = window
        self.threshold = threshold
        self.min_samples = min(min_samples, window)
        self._live = {"confidence": [0] * len(reference_confidence), "label": [0] * len(labels)}
        self._recent: collections.deque[tuple[int, int]] = collections.deque()  # (confidence bin, label id)
        self._above = {kind: False for kind in KINDS}
        self._lock = threading.Lock()

    @classmethod
    def from_metrics(cls, version: str, labels: Sequence[str], metrics: Mapping[str, Any],
                     **options: Any) -> "DriftMonitor | None":
        """A monitor from metrics.json's eval section, or None (logged) when it records no distributions."""
        ev = metrics.get("eval") if isinstance(metrics, Mapping) else None
        hist = ev.get("confidence_histogram") if isinstance(ev, Mapping) else None
        counts = ev.get("predicted_label_counts") if isinstance(ev, Mapping) else None
        if hist is None or counts is None:
            logger.info("no drift monitoring for %s: its metrics.json has no eval.confidence_histogram and "
                        "eval.predicted_label_counts (models exported by jaxclf training with evaluation do)",
                        version)
            return None
        try:
            return cls(version, labels, hist, counts, **options)
        except (TypeError, ValueError) as e:
            logger.warning("no drift monitoring for %s: unusable reference in metrics.json: %s", version, e)
            return None

    def observe(self, label: str | int, confidence: float) -> None:
        """Add one live prediction (label name or id, its confidence in [0, 1])."""
        k = self.label_index[label] if isinstance(label, str) else int(label)
        b = confidence_bin(float(confidence), len(self._live["confidence"]))
        crossings = []
        with self._lock:
            self._recent.append((b, k))
            self._live["confidence"][b] += 1
            self._live["label"][k] += 1
            if len(self._recent) > self.window:
                old_b, old_k = self._recent.popleft()
                self._live["confidence"][old_b] -= 1
                self._live["label"][old_k] -= 1
            if len(self._recent) >= self.min_samples:
                for kind in KINDS:
                    value = psi(self.reference[kind], self._live[kind])
                    if self._above[kind]:
                        above = value >= self.threshold * REARM_FRACTION  # hysteresis: no flapping
                    else:
                        above = value > self.threshold
                    if above != self._above[kind]:
                        self._above[kind] = above
                        crossings.append((kind, value, above, len(self._recent)))
        for kind, value, above, n in crossings:  # log outside the lock
            if above:
                logger.warning("drift: %s %s PSI %.3f is above the threshold %.2f over the last %d predictions "
                               "(reference: eval distributions in its metrics.json)", self.version, kind, value,
                               self.threshold, n)
            else:
                logger.info("drift: %s %s PSI %.3f is back below %.2f (%.0f%% of the threshold); warnings re-armed",
                            self.version, kind, value, self.threshold * REARM_FRACTION, 100 * REARM_FRACTION)

    def observe_many(self, predictions: Sequence[Mapping[str, Any]]) -> None:
        """observe() each {"label", "confidence"} dict (the service's prediction format)."""
        for p in predictions:
            self.observe(p["label"], p["confidence"])

    @property
    def samples(self) -> int:
        with self._lock:
            return len(self._recent)

    def values(self) -> dict[str, float]:
        """{"confidence": PSI, "label": PSI} over the current window; empty before min_samples."""
        with self._lock:
            if len(self._recent) < self.min_samples:
                return {}
            return {kind: psi(self.reference[kind], self._live[kind]) for kind in KINDS}

    def above_threshold(self) -> dict[str, bool]:
        with self._lock:
            return dict(self._above)
