"""The classifier's forward for bulk jobs: one AOT executable per (batch, length) bucket, batch split over local devices.

    forward = BucketedForward(classifier, batch_size=256)
    calls = forward.dispatch(token_rows)        # compiled calls queued on the devices, not waited for
    logits = forward.gather(calls, len(token_rows))   # float32 (N, C), in the rows' order

Rows are sorted by length and cut into calls of batch_size rows, each padded to the length bucket
of its longest row, so a sort window of mixed lengths pads little. The batch dimension is sharded
over a one-axis mesh of this process's devices (`data`), the weights are replicated: every local
device works, and no collective crosses processes (each process of a multi-host job runs its own
rows). The model is traced once with a symbolic (batch, length) shape (jax.export, as the serving
engine does) and each bucket is compiled from it once, on first use; no call ever traces or compiles
again (`compilations` counts them).

`GraphForward` makes the same calls through a graph backend of the serving engine (ONNX Runtime or
OpenVINO on this host's CPU, jaxclf.serve.onnx_backend): `jaxclf predict --backend openvino`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxclf.classifier import TextClassifier
from jaxclf.config import ConfigError, ModelConfig
from jaxclf.model import in_row_chunks, row_chunk_tokens
from jaxclf.tokenizer import bucket_for, length_buckets

logger = logging.getLogger(__name__)


def batch_buckets(batch_size: int, num_devices: int) -> tuple[int, ...]:
    """Batch sizes a call may pad to: num_devices × powers of two below batch_size, then batch_size."""
    if batch_size % num_devices:
        raise ConfigError(f"batch_size {batch_size} must be a multiple of the {num_devices} local devices, "
                          f"so each device gets the same rows")
    sizes, n = [], num_devices
    while n < batch_size:
        sizes.append(n)
        n *= 2
    return (*sizes, batch_size)


def _pad(rows: Sequence[Sequence[int]], pad_id: int, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int32 (batch, length) ids and mask; rows past len(rows) are all padding.

    jaxclf.tokenizer.pad_rows without its per-row Python loop: one flat copy, placed by a length mask
    (a window of short texts spent more time in that loop than in the model).
    """
    lengths = np.zeros(batch, np.int64)
    lengths[:len(rows)] = [len(r) for r in rows]
    mask = np.arange(length) < lengths[:, None]  # (batch, length)
    ids = np.full((batch, length), pad_id, np.int32)
    ids[mask] = np.fromiter(itertools.chain.from_iterable(rows), np.int32, count=int(lengths.sum()))
    return ids, mask.astype(np.int32)


