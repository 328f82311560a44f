"""The few lines `jaxclf train` prints when a run ends: what was learnt, where the model is, how to use it.

    lines = summary_lines(result, train_config)   # from the TrainResult and OUTPUT/model/metrics.json
    print("\\n".join(lines))

Every figure comes from the TrainResult and the exported model's metrics.json (the report of the
checkpoint that was exported, and its "calibration" section when the export fitted a temperature), so
the summary says what the model directory holds, not what the last step happened to score.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any

from jaxclf.config import TrainingConfig

EXAMPLE_TEXT = "The soup was cold and the waiter rude."  # what the printed predict / curl lines send
SERVE_PORT = 8000  # the port the printed serve / curl lines use (jaxclf.serve.config.ServeConfig's default)


def majority_baseline(per_class: dict[str, dict[str, Any]]) -> tuple[str, float, float]:
    """(label, accuracy, macro-F1) of always answering the most frequent class of these rows.

    That class has precision p = its share of the rows and recall 1, so F1 = 2p / (1 + p); every other
    class scores F1 0, and the macro mean divides by the number of classes.
    """
    total = sum(c["support"] for c in per_class.values())
    label = max(per_class, key=lambda name: per_class[name]["support"])
    share = per_class[label]["support"] / total if total else 0.0
    return label, share, (2 * share / (1 + share)) / len(per_class) if per_class else 0.0


def _planned_steps(cfg: TrainingConfig, steps: int, epoch: float) -> int | None:
    """The run's planned total steps (as loop.plan_steps computes them), from its steps and epochs done."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    if steps <= 0 or epoch <= 0:
        return None
    steps_per_epoch = math.floor(steps / epoch + 1e-9)  # epoch = steps * batch / examples
    return math.ceil(cfg.num_train_epochs * steps_per_epoch)


def _learnt(report: dict[str, Any]) -> list[str]:
    label, base_acc, base_f1 = majority_baseline(report["per_class"])
    per_class = ", ".join(f"{name} {c['f1']:.2f}" for name, c in report["per_class"].items())
    return [f"learnt: held-out accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f} on "
            f"{report['num_examples']} rows (always answering {label!r}: {base_acc:.3f} / {base_f1:.3f})",
            f"  F1 per class: {per_class}"]


def _stopping(result, cfg: TrainingConfig, exported_step: int, exported_epoch: float) -> str:
    metric = cfg.metric_for_best_model
    planned = _planned_steps(cfg, result.steps, result.epoch)
    best = f"best {metric} at step {exported_step} (epoch {exported_epoch:.1f}), the checkpoint exported"
    if planned is not None and result.steps < planned:
        return (f"stopped early at step {result.steps} of {planned} (epoch {result.epoch:.1f}): no gain in "
                f"{cfg.early_stopping_patience} evaluations; {best}")
    return f"ran all {result.steps} steps ({result.epoch:.1f} epochs); {best}"


def _confidence(metrics: dict[str, Any]) -> list[str]:
    calib = metrics.get("calibration")
    if not calib or "temperature" not in calib:
        ece = (metrics.get("eval") or {}).get("ece")
        return [f"confidence: not calibrated (held-out ECE {ece:.3f})"] if ece is not None else []
    line = f"confidence: temperature {calib['temperature']:.2f} fitted on the held-out rows"
    if "ece_before" in calib and "ece_after" in calib:
        line += f"; ECE {calib['ece_before']:.3f} -> {calib['ece_after']:.3f}"
    return [line]


def _usage(model_dir: Path) -> list[str]:
    where = shlex.quote(str(model_dir))
    body = shlex.quote(json.dumps({"text": EXAMPLE_TEXT}))
    return [f"model: {model_dir}",
            f"  predict: jaxclf predict --model {where} {shlex.quote(EXAMPLE_TEXT)}",
            f"  serve:   jaxclf serve --model {where} --port {SERVE_PORT}",
            f"           curl -s -H 'Content-Type: application/json' -d {body} localhost:{SERVE_PORT}/predict"]


def summary_lines(result, cfg: TrainingConfig) -> list[str]:
    """The end-of-run summary of a finished (not preempted) TrainResult, as lines of text."""
    metrics_file = Path(result.model_dir) / "metrics.json"
    try:
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):  # another process's export, or an old directory: say less
        metrics = {}
    report = metrics.get("eval") or result.eval_metrics
    lines = []
    if report and report.get("per_class"):
        lines += _learnt(report)
        lines.append(_stopping(result, cfg, metrics.get("step", result.steps), metrics.get("epoch", result.epoch)))
        lines += _confidence(metrics)
    else:
        lines.append(f"trained {result.steps} steps ({result.epoch:.1f} epochs) without held-out data "
                     f"(train.eval_split=0 and no --eval): nothing measured; the last step exported")
    return lines + _usage(Path(result.model_dir))
