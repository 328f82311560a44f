"""bfloat16 compute: JAX (dtype="bfloat16") vs torch_ref cast to bfloat16, and vs float32.

JAX runs bf16 with float32 weights (mixed-precision training's model) and with bf16 weights (what
`jaxclf.load(dir, dtype="bfloat16")` and `jaxclf serve --dtype bfloat16` run); its matmuls take bf16
inputs and accumulate in float32.

What is meaningful in bf16: not equal logits (each framework rounds at different points: XLA keeps
fused elementwise chains in float32, PyTorch rounds after every op) but equal decisions and close
distributions. Both sides load the same float32 master weights; the torch module is then cast with
`.to(torch.bfloat16)` (its LayerNorm/softmax still run in float32, as in jaxclf).

Measured over 3 configs x 256 random padded inputs (|logits| up to ~2.8, median top-2 margin 0.35-0.74),
float32 weights / bf16 weights:
    KL(p_torch_bf16 || p_jax_bf16)  worst 2.2e-4 / 1.9e-4
    KL(p_torch_fp32 || p_jax_bf16)  worst 1.1e-4 / 1.5e-4
    max |logit| difference          worst 2.7e-2 / 3.5e-2
    label agreement                 >= 99.2% / 98.0%; every disagreement is a near tie (fp32 top-2 margin <= 0.1)
Bounds, with margin: KL <= 1e-3; labels agree on every input whose float32 top-2 margin exceeds 0.1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxclf import weights
from parity_tests import twins

KL_BOUND = 1e-3
TIE_MARGIN = 0.1  # > 2x the worst bf16 logit difference measured (3.5e-2)
MIN_AGREEMENT = 0.97

CONFIGS = {
    "post-LN pooler gelu": dict(norm_first=False, pooling="pooler"),
    "pre-LN mean gelu_tanh sinusoidal": dict(norm_first=True, pooling="mean", activation="gelu_tanh",
                                             position_embedding="sinusoidal"),
    "post-LN cls relu": dict(pooling="cls", activation="relu", type_vocab_size=0),
}


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(p) || softmax(q)) per row, in float64."""
    p, q = np.asarray(p_logits, np.float64), np.asarray(q_logits, np.float64)
    log_p = p - np.logaddexp.reduce(p, axis=1, keepdims=True)
    log_q = q - np.logaddexp.reduce(q, axis=1, keepdims=True)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=1)


def assert_within_bf16_bounds(name: str, want: np.ndarray, got: np.ndarray) -> None:
    """bf16 logits `got` against float32's `want`: they differ, yet KL <= KL_BOUND and the same label
    wherever float32's top-2 margin exceeds TIE_MARGIN (recorded as `name`)."""
    kl = kl_divergence(want, got)
    twins.record(f"{name}: KL(p_fp32 || p_bf16) max", kl.max())
    twins.record(f"{name}: logits |fp32 - bf16| max", twins.max_abs(want, got))
    assert 0 < twins.max_abs(want, got) and kl.max() <= KL_BOUND, (twins.max_abs(want, got), kl.max())
    top2 = np.sort(want, axis=1)
    clear = top2[:, -1] - top2[:, -2] > TIE_MARGIN
    assert (want.argmax(1) == got.argmax(1))[clear].all()


