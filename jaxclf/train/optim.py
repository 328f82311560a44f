"""The optimiser: gradient clipping -> AdamW with a warmup-then-decay learning-rate schedule.

    tx, schedule = make_optimizer(learning_rate=3e-4, warmup_steps=100, total_steps=1000,
                                  weight_decay=0.01, max_grad_norm=1.0)

Weight decay follows Hugging Face BERT / `transformers.Trainer` practice: every parameter decays
except biases and LayerNorm parameters (`scale`, `bias`). Embedding tables (word, position,
token type) DO decay, as in the HF Trainer, whose exclusion list is only "bias" and LayerNorm
weights.

The update is decoupled AdamW (Loshchilov & Hutter) with the decay multiplied by the scheduled
learning rate, exactly as `torch.optim.AdamW` computes it:

    p <- p - lr_t * (m_hat / (sqrt(v_hat) + eps) + wd * p)      (optax)
    p <- p * (1 - lr_t * wd) - lr_t * m_hat / (sqrt(v_hat) + eps)  (torch)

which are the same expression; parity_tests/test_optimizer.py checks the two step by step.

Fine-tuning options (both off by default, when the optimiser is exactly the one above):

- `layerwise_lr_decay` (Sun et al. 2019, "How to Fine-Tune BERT"): with L encoder layers counted
  k = 1..L from the bottom (`encoder.layer.{k-1}`), layer k learns at lr * decay**(L - k); the
  embeddings (k = 0) at lr * decay**L; everything above the encoder (pooler, classifier, a pre-LN
  final LayerNorm) at lr. The scale multiplies the whole AdamW update, decoupled weight decay
  included, which is exactly AdamW with that parameter's learning rate scaled.
- `freeze_embeddings`: the `embeddings.*` parameters (word, position, token-type tables and their
  LayerNorm) get no update at all, hold no AdamW moments, and are left out of the clipping norm
  (optax.multi_transform with set_to_zero), as `requires_grad=False` does in PyTorch.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

DECAYS = ("linear", "cosine", "constant")

Schedule = Callable[[jax.typing.ArrayLike], jax.Array]


def _names(path: tuple) -> list[str]:
    """Module/leaf names of a pytree path; the `.value` attribute of an nnx.Variable is dropped."""
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            names.append(str(key.key))
        # GetAttrKey: an nnx.Variable's payload (`.value`), not a parameter name.
    return names


def decays(names: list[str]) -> bool:
    """Whether the parameter at this path gets weight decay: not biases, not LayerNorm parameters."""
    if not names:
        return True
    leaf = names[-1]
    if leaf in ("bias", "scale"):  # Linear/LayerNorm bias; LayerNorm scale (PyTorch `LayerNorm.weight`)
        return False
    return not any("norm" in n.lower() for n in names[:-1])


def decay_mask(params_state: Any) -> Any:
    """A pytree like `params_state` with True where weight decay applies (kernels, embedding tables).

    Accepts an `nnx.State` of parameters (with or without its Variable wrappers, i.e. also
    `nnx.as_pure(...)`) or a nested dict keyed by the NNX attribute names.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(_names(path)), params_state)


def param_lr_scale(names: list[str], num_layers: int, layerwise_lr_decay: float = 1.0,
                   freeze_embeddings: bool = False) -> float:
    """The learning-rate multiplier of the parameter at this path (see the module docstring)."""
    if names and names[0] == "embeddings":
        return 0.0 if freeze_embeddings else float(layerwise_lr_decay ** num_layers)
    if len(names) > 2 and names[:2] == ["encoder", "layer"]:
        k = int(names[2]) + 1  # 1-based layer number
        return float(layerwise_lr_decay ** (num_layers - k))
    return 1.0


def _infer_num_layers(params_state: Any) -> int:
    layers = {int(n[2]) for n in (_names(path) for path, _ in jax.tree_util.tree_leaves_with_path(params_state))
              if len(n) > 2 and n[:2] == ["encoder", "layer"]}
    return max(layers) + 1 if layers else 0


