#!/usr/bin/env python
"""Where a small call's time goes: jaxclf's compiled forward at batch 1, layer by layer of the call path.

On the benchmark model (random init, 4 layers, d256, 4 heads, ff 1024, vocab 8000), for each shape:

- compute only: the executable on inputs already on the device, output left on the device (blocked on);
- + host inputs: numpy int32 ids/mask passed in (what InferenceEngine and benchmarks/inference.py do);
- + output to numpy: np.asarray of the logits (the full call benchmarks/inference.py times).

Each variant is timed interleaved (A, B, C, ...) over --rounds rounds; medians of per-call microseconds.

    python benchmarks/call_overhead.py                     # batch 1 x 32 and 1 x 128, ~1 min
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import int_list, interleaved, markdown_table, median, write_results  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int_list, default=[32, 128])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=200, help="calls per variant per round")
    p.add_argument("--name", default="call_overhead")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from jaxclf.serve.compilation import compile_buckets
    from server_process import create_random_model_dir

    rows, raw = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        clf = create_random_model_dir(Path(tmp) / "model", max_length=max(args.lengths))
        device = jax.devices()[0]
        weights, executables = compile_buckets(clf.model, device, [args.batch], args.lengths)
        for t in args.lengths:
            executable = executables[(args.batch, t)]
            ids = np.random.default_rng(t).integers(5, 8000, (args.batch, t)).astype(np.int32)
            mask = np.ones_like(ids)
            ids_dev, mask_dev = jax.device_put(ids, device), jax.device_put(mask, device)

            def timed(call):
                def run() -> float:
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        call()
                    return (time.perf_counter() - start) / args.calls * 1e6
                return run

            variants = {
                "compute only (device inputs, output kept on device)":
                    timed(lambda: executable(weights, ids_dev, mask_dev).block_until_ready()),
                "+ numpy inputs": timed(lambda: executable(weights, ids, mask).block_until_ready()),
                "+ output to numpy (the benchmark's jaxclf call)":
                    timed(lambda: np.asarray(executable(weights, ids, mask))),
            }
            for v in variants.values():  # warm-up
                v()
            samples = interleaved(variants, args.rounds)
            base = median(samples[next(iter(variants))])
            for name, values in samples.items():
                us = median(values)
                rows.append([f"{args.batch}x{t}", name, us, us - base])
            raw[f"{args.batch}x{t}"] = samples
    table = markdown_table(["batch x seq", "call path", "µs per call (median)", "µs over compute only"], rows)
    note = (f"jaxclf's AOT-compiled forward (serve.compilation.compile_buckets) on the benchmark model; "
            f"{args.rounds} interleaved rounds of {args.calls} calls per variant.\n\n")
    path = write_results(args.name, {"args": vars(args), "samples_us": raw}, note + table)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
