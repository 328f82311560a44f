#!/usr/bin/env python
"""Bulk prediction: `jaxclf predict --input ... --output ...` against the raw compiled forward and the server.

On the same texts and the same model (random init, 4 layers, d_model 256, as the other benchmarks):

- raw forward: the bulk job's own executables (jaxclf.bulk.forward.BucketedForward) on texts tokenized,
  sorted, padded and put on the device beforehand; only the compiled calls are timed. For each batch
  size the rows/s of all texts; "best" is the fastest batch size: the ceiling the pipeline aims at.
- bulk job: `python -m jaxclf.cli.predict` in a subprocess at that batch size, from a JSONL file to
  JSONL shards: reading, tokenizing, sorting, padding, the calls, softmax, writing and committing.
  Its rows/s is predictions over the job's seconds (start-up apart: imports, model load) with the
  compilation cache warm (a first, cold run fills it); the subprocess's peak RSS is reported too.
- more bulk jobs (--job NAME=FLAGS): the same job with extra flags, e.g. another backend or dtype
  (a graph backend gets the model exported once, `jaxclf export-onnx`), run after the default one.
- server: scripts/serve.py (default settings), POST /predict/batch with --batch-texts texts per
  request from --clients threads, every text made unique so the result cache never answers.

Texts: data/tweets/test.jsonl when `scripts/prepare_data.py tweets` has written it, else
data/sample_texts.csv repeated (short, review/tweet-like). Each measurement is repeated --rounds times,
interleaved (raw, bulk, server, raw, ...), and the median is reported.

    python benchmarks/bulk_predict.py                   # 30k texts, 3 rounds (~6 min on 2 cores)
    python benchmarks/bulk_predict.py --quick           # 8k texts, 1 round (~2 min)
    python benchmarks/bulk_predict.py --job "bf16=--dtype bfloat16" --job "openvino=--backend openvino"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import int_list, markdown_table, median, write_results  # noqa: E402
from server_process import ServerProcess, create_random_model_dir, export_onnx, sample_texts  # noqa: E402

from jaxclf.serve.config import GRAPH_BACKENDS  # noqa: E402  (JAX-free)

REPO = Path(__file__).resolve().parent.parent
TWEETS = REPO / "data" / "tweets" / "test.jsonl"
# The job's own peak: VmHWM of its address space. getrusage's ru_maxrss is not: Linux carries the
# high-water mark over fork and exec, so every job reported this (536 MiB) process's peak.
MEASURE_BULK = """
import sys
from jaxclf.cli import run_command
from jaxclf.cli.predict import main
code = run_command(main, sys.argv[1:])
hwm = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("PEAK_RSS_KIB", hwm, flush=True)
sys.exit(code)
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=30000, help="texts in the corpus")
    p.add_argument("--batch-sizes", type=int_list, default=[64, 128, 256], help="raw forward batch sizes tried")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--clients", type=int, default=4, help="client threads against /predict/batch")
    p.add_argument("--batch-texts", type=int, default=32, help="texts per /predict/batch request")
    p.add_argument("--server-texts", type=int, default=6000, help="texts sent to the server per round")
    p.add_argument("--job", action="append", default=[], metavar="NAME=FLAGS",
                   help="another bulk job variant, its extra `jaxclf predict` flags after the name "
                        "(repeatable), e.g. 'openvino bf16=--backend openvino --dtype bfloat16'")
    p.add_argument("--quick", action="store_true", help="8k texts, 1 round, 2k texts to the server")
    p.add_argument("--name", default="bulk_predict", help="result file name under benchmarks/results/")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.rounds, args.server_texts = 8000, 1, 2000
    args.jobs = {}
    for spec in args.job:
        name, sep, flags = spec.partition("=")
        if not sep or not name.strip():
            p.error(f"--job takes NAME=FLAGS, got {spec!r}")
        args.jobs[name.strip()] = flags.split()
    return args


def corpus(rows: int) -> tuple[list[str], str]:
    if TWEETS.exists():
        source, texts = str(TWEETS.relative_to(REPO)), sample_texts(TWEETS)
    else:
        source, texts = "data/sample_texts.csv (repeated)", sample_texts()
    return [texts[i % len(texts)] for i in range(rows)], source


