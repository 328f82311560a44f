"""The JAX model and its torch_ref twin built from one config with the same weights, and run side by side.

Weights always travel JAX -> `jaxclf.weights.to_torch_state` -> `load_state_dict(strict=True)`,
so every test here also exercises the one rename/transpose table.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
from flax import nnx

import torch_ref
from jaxclf import weights
from jaxclf.config import ModelConfig
from jaxclf.model import TransformerClassifier

SAMPLE_TEXTS = Path(__file__).resolve().parents[1] / "data" / "sample_texts.csv"

# The parity contract (DESIGN.md, "Numerics").
LOGITS_TOL = 1e-5
GRAD_TOL = 1e-4


def torch_fp32_exact() -> None:
    """TF32 off everywhere (a no-op on CPU, but the contract names it) and full-precision matmuls."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def sample_texts() -> list[str]:
    """The `text` column of data/sample_texts.csv."""
    from jaxclf.train.data import read_examples
    return read_examples(SAMPLE_TEXTS)[0]


def highest():
    return jax.default_matmul_precision("highest")


def tiny_config(**overrides) -> ModelConfig:
    """A small model with every tensor kind; dropout on, so eval mode is what switches it off."""
    base = dict(vocab_size=40, d_model=16, nhead=2, num_encoder_layers=2, dim_feedforward=24,
                max_position_embeddings=12, num_classes=3, dropout=0.2, attention_dropout=0.2,
                type_vocab_size=2, pooling="pooler", initializer_range=0.2)
    base.update(overrides)
    return ModelConfig(**base)


def jax_model(config: ModelConfig, seed: int = 0) -> TransformerClassifier:
    """A JAX model with random non-trivial weights drawn in numpy.

    Kernels and embedding tables ~ N(0, initializer_range), biases ~ N(0, initializer_range),
    LayerNorm scales ~ 1 + N(0, 0.2): with the init's zero biases and unit scales a mixed-up or
    untransposed tensor could go unnoticed. Built from `nnx.eval_shape`, because `jaxclf.model.create_model` compiles
    a truncated-normal initialiser per parameter shape (~0.2 s each), the bulk of a test's time
    when every hypothesis example has new shapes.
    """
    abstract = nnx.eval_shape(
        lambda: TransformerClassifier(config, rngs=nnx.Rngs(params=seed, dropout=seed + 1)))
    rng = np.random.default_rng(seed)
    std = config.initializer_range
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(abstract))):
        leaf, shape = str(path[-1]), var.get_value().shape
        if isinstance(var, nnx.Param):
            if leaf == "scale":
                value = 1.0 + 0.2 * rng.standard_normal(shape)
            else:  # kernel, embedding, bias
                value = std * rng.standard_normal(shape)
            var.set_value(jnp.asarray(value, var.get_value().dtype))
        elif isinstance(var, nnx.RngKey):
            var.set_value(jax.random.key(seed + 1 + i))
        elif isinstance(var, nnx.RngCount):
            var.set_value(jnp.zeros(shape, jnp.uint32))
        else:
            raise AssertionError(f"do not know how to fill {'/'.join(map(str, path))} ({type(var).__name__})")
    return abstract


def torch_twin(config: ModelConfig, state: dict[str, np.ndarray]) -> torch_ref.TransformerClassifier:
    """torch_ref model in eval mode holding `state` (PyTorch-named float32 arrays), loaded strictly."""
    model = torch_ref.TransformerClassifier(config)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    return model.eval()


def build_pair(config: ModelConfig, seed: int = 0) -> tuple[TransformerClassifier, torch_ref.TransformerClassifier]:
    """(JAX model, torch_ref model), both in eval mode, with identical non-trivial weights."""
    jmodel = jax_model(config, seed)
    jmodel.eval()
    return jmodel, torch_twin(config, weights.to_torch_state(jmodel))


