"""Layer-wise learning-rate decay and frozen embeddings in jaxclf.optim.make_optimizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxclf.train import optim
from jaxclf.config import ModelConfig
from jaxclf.model import create_model

LAYERS = 3
DECAY = 0.5


@pytest.fixture(scope="module")
def params():
    """The parameters (an nnx.State) of a tiny 3-layer model, as jaxclf.train holds them."""
    config = ModelConfig(vocab_size=30, d_model=8, nhead=2, num_encoder_layers=LAYERS, dim_feedforward=16,
                         max_position_embeddings=8, type_vocab_size=2, pooling="pooler", num_classes=2)
    _, params, _ = nnx.split(create_model(config, seed=1), nnx.Param, ...)
    return params


def gradients(params, steps: int) -> list:
    """Random gradients, one tree per step (the mechanism is what is tested, not the loss)."""
    rng = np.random.default_rng(0)
    return [jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
            for _ in range(steps)]


def flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(optim._names(path)): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def run(tx, params, steps: int):
    """`steps` jitted optimiser steps as jaxclf.train takes them; returns (params, each step's update)."""
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, updates

    all_updates = []
    for grads in gradients(params, steps):
        params, opt_state, updates = step(params, opt_state, grads)
        all_updates.append(flat(updates))
    return params, all_updates


def optimizer(weight_decay: float = 0.1, **kwargs):
    return optim.make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=10, weight_decay=weight_decay,
                                max_grad_norm=1.0, **kwargs)[0]


def expected_scale(name: str) -> float:
    parts = name.split("/")
    if parts[0] == "embeddings":
        return DECAY ** LAYERS
    if parts[:2] == ["encoder", "layer"]:
        return DECAY ** (LAYERS - (int(parts[2]) + 1))
    return 1.0


def test_param_lr_scales_follow_the_layer_depth(params):
    scales = flat(optim.param_lr_scales(params, LAYERS, DECAY))
    assert scales["embeddings/word_embeddings/embedding"] == DECAY ** 3
    assert scales["encoder/layer/0/attention/self/query/kernel"] == DECAY ** 2
    assert scales["encoder/layer/2/output/LayerNorm/scale"] == 1.0
    assert scales["pooler/dense/kernel"] == scales["classifier/bias"] == 1.0
    assert flat(optim.param_lr_scales(params, None, DECAY)) == scales  # num_layers counted from the tree
    frozen = flat(optim.param_lr_scales(params, LAYERS, 1.0, freeze_embeddings=True))
    assert {k: v for k, v in frozen.items() if k.startswith("embeddings/")} == {
        k: 0.0 for k in frozen if k.startswith("embeddings/")}
    assert all(v == 1.0 for k, v in frozen.items() if not k.startswith("embeddings/"))


@pytest.mark.parametrize("weight_decay,steps", [(0.1, 1), (0.0, 3)])
def test_layer_updates_are_scaled_by_decay_to_the_depth(params, weight_decay, steps):
    """Same gradients in both runs; the scale multiplies the whole AdamW update, decoupled decay included.

    With weight decay the two runs' parameters (hence their decay terms) part after step 1.
    """
    _, reference = run(optimizer(weight_decay=weight_decay), params, steps)
    _, decayed = run(optimizer(weight_decay=weight_decay, layerwise_lr_decay=DECAY, num_layers=LAYERS),
                     params, steps)
    for step in range(steps):
        for name, u in reference[step].items():
            assert np.abs(u).max() > 0, name
            np.testing.assert_allclose(decayed[step][name], u * expected_scale(name), rtol=1e-5, atol=1e-9,
                                       err_msg=f"step {step + 1}: {name}")


def test_frozen_embeddings_do_not_move(params):
    before = flat(params)
    after, _ = run(optimizer(freeze_embeddings=True), params, steps=4)
    after = flat(after)
    for name in before:
        if name.startswith("embeddings/"):
            assert np.array_equal(after[name], before[name]), name
    moved = [n for n in before if not n.startswith("embeddings/") and not np.array_equal(after[n], before[n])]
    assert "classifier/kernel" in moved and "encoder/layer/0/attention/self/query/kernel" in moved


def test_frozen_embeddings_hold_no_adam_moments(params):
    tx = optimizer(freeze_embeddings=True, layerwise_lr_decay=0.8)
    moments = [x for x in jax.tree.leaves(tx.init(params)) if x.ndim == 2]
    word = params["embeddings"]["word_embeddings"]["embedding"].get_value()
    assert not any(x.shape == word.shape for x in moments)


def test_defaults_are_the_plain_optimizer(params):
    schedule = optim.make_schedule(1e-2, 0, 10)
    plain = optax.chain(optax.clip_by_global_norm(1.0),
                        optax.adamw(schedule, weight_decay=0.1, mask=optim.decay_mask))
    _, want = run(plain, params, steps=2)
    _, got = run(optimizer(), params, steps=2)
    for name in want[1]:
        assert np.array_equal(got[1][name], want[1][name]), name


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_layerwise_lr_decay_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="layerwise_lr_decay must be in"):
        optimizer(layerwise_lr_decay=bad)
