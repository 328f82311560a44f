#!/usr/bin/env python
"""XLA CPU flags for jaxclf's forward: throughput of the same compiled buckets under different XLA_FLAGS.

XLA reads XLA_FLAGS once, when its CPU client starts, so each flag set runs in its own fresh process:
a worker builds the benchmark model (random init, the same seed and shape as benchmarks/inference.py),
compiles the forward per (batch, length) with the flags in its environment, checks its logits against
the baseline's, and times each shape for about --target-s. The parent runs the flag sets in turn
(A, B, C, A, B, C, ...) for --rounds rounds, so every set sees the same machine noise, and reports
the median examples/s of each shape under each set, as a ratio to the baseline (the empty flag set).

    python benchmarks/xla_flags.py                                         # the candidates below, ~4 min
    python benchmarks/xla_flags.py --flags=--xla_cpu_experimental_xnn_fusion_type=dot --rounds 5

Candidates (XLA flags this jaxlib knows): the XNNPACK dot fusion (xnn dot), the oneDNN and YNN fusions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import int_list, markdown_table, median, write_results  # noqa: E402

CANDIDATES = ("--xla_cpu_experimental_xnn_fusion_type=dot",
              "--xla_cpu_experimental_onednn_fusion_type=dot",
              "--xla_cpu_experimental_ynn_fusion_type=dot")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flags", action="append", default=None,
                   help=f"an XLA_FLAGS value to compare with none (repeatable; default: {', '.join(CANDIDATES)})")
    p.add_argument("--batch-sizes", type=int_list, default=[1, 8, 32, 64])
    p.add_argument("--lengths", type=int_list, default=[32, 128])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--target-s", type=float, default=0.4, help="about how long each shape is timed per round")
    p.add_argument("--name", default="xla_flags", help="result file name under benchmarks/results/")
    p.add_argument("--worker", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    p.add_argument("--reference", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args) -> int:
    """In a fresh process (XLA_FLAGS already in the environment): one round of every shape, JSON out."""
    import jax
    import numpy as np

    import jaxclf
    from jaxclf.serve.compilation import compile_buckets

    clf = jaxclf.load(args.worker)
    weights, executables = compile_buckets(clf.model, jax.devices()[0], args.batch_sizes, args.lengths)
    reference = json.loads(Path(args.reference).read_text()) if args.reference and Path(args.reference).exists() \
        else {}
    out = {}
    for (b, t), executable in executables.items():
        rng = np.random.default_rng(1000 * t + b)
        ids = rng.integers(5, clf.config.vocab_size, (b, t)).astype(np.int32)
        mask = np.ones((b, t), np.int32)
        logits = np.asarray(executable(weights, ids, mask))
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.target_s or n < 3:
            np.asarray(executable(weights, ids, mask))
            n += 1
        seconds = (time.perf_counter() - start) / n
        key = f"{b}x{t}"
        diff = float(np.abs(logits - np.asarray(reference[key])).max()) if key in reference else 0.0
        out[key] = {"examples_per_s": b / seconds, "max_abs_logit_diff_vs_baseline": diff, "logits": logits.tolist()}
    print(json.dumps(out), flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    from server_process import create_random_model_dir

    flag_sets = ["", *(args.flags or CANDIDATES)]
    samples: dict[str, dict[str, list[float]]] = {f: {} for f in flag_sets}
    diffs: dict[str, dict[str, float]] = {f: {} for f in flag_sets}
    with tempfile.TemporaryDirectory(prefix="jaxclf-bench-xla-flags-") as tmp:
        model_dir = Path(tmp) / "model"
        create_random_model_dir(model_dir, max_length=max(args.lengths))
        reference = Path(tmp) / "baseline_logits.json"
        for round_ in range(args.rounds):
            for flags in flag_sets:
                cmd = [sys.executable, __file__, "--worker", str(model_dir), "--reference", str(reference),
                       "--batch-sizes", ",".join(map(str, args.batch_sizes)),
                       "--lengths", ",".join(map(str, args.lengths)), "--target-s", str(args.target_s)]
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                                      env={**os.environ, "XLA_FLAGS": flags})
                if proc.returncode != 0:
                    print(f"flags {flags!r} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                    samples.pop(flags, None)
                    continue
                out = json.loads(proc.stdout.strip().splitlines()[-1])
                if flags == "" and not reference.exists():
                    reference.write_text(json.dumps({k: v["logits"] for k, v in out.items()}))
                for key, entry in out.items():
                    samples.setdefault(flags, {}).setdefault(key, []).append(entry["examples_per_s"])
                    diffs[flags][key] = max(diffs[flags].get(key, 0.0), entry["max_abs_logit_diff_vs_baseline"])
                print(f"round {round_ + 1} {flags or 'baseline'}: " + ", ".join(
                    f"{k} {v['examples_per_s']:.0f}" for k, v in out.items()), flush=True)
    shapes = list(samples[""])
    rows = []
    for flags in samples:
        for key in shapes:
            rate = median(samples[flags][key])
            rows.append([flags or "(none: the default)", key, rate, rate / median(samples[""][key]),
                         diffs[flags].get(key, 0.0)])
    table = markdown_table(["XLA_FLAGS", "batch x seq", "examples/s", "/ default", "max abs logit diff"], rows)
    note = (f"jaxclf's compiled forward (serve.compilation.compile_buckets) on the benchmark model (random init, "
            f"4 layers, d256, 4 heads, ff 1024, vocab 8000), all-real tokens; each flag set in a fresh process, "
            f"sets run in turn for {args.rounds} rounds, ~{args.target_s:g}s per shape per round; examples/s: "
            f"median over rounds.\n\n")
    path = write_results(args.name, {"args": vars(args), "samples": samples, "max_abs_logit_diff": diffs},
                         note + table)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
