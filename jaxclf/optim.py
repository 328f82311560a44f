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
                   decay: str = "linear") -> tuple[optax.GradientTransformation, Schedule]:
    """(clip_by_global_norm -> AdamW with the schedule and the decay mask, the schedule).

    max_grad_norm None or 0 disables clipping. Use the schedule to log the learning rate:
    `schedule(step)` is the rate of the update taken at optimizer step `step` (0-based).
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if max_grad_norm is not None and max_grad_norm < 0:
        raise ValueError(f"max_grad_norm must be > 0 (or None/0 to disable clipping), got {max_grad_norm!r}")
    schedule = make_schedule(learning_rate, warmup_steps, total_steps, decay)
    # A callable mask: nnx.Optimizer calls tx.init on Variables but tx.update on pure arrays.
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    if max_grad_norm:
        return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw), schedule
    return adamw, schedule