def param_lr_scales(params_state: Any, num_layers: int | None = None, layerwise_lr_decay: float = 1.0,
                    freeze_embeddings: bool = False) -> Any:
    """A pytree like `params_state` of float learning-rate multipliers (0.0 where frozen).

    `num_layers` None counts the `encoder/layer/N` entries of the tree.
    """
    if num_layers is None:
        num_layers = _infer_num_layers(params_state)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: param_lr_scale(_names(path), num_layers, layerwise_lr_decay, freeze_embeddings),
        params_state)


def scale_by_param_lr(num_layers: int | None, layerwise_lr_decay: float) -> optax.GradientTransformation:
    """Multiply each parameter's update by its layer-wise learning-rate scale (stateless).

    The scales are recomputed from the tree paths at trace time, so the transformation works on an
    `nnx.State` with or without Variable wrappers, like `decay_mask`.
    """

    def update_fn(updates, state, params=None):
        del params
        scales = param_lr_scales(updates, num_layers, layerwise_lr_decay)
        return jax.tree.map(lambda u, s: u if s == 1.0 else u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _embedding_labels(params_state: Any) -> Any:
    """"frozen" for `embeddings.*` parameters, "trained" for the others (optax.multi_transform labels)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if _names(path)[:1] == ["embeddings"] else "trained", params_state)


def make_schedule(learning_rate: float, warmup_steps: int, total_steps: int,
                  decay: str = "linear") -> Schedule:
    """step -> learning rate: linear warmup from 0 over `warmup_steps`, then `decay` to 0 at `total_steps`.

    "linear" and "cosine" reach 0 at total_steps (and stay there); "constant" holds the peak.
    The value at step s is the rate used by the (s+1)-th update (optax counts from 0).
    """
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {', '.join(DECAYS)}; got {decay!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
    if warmup_steps < 0 or total_steps < 1 or warmup_steps > total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, got "
                         f"warmup_steps={warmup_steps}, total_steps={total_steps}")
    peak = float(learning_rate)
    decay_steps = total_steps - warmup_steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / warmup_steps if warmup_steps > 0 else jnp.float32(peak)
        frac = jnp.clip((step - warmup_steps) / max(decay_steps, 1), 0.0, 1.0)
        if decay == "linear":
            after = peak * (1.0 - frac)
        elif decay == "cosine":
            after = peak * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        else:
            after = jnp.full_like(frac, peak)
        return jnp.where(step < warmup_steps, warm, after).astype(jnp.float32)

    return schedule


def make_optimizer(learning_rate: float, warmup_steps: int, total_steps: int, weight_decay: float,
                   max_grad_norm: float | None, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   decay: str = "linear", layerwise_lr_decay: float = 1.0, freeze_embeddings: bool = False,
                   num_layers: int | None = None) -> tuple[optax.GradientTransformation, Schedule]:
    """(clip_by_global_norm -> AdamW with the schedule and the decay mask, the schedule).

    max_grad_norm None or 0 disables clipping. Use the schedule to log the learning rate:
    `schedule(step)` is the rate of the update taken at optimizer step `step` (0-based); a
    parameter's own rate is that times its `param_lr_scales` entry. `layerwise_lr_decay` in (0, 1]
    and `freeze_embeddings` are described in the module docstring; `num_layers` (the model's
    num_encoder_layers) is counted from the parameter tree when None.
    """
    if not (isinstance(layerwise_lr_decay, (int, float)) and 0.0 < layerwise_lr_decay <= 1.0):
        raise ValueError(f"layerwise_lr_decay must be in (0, 1] (1 disables it), got {layerwise_lr_decay!r}")
    if num_layers is not None and (not isinstance(num_layers, int) or num_layers < 0):
        raise ValueError(f"num_layers must be a non-negative integer or None, got {num_layers!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if max_grad_norm is not None and max_grad_norm < 0:
        raise ValueError(f"max_grad_norm must be > 0 (or None/0 to disable clipping), got {max_grad_norm!r}")
    schedule = make_schedule(learning_rate, warmup_steps, total_steps, decay)
    # A callable mask: nnx.Optimizer calls tx.init on Variables but tx.update on pure arrays.
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    steps = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    steps.append(adamw)
    if layerwise_lr_decay != 1.0:
        steps.append(scale_by_param_lr(num_layers, layerwise_lr_decay))
    tx = optax.chain(*steps) if len(steps) > 1 else adamw
    if freeze_embeddings:
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, _embedding_labels)
    return tx, schedule
