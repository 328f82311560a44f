"""The pure, jittable steps: train_step(state, batch) -> (state, metrics) and eval_step(params, batch) -> logits.

    step = jax.jit(make_train_step(graphdef, rest, tx, schedule, cfg), donate_argnums=0)
    state, metrics = step(state, batch)  # batch: {"input_ids", "attention_mask": (B, T), "labels", "weights": (B,)}
                                         # distilling (train.distill_from): + "teacher_logits" (B, C), "has_label" (B,)

The state is a dict {"params", "opt_state", "step", "rng", "loss_scale", "good_steps"} (see
jaxclf.train.loop.build_train_state). Rows of weight 0 (an eval batch's padding) never count.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxclf.config import TrainingConfig


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example loss (B,) from logits (B, C) and integer labels (B,); float32 whatever the compute dtype."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def distillation_loss(logits: jax.Array, labels: jax.Array, teacher_logits: jax.Array, has_label: jax.Array,
                      temperature: float, alpha: float) -> jax.Array:
    """Per-example loss (B,): (1 - alpha) * CE(logits, label) + alpha * T^2 * KL(softmax(teacher/T) || softmax(logits/T)).

    has_label (B,) is 1.0 for a labelled example, 0.0 for an unlabelled one, which keeps only the soft
    term. T^2 keeps the soft term's gradients on the scale of the hard one's as T changes (Hinton et
    al., 2015). float32 whatever the compute dtype.
    """
    logits, teacher_logits = logits.astype(jnp.float32), teacher_logits.astype(jnp.float32)
    soft = optax.losses.kl_divergence_with_log_targets(jax.nn.log_softmax(logits / temperature),
                                                       jax.nn.log_softmax(teacher_logits / temperature))
    hard = cross_entropy(logits, labels) * has_label
    return (1.0 - alpha) * hard + alpha * temperature ** 2 * soft


def _with_dropout_key(rest: Any, key: jax.Array) -> Any:
    """The model's RNG state with every key replaced by `key`."""
    return jax.tree.map(lambda x: key if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x, rest)


def make_loss_fn(graphdef, rest, total_weight: jax.Array, loss_scale: jax.Array,
                 distill: tuple[float, float] | None = None) -> Callable:
    """loss_fn(params, batch part, dropout key) -> (scaled loss, loss): this part's share of the batch mean.

    distill (temperature, alpha): the loss is `distillation_loss` against the part's "teacher_logits"
    (B, C) and "has_label" (B,) (jaxclf.train.distill puts them in the batches); None: cross-entropy.
    """

    def loss_fn(params, part: dict, key: jax.Array):
        # A fresh dropout stream per step, derived from (seed, step): a resumed run replays it exactly.
        model = nnx.merge(graphdef, params, _with_dropout_key(rest, key), copy=True)  # copy: dropout advances its RNG
        model.train()
        logits = model(part["input_ids"], part["attention_mask"])
        if distill is None:
            per_example = cross_entropy(logits, part["labels"])
        else:
            per_example = distillation_loss(logits, part["labels"], part["teacher_logits"], part["has_label"],
                                            *distill)
        loss = (per_example * part["weights"]).sum() / total_weight
        return loss * loss_scale, loss

    return loss_fn


def accumulate_gradients(grad_fn: Callable, params: Any, batch: dict, key: jax.Array,
                         micro_batches: int) -> tuple[Any, jax.Array]:
    """(summed gradients, summed loss) over `micro_batches` parts of the batch, run one after another (lax.scan)."""
    if micro_batches == 1:
        return grad_fn(params, batch, key)
    rows = batch["labels"].shape[0]
    if rows % micro_batches:
        raise ValueError(f"a batch of {rows} rows does not split into micro_batches={micro_batches}")

    # Micro-batch k takes rows k, k+m, k+2m, ...: with the batch sharded over devices in contiguous
    # blocks, every micro-batch stays spread evenly over them (no data movement).
    def split(x):  # (B, ...) -> (m, B / m, ...)
        return jnp.moveaxis(x.reshape(rows // micro_batches, micro_batches, *x.shape[1:]), 1, 0)

    def add_part(carry, xs):
        part, k = xs
        grads, loss = grad_fn(params, part, jax.random.fold_in(key, k))
        return jax.tree.map(jnp.add, carry, (grads, loss)), None

    zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32))
    (grads, loss), _ = jax.lax.scan(add_part, zeros, (jax.tree.map(split, batch), jnp.arange(micro_batches)))
    return grads, loss


def skip_if_overflowed(finite: jax.Array, new: Any, old: Any) -> Any:
    """`new` where the gradients were finite, else `old` (an overflowed fp16 step changes nothing)."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def next_loss_scale(state: dict, finite: jax.Array, period: int) -> dict:
    """Dynamic loss scaling: halve the scale on overflow; double it after `period` finite steps in a row."""
    good = jnp.where(finite, state["good_steps"] + 1, 0)
    grow = good >= period
    scale = jnp.where(finite, jnp.where(grow, state["loss_scale"] * 2, state["loss_scale"]),
                      jnp.maximum(state["loss_scale"] / 2, 1.0))
    return {"good_steps": jnp.where(grow, 0, good), "loss_scale": scale}


def make_train_step(graphdef, rest, tx: optax.GradientTransformation, schedule, cfg: TrainingConfig):
    """The pure train step: (state, batch) -> (state, metrics). `rest` holds the model's RNG streams."""
    fp16 = cfg.mixed_precision == "fp16"
    distill = (cfg.distill_temperature, cfg.distill_alpha) if cfg.distill_from else None

    def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
        params = state["params"]
        dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        total_weight = jnp.maximum(batch["weights"].sum(), 1.0)
        grad_fn = jax.grad(make_loss_fn(graphdef, rest, total_weight, state["loss_scale"], distill), has_aux=True)
        grads, loss = accumulate_gradients(grad_fn, params, batch, dropout_key, cfg.micro_batches)
        grads = jax.tree.map(lambda g: g / state["loss_scale"], grads)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = dict(state, step=state["step"] + 1)
        skipped = jnp.int32(0)
        if fp16:
            finite = jnp.isfinite(grad_norm)
            new_params = skip_if_overflowed(finite, new_params, params)
            opt_state = skip_if_overflowed(finite, opt_state, state["opt_state"])
            new_state.update(next_loss_scale(state, finite, cfg.loss_scale_period))
            skipped = 1 - finite.astype(jnp.int32)
        new_state.update(params=new_params, opt_state=opt_state)
        metrics = {"loss": loss, "grad_norm": grad_norm,
                   "learning_rate": schedule(state["step"]),  # this update's rate (off by skipped fp16 steps)
                   "param_norm": optax.global_norm(new_params), "update_norm": optax.global_norm(updates),
                   "skipped": skipped, "loss_scale": state["loss_scale"],
                   "tokens": batch["attention_mask"].sum(), "examples": batch["weights"].sum()}
        return new_state, metrics

    return train_step


def make_eval_step(graphdef, rest):
    """eval_step(params, batch) -> float32 logits (B, num_classes), dropout off."""

    def eval_step(params, batch: dict) -> jax.Array:
        model = nnx.merge(graphdef, params, rest)
        model.eval()
        return model(batch["input_ids"], batch["attention_mask"]).astype(jnp.float32)

    return eval_step
