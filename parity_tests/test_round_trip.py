"""Model directory round trip JAX -> torch_ref -> JAX is bit-exact; padding and dropout behave on both sides."""

from __future__ import annotations

import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from flax import nnx

import jaxclf
import torch_ref
from jaxclf import model_dir, weights
from parity_tests import twins

TEXTS = ["Best tacos in town, hands down.", "", "the blender leaks " * 30, "Ünïcödé ✓ 東京 🙂"]


def test_round_trip_is_bit_exact(tmp_path, saved_classifier):
    original, saved = saved_classifier
    expected = weights.to_torch_state(original.model)

    # 1. What TextClassifier.save wrote is exactly the model's parameters.
    written = safetensors.numpy.load_file(str(saved / model_dir.WEIGHTS_FILE))
    assert set(written) == set(expected), f"saved names differ: {sorted(set(written) ^ set(expected))}"
    for name in expected:
        assert written[name].dtype == np.float32, f"{name} saved as {written[name].dtype}"
        assert np.array_equal(written[name], expected[name]), f"{name} changed when saved"

    # 2. torch_ref loads exactly those values.
    torch_side = torch_ref.load(saved)
    state = torch_side.model.state_dict()
    assert set(state) == set(expected), f"torch_ref names differ: {sorted(set(state) ^ set(expected))}"
    for name, tensor in state.items():
        assert np.array_equal(tensor.numpy(), expected[name]), f"{name} changed when torch_ref loaded it"

    # 3. torch_ref's state_dict written back with safetensors, read by jaxclf.load: still exact.
    back_dir = tmp_path / "from_torch"
    back_dir.mkdir()
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()},
                                str(back_dir / model_dir.WEIGHTS_FILE), metadata={"format": "pt"})
    for name in (model_dir.CONFIG_FILE, model_dir.TOKENIZER_FILE):
        shutil.copy(saved / name, back_dir / name)
    back = jaxclf.load(back_dir)
    again = weights.to_torch_state(back.model)
    assert set(again) == set(expected)
    for name in expected:
        assert np.array_equal(again[name], expected[name]), (
            f"{name} not bit-exact after JAX -> torch_ref -> JAX: max-abs "
            f"{twins.max_abs(again[name], expected[name]):.3e}")
    assert back.config == original.config
    assert np.array_equal(back.logits(TEXTS), original.logits(TEXTS)), "same weights, different logits"


# --- padding ---------------------------------------------------------------------------------------

def jax_logits(model, batch):
    return twins.jax_outputs(model, batch)["logits"]


def torch_logits(model, batch):
    return twins.torch_outputs(model, batch)["logits"]


@pytest.mark.parametrize("pooling", ["cls", "mean", "pooler"])
def test_padding_changes_nothing(pooling):
    config = twins.tiny_config(pooling=pooling, max_position_embeddings=16, norm_first=pooling == "mean")
    jmodel, tmodel = twins.build_pair(config, seed=2)
    rng = np.random.default_rng(2)
    batch = twins.random_batch(rng, config, 4, 9, padding="mixed")

    # Appending pad tokens (mask 0) to every row: no logit moves beyond 1e-6.
    longer = {k: np.pad(v, ((0, 0), (0, 5)), constant_values=config.pad_token_id if k == "input_ids" else 0)
              for k, v in batch.items()}
    for side, run, model in (("jax", jax_logits, jmodel), ("torch_ref", torch_logits, tmodel)):
        err = twins.record("padding: appended pads logit max-abs", twins.max_abs(run(model, batch), run(model, longer)))
        assert err <= 1e-6, f"{side}: appending 5 pad tokens moved a logit by {err:.3e} > 1e-6 ({pooling})"

    # Whatever ids and token types sit at padded positions, the logits are bit-identical.
    scrambled = {k: v.copy() for k, v in longer.items()}
    padded = scrambled["attention_mask"] == 0
    scrambled["input_ids"][padded] = rng.integers(0, config.vocab_size, padded.sum())
    scrambled["token_type_ids"][padded] = rng.integers(0, config.type_vocab_size, padded.sum())
    assert padded.sum() > 0 and not np.array_equal(scrambled["input_ids"], longer["input_ids"])
    for side, run, model in (("jax", jax_logits, jmodel), ("torch_ref", torch_logits, tmodel)):
        a, b = run(model, longer), run(model, scrambled)
        assert np.array_equal(a, b), (
            f"{side}: ids at padded positions leaked into the logits ({pooling}), max-abs {twins.max_abs(a, b):.3e}")