def prepare_raw_calls(clf, texts: list[str], batch_sizes: list[int]) -> dict[int, tuple]:
    """Per batch size: (weights, [(executable, ids, mask)]) with every text tokenized, sorted, padded and on device."""
    import jax
    from jaxclf.bulk.forward import BucketedForward, _pad

    rows = clf.encoder.ids(texts)
    prepared = {}
    for batch_size in batch_sizes:
        forward = BucketedForward(clf, batch_size)
        calls = []
        for index, b, t in forward.plan([len(r) for r in rows]):
            ids, mask = _pad([rows[i] for i in index], clf.config.pad_token_id, b, t)
            calls.append((forward.executable(b, t), jax.device_put(ids, forward._rows),
                          jax.device_put(mask, forward._rows)))
        prepared[batch_size] = (forward._weights, calls)
    return prepared


def raw_forward_rates(prepared: dict[int, tuple], num_texts: int) -> dict[int, float]:
    """rows/s of the compiled calls alone, per batch size."""
    import jax
    rates = {}
    for batch_size, (weights, calls) in prepared.items():
        jax.block_until_ready([run(weights, ids, mask) for run, ids, mask in calls[:2]])  # warm
        started = time.perf_counter()
        jax.block_until_ready([run(weights, ids, mask) for run, ids, mask in calls])
        rates[batch_size] = num_texts / (time.perf_counter() - started)
    return rates


def bulk_job(model: Path, source: Path, out: Path, batch_size: int, cache: Path, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, "-c", MEASURE_BULK, "--model", str(model), "--input", str(source), "--output", str(out),
           "--id-field", "id", "--batch-size", str(batch_size), "--compilation-cache", str(cache), "--restart",
           "--log-level", "WARNING", *extra]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"bulk job failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    rss = next(int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KIB"))
    process = summary["throughput"]["processes"][0]
    return {"rows_per_s": summary["throughput"]["rows_per_second"], "seconds": process["seconds"],
            "compile_seconds": process["compile_seconds"], "startup_seconds": process["startup_seconds"],
            "wall_seconds": wall, "peak_rss_mib": rss / 1024, "predictions": summary["predictions"]}


