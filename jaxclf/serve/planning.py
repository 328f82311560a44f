"""Which compiled shapes exist and which calls a batch of texts becomes: buckets and call planning.

Every (batch size × sequence length) bucket is compiled at start-up; a batch of token rows is
padded up to a bucket. `plan_calls` splits rows of very different lengths into a few calls, so
one long text does not pad a whole batch to its length. Pure Python, JAX-free.
"""

from __future__ import annotations

from typing import Sequence

from jaxclf import tokenizer as tokenization
from jaxclf.config import ConfigError
from jaxclf.tokenizer import bucket_for

# Cost of a compiled call, in padded token slots: batch × length, plus a fixed cost per call worth
# this many slots. Tuned on a 2-core CPU with real tweets (33 tokens median) in 32-text requests:
# 0 -> 632 predictions/s (7.2 calls a request), 64 -> 943, 128 -> 984 (2.7 calls), 256 -> 922,
# one call per request -> 763. On a 2-core Xeon, /predict at 8, 32, 64 clients, 512 served 1.04x, 0.76x,
# 0.91x what 128 did and 1024 0.89x, 0.54x, 0.50x (benchmarks/results/serving_call_overhead_xeon.md).
CALL_OVERHEAD_SLOTS = 128


# Every compiled bucket costs resident memory: measured with `jaxclf serve` defaults on the benchmark
# model (4 layers, d256, max length 128), ~10 MiB per executable loaded from the persistent cache and
# run once (the engine's warm-up). 36 buckets (batch powers of two x lengths 16-128 with midpoints)
# held 583 MiB after /ready; the 12 below hold 400 MiB after /ready and 462 after 10,000 requests
# (benchmarks/results/serving.md, with the breakdown). Batch 4 rather than 8: concurrent /predict traffic
# forms calls of 2-4 texts (1.8-3.9 texts per call at 8-64 clients), which batch 8 padded. In the same
# interleaved run, batches (1, 4, 32) served 1.11x, 1.12x, 0.99x, 1.09x the /predict requests/s of
# (1, 8, 32) at 1, 8, 32, 64 clients (0.98x, 0.92x, 0.93x, 1.03x of the 36 buckets) and 0.99-1.05x its
# /predict/batch predictions/s. The price: a call of 5-8 texts runs as two of 4 (~1.3x the padded work
# of one of 8). Adding 4 to (1, 8, 32) served better still but held 499 MiB after 10,000 requests.
# The memory is XLA:CPU's, not ours (heaptrack, 36 buckets, compiled without the cache): each executable
# keeps its optimised HLO module with the dataflow and alias analyses and the buffer assignment built to
# compile it, ~5.8 MiB, and its first run adds ~2.7 MiB (the YNNPACK runtimes of its dot fusions).
# Freed only with the executable: jax.clear_caches() and dropping JAX's lowering free nothing, and the
# XLA flags tried (codegen split count 1, fusion emitters off, XNNPACK off) changed it by under 0.3 MiB.
def default_batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """1, then 4 times powers of 8 (4, 32, 256, ...), then max_batch_size (always the last): (1, 4, 32) for 32."""
    buckets, n = {1, max_batch_size}, 4
    while n < max_batch_size:
        buckets.add(n)
        n *= 8
    return tuple(sorted(buckets))


def default_length_buckets(max_length: int) -> tuple[int, ...]:
    """32, 48, 64, then powers of two, capped by max_length (always the last): (32, 48, 64, 128) for 128.

    48 is kept because short texts dominate real traffic (a 33-token tweet pads to 48, not 64); a
    16-token bucket saves little at batch 1, where a call's fixed cost dominates.
    """
    buckets = set(tokenization.length_buckets(max_length, smallest=32))
    if 48 < max_length:
        buckets.add(48)
    return tuple(sorted(buckets))


def check_buckets(name: str, buckets: Sequence[int], largest: int | None = None,
                  largest_name: str = "") -> tuple[int, ...]:
    """`buckets` as a tuple, if strictly increasing positive integers ending at `largest` (when given)."""
    values = tuple(buckets)
    if not values or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in values):
        raise ConfigError(f"{name} must be a non-empty list of positive integers, got {list(values)}")
    if list(values) != sorted(set(values)):
        raise ConfigError(f"{name} must be strictly increasing, got {list(values)}")
    if largest is not None and values[-1] != largest:
        raise ConfigError(f"the largest of {name} must equal {largest_name}={largest} so every request "
                          f"fits a bucket; got {list(values)}")
    return values


def model_length_buckets(configured: Sequence[int] | None, max_text_length: int) -> tuple[int, ...]:
    """The length buckets to compile for a model: `configured` (checked against the most tokens it reads
    per row, jaxclf.model_dir.max_text_length) or the default ones up to it."""
    if configured is None:
        return default_length_buckets(max_text_length)
    return check_buckets("length_buckets", configured, max_text_length,
                         "the model's max text length (max_position_embeddings, or its tokenizer's truncation)")


def plan_calls(lengths: Sequence[int], batch_buckets: Sequence[int],
               length_buckets: Sequence[int]) -> list[list[int]]:
    """Split rows of these token lengths into compiled calls that pad the least.

    One call pads every row to the longest one, so a single 60-token text among 31 short
    ones would double the work of a (32, 32) batch. Rows are sorted by length and cut into
    consecutive groups (each at most the largest batch bucket) minimising the padded
    slots b × t summed over calls plus CALL_OVERHEAD_SLOTS per call (an exact dynamic
    programme, O(n × largest batch bucket)). Returns groups of row indices.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n, largest = len(order), batch_buckets[-1]
    padded_batch = [0] + [bucket_for(k, batch_buckets) for k in range(1, largest + 1)]
    best = [0.0] + [float("inf")] * n  # best[i]: cheapest plan of the i shortest rows
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        t = bucket_for(lengths[order[i - 1]], length_buckets)  # the group's longest row
        for j in range(max(0, i - largest), i):
            cost = best[j] + padded_batch[i - j] * t + CALL_OVERHEAD_SLOTS
            if cost < best[i]:
                best[i], cut[i] = cost, j
    groups, i = [], n
    while i > 0:
        groups.append(order[cut[i]:i])
        i = cut[i]
    return groups[::-1]