# --- dropout ---------------------------------------------------------------------------------------

def test_dropout_is_off_in_inference_and_on_in_training(saved_classifier):
    clf, saved = saved_classifier
    assert clf.config.dropout > 0 and clf.config.attention_dropout > 0
    ids, mask = clf.encode(TEXTS)

    # JAX: TextClassifier.logits runs the model in eval mode; repeated calls are identical.
    first, second = clf.logits(TEXTS), clf.logits(TEXTS)
    assert np.array_equal(first, second), "two inference calls differ: dropout is on"
    model = clf.model
    model.eval()
    eval_logits = np.asarray(nnx.jit(lambda m, i, a: m(i, a))(model, jnp.asarray(ids), jnp.asarray(mask)))
    err = twins.record("TextClassifier.logits vs model.eval() max-abs", twins.max_abs(first, eval_logits))
    assert err <= 1e-6, f"TextClassifier.logits differs from the model in eval mode by {err:.3e}"
    model.train()
    try:
        train_call = nnx.jit(lambda m, i, a: m(i, a))  # advances the dropout RNG in the model
        a, b = (np.asarray(train_call(model, jnp.asarray(ids), jnp.asarray(mask))) for _ in range(2))
    finally:
        model.eval()
    assert not np.allclose(a, eval_logits, atol=1e-4), "JAX train mode: dropout changed nothing"
    assert not np.allclose(a, b, atol=1e-4), "JAX train mode: two calls drew the same dropout masks"
    assert np.array_equal(clf.logits(TEXTS), first), "inference after training mode differs"

    # torch_ref: TorchClassifier.logits is eval mode whatever mode the module was left in.
    torch_side = torch_ref.load(saved)
    t_first = torch_side.logits(TEXTS)
    assert np.array_equal(t_first, torch_side.logits(TEXTS)), "two torch_ref inference calls differ"
    tids, tmask = torch_side.encode(TEXTS)
    torch_side.model.train()
    with torch.no_grad():
        ta = torch_side.model(tids, attention_mask=tmask).numpy()
        tb = torch_side.model(tids, attention_mask=tmask).numpy()
    assert not np.allclose(ta, t_first, atol=1e-4), "torch_ref train mode: dropout changed nothing"
    assert not np.allclose(ta, tb, atol=1e-4), "torch_ref train mode: two calls drew the same dropout masks"
    assert np.array_equal(torch_side.logits(TEXTS), t_first), "TorchClassifier.logits is not in eval mode"


def test_gradient_checkpointing_keeps_dropout_keys():
    """Remat must not change training-mode outputs: dropout draws the same keys with and without it."""
    config = twins.tiny_config(num_encoder_layers=2)
    batch = twins.random_batch(np.random.default_rng(0), config, 2, 6)
    inputs = [jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids")]
    outs = []
    for remat in (False, True):
        model = twins.jax_model(config.replace(gradient_checkpointing=remat), seed=5)
        model.train()
        step = nnx.jit(lambda m: m(*inputs))
        outs.append([np.asarray(step(model)) for _ in range(2)])
    assert not np.array_equal(outs[0][0], outs[0][1]), "dropout keys did not advance between calls"
    for call in range(2):
        assert np.array_equal(outs[0][call], outs[1][call]), (
            f"call {call + 1}: gradient_checkpointing changed train-mode logits by "
            f"{twins.max_abs(outs[0][call], outs[1][call]):.3e}")
