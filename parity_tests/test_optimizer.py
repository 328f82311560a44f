"""jaxclf.optim (clip -> AdamW with warmup/decay, no decay on biases and LayerNorm) vs torch.optim.AdamW.

optax.adamw:   p <- p - lr_t * (m_hat / (sqrt(v_hat) + eps) + wd * p)
torch AdamW:   p <- p * (1 - lr_t * wd);  p <- p - (lr_t / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)

Both read the parameter *before* the step for the decay term, so the two are the same expression;
they differ only in rounding order (torch: lerp for m, sqrt(v)/sqrt(bc2); optax: b1*m + (1-b1)*g,
sqrt(v/bc2)) and in clipping: torch scales by max_norm / (norm + 1e-6), optax by max_norm / norm,
a relative difference of 1e-6/norm on the clipped gradient that Adam's normalisation almost cancels.
The learning rate of each torch step is set to the optax schedule's value for that step, so the
two sides use the identical rate.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from jaxclf.train import optim
from parity_tests import twins

HYPER = dict(learning_rate=1e-2, warmup_steps=2, total_steps=6, weight_decay=0.1, max_grad_norm=1.0,
             b1=0.9, b2=0.98, eps=1e-6)
STEPS = 6
PARAM_TOL = 1e-5


def decay_by_name(model) -> dict[str, bool]:
    """The decay mask of jaxclf.optim, keyed by PyTorch parameter name."""
    return {name: bool(flag) for name, flag in twins.named_arrays(optim.decay_mask(nnx.state(model, nnx.Param))).items()}


def torch_adamw(tmodel, decays: dict[str, bool], hyper=HYPER) -> torch.optim.AdamW:
    """torch AdamW with the same two param groups (weight_decay=0 for biases and LayerNorm)."""
    named = dict(tmodel.named_parameters())
    assert set(named) == set(decays), f"decay mask names {sorted(set(decays) ^ set(named))} do not match"
    groups = [{"params": [p for n, p in named.items() if decays[n]], "weight_decay": hyper["weight_decay"]},
              {"params": [p for n, p in named.items() if not decays[n]], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=hyper["learning_rate"], betas=(hyper["b1"], hyper["b2"]),
                             eps=hyper["eps"], foreach=False)


def torch_step(opt, tmodel, schedule, step: int, max_grad_norm: float) -> None:
    for group in opt.param_groups:
        group["lr"] = float(schedule(step))  # the very float32 rate optax uses at this step
    torch.nn.utils.clip_grad_norm_(tmodel.parameters(), max_grad_norm)
    opt.step()


def worst_param_error(jax_params, tmodel) -> tuple[str, float]:
    named = twins.named_arrays(jax_params)
    errors = {n: twins.max_abs(named[n], p.detach().numpy()) for n, p in tmodel.named_parameters()}
    worst = max(errors, key=errors.get)
    return worst, errors[worst]


def test_decay_mask_follows_bert_practice():
    model = twins.jax_model(twins.tiny_config(norm_first=True), 0)
    decays = decay_by_name(model)
    no_decay = sorted(n for n, d in decays.items() if not d)
    assert all(n.endswith(".bias") or ".LayerNorm." in n for n in no_decay), no_decay
    for name, flag in decays.items():
        expected = not (name.endswith(".bias") or "LayerNorm" in name)
        assert flag == expected, f"{name}: decay {flag}, expected {expected} (HF: no decay on bias/LayerNorm)"
    # Embedding tables decay, as in the Hugging Face Trainer.
    assert decays["embeddings.word_embeddings.weight"] and decays["embeddings.position_embeddings.weight"]
    assert not decays["embeddings.LayerNorm.weight"] and not decays["encoder.LayerNorm.weight"]


@pytest.mark.parametrize("decay", optim.DECAYS)
def test_schedule_is_hf_warmup_then_decay(decay):
    peak, warmup, total = 3e-4, 4, 10
    schedule = optim.make_schedule(peak, warmup, total, decay)

    def hf(step):  # transformers.get_{linear,cosine,constant}_schedule_with_warmup
        if step < warmup:
            return peak * step / warmup
        progress = min((step - warmup) / (total - warmup), 1.0)
        return peak * {"linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * progress)),
                       "constant": 1.0}[decay]

    got = [float(schedule(s)) for s in range(total + 3)]
    want = [hf(s) for s in range(total + 3)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12, err_msg=f"{decay} schedule")
    assert float(optim.make_schedule(peak, 0, total, decay)(0)) == pytest.approx(peak, rel=1e-7)


def test_adamw_update_rule_matches_torch_on_the_same_gradients():
    """Isolates the optimiser: both sides receive identical gradients, some steps clipped, some not."""
    model = twins.jax_model(twins.tiny_config(), 0)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    tmodel = twins.torch_twin(model.config, twins.named_arrays(params))
    tx, schedule = optim.make_optimizer(**HYPER)
    opt_state = tx.init(params)
    opt = torch_adamw(tmodel, decay_by_name(model))
    update = jax.jit(lambda g, s, p: tx.update(g, s, p))
    rng = np.random.default_rng(0)
    worst = 0.0
    for step, scale in enumerate([0.01, 3.0, 0.2, 10.0, 0.05, 1.5]):  # global norms below and above 1
        grads = jax.tree.map(lambda p: jnp.asarray(scale * rng.standard_normal(p.shape), jnp.float32), params)
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        named = twins.named_arrays(grads)
        for n, p in tmodel.named_parameters():
            p.grad = torch.from_numpy(named[n].copy())
        torch_step(opt, tmodel, schedule, step, HYPER["max_grad_norm"])
        name, err = worst_param_error(params, tmodel)
        worst = max(worst, twins.record("AdamW same-grads param max-abs", err))
        assert err <= PARAM_TOL, f"step {step + 1}: {name} differs by {err:.3e} > {PARAM_TOL:g}"
    assert worst < 1e-6, f"the update rules should agree to rounding, measured {worst:.3e}"


# The attention key bias adds q.b_k to every score of a query, a constant that softmax removes: its
# true gradient is exactly 0 and both frameworks return rounding noise (~1e-9). Adam divides by
# sqrt(v_hat) + eps, so that noise moves the bias by up to lr * noise / eps per step, independently
# on each side. These biases are held to that bound instead of PARAM_TOL.
ZERO_GRADIENT = ".attention.self.key.bias"


@pytest.mark.slow
def test_six_adamw_training_steps_match_torch():
    """End to end: each side computes its own gradients on fixed batches and takes 6 AdamW steps."""
    config = twins.tiny_config(dropout=0.0, attention_dropout=0.0, num_encoder_layers=2, pooling="pooler")
    model, tmodel = twins.build_pair(config, seed=4)
    rng = np.random.default_rng(4)
    batches = [twins.random_batch(rng, config, 4, 10) for _ in range(3)]
    labels = [rng.integers(0, config.num_classes, 4).astype(np.int32) for _ in range(3)]
    tx, schedule = optim.make_optimizer(**HYPER)
    opt = torch_adamw(tmodel, decay_by_name(model))

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.as_pure(params)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, batch, labels):
        loss, grads = jax.value_and_grad(twins._loss, argnums=1)(
            graphdef, params, rest, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    start = twins.named_arrays(params)
    noise, largest, lr_sum = 0.0, 0.0, 0.0
    for step in range(STEPS):
        batch, y = batches[step % 3], labels[step % 3]
        with twins.highest():
            params, opt_state, loss, grads = train_step(
                params, opt_state, jax.tree.map(jnp.asarray, batch), jnp.asarray(y))
        opt.zero_grad(set_to_none=True)
        tloss = F.cross_entropy(tmodel(**twins.torch_inputs(batch)), torch.from_numpy(y.astype(np.int64)))
        tloss.backward()
        grads = twins.named_arrays(grads)
        for name, p in tmodel.named_parameters():
            size = max(np.abs(grads[name]).max(), np.abs(p.grad.numpy()).max())
            if name.endswith(ZERO_GRADIENT):
                noise = max(noise, float(size))
            else:
                largest = max(largest, float(size))
        torch_step(opt, tmodel, schedule, step, HYPER["max_grad_norm"])
        lr_sum += float(schedule(step))
        assert abs(float(loss) - float(tloss.detach())) <= twins.LOGITS_TOL, (
            f"step {step + 1}: loss {float(loss)} vs torch {float(tloss)}")

        named = twins.named_arrays(params)
        errors = {n: twins.max_abs(named[n], p.detach().numpy()) for n, p in tmodel.named_parameters()}
        worst = max((n for n in errors if not n.endswith(ZERO_GRADIENT)), key=errors.get)
        twins.record("AdamW 6 training steps param max-abs", errors[worst])
        assert errors[worst] <= PARAM_TOL, (
            f"after step {step + 1}: {worst} differs by {errors[worst]:.3e} > {PARAM_TOL:g} (JAX vs torch AdamW)")

        assert noise <= 1e-6 * largest, f"key-bias gradients {noise:.2e} are not rounding noise"
        bound = 2 * lr_sum * noise / HYPER["eps"]
        key_err = max(e for n, e in errors.items() if n.endswith(ZERO_GRADIENT))
        twins.record("AdamW key bias (true grad 0) param max-abs", key_err)
        assert key_err <= bound, (
            f"after step {step + 1}: key biases differ by {key_err:.3e}, more than Adam can make of "
            f"gradient noise {noise:.1e}: 2 * sum(lr) * noise / eps = {bound:.3e}")
    end = twins.named_arrays(params)
    moved = max(twins.max_abs(start[n], end[n]) for n in start)
    assert moved > 100 * PARAM_TOL, f"parameters barely moved ({moved:.2e}); the comparison is vacuous"


@pytest.mark.slow
def test_make_optimizer_drives_nnx_optimizer():
    """The training loop may use nnx.Optimizer: its tx.init sees Variables, tx.update pure arrays."""
    config = twins.tiny_config(dropout=0.0, attention_dropout=0.0)
    model = twins.jax_model(config, 0)
    reference = twins.jax_model(config, 0)
    tx, _ = optim.make_optimizer(**HYPER)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    batch = twins.random_batch(np.random.default_rng(0), config, 2, 6)
    inputs = [jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids")]

    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(*inputs), jnp.array([0, 2])).mean()

    grad_fn = nnx.jit(nnx.grad(loss_fn))

    @nnx.jit
    def nnx_step(optimizer, model, grads):
        optimizer.update(model, grads)

    @jax.jit
    def pure_step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(3):
        nnx_step(optimizer, model, grad_fn(model))
    # The same three steps with pure optax over the split state.
    params = nnx.as_pure(nnx.state(reference, nnx.Param))
    state = tx.init(params)
    for _ in range(3):
        params, state = pure_step(params, state, nnx.as_pure(nnx.state(grad_fn(reference), nnx.Param)))
        nnx.update(reference, params)
    a, b = twins.named_arrays(nnx.state(model, nnx.Param)), twins.named_arrays(params)
    err = max(twins.max_abs(a[n], b[n]) for n in a)
    assert err <= 1e-7, f"nnx.Optimizer and pure optax disagree by {err:.3e}"
    initial = twins.named_arrays(nnx.state(twins.jax_model(config, 0), nnx.Param))
    assert max(twins.max_abs(a[n], initial[n]) for n in a) > 1e-3, "the optimizer did not move the parameters"
