"""Model FLOPs and the measured matmul peak, for reporting model FLOPs utilisation (MFU)."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from jaxclf.config import ModelConfig


def forward_flops_per_example(config: ModelConfig, seq_len: int) -> float:
    """Matmul FLOPs of one forward pass over a (padded) sequence: 2 per multiply-add.

    Per layer: Q/K/V/output projections 4*T*D^2, feed-forward 2*T*D*F, attention scores and
    context 2*T^2*D; plus the classifier. Embedding lookups and elementwise work are not counted,
    as in the usual MFU convention (PaLM appendix B).
    """
    t, d, f = seq_len, config.d_model, config.dim_feedforward
    per_layer = 4 * t * d * d + 2 * t * d * f + 2 * t * t * d
    head = d * d if config.pooling == "pooler" else 0
    return 2.0 * (config.num_encoder_layers * per_layer + head + d * config.num_classes)


def train_flops_per_example(config: ModelConfig, seq_len: int) -> float:
    """Forward plus backward (twice the forward): 3x the forward FLOPs."""
    return 3.0 * forward_flops_per_example(config, seq_len)


@functools.lru_cache(maxsize=4)
def measure_matmul_peak(dtype: str = "float32", n: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of a large square matmul on the default device: the achievable peak MFU is measured against."""
    a = jnp.ones((n, n), dtype=dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 3:
        matmul(a, a).block_until_ready()
        count += 1
    return 2.0 * n ** 3 * count / (time.perf_counter() - start)
