"""Two versions side by side: their metrics (with b - a) and the model and training settings that differ."""

from __future__ import annotations

from typing import Any, Mapping

from jaxclf.registry.core import Registry


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"eval": {"accuracy": 0.9}} -> {"eval.accuracy": 0.9}; lists are kept whole."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value} if prefix else {}


def _diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Flattened key -> {"a", "b"} for every key whose values differ."""
    fa, fb = _flatten(a), _flatten(b)
    return {k: {"a": fa.get(k), "b": fb.get(k)} for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


def compare(registry: Registry, ref_a: str, ref_b: str) -> dict[str, Any]:
    """Metrics side by side (scalars, with b - a) and the config keys whose values differ."""
    a, b = registry.get(ref_a), registry.get(ref_b)
    metrics_a, metrics_b = a.metadata.get("metrics") or {}, b.metadata.get("metrics") or {}
    flat_a, flat_b = _flatten(metrics_a), _flatten(metrics_b)
    metrics = {}
    for key in sorted(set(flat_a) | set(flat_b)):
        va, vb = flat_a.get(key), flat_b.get(key)
        if key.startswith("training_config.") or isinstance(va, (list, dict)) or isinstance(vb, (list, dict)):
            continue  # histograms and confusion matrices do not line up as columns; configs are diffed below
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb))
        metrics[key] = {"a": va, "b": vb, "delta": (vb - va) if numeric else None}
    return {"a": a.ref, "b": b.ref, "metrics": metrics,
            "config_diff": _diff((a.metadata.get("config") or {}).get("model", {}),
                                 (b.metadata.get("config") or {}).get("model", {})),
            "training_config_diff": _diff(metrics_a.get("training_config") or {},
                                          metrics_b.get("training_config") or {}),
            "same_content": a.content_hash == b.content_hash}
