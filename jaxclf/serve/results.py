"""What the engine hands back: one text's PredictionResult, a BatchPredictionResult, and the records
its batch listeners and stats() report. Plain frozen dataclasses, JAX-free."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class PredictionResult:
    """The result for one text (the original framework's name; `Prediction` is the same class)."""

    predicted_class: str  # label with the highest probability
    confidence: float  # its probability
    probabilities: dict[str, float]  # every label's probability
    logits: tuple[float, ...]  # float32 logits, in label order
    model_version: str
    cached: bool = False  # served from the result cache
    processing_time_ms: float = 0.0  # from submission to the result (its last window's): queue wait plus calls
    windows: int = 1  # rows the model read for it: 1, or its windows under long_text="chunks"

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.predicted_class, "confidence": self.confidence,
                "probabilities": dict(self.probabilities), "windows": self.windows,
                "model_version": self.model_version}


Prediction = PredictionResult


@dataclasses.dataclass(frozen=True)
class BatchPredictionResult:
    """The results for many texts, in request order."""

    results: list[PredictionResult]
    model_version: str
    processing_time_ms: float = 0.0  # wall time of the whole predict_batch call

    def __len__(self) -> int:
        return len(self.results)


BatchPrediction = BatchPredictionResult


@dataclasses.dataclass(frozen=True)
class BatchRecord:
    """What one compiled call did; passed to batch listeners (metrics)."""

    size: int  # rows in the call: texts, or windows of long texts
    padded_batch: int  # batch bucket it ran in
    padded_length: int  # length bucket it ran in
    queue_waits_s: tuple[float, ...]  # per row: enqueue -> start of the call
    run_s: float  # wall time of the compiled call


@dataclasses.dataclass(frozen=True)
class EngineStats:
    requests: int  # texts asked for, cached or not
    cache_hits: int
    cache_misses: int
    batches: int  # compiled calls run
    batched_texts: int  # rows run through compiled calls (a long text under chunks: one per window)
    queue_depth: int
    rejected_queue_full: int
    dropped_deadline: int  # dropped unrun because their deadline passed
    aot_compilations: int  # executables compiled at start-up
    stray_compilations: int  # compiles triggered while serving a request; must stay 0