@pytest.mark.slow
@pytest.mark.parametrize("weights_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", CONFIGS)
def test_bf16_labels_agree_and_kl_is_small(name, weights_dtype):
    """weights_dtype float32: mixed-precision training's model; bfloat16: what jaxclf.load(dir, dtype=...) serves."""
    config = twins.tiny_config(d_model=32, nhead=4, dim_feedforward=64, num_encoder_layers=2,
                               max_position_embeddings=16, num_classes=4, **CONFIGS[name])
    jax_fp32, torch_fp32 = twins.build_pair(config, seed=1)
    master = weights.to_torch_state(jax_fp32)
    jax_bf16 = twins.jax_model(config.replace(dtype="bfloat16", param_dtype=weights_dtype), seed=0)
    weights.load_torch_state(jax_bf16, master)
    torch_bf16 = twins.torch_twin(config, master).to(torch.bfloat16)

    rng = np.random.default_rng(0)
    logits = {"jax_bf16": [], "torch_bf16": [], "torch_fp32": []}
    for _ in range(4):  # 4 x 64 = 256 inputs of one shape: one compilation
        batch = twins.random_batch(rng, config, 64, 16)
        logits["jax_bf16"].append(twins.jax_outputs(jax_bf16, batch)["logits"])
        logits["torch_bf16"].append(twins.torch_outputs(torch_bf16, batch)["logits"])
        logits["torch_fp32"].append(twins.torch_outputs(torch_fp32, batch)["logits"])
    logits = {k: np.concatenate(v) for k, v in logits.items()}
    reference = np.sort(logits["torch_fp32"], axis=1)
    margin = reference[:, -1] - reference[:, -2]
    assert np.median(margin) > 0.1 and np.abs(reference).max() > 1.0, "logits too flat to mean anything"

    for ref in ("torch_bf16", "torch_fp32"):
        kl = kl_divergence(logits[ref], logits["jax_bf16"])
        twins.record(f"bf16, {weights_dtype} weights: KL({ref} || jax_bf16) max", kl.max())
        twins.record(f"bf16, {weights_dtype} weights: logits |{ref} - jax_bf16| max", twins.max_abs(logits[ref], logits["jax_bf16"]))
        assert kl.max() <= KL_BOUND, (
            f"{name}: KL(p_{ref} || p_jax_bf16) reaches {kl.max():.3e} > {KL_BOUND:g} "
            f"(mean {kl.mean():.2e}, input {int(kl.argmax())})")

        same = logits[ref].argmax(1) == logits["jax_bf16"].argmax(1)
        twins.record(f"bf16, {weights_dtype} weights: label disagreement rate vs {ref}", 1.0 - same.mean())
        clear = margin > TIE_MARGIN
        assert same[clear].all(), (
            f"{name}: jax_bf16 and {ref} predict different labels for {int((~same & clear).sum())} input(s) "
            f"whose float32 top-2 margin exceeds {TIE_MARGIN} (margins {margin[~same & clear]})")
        assert same.mean() >= MIN_AGREEMENT, f"{name}: labels agree on only {same.mean():.1%} of inputs"



def _equations(jaxpr):
    """Every equation of a jaxpr, inside nested calls (pjit, custom_jvp, ...) too."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _equations(inner)


def test_reduced_precision_matmuls_accumulate_in_float32_and_gelu_takes_erf():
    """XLA:CPU runs bf16 x bf16 -> f32 dots on AMX / AVX512-BF16 kernels but bf16 -> bf16 ones on a generic
    path slower than float32 (jaxclf.model.Dense); jax.nn.gelu's erfc expansion took 8.4 of 29 ms a call."""
    config = twins.tiny_config(d_model=32, nhead=4, dim_feedforward=64, num_encoder_layers=2,
                               max_position_embeddings=16, num_classes=4, dtype="bfloat16", param_dtype="bfloat16")
    model = twins.jax_model(config, seed=0)
    model.eval()
    ids = jnp.ones((2, 8), jnp.int32)
    equations = list(_equations(jax.make_jaxpr(lambda i: model(i, i > 0))(ids).jaxpr))
    dots = [e for e in equations if e.primitive.name == "dot_general"]
    # Per layer q, k, v, attention output, feed-forward in and out, and the two attention products; the pooler; the head.
    assert len(dots) == 2 * 8 + 2, [str(e) for e in dots]
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2, str(eqn)
        assert eqn.outvars[0].aval.dtype == jnp.float32, f"a bf16 matmul not accumulating in float32: {eqn}"
    names = {e.primitive.name for e in equations}
    assert "erf" in names and "erfc" not in names, sorted(names)


def test_the_engine_and_service_run_bfloat16_close_to_float32(saved_model_dir):
    """`jaxclf serve --dtype bfloat16`: bf16 weights and executables behind the same buckets, same bounds."""
    from jaxclf.serve import create_app
    from jaxclf.serve.engine import InferenceEngine

    buckets = dict(max_batch_size=8, batch_buckets=(1, 8), length_buckets=(8, 24), cache_size=0)
    texts = twins.sample_texts()[:40] + ["", "word " * 200]  # an empty text and one cut at 24 tokens
    with InferenceEngine(saved_model_dir, **buckets) as fp32, \
            InferenceEngine(saved_model_dir, **buckets, dtype="bfloat16") as bf16:
        want, got = ([r.logits for r in engine.predict_batch(texts).results] for engine in (fp32, bf16))
        want, got = np.array(want), np.array(got)
        assert_within_bf16_bounds("bf16 engine", want, got)

        params = jax.tree.leaves(nnx.state(bf16.classifier.model, nnx.Param))
        assert {p.dtype for p in params} == {jnp.dtype(jnp.bfloat16)}  # held in bf16: half the weight memory
        health = bf16.health_check()
        assert (health["status"], health["dtype"], health["stray_compilations"]) == ("ok", "bfloat16", 0)
        client = create_app(bf16).test_client()
        info = client.get("/model/info").get_json()
        assert info["serving"]["dtype"] == info["config"]["dtype"] == "bfloat16"
        response = client.post("/predict", json={"text": texts[0]})
        assert response.status_code == 200 and response.get_json()["label"] == bf16.labels[int(got[0].argmax())]
