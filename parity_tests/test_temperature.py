"""Temperature scaling is part of the model: jaxclf and torch_ref divide logits by config.temperature alike,
jaxclf.load / torch_ref.load apply it from config.json, and the Hugging Face export folds it into the head."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxclf
import torch_ref
from jaxclf import weights
from parity_tests import twins

TEMPERATURE = 2.7
TOL = 1e-6


def jax_logits(model, batch) -> np.ndarray:
    """Logits through TransformerClassifier.__call__ (twins.jax_outputs reads the head directly)."""
    model.eval()
    with twins.highest():
        out = model(*(jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids")))
    return np.asarray(out, np.float32)


def torch_logits(model, batch) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(**twins.torch_inputs(batch)).numpy()


def test_forward_divides_by_the_temperature_and_torch_ref_matches():
    plain = twins.tiny_config()
    scaled = plain.replace(temperature=TEMPERATURE)
    batch = twins.random_batch(np.random.default_rng(0), plain, 4, plain.max_position_embeddings)
    raw = jax_logits(twins.jax_model(plain, seed=5), batch)
    jmodel = twins.jax_model(scaled, seed=5)  # the same weights: the temperature does not change any shape
    calibrated = jax_logits(jmodel, batch)
    assert np.abs(raw).max() > 0.1, "logits too small for the comparison to mean anything"
    np.testing.assert_allclose(calibrated, raw / TEMPERATURE, rtol=0, atol=TOL)
    np.testing.assert_array_equal(calibrated.argmax(-1), raw.argmax(-1))
    tmodel = twins.torch_twin(scaled, weights.to_torch_state(jmodel))
    err = twins.record("temperature logits max-abs", twins.max_abs(calibrated, torch_logits(tmodel, batch)))
    assert err <= TOL, f"JAX vs torch_ref with temperature {TEMPERATURE}: {err:.3e}"


def test_loaders_apply_the_temperature_from_config_json(saved_classifier, tmp_path):
    """A model directory whose config.json records a temperature: jaxclf.load and torch_ref.load both divide by it."""
    _, path = saved_classifier
    texts = twins.sample_texts()[:6]
    with twins.highest():
        raw = jaxclf.load(path).logits(texts)
    calibrated_dir = tmp_path / "calibrated"
    shutil.copytree(path, calibrated_dir)
    config = json.loads((calibrated_dir / "config.json").read_text())
    config["model"]["temperature"] = TEMPERATURE
    (calibrated_dir / "config.json").write_text(json.dumps(config))
    clf = jaxclf.load(calibrated_dir)
    assert clf.config.temperature == TEMPERATURE
    with twins.highest():
        got = clf.logits(texts)
    np.testing.assert_allclose(got, raw / TEMPERATURE, rtol=0, atol=TOL)
    reference = torch_ref.load(calibrated_dir).logits(texts)
    assert twins.max_abs(got, reference) <= twins.LOGITS_TOL
    scaled_confidence = max(p["confidence"] for p in clf.predict(texts))
    assert scaled_confidence < max(p["confidence"] for p in jaxclf.load(path).predict(texts))


def test_hf_export_folds_the_temperature_into_the_head(tmp_path):
    transformers = pytest.importorskip("transformers", reason="pip install 'jaxclf[hf]' for the HF export")
    from jaxclf import hf
    from parity_tests.test_hf_parity import hf_batch, hf_outputs, save_checkpoint

    hf_dir = tmp_path / "hf"
    original = save_checkpoint(hf_dir, head=True, seed=3)
    imported = hf.import_hf(hf_dir, tmp_path / "jaxclf")
    config = json.loads((imported / "config.json").read_text())
    config["model"]["temperature"] = TEMPERATURE
    (imported / "config.json").write_text(json.dumps(config))
    exported = hf.export_hf(imported, tmp_path / "exported")

    batch = hf_batch(hf_dir, max_length=48)
    reloaded = transformers.BertForSequenceClassification.from_pretrained(exported).eval()
    want = hf_outputs(original, batch)["logits"] / TEMPERATURE
    got_hf = hf_outputs(reloaded, batch)["logits"]
    got_jax = jax_logits(jaxclf.load(imported).model, batch)
    assert twins.max_abs(got_hf, want) <= TOL
    assert twins.max_abs(got_jax, got_hf) <= twins.LOGITS_TOL