def server_rate(server: ServerProcess, texts: list[str], args, round_index: int) -> float:
    """predictions/s of POST /predict/batch from args.clients threads, each on its own keep-alive connection."""
    import http.client
    unique = [f"{t} u{round_index}x{i}" for i, t in enumerate(texts)]  # never a result-cache hit
    requests = [unique[i:i + args.batch_texts] for i in range(0, len(unique), args.batch_texts)]
    errors = []

    def client(part: list[list[str]]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        try:
            for batch in part:
                conn.request("POST", "/predict/batch", json.dumps({"texts": batch}),
                             {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    errors.append(response.status)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(requests[k::args.clients],)) for k in range(args.clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise SystemExit(f"/predict/batch answered {len(errors)} errors, e.g. {errors[0]}")
    return len(unique) / elapsed


def main(argv=None) -> int:
    args = parse_args(argv)
    import jaxclf
    texts, source_name = corpus(args.rows)
    work = Path(tempfile.mkdtemp(prefix="jaxclf-bulk-bench-"))
    model = work / "model"
    create_random_model_dir(model)
    clf = jaxclf.load(model)
    source = work / "in.jsonl"
    with open(source, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"t{i}", "text": text}, ensure_ascii=False) + "\n")
    lengths = sorted(len(r) for r in clf.encoder.ids(texts[:5000]))

    prepared = prepare_raw_calls(clf, texts, args.batch_sizes)
    cache = work / "xla-cache"
    graph = work / "model.onnx"  # the export a --job on a graph backend runs
    labels = {name: " ".join(flags) for name, flags in args.jobs.items()}  # as given, before --onnx-file
    for name, flags in args.jobs.items():
        if any(backend in flags for backend in GRAPH_BACKENDS) and "--onnx-file" not in flags:
            if not graph.exists():
                export_onnx(model, graph)
            flags += ["--onnx-file", str(graph)]
    raw, bulk, served = [], [], []
    jobs = {name: [] for name in args.jobs}
    jobs_cold = {}
    best = None
    cold = None
    with ServerProcess(model, cache_dir=cache, log_dir=work) as server:
        server.wait_ready()
        for r in range(args.rounds):
            raw.append(raw_forward_rates(prepared, len(texts)))
            print(f"round {r}: raw forward rows/s {({b: round(v) for b, v in raw[-1].items()})}", flush=True)
            best = best or max(raw[0], key=raw[0].get)
            if cold is None:
                cold = bulk_job(model, source, work / "out", best, cache)  # fills the compilation cache
                print(f"cold bulk job: {cold}", flush=True)
            bulk.append(bulk_job(model, source, work / "out", best, cache))
            print(f"round {r}: bulk job {bulk[-1]}", flush=True)
            for k, (name, flags) in enumerate(args.jobs.items()):
                if name not in jobs_cold:  # its own buckets into the cache (the JAX ones), as for the default
                    jobs_cold[name] = bulk_job(model, source, work / f"out-{k}", best, cache, flags)
                jobs[name].append(bulk_job(model, source, work / f"out-{k}", best, cache, flags))
                print(f"round {r}: bulk job {name}: {jobs[name][-1]}", flush=True)
            served.append(server_rate(server, texts[:args.server_texts], args, r))
            print(f"round {r}: /predict/batch {served[-1]:.0f} predictions/s", flush=True)
        server_rss = server.rss()

    raw_best = median([rates[best] for rates in raw])
    bulk_rate = median([b["rows_per_s"] for b in bulk])
    server_median = median(served)
    rows = [[f"raw compiled forward, batch {b}", f"{median([x[b] for x in raw]):.0f}",
             f"{median([x[b] for x in raw]) / raw_best:.2f}", ""] for b in args.batch_sizes]
    rows.append([f"jaxclf predict (bulk job, batch {best})", f"{bulk_rate:.0f}", f"{bulk_rate / raw_best:.2f}",
                 f"{median([b['peak_rss_mib'] for b in bulk]):.0f}"])
    for name, runs in jobs.items():
        rate = median([b["rows_per_s"] for b in runs])
        rows.append([f"jaxclf predict {labels[name]} ({name}, batch {best})", f"{rate:.0f}",
                     f"{rate / raw_best:.2f}", f"{median([b['peak_rss_mib'] for b in runs]):.0f}"])
    rows.append([f"server POST /predict/batch ({args.batch_texts} texts, {args.clients} clients)",
                 f"{server_median:.0f}", f"{server_median / raw_best:.2f}", f"{server_rss.get('VmHWM', 0):.0f}"])
    table = markdown_table(["variant", "predictions/s", "vs raw forward at its best batch", "peak RSS MiB"], rows)
    load = os.getloadavg()
    note = (f"Load average at the end: {load[0]:.1f} (1 min), {load[2]:.1f} (15 min) on {os.cpu_count()} cores: "
            f"other jobs shared the machine, so compare rows of this table, not absolute figures.\n\n"
            f"Model: random init, 4 layers, d_model 256, 4 heads, ff 1024, vocab 8000, max length 128. "
            f"Texts: {len(texts)} from {source_name}; {lengths[len(lengths) // 2]} tokens median, "
            f"max {lengths[-1]}. {args.rounds} interleaved round(s), medians. Bulk job: JSONL in, JSONL shards "
            f"out, default sort window and shard size, warm compilation cache; its seconds exclude start-up "
            f"({median([b['startup_seconds'] for b in bulk]):.1f} s: imports, model load) and include "
            f"compiling or loading its buckets ({median([b['compile_seconds'] for b in bulk]):.2f} s warm, "
            f"{cold['compile_seconds']:.1f} s cold); whole command "
            f"{median([b['wall_seconds'] for b in bulk]):.1f} s wall.\n\n{table}")
    print(note)
    write_results(args.name, {"settings": vars(args), "raw_forward": raw, "best_batch": best,
                              "bulk": bulk, "bulk_cold": cold, "jobs": jobs, "jobs_cold": jobs_cold,
                              "server_predictions_per_s": served,
                              "server_rss": server_rss}, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
