"""float32 forward parity: logits, last hidden state and pooled output of JAX vs torch_ref agree to 1e-5."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, target

from jaxclf.config import ACTIVATIONS, POOLINGS, POSITION_EMBEDDINGS
from parity_tests import twins

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None)


@st.composite
def configs(draw, max_layers: int = 3, min_d_model: int = 1):
    """Any small config the model accepts, weights large enough that logits are not tiny."""
    nhead = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([1, 2, 3, 4, 8]))
    if nhead * head_dim < min_d_model:
        head_dim = -(-min_d_model // nhead)
    position = draw(st.sampled_from(POSITION_EMBEDDINGS))
    if position == "sinusoidal" and (nhead * head_dim) % 2:
        position = "learned"  # a sinusoidal table needs an even d_model
    return twins.tiny_config(
        vocab_size=draw(st.integers(5, 60)),
        d_model=nhead * head_dim,
        nhead=nhead,
        num_encoder_layers=draw(st.integers(1, max_layers)),
        dim_feedforward=draw(st.sampled_from([1, 4, 8, 24, 48])),
        max_position_embeddings=draw(st.integers(1, 12)),
        num_classes=draw(st.integers(2, 5)),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        norm_first=draw(st.booleans()),
        position_embedding=position,
        type_vocab_size=draw(st.sampled_from([0, 1, 2, 3])),
        pooling=draw(st.sampled_from(POOLINGS)),
        layer_norm_eps=draw(st.sampled_from([1e-12, 1e-6, 1e-5, 1e-3])),
        initializer_range=draw(st.floats(0.05, 0.2)),
        pad_token_id=0,
    )


@st.composite
def batches(draw, config):
    """Random inputs for a config: batch 1-5, length 1..max, padding anywhere but the first token."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return twins.random_batch(rng, config, draw(st.integers(1, 5)),
                              draw(st.integers(1, config.max_position_embeddings)),
                              padding=draw(st.sampled_from(["none", "right", "mixed"])))


def assert_outputs_agree(config, batch, seed=0, jit=True, search=False):
    """Compare the three outputs; search=True (inside @given) steers hypothesis towards large errors."""
    jmodel, tmodel = twins.build_pair(config, seed)
    j, t = twins.jax_outputs(jmodel, batch, jit=jit), twins.torch_outputs(tmodel, batch)
    for key in ("logits", "last_hidden_state", "pooled"):
        err = twins.record(f"fp32 {key} max-abs", twins.max_abs(j[key], t[key]))
        assert err <= twins.LOGITS_TOL, (
            f"{key}: JAX vs torch_ref max-abs error {err:.3e} > {twins.LOGITS_TOL:g}\nconfig={config}\n"
            f"mask=\n{batch['attention_mask']}")
        if search:
            target(err, label=key)
    return j


@pytest.mark.slow
@SETTINGS
@given(st.data())
def test_forward_matches_torch_ref(data):
    config = data.draw(configs())
    batch = data.draw(batches(config))
    assert_outputs_agree(config, batch, seed=data.draw(st.integers(0, 1000)), search=True)


# Every combination of the structural options, on one shape (hypothesis covers shapes and values).
COMBINATIONS = list(itertools.product([False, True], POSITION_EMBEDDINGS, POOLINGS, ACTIVATIONS, [0, 2]))


@pytest.mark.parametrize("norm_first,position,pooling,activation,type_vocab_size", COMBINATIONS)
def test_every_option_combination(norm_first, position, pooling, activation, type_vocab_size):
    config = twins.tiny_config(norm_first=norm_first, position_embedding=position, pooling=pooling,
                               activation=activation, type_vocab_size=type_vocab_size,
                               num_encoder_layers=2, max_position_embeddings=8)
    batch = twins.random_batch(np.random.default_rng(len(COMBINATIONS)), config, 3, 8)
    out = assert_outputs_agree(config, batch, seed=7, jit=False)  # eager: ops compiled once for all 72
    assert np.abs(out["logits"]).max() > 0.05, "logits are too small for the comparison to mean anything"