def random_batch(rng: np.random.Generator, config: ModelConfig, batch: int, length: int,
                 padding: str = "mixed") -> dict[str, np.ndarray]:
    """Random (B, T) input_ids, attention_mask and token_type_ids; the first token of each row is real.

    padding: "none", "right" (a random real length per row) or "mixed" (right padding for some
    rows, random holes anywhere after the first token for others).
    """
    ids = rng.integers(0, config.vocab_size, size=(batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    if padding != "none":
        for row in range(batch):
            if padding == "right" or rng.random() < 0.5:
                mask[row, rng.integers(1, length + 1):] = 0
            else:
                mask[row] = rng.random(length) < 0.6
                mask[row, 0] = 1
    types = rng.integers(0, max(config.type_vocab_size, 1), size=(batch, length)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@functools.lru_cache(maxsize=64)
def _jitted_outputs(graphdef):
    @jax.jit
    def run(state, input_ids, attention_mask, token_type_ids):
        model = nnx.merge(graphdef, state)
        hidden, pooled = model.features(input_ids, attention_mask, token_type_ids)
        return model.classifier(pooled).astype(jnp.float32), hidden, pooled

    return run


def jax_outputs(model: TransformerClassifier, batch: dict[str, np.ndarray],
                jit: bool = True) -> dict[str, np.ndarray]:
    """Eval-mode logits, last_hidden_state and pooled of the JAX model, float32 numpy, highest precision.

    jit=False runs op by op: slower per call, but sweeping many configs of one shape then reuses
    the compiled ops instead of compiling a whole model per config.
    """
    model.eval()
    inputs = [jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids")]
    with highest():
        if jit:
            graphdef, state = nnx.split(model)
            logits, hidden, pooled = _jitted_outputs(graphdef)(state, *inputs)
        else:
            hidden, pooled = model.features(*inputs)
            logits = model.classifier(pooled).astype(jnp.float32)
    return {"logits": np.asarray(logits, np.float32), "last_hidden_state": np.asarray(hidden, np.float32),
            "pooled": np.asarray(pooled, np.float32)}


def torch_inputs(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in batch.items()}


def torch_outputs(model: torch_ref.TransformerClassifier, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Eval-mode logits, last_hidden_state and pooled of the torch_ref model, float32 numpy."""
    model.eval()
    with torch.no_grad():
        out = model(**torch_inputs(batch), return_hidden=True)
    return {k: v.float().numpy() for k, v in out.items()}


def max_abs(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"shape mismatch {a.shape} vs {b.shape}"
    return float(np.max(np.abs(a - b))) if a.size else 0.0


# --- gradients -----------------------------------------------------------------------------------

def _loss(graphdef, params, rest, input_ids, attention_mask, token_type_ids, labels):
    model = nnx.merge(graphdef, params, rest)
    logits = model(input_ids, attention_mask, token_type_ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.lru_cache(maxsize=64)
def _jitted_grad(graphdef):
    return jax.jit(jax.value_and_grad(functools.partial(_loss, graphdef), argnums=0))


def jax_grads(model: TransformerClassifier, batch: dict[str, np.ndarray],
              labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """(mean cross-entropy, its gradient per parameter under the PyTorch name, Linear kernels transposed).

    Eval mode (dropout off) so that the two sides compute the same function.
    """
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    with highest():
        loss, grads = _jitted_grad(graphdef)(
            params, rest, *(jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids")),
            jnp.asarray(labels))
    return float(loss), named_arrays(grads)


def named_arrays(state) -> dict[str, np.ndarray]:
    """An nnx.State of parameters (or of their gradients) as PyTorch-named numpy arrays."""
    out = {}
    for path, leaf in nnx.to_flat_state(state):
        name, transpose = weights.torch_name(path)
        value = np.asarray(leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf, np.float32)
        out[name] = value.T if transpose else value
    return out


def torch_grads(model: torch_ref.TransformerClassifier, batch: dict[str, np.ndarray],
                labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
    """(mean cross-entropy, gradient per parameter) of the torch_ref model in eval mode."""
    model.eval()
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(**torch_inputs(batch)), torch.from_numpy(np.asarray(labels, np.int64)))
    loss.backward()
    return float(loss.detach()), {n: (p.grad.numpy().copy() if p.grad is not None else np.zeros(tuple(p.shape), np.float32))
                         for n, p in model.named_parameters()}


# --- measurements ------------------------------------------------------------------------------

MEASURED: dict[str, float] = {}


def record(name: str, value: float) -> float:
    """Keep the worst (largest) value measured under `name`; printed at the end of the session."""
    MEASURED[name] = max(MEASURED.get(name, float("-inf")), float(value))
    return value