class _Calls:
    """How rows become calls (plan) and how the calls' logits come back in row order (gather); each
    forward below runs the calls its own way (`dispatch`)."""

    def __init__(self, config: ModelConfig, batch_size: int, num_devices: int):
        self.config = config
        self.batch_size = batch_size
        self.batch_buckets = batch_buckets(batch_size, num_devices)
        # Midpoint buckets (48, 96, ...) as in serving: a 33-token text pads to 48, not 64.
        self.length_buckets = length_buckets(config.max_position_embeddings, midpoints=True)

    def plan(self, lengths: Sequence[int]) -> list[tuple[np.ndarray, int, int]]:
        """(row indices, batch bucket, length bucket) per call: rows by length, batch_size at a time."""
        order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
        calls = []
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            longest = int(lengths[rows[-1]])  # sorted: the last row is the longest
            calls.append((rows, bucket_for(len(rows), self.batch_buckets), bucket_for(longest, self.length_buckets)))
        return calls

    def padded_calls(self, rows: Sequence[Sequence[int]]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(row indices, padded ids, mask) per planned call."""
        for index, batch, length in self.plan([len(r) for r in rows]):
            yield (index, *_pad([rows[i] for i in index], self.config.pad_token_id, batch, length))

    def gather(self, calls: list[tuple[np.ndarray, Any]], num_rows: int) -> np.ndarray:
        """float32 (num_rows, C) logits of dispatched calls, in the original row order."""
        out = np.empty((num_rows, self.config.num_classes), np.float32)
        for index, logits in calls:
            out[index] = np.asarray(logits)[:len(index)]
        return out

    def logits(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        return self.gather(self.dispatch(rows), len(rows))


class BucketedForward(_Calls):
    """Logits of token-id rows through executables compiled once per (batch, length) bucket."""

    def __init__(self, classifier: TextClassifier, batch_size: int,
                 devices: Sequence[jax.Device] | None = None):
        devices = list(devices if devices is not None else jax.local_devices())
        super().__init__(classifier.config, batch_size, len(devices))
        self.mesh = Mesh(np.asarray(devices), ("data",))
        self._replicated = NamedSharding(self.mesh, P())
        self._rows = NamedSharding(self.mesh, P("data"))

        classifier.model.eval()  # dropout off
        graphdef, state = nnx.split(classifier.model)
        leaves, treedef = jax.tree.flatten(state)
        self._weights = jax.device_put(leaves, self._replicated)
        self._weight_specs = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._replicated) for x in leaves]

        def forward(leaves, input_ids, attention_mask):
            model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            return model(input_ids, attention_mask)  # (B, C) float32

        shardings = dict(in_shardings=([self._replicated] * len(leaves), self._rows, self._rows),
                         out_shardings=self._rows)
        jitted = jax.jit(forward, **shardings)
        try:
            # The batch is a multiple of the device count so the symbolic shape can be sharded.
            b, t = jax.export.symbolic_shape(f"{len(devices)}*b, t",
                                             constraints=[f"t <= {self.config.max_position_embeddings}"])
            spec = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=self._rows)
            jitted = jax.jit(jax.export.export(jitted)(self._weight_specs, spec, spec).call, **shardings)
        except Exception as e:  # shape polymorphism saves tracing time; tracing per bucket is correct too
            logger.warning("symbolic-shape export failed (%s: %s); tracing the model once per bucket",
                           type(e).__name__, e)
        # One device: big batches as a loop over row chunks on a CPU (model.in_row_chunks). Across devices
        # each holds a slice of the rows, which a reshape into chunks would move between them.
        chunk_tokens = row_chunk_tokens(devices[0].platform) if len(devices) == 1 else None
        self._jitted = jax.jit(lambda w, ids, mask: in_row_chunks(functools.partial(jitted, w), ids, mask,
                                                                  chunk_tokens), **shardings)
        self._executables: dict[tuple[int, int], Any] = {}
        self._lock = threading.Lock()
        self.compile_seconds = 0.0

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    @property
    def compilations(self) -> int:
        return len(self._executables)

    def executable(self, batch: int, length: int):
        """The compiled call for a (batch, length) bucket, compiled now if this is its first use."""
        key = (batch, length)
        with self._lock:
            if key not in self._executables:
                started = time.perf_counter()
                spec = jax.ShapeDtypeStruct(key, jnp.int32, sharding=self._rows)
                self._executables[key] = self._jitted.lower(self._weight_specs, spec, spec).compile()
                self.compile_seconds += time.perf_counter() - started
                logger.debug("compiled bucket batch %d x length %d", batch, length)
            return self._executables[key]

    def dispatch(self, rows: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, jax.Array]]:
        """Queue the compiled calls for these token rows; returns (row indices, logits on device) per call.

        JAX runs them asynchronously: the caller can prepare the next work while the devices compute.
        """
        return [(index, self.executable(*ids.shape)(self._weights, jax.device_put(ids, self._rows),
                                                    jax.device_put(mask, self._rows)))
                for index, ids, mask in self.padded_calls(rows)]


class GraphForward(_Calls):
    """Logits of token-id rows through a graph backend's runner (serve.onnx_backend.graph_runner), at
    the same (batch, length) buckets; each call runs on this host's CPU when dispatched."""

    num_devices = 1
    compilations = 0  # nothing is XLA-compiled: the runtime plans each shape on its first run
    compile_seconds = 0.0

    def __init__(self, config: ModelConfig, batch_size: int, runner):
        super().__init__(config, batch_size, 1)
        self._run = runner.run

    def dispatch(self, rows: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(index, self._run(ids.shape, ids, mask)) for index, ids, mask in self.padded_calls(rows)]
