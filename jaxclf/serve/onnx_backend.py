"""Backends over the exported ONNX graph: the engine's buckets, batcher and cache in front of ONNX
Runtime or OpenVINO.

    jaxclf export-onnx --model runs/default/model --output runs/default/model/model.onnx
    jaxclf serve --model runs/default/model --backend onnxruntime     # or --backend openvino

The JAX backend (XLA executables, one per bucket) is the default everywhere. On a CPU-only host,
the runtimes built for CPUs run the same graph faster at small batches (benchmarks/results/inference.md),
so `backend="onnxruntime"` or `"openvino"` runs the graph `jaxclf export-onnx` wrote instead, behind
the very same buckets: a request is padded to a (batch, length) bucket exactly as for XLA, the engine
runs every bucket once at start-up (both runtimes plan memory and pick kernels per shape on its first
run), and the batcher, cache, long-text windows and API are the engine's. Only `pip install
'jaxclf[onnx]'` (ONNX Runtime) or `'jaxclf[openvino]'` is needed to serve; torch only to export.

The graph must come from this model directory: its `jaxclf.content_hash` metadata (written by the
export) must equal the directory's content hash, or the engine refuses to start, so a stale export
never answers for a retrained or recalibrated model. The parity suite holds each backend to the JAX
backend's logits to 1e-5 in float32 (parity_tests/test_onnx_backend.py).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from pathlib import Path

import numpy as np

from jaxclf.config import ConfigError

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"  # where the backend looks for the graph in the model directory by default
HASH_KEY = "jaxclf.content_hash"  # the export's metadata key (torch_ref.onnx_export.metadata)


def default_onnx_file(model_path: str | os.PathLike) -> Path:
    return Path(model_path) / ONNX_FILE


INPUTS = ["input_ids", "attention_mask"]  # the export's inputs, int64 (batch, length)


def _graph_file(onnx_file: str | os.PathLike, model_path: str | os.PathLike, backend: str) -> Path:
    path = Path(onnx_file)
    if not path.is_file():
        raise ConfigError(f"backend={backend!r} serves an exported graph, and there is none at {path}; "
                          f"write it with: jaxclf export-onnx --model {model_path} --output {path}")
    return path


def _check_graph(path: Path, model_path: str | os.PathLike, exported_from: str | None, inputs: list[str]) -> None:
    """Refuse a graph exported from another model (or from this directory before it changed)."""
    from jaxclf.registry import content_hash

    expected = content_hash(model_path)
    if exported_from is None or json.loads(exported_from) != expected:
        raise ConfigError(f"{path} was not exported from the model directory {model_path} as it is now "
                          f"(graph: {HASH_KEY} {exported_from or 'missing'}; directory: {expected!r}); "
                          f"re-export it with: jaxclf export-onnx --model {model_path} --output {path}")
    if inputs != INPUTS:
        raise ConfigError(f"{path}: expected inputs {', '.join(INPUTS)} (a jaxclf export), got {inputs}")


def _feed(input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": input_ids.astype(np.int64, copy=False),
            "attention_mask": attention_mask.astype(np.int64, copy=False)}


def import_openvino():
    """`import openvino`, without the model converter that phones home.

    `import openvino` also imports its converter, openvino.tools.ovc, which sends a usage event to
    Google Analytics from a forked process unless ~/intel/openvino_telemetry opts out (seen here:
    os.fork from openvino_telemetry's sender thread). A fork in a multithreaded JAX process can
    deadlock it, and a server has no business calling out. The backend reads ONNX with the runtime's
    own reader, so the converter is kept from loading: openvino's __init__ skips it on ImportError.
    """
    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    blocked = "openvino.tools.ovc"
    sys.modules[blocked] = None  # makes `from openvino.tools.ovc import ...` raise ImportError
    try:
        import openvino
    finally:
        del sys.modules[blocked]
    return openvino


class OnnxRuntimeBuckets:
    """One ONNX Runtime session over the exported graph, run at the engine's (batch, length) buckets.

    `run((b, t), ids, mask)` takes the same padded int arrays as the XLA executables and returns
    float32 (b, C) logits. A session's `run` is thread-safe, so the batcher's workers share it.
    """

    def __init__(self, onnx_file: str | os.PathLike, model_path: str | os.PathLike):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("backend='onnxruntime' needs onnxruntime: pip install 'jaxclf[onnx]'") from None
        path = _graph_file(onnx_file, model_path, "onnxruntime")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings about unused initializers are noise here
        # The batcher's workers call run() concurrently; ONNX Runtime's default spin-waiting intra-op
        # threads then compete with each other and with the HTTP threads for the cores. Measured against
        # the JAX backend on 2 cores (benchmarks/results/serving*.md): /predict requests/s with spinning
        # 1.56x at 1 client but 0.83x at 32; without, 1.26x at 1 and 1.08x at 32.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ONNX Runtime raises its own exception types (Fail, InvalidGraph, ...)
            raise ConfigError(f"{path}: ONNX Runtime cannot load this graph ({type(e).__name__}: {e})") from None
        _check_graph(path, model_path, self.session.get_modelmeta().custom_metadata_map.get(HASH_KEY),
                     [i.name for i in self.session.get_inputs()])
        self.path = path
        logger.info("ONNX Runtime %s serving %s", ort.__version__, path)

    def run(self, bucket: tuple[int, int], input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        del bucket  # the graph's axes are dynamic: the padded arrays already have the bucket's shape
        (logits,) = self.session.run(None, _feed(input_ids, attention_mask))
        return logits


class OpenVinoBuckets:
    """One OpenVINO compiled model over the exported graph, run at the engine's (batch, length) buckets.

    `dtype` sets OpenVINO's inference precision. float32 pins it: OpenVINO's own default on a CPU with
    AMX or AVX512-BF16 is bf16, which would change the logits unasked. bfloat16 asks for bf16 matmuls
    and is refused on a CPU that cannot run them (OpenVINO would quietly fall back to float32).
    An infer request is not thread-safe, so each batcher thread gets its own; they share the compiled
    model, its weights and its per-shape kernels.
    """

    PRECISIONS = {"float32": "f32", "bfloat16": "bf16"}  # jaxclf dtype -> OpenVINO element type

    def __init__(self, onnx_file: str | os.PathLike, model_path: str | os.PathLike, dtype: str = "float32"):
        try:
            openvino = import_openvino()
        except ImportError:
            raise ConfigError("backend='openvino' needs openvino: pip install 'jaxclf[openvino]'") from None
        path = _graph_file(onnx_file, model_path, "openvino")
        if dtype not in self.PRECISIONS:
            raise ConfigError(f"backend='openvino' runs float32 or bfloat16, got dtype={dtype!r}")
        core = openvino.Core()
        try:
            graph = core.read_model(str(path))
        except Exception as e:  # OpenVINO raises RuntimeError subclasses of its own
            raise ConfigError(f"{path}: OpenVINO cannot read this graph ({type(e).__name__}: {e})") from None
        key = ["framework", HASH_KEY]  # where OpenVINO's ONNX reader puts the graph's metadata
        _check_graph(path, model_path, graph.get_rt_info(key).astype(str) if graph.has_rt_info(key) else None,
                     [i.get_any_name() for i in graph.inputs])
        wanted = self.PRECISIONS[dtype]
        capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")  # e.g. BF16, FP32, INT8
        if wanted == "bf16" and "BF16" not in capabilities:
            raise ConfigError(f"backend='openvino' with dtype={dtype!r} needs a CPU with bf16 matmuls "
                              f"(AVX512-BF16 or AMX); OpenVINO finds none here (CPU capabilities: "
                              f"{', '.join(capabilities)}). Serve float32, or backend='jax' with dtype='bfloat16'")
        # LATENCY: one stream, every core on each call. In one interleaved run of benchmarks/serving.py on
        # 2 cores, THROUGHPUT (two one-thread streams) served 1.27x LATENCY's /predict requests/s at 32 and
        # 64 clients, but 0.75x at one client and 0.56x its /predict/batch predictions/s at one client.
        try:
            self.compiled = core.compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": wanted,
                                                              "PERFORMANCE_HINT": "LATENCY"})
        except Exception as e:
            raise ConfigError(f"{path}: OpenVINO cannot compile this graph for the CPU in {wanted} "
                              f"({type(e).__name__}: {e})") from None
        resolved = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if resolved != wanted:  # the precision the logits would really have; never a quiet fallback
            raise ConfigError(f"backend='openvino' with dtype={dtype!r}: OpenVINO compiled this graph in "
                              f"{resolved}, not {wanted} (CPU capabilities: {', '.join(capabilities)})")
        self.path = path
        self._local = threading.local()
        logger.info("OpenVINO %s serving %s in %s", openvino.__version__, path, resolved)

    def run(self, bucket: tuple[int, int], input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        del bucket  # the graph's axes are dynamic: the padded arrays already have the bucket's shape
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return np.array(request.infer(_feed(input_ids, attention_mask))[0])  # a copy: the request reuses its buffer


def graph_runner(backend: str, onnx_file: str | os.PathLike | None, model_path: str | os.PathLike,
                 dtype: str) -> OnnxRuntimeBuckets | OpenVinoBuckets:
    """The runner of a graph backend (jaxclf.serve.config.GRAPH_BACKENDS) over `onnx_file`, by default
    MODEL_DIR/model.onnx; `dtype` is the model's compute dtype (float32, or bfloat16 for OpenVINO)."""
    onnx_file = onnx_file or default_onnx_file(model_path)
    if backend == "onnxruntime":
        return OnnxRuntimeBuckets(onnx_file, model_path)
    if backend == "openvino":
        return OpenVinoBuckets(onnx_file, model_path, dtype)
    raise ConfigError(f"backend={backend!r} does not run an exported graph")
