"""The ONNX Runtime backend: the engine's buckets, batcher and cache in front of an exported graph.

    jaxclf export-onnx --model runs/default/model --output runs/default/model/model.onnx
    jaxclf serve --model runs/default/model --backend onnxruntime

The JAX backend (XLA executables, one per bucket) is the default everywhere. On a CPU-only host,
ONNX Runtime runs the same graph faster at small batches (benchmarks/results/inference.md: at batch 1
it took 3.6 ms where XLA:CPU took 7.6 ms, 4 layers d256, 32 tokens), so `backend="onnxruntime"` runs
the graph `jaxclf export-onnx` wrote instead, behind the very same buckets: a request is padded to
a (batch, length) bucket exactly as for XLA, the engine runs every bucket once at start-up (ONNX
Runtime plans its memory per shape on the first run), and the batcher, cache, long-text windows and
API are the engine's. Only `pip install 'jaxclf[onnx]'` is needed to serve; torch only to export.

The graph must come from this model directory: its `jaxclf.content_hash` metadata (written by the
export) must equal the directory's content hash, or the engine refuses to start, so a stale export
never answers for a retrained or recalibrated model. The parity suite holds the two backends to 1e-5
(parity_tests/test_onnx_backend.py).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from jaxclf.config import ConfigError

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"  # where the backend looks for the graph in the model directory by default
HASH_KEY = "jaxclf.content_hash"  # the export's metadata key (torch_ref.onnx_export.metadata)


def default_onnx_file(model_path: str | os.PathLike) -> Path:
    return Path(model_path) / ONNX_FILE


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
        from jaxclf.registry import content_hash

        path = Path(onnx_file)
        if not path.is_file():
            raise ConfigError(f"backend='onnxruntime' serves an exported graph, and there is none at {path}; "
                              f"write it with: jaxclf export-onnx --model {model_path} --output {path}")
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
        exported_from = self.session.get_modelmeta().custom_metadata_map.get(HASH_KEY)
        expected = content_hash(model_path)
        if exported_from is None or json.loads(exported_from) != expected:
            raise ConfigError(f"{path} was not exported from the model directory {model_path} as it is now "
                              f"(graph: {HASH_KEY} {exported_from or 'missing'}; directory: {expected!r}); "
                              f"re-export it with: jaxclf export-onnx --model {model_path} --output {path}")
        self.path = path
        names = [i.name for i in self.session.get_inputs()]
        if names != ["input_ids", "attention_mask"]:
            raise ConfigError(f"{path}: expected inputs input_ids, attention_mask (a jaxclf export), got {names}")
        logger.info("ONNX Runtime %s serving %s", ort.__version__, path)

    def run(self, bucket: tuple[int, int], input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        del bucket  # the graph's axes are dynamic: the padded arrays already have the bucket's shape
        (logits,) = self.session.run(None, {"input_ids": input_ids.astype(np.int64, copy=False),
                                            "attention_mask": attention_mask.astype(np.int64, copy=False)})
        return logits
