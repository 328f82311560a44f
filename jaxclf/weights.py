"""The one table between jaxclf's NNX parameter paths and the PyTorch (torch_ref / HF BERT) names.

NNX path `encoder/layer/0/attention/self/query/kernel` (in, out) is the PyTorch tensor
`encoder.layer.0.attention.self.query.weight` (out, in). Only the leaf changes name; only
Linear kernels are transposed.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open

from jaxclf.config import ModelConfig
from jaxclf.errors import JaxclfError

# NNX leaf name -> (PyTorch leaf name, transpose?)
LEAF_TABLE: dict[str, tuple[str, bool]] = {
    "kernel": ("weight", True),  # nnx.Linear (in, out) -> nn.Linear (out, in)
    "bias": ("bias", False),  # nnx.Linear / nnx.LayerNorm bias
    "scale": ("weight", False),  # nnx.LayerNorm scale -> nn.LayerNorm weight
    "embedding": ("weight", False),  # nnx.Embed table -> nn.Embedding weight
}


class WeightsError(JaxclfError, ValueError):
    """A set of tensors does not fit the model; the message names every offending tensor."""


def torch_name(path: tuple) -> tuple[str, bool]:
    """NNX state path -> (PyTorch state_dict name, whether the tensor is transposed)."""
    *module, leaf = (str(p) for p in path)
    if leaf not in LEAF_TABLE:
        raise WeightsError(f"no PyTorch name for parameter {'/'.join(map(str, path))}")
    name, transpose = LEAF_TABLE[leaf]
    return ".".join([*module, name]), transpose


def _params(model: nnx.Module) -> list[tuple[tuple, nnx.Variable]]:
    return list(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def to_torch_state(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every parameter as a float32 numpy array under its PyTorch name, Linear kernels transposed."""
    out: dict[str, np.ndarray] = {}
    for path, var in _params(model):
        name, transpose = torch_name(path)
        value = np.asarray(jax.device_get(var.get_value()), dtype=np.float32)
        out[name] = np.ascontiguousarray(value.T if transpose else value)
    return out


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """PyTorch name -> shape for a config, without allocating the weights."""
    from jaxclf.model import TransformerClassifier

    abstract = nnx.eval_shape(lambda: TransformerClassifier(config, rngs=nnx.Rngs(0)))
    shapes = {}
    for path, var in _params(abstract):
        name, transpose = torch_name(path)
        shape = tuple(var.get_value().shape)
        shapes[name] = shape[::-1] if transpose else shape
    return shapes


def file_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """PyTorch name -> shape from a safetensors file's header; no tensor is read."""
    with safe_open(str(path), framework="numpy") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def check_tensors(tensors: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
                  source: str = "weights") -> None:
    """Raise WeightsError naming every missing, extra and misshapen tensor (key sets must match exactly)."""
    check_shapes({name: tuple(np.shape(t)) for name, t in tensors.items()}, expected, source)


def check_shapes(shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                 source: str = "weights") -> None:
    """check_tensors on shapes alone (e.g. file_shapes: a check before anything is read or allocated)."""
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    misshapen = sorted(
        f"{k}: expected {tuple(expected[k])}, found {tuple(shapes[k])}"
        for k in set(expected) & set(shapes) if tuple(shapes[k]) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"missing tensor(s): {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected tensor(s): {', '.join(extra)}")
    if misshapen:
        problems.append(f"wrong shape(s): {'; '.join(misshapen)}")
    if problems:
        raise WeightsError(f"{source} does not match the model config: " + " | ".join(problems))


def load_torch_state(model: nnx.Module, tensors: Mapping[str, np.ndarray], source: str = "weights") -> None:
    """Set the model's parameters in place from PyTorch-named tensors, after checking names and shapes."""
    params = _params(model)
    expected = {}
    for path, var in params:
        name, transpose = torch_name(path)
        shape = tuple(var.get_value().shape)
        expected[name] = shape[::-1] if transpose else shape
    check_tensors(tensors, expected, source)
    for path, var in params:
        name, transpose = torch_name(path)
        value = np.asarray(tensors[name])
        if not np.issubdtype(value.dtype, np.floating):
            raise WeightsError(f"{source}: tensor {name} has dtype {value.dtype}, expected a float type")
        var.set_value(jax.numpy.asarray(value.T if transpose else value, dtype=var.get_value().dtype))
