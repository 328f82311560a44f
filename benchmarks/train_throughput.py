#!/usr/bin/env python
"""Train-step throughput: jaxclf's jitted step vs torch_ref (eager + fused AdamW, and torch.compile).

Same model, batch, sequence length and thread count; fp32 and bf16; timed interleaved over
several rounds, medians and ratios reported. MFU is against the larger of the JAX and PyTorch
matmul peaks measured in the same run. jaxclf runs the batch as --micro-batch-rows rows at a time
inside its jitted step (TrainingConfig.micro_batches, lax.scan); "jaxclf, whole batch" is the
same step without it.

    python benchmarks/train_throughput.py                       # 4 layers, d_model 256, seq 128, batch 32
    python benchmarks/train_throughput.py --dtypes float32 --no-compile --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

# libgomp's spinning wait makes small torch calls 10-100x slower on a shared machine (see
# benchmarks/README.md, inference.py); PASSIVE is torch's faster setting here. An explicit
# OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from common import add_model_args, interleaved, markdown_table, median, timed, write_results  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="steps timed per round and variant")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--micro-batch-rows", type=int, default=8,
                   help="rows per jaxclf micro-batch (TrainingConfig.micro_batches = batch / this; default 8)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--name", default="train_throughput", help="result file name under benchmarks/results/")
    return p.parse_args(argv)


def jax_step_runner(config, batch_np, dtype: str, micro_batches: int = 1):
    import jax
    import jax.numpy as jnp

    from jaxclf.train import sharding
    from jaxclf.config import TrainingConfig
    from jaxclf.train.loop import build_train_state
    from jaxclf.train.step import make_train_step

    cfg = TrainingConfig(mixed_precision={"float32": "no", "bfloat16": "bf16"}[dtype], warmup_steps=10,
                         per_device_train_batch_size=len(batch_np["labels"]), micro_batches=micro_batches)
    mesh = sharding.make_mesh()
    setup = build_train_state(config.replace(dtype=dtype), cfg, mesh, total_steps=10_000)
    step = jax.jit(make_train_step(setup.graphdef, setup.rest, setup.tx, setup.schedule, cfg), donate_argnums=0)
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    holder = {"state": setup.state}
    t0 = time.perf_counter()
    holder["state"], m = step(holder["state"], batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    return run, compile_s


def torch_step_runner(config, batch_np, dtype: str, compiled: bool):
    import torch

    from torch_ref.model import TransformerClassifier

    model = TransformerClassifier.from_config(config, seed=0)
    model.train()
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=5e-4, fused=True)
    ids = torch.from_numpy(batch_np["input_ids"].astype(np.int64))
    mask = torch.from_numpy(batch_np["attention_mask"].astype(np.int64))
    labels = torch.from_numpy(batch_np["labels"].astype(np.int64))
    forward = torch.compile(model) if compiled else model

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = forward(ids, mask)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    t0 = time.perf_counter()
    run()
    return run, time.perf_counter() - t0


def matmul_peak() -> dict:
    import torch

    from jaxclf.train import flops
    n = 1024
    a = torch.ones(n, n)
    torch_peak = 2 * n ** 3 / timed(lambda: torch.mm(a, a), 20)
    return {"jax_flops_per_s": flops.measure_matmul_peak("float32", n), "torch_flops_per_s": torch_peak}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from jaxclf.config import ModelConfig
    from jaxclf.train.flops import train_flops_per_example

    torch.set_num_threads(os.cpu_count())
    config = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, nhead=args.heads,
                         num_encoder_layers=args.layers, dim_feedforward=args.ff,
                         max_position_embeddings=args.seq, num_classes=3)
    rng = np.random.default_rng(0)
    lengths = rng.integers(args.seq // 2, args.seq + 1, args.batch)
    mask = (np.arange(args.seq)[None, :] < lengths[:, None]).astype(np.int32)
    batch = {"input_ids": (rng.integers(5, args.vocab, (args.batch, args.seq)) * mask).astype(np.int32),
             "attention_mask": mask, "labels": rng.integers(0, 3, args.batch).astype(np.int32),
             "weights": np.ones(args.batch, np.float32)}

    if args.batch % args.micro_batch_rows:
        raise SystemExit(f"--batch {args.batch} is not a multiple of --micro-batch-rows {args.micro_batch_rows}")
    micro_batches = args.batch // args.micro_batch_rows
    peaks = matmul_peak()
    peak = max(peaks.values())
    flops_per_step = train_flops_per_example(config, args.seq) * args.batch
    rows, results = [], {}
    for dtype in args.dtypes.split(","):
        runners, compile_times = {}, {}
        runners["jaxclf"], compile_times["jaxclf"] = jax_step_runner(config, batch, dtype, micro_batches)
        runners["jaxclf, whole batch"], compile_times["jaxclf, whole batch"] = jax_step_runner(config, batch, dtype)
        runners["torch eager"], compile_times["torch eager"] = torch_step_runner(config, batch, dtype, False)
        if not args.no_compile:
            runners["torch.compile"], compile_times["torch.compile"] = torch_step_runner(config, batch, dtype, True)
        samples = interleaved({k: (lambda r=r: timed(r, args.steps)) for k, r in runners.items()}, args.rounds)
        best_torch = min(median(v) for k, v in samples.items() if k.startswith("torch"))
        for name, s in samples.items():
            sec = median(s)
            entry = {"seconds_per_step": sec, "samples": s, "examples_per_s": args.batch / sec,
                     "tokens_per_s": args.batch * args.seq / sec, "real_tokens_per_s": float(mask.sum()) / sec,
                     "mfu": flops_per_step / sec / peak, "first_step_s": compile_times[name]}
            results[f"{dtype}/{name}"] = entry
            rows.append([dtype, name, entry["examples_per_s"], entry["tokens_per_s"], 100 * entry["mfu"],
                         sec * 1e3, compile_times[name], (best_torch / sec) if name.startswith("jaxclf") else ""])
        print(f"{dtype}: " + ", ".join(f"{k} {args.batch / median(v):.1f} ex/s" for k, v in samples.items()),
              flush=True)
    table = (f"Model: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, ff {args.ff}; "
             f"batch {args.batch} x seq {args.seq}; jaxclf in {micro_batches} micro-batches of {args.micro_batch_rows} "
             f"rows; {args.rounds} interleaved rounds x {args.steps} steps, medians; "
             f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}. "
             f"Matmul peak: JAX {peaks['jax_flops_per_s'] / 1e9:.1f}, torch {peaks['torch_flops_per_s'] / 1e9:.1f} "
             f"GFLOP/s.\n\n" + markdown_table(
                 ["dtype", "variant", "examples/s", "tokens/s", "MFU %", "ms/step", "first step s",
                  "jaxclf / faster torch"], rows))
    path = write_results(args.name, {"args": vars(args), "matmul_peak": peaks, "results": results}, table)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
