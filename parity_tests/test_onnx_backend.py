"""The engine's ONNX Runtime and OpenVINO backends give the JAX backend's logits to 1e-5, behind the
same buckets.

`InferenceEngine(dir, backend="onnxruntime")` (or "openvino") runs the graph `jaxclf export-onnx`
wrote (jaxclf.serve.onnx_backend); everything else (tokenizing, padding to buckets, planning calls,
the batcher, long-text windows and their pooling, the result cache) is the engine's own. Needs torch
to export and onnxruntime or openvino to run: pip install torch==2.13.0 'jaxclf[onnx,openvino]'.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

for _package in ("onnx", "onnxscript", "onnxruntime"):
    pytest.importorskip(_package, reason=f"{_package} is not installed: pip install 'jaxclf[onnx]'")

from jaxclf.config import ConfigError  # noqa: E402
from jaxclf.serve import EngineConfig, create_app  # noqa: E402
from jaxclf.serve.engine import InferenceEngine  # noqa: E402
from parity_tests import twins  # noqa: E402
from parity_tests.test_bf16 import assert_within_bf16_bounds  # noqa: E402
from parity_tests.test_onnx_export import EDGE_TEXTS, export, long_texts  # noqa: E402
from parity_tests.twins import sample_texts  # noqa: E402

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed: pip install 'jaxclf[openvino]'")
BACKENDS = ["onnxruntime", pytest.param("openvino", marks=needs_openvino)]
UNREADABLE = {"onnxruntime": "ONNX Runtime cannot load this graph", "openvino": "OpenVINO cannot read this graph"}

BUCKETS = dict(max_batch_size=8, batch_buckets=(1, 8), length_buckets=(8, 24), cache_size=0)


@pytest.fixture(scope="module")
def exported_dir(saved_model_dir, tmp_path_factory):
    """A copy of the parity model directory with its graph at the default place, MODEL_DIR/model.onnx."""
    d = tmp_path_factory.mktemp("onnx_backend") / "model"
    shutil.copytree(saved_model_dir, d)
    export(d, d / "model.onnx")
    return d


def both_backends(directory, backend, **overrides):
    return (InferenceEngine(directory, **BUCKETS, **overrides),
            InferenceEngine(directory, **BUCKETS, backend=backend, **overrides))


def logits_of(engine: InferenceEngine, texts: list[str]) -> np.ndarray:
    return np.array([r.logits for r in engine.predict_batch(texts).results], np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_graph_backend_matches_the_jax_backend_on_mixed_lengths(exported_dir, backend):
    """In float32: OpenVINO's own default on a CPU with AMX or AVX512-BF16 is bf16, which fails this."""
    jax_engine, ort_engine = both_backends(exported_dir, backend)
    with jax_engine, ort_engine:
        texts = sample_texts()[:30] + EDGE_TEXTS + long_texts()  # short, 24-token truncated, empty
        for batch in (texts[:1], texts[:5], texts):  # one call; a padded bucket; several planned calls
            with twins.highest():
                want = logits_of(jax_engine, batch)
            err = twins.record(f"{backend} backend logits max-abs", twins.max_abs(logits_of(ort_engine, batch), want))
            assert err <= twins.LOGITS_TOL, f"the {backend} backend differs from the JAX backend by {err:.3e}"
        single = ort_engine.predict_single(texts[0])
        assert single.predicted_class == jax_engine.predict_single(texts[0]).predicted_class
        health = ort_engine.health_check()
        assert (health["status"], health["backend"], health["dtype"], health["stray_compilations"]) == (
            "ok", backend, "float32", 0)
        assert sorted(map(tuple, health["compiled_buckets"])) == [(1, 8), (1, 24), (8, 8), (8, 24)]
        assert ort_engine.aot_compilations == 0  # no XLA executable is built for this backend
        # ...and no JAX copy of the weights: the parameters are shapes only
        params = jax.tree.leaves(nnx.state(ort_engine.classifier.model, nnx.Param))
        assert params and all(isinstance(p, jax.ShapeDtypeStruct) for p in params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_documents_pool_the_same_on_both_backends(saved_model_dir, tmp_path, backend):
    d = tmp_path / "chunks"
    shutil.copytree(saved_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"].update(long_text="chunks", chunk_stride=11, max_chunks=6, chunk_pooling="weighted")
    (d / "config.json").write_text(json.dumps(cfg))
    export(d, d / "model.onnx")
    jax_engine, ort_engine = both_backends(d, backend)
    with jax_engine, ort_engine:
        texts = long_texts() + sample_texts()[:4]
        results = ort_engine.predict_batch(texts).results
        assert max(r.windows for r in results) > 1
        with twins.highest():
            want = logits_of(jax_engine, texts)
        err = twins.max_abs(np.array([r.logits for r in results], np.float32), want)
        assert err <= twins.LOGITS_TOL, f"pooled windows differ between backends by {err:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_graph_exported_before_the_model_changed_is_refused(exported_dir, tmp_path, backend):
    d = tmp_path / "recalibrated"
    shutil.copytree(exported_dir, d)  # model.onnx comes along, exported from the model as it was
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"]["temperature"] = 1.7
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="was not exported from the model directory .* re-export it with: "
                                          "jaxclf export-onnx"):
        InferenceEngine(d, **BUCKETS, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_missing_or_broken_graph_is_a_clear_error(saved_model_dir, tmp_path, backend):
    with pytest.raises(ConfigError, match="there is none at .*model.onnx; write it with: jaxclf export-onnx"):
        InferenceEngine(saved_model_dir, **BUCKETS, backend=backend)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a graph")
    with pytest.raises(ConfigError, match=UNREADABLE[backend]):
        InferenceEngine(saved_model_dir, **BUCKETS, backend=backend, onnx_file=str(broken))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_service_reports_and_uses_the_backend(exported_dir, backend):
    engine = InferenceEngine(exported_dir, EngineConfig(backend=backend, **BUCKETS))
    with engine:
        client = create_app(engine).test_client()
        assert client.get("/ready").status_code == 200
        assert client.get("/model/info").get_json()["serving"]["backend"] == backend
        response = client.post("/predict", json={"text": sample_texts()[0]})
        assert response.status_code == 200
        assert response.get_json()["label"] == engine.predict_single(sample_texts()[0]).predicted_class


@needs_openvino
def test_openvino_in_bfloat16_stays_within_the_bf16_bounds_or_is_refused(exported_dir):
    """`--backend openvino --dtype bfloat16`: OpenVINO's bf16 precision, held to the bounds of the JAX
    bf16 path (parity_tests/test_bf16.py). A CPU without bf16 matmuls gets a clear refusal, where
    OpenVINO itself would quietly run float32."""
    from jaxclf.serve.onnx_backend import import_openvino

    capabilities = import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in capabilities:  # e.g. an AMD EPYC: FP32, INT8, BIN, EXPORT_IMPORT
        with pytest.raises(ConfigError, match="needs a CPU with bf16 matmuls .* Serve float32"):
            InferenceEngine(exported_dir, **BUCKETS, backend="openvino", dtype="bfloat16")
        return
    texts = sample_texts()[:40] + EDGE_TEXTS + long_texts()
    with InferenceEngine(exported_dir, **BUCKETS) as fp32, \
            InferenceEngine(exported_dir, **BUCKETS, backend="openvino", dtype="bfloat16") as bf16:
        assert_within_bf16_bounds("openvino bf16 backend", logits_of(fp32, texts), logits_of(bf16, texts))
        assert bf16.health_check()["dtype"] == "bfloat16"


@needs_openvino
def test_importing_openvino_for_the_backend_sends_no_telemetry():
    """`import openvino` loads its converter, whose telemetry forks a sender process; the backend's
    import leaves the converter (and the telemetry package) out of the process."""
    probe = ("import sys; from jaxclf.serve.onnx_backend import import_openvino; ov = import_openvino(); "
             "ov.Core(); print(sorted(m for m in sys.modules if 'telemetry' in m or 'ovc' in m))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_bulk_predict_on_a_graph_backend_matches_the_jax_backend(exported_dir, tmp_path, backend):
    """`jaxclf predict --backend ...`: the same calls through the graph, recorded in job.json."""
    import dataclasses

    from jaxclf.bulk import BulkConfig, read_predictions, run
    from jaxclf.bulk.writer import OutputError

    texts = sample_texts()[:60] + EDGE_TEXTS + long_texts()
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    config = BulkConfig(batch_size=16, sort_window=32, shard_rows=40, logits=True, progress=False)
    with twins.highest():
        run(str(exported_dir), [str(source)], tmp_path / "jax", config)
    summary = run(str(exported_dir), [str(source)], tmp_path / backend, dataclasses.replace(config, backend=backend))
    assert summary["rows"] == summary["predictions"] == len(texts)
    want = np.array([r["logits"] for r in read_predictions(tmp_path / "jax")], np.float32)
    got = np.array([r["logits"] for r in read_predictions(tmp_path / backend)], np.float32)
    err = twins.record(f"{backend} bulk predict logits max-abs", twins.max_abs(got, want))
    assert err <= twins.LOGITS_TOL, f"jaxclf predict --backend {backend} differs from JAX by {err:.3e}"
    assert json.loads((tmp_path / backend / "job.json").read_text())["backend"] == backend
    with pytest.raises(OutputError, match=f"backend: was '{backend}', now None"):  # a resume on JAX is refused
        run(str(exported_dir), [str(source)], tmp_path / backend, config)
