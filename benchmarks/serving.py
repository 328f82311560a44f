#!/usr/bin/env python
"""Serving: requests/s, latency and memory of scripts/serve.py under a bounded load, server variants side by side.

Servers run side by side on 127.0.0.1 (port 0), by default one with dynamic batching (the default
settings) and one with --no-batching (--server NAME=FLAGS picks others, e.g. bucket sets), all on the
same model and compilation cache. A load generator of our own (threads, one keep-alive http.client
connection each, a fixed number of requests per level) drives them in turn, level by level and round
by round (A, B, A, B, ...), so every server sees the same machine noise.

- POST /predict, one text per request, at --concurrency 1,8,32,64: requests/s, p50/p99 latency.
- POST /predict/batch, --batch-texts texts per request, at --batch-concurrency: predictions/s.
- Texts are sampled from data/sample_texts.csv (tweet-length reviews), each with a unique counter word
  appended (" u123"), so the server's result cache never answers (checked: cache hits are reported).
- Start-up: launch to /ready with an empty compilation cache (cold), then with it filled (cached).
- Memory: VmRSS / VmHWM of each server process after the load; then --soak-requests more (mixed /predict
  and /predict/batch) on the first server, and where its resident memory goes: interpreter and imports
  (a process importing what serve.py imports), the JAX runtime, weights and one executable (a server
  with one bucket), each further executable, and growth under the load (anonymous vs file-backed
  pages from /proc/PID/smaps_rollup); and a check that no server mapped libtorch.

The model is a random 4-layer d_model 256 classifier with a tokenizer trained on the sample texts,
unless --model names a model directory. Everything is bounded and the servers get SIGTERM at the end.

    python benchmarks/serving.py                          # ~3-4 min on 2 cores
    python benchmarks/serving.py --quick                  # ~1 min: concurrency 1,8, fewer requests
    python benchmarks/serving.py --model runs/default/model --concurrency 1,16 --rounds 5
    python benchmarks/serving.py --server jax= --server openvino="--backend openvino"   # the backends
    python benchmarks/serving.py --server default= --server "flag=XLA_FLAGS=--xla_cpu_... --batch-buckets 1,8,32"
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import itertools
import json
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from common import (RESULTS, int_list as _ints, markdown_table, median, save_figure, subplots,  # noqa: E402
                    write_results)
from server_process import (ServerProcess, create_random_model_dir, export_onnx, http_json, metric_sum,  # noqa: E402
                            resident_pages, sample_texts)

from jaxclf.serve.config import GRAPH_BACKENDS, ServeConfig  # noqa: E402  (JAX-free: the server's defaults)

DEFAULT_SERVERS = ("batching on=", "batching off=--no-batching")
HEADERS = {"Content-Type": "application/json"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory to serve (default: a random 4-layer d256 model)")
    p.add_argument("--concurrency", type=_ints, default=[1, 8, 32, 64], help="client threads for /predict")
    p.add_argument("--requests", type=int, default=256, help="/predict requests per level, round and server")
    p.add_argument("--batch-concurrency", type=_ints, default=[1, 4, 8], help="client threads for /predict/batch")
    p.add_argument("--batch-texts", type=int, default=32, help="texts per /predict/batch request")
    p.add_argument("--texts", default=None, metavar="FILE",
                   help="CSV/JSONL whose texts the load sends (default: data/sample_texts.csv); the random "
                        "model's tokenizer is trained on them, e.g. data/tweets/test.jsonl (scripts/prepare_data.py tweets)")
    p.add_argument("--batch-requests", type=int, default=48, help="/predict/batch requests per level, round and server")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per level")
    p.add_argument("--server", action="append", default=None, metavar="NAME=FLAGS",
                   help="a server to measure: a name and extra scripts/serve.py flags, after any VAR=VALUE "
                        "settings of its environment (repeatable; default: "
                        f"{' and '.join(repr(x) for x in DEFAULT_SERVERS)}); the first is the soaked one")
    p.add_argument("--soak-requests", type=int, default=10_000,
                   help="requests sent to the first server after the measured levels (9 /predict to 1 "
                        "/predict/batch), before its memory is read again (0: skip the soak and the breakdown)")
    p.add_argument("--threads", type=int, default=None, help="waitress threads per server (default: serve.py's)")
    p.add_argument("--max-wait-ms", type=float, default=None, help="batcher wait (default: serve.py's)")
    p.add_argument("--timeout-s", type=float, default=60.0, help="socket timeout of each client request")
    p.add_argument("--quick", action="store_true", help="about a minute: concurrency 1,8, fewer requests, 2 rounds")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--name", default="serving", help="result file name under benchmarks/results/")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.requests, args.rounds = [1, 8], 64, 2
        args.batch_concurrency, args.batch_requests, args.soak_requests = [1], 8, 500
    args.servers, args.server_env = {}, {}
    for item in args.server or DEFAULT_SERVERS:
        name, sep, flags = item.partition("=")
        if not sep or not name.strip() or name in args.servers:
            p.error(f"--server {item!r} must be NAME=FLAGS with a new NAME")
        tokens = flags.split()
        env = {}
        while tokens and re.match(r"[A-Z][A-Z0-9_]*=", tokens[0]):  # XLA_FLAGS=--xla_... before the flags
            key, _, value = tokens.pop(0).partition("=")
            env[key] = value
        args.servers[name.strip()], args.server_env[name.strip()] = tokens, env
    return args


class UniqueTexts:
    """Tweet-length texts from the sample CSV, each made unique by a counter word (defeats the result cache)."""

    def __init__(self, seed: int = 0, path: str | None = None):
        self.texts = sample_texts(path) if path else sample_texts()
        self.path = path
        self.rng = np.random.default_rng(seed)
        self.counter = itertools.count()
        self.lock = threading.Lock()

    def next(self, n: int = 1) -> list[str]:
        with self.lock:
            picks = self.rng.integers(0, len(self.texts), n)
            return [f"{self.texts[i]} u{next(self.counter)}" for i in picks]


def run_load(port: int, path: str, bodies: list[list[bytes]], timeout_s: float) -> dict:
    """Send bodies[i] in order over thread i's own keep-alive connection, all threads at once.

    Returns wall seconds (from the common start to the last response), per-request latencies of the
    200 answers and a count of everything else. Bounded: a fixed number of requests per thread, each
    with a socket timeout, and a join deadline.
    """
    concurrency = len(bodies)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[collections.Counter] = [collections.Counter() for _ in range(concurrency)]
    start = threading.Barrier(concurrency + 1)

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
        try:
            conn.connect()  # outside the timed part
            start.wait(timeout=timeout_s)
        except (OSError, threading.BrokenBarrierError) as e:
            errors[i][type(e).__name__] += len(bodies[i])
            conn.close()
            return
        for body in bodies[i]:
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body, HEADERS)
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException) as e:
                status = type(e).__name__
                conn.close()  # http.client reconnects on the next request
            elapsed = time.perf_counter() - t0
            if status == 200:
                latencies[i].append(elapsed)
            else:
                errors[i][str(status)] += 1
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True, name=f"load-{i}") for i in range(concurrency)]
    for t in threads:
        t.start()
    start.wait(timeout=timeout_s)
    began = time.perf_counter()
    deadline = began + timeout_s * max(len(b) for b in bodies) + 5
    for t in threads:
        t.join(max(0.0, deadline - time.perf_counter()))
    wall = time.perf_counter() - began
    stuck = sum(t.is_alive() for t in threads)
    all_errors = sum(errors, collections.Counter())
    if stuck:
        all_errors["client_thread_still_running"] += stuck
    return {"wall_s": wall, "latencies": [x for per in latencies for x in per], "errors": dict(all_errors)}


def engine_counters(server: ServerProcess) -> dict[str, float]:
    text = server.metrics_text()
    return {name: metric_sum(text, name) for name in (
        "jaxclf_batch_size_sum", "jaxclf_batch_size_count", "jaxclf_cache_hits_total", "jaxclf_cache_misses_total",
        "jaxclf_rejected_queue_full_total", "jaxclf_compilations_total")}


def measure(args, servers: dict[str, ServerProcess], texts: UniqueTexts, path: str, levels: list[int],
            requests: int, texts_per_request: int) -> dict:
    """Per level: every server in turn, `rounds` times; medians of rates, percentiles of all latencies."""

    def bodies(concurrency: int, total: int) -> list[list[bytes]]:
        counts = [total // concurrency + (1 if i < total % concurrency else 0) for i in range(concurrency)]
        out = []
        for n in counts:
            if texts_per_request == 1:
                out.append([json.dumps({"text": t}).encode() for t in texts.next(n)])
            else:
                out.append([json.dumps({"texts": texts.next(texts_per_request)}).encode() for _ in range(n)])
        return out

    results = {}
    for level in levels:
        total = max(requests, level)  # at least one request per thread
        for server in servers.values():  # warm-up: connections, waitress threads, every bucket this level hits
            run_load(server.port, path, bodies(level, max(level, min(total, 2 * level))), args.timeout_s)
        runs = {mode: [] for mode in servers}
        before = {mode: engine_counters(s) for mode, s in servers.items()}
        for _ in range(args.rounds):
            for mode, server in servers.items():
                runs[mode].append(run_load(server.port, path, bodies(level, total), args.timeout_s))
        after = {mode: engine_counters(s) for mode, s in servers.items()}
        for mode in servers:
            delta = {k: after[mode][k] - before[mode][k] for k in after[mode]}
            ok_rates = [len(r["latencies"]) / r["wall_s"] for r in runs[mode]]
            latencies = [x for r in runs[mode] for x in r["latencies"]]
            errors = sum((collections.Counter(r["errors"]) for r in runs[mode]), collections.Counter())
            rps = median(ok_rates)
            results[f"{mode}/{level}"] = {
                "mode": mode, "concurrency": level, "requests_per_round": total, "texts_per_request": texts_per_request,
                "requests_per_s": rps, "predictions_per_s": rps * texts_per_request,
                "requests_per_s_by_round": ok_rates,
                "p50_ms": float(np.percentile(latencies, 50)) * 1e3 if latencies else float("nan"),
                "p99_ms": float(np.percentile(latencies, 99)) * 1e3 if latencies else float("nan"),
                "ok": len(latencies), "errors": dict(errors),
                "texts_per_compiled_call": (delta["jaxclf_batch_size_sum"] / delta["jaxclf_batch_size_count"]
                                            if delta["jaxclf_batch_size_count"] else float("nan")),
                "cache_hits": delta["jaxclf_cache_hits_total"], "cache_misses": delta["jaxclf_cache_misses_total"]}
            r = results[f"{mode}/{level}"]
            print(f"{path} c={level:3d} {mode:12s}: {r['requests_per_s']:7.1f} req/s "
                  f"({r['predictions_per_s']:7.1f} pred/s), p50 {r['p50_ms']:7.1f} ms, p99 {r['p99_ms']:7.1f} ms, "
                  f"{r['texts_per_compiled_call']:.1f} texts/call, errors {r['errors'] or 0}", flush=True)
    return results


def start_servers(args, model_dir: Path, work: Path, stack: contextlib.ExitStack) -> tuple[dict, dict]:
    """Cold start (then stopped), then the two servers measured, started on the filled cache."""
    cache = work / "xla-cache"
    common_args = []
    if args.threads is not None:
        common_args += ["--threads", str(args.threads)]
    if args.max_wait_ms is not None:
        common_args += ["--max-wait-ms", str(args.max_wait_ms)]
    flags = {name: common_args + extra for name, extra in args.servers.items()}
    graph = work / "model.onnx"  # a server variant on a graph backend serves this export of the model
    for name, extra in flags.items():
        if any(backend in extra for backend in GRAPH_BACKENDS) and "--onnx-file" not in extra:
            if not graph.exists():
                export_onnx(model_dir, graph)
            flags[name] = extra + ["--onnx-file", str(graph)]
    first = next(iter(flags))
    startup = {}

    def record(label: str, server: ServerProcess) -> None:
        status, info = http_json(server.port, "GET", "/model/info")
        rss_ready, resident = server.rss(), resident_pages(server.proc.pid)  # before any request
        first_calls = first_requests(server, label)
        startup[label] = {"launch_to_listening_s": server.listening_s, "launch_to_ready_s": server.ready_s,
                          "engine_startup_s": server.ready_info.get("startup_seconds"),
                          "executables": server.ready_info.get("compilations"), "memory_mib": rss_ready,
                          "resident": resident,
                          "serving": info.get("serving") if status == 200 else None, "first_requests_ms": first_calls}
        print(f"{label}: ready {server.ready_s:.2f}s after launch (engine {startup[label]['engine_startup_s']}s, "
              f"{startup[label]['executables']} executables), RSS {startup[label]['memory_mib']['VmRSS']:.0f} MiB",
              flush=True)

    with ServerProcess(model_dir, flags[first], cache_dir=cache, log_dir=work, name="cold",
                       env=args.server_env[first]) as cold:
        cold.wait_ready()
        record(f"{first}, cold cache", cold)
    servers = {}
    for mode in flags:
        server = stack.enter_context(ServerProcess(model_dir, flags[mode], cache_dir=cache, log_dir=work,
                                                   name="server-" + str(len(servers)), env=args.server_env[mode]))
        server.wait_ready()
        record(f"{mode}, cached", server)
        servers[mode] = server
    return servers, startup


def first_requests(server: ServerProcess, label: str) -> dict[str, list[float]]:
    """Milliseconds of the first two /predict and the first two /predict/batch (32 texts) after /ready.

    Each is the first use of its bucket (a lone short text: batch 1; 32 of them: the largest batch),
    so a server that left a bucket's first run to its first request shows it here.
    """
    out = {}
    for path, body in (("/predict", lambda i: {"text": f"first request {i} of {label}"}),
                       ("/predict/batch", lambda i: {"texts": [f"first batch {i} text {k} of {label}" for k in range(32)]})):
        times = []
        for i in range(2):
            started = time.perf_counter()
            status, _ = http_json(server.port, "POST", path, body(i))
            if status != 200:
                raise RuntimeError(f"{label}: {path} after /ready answered {status}")
            times.append((time.perf_counter() - started) * 1000)
        out[path] = times
    return out


# What serve.py's process holds before the engine loads: the interpreter, its imports, the JAX CPU client.
IMPORT_PROBE = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from server_process import resident_pages
import jaxclf.serve.app, jaxclf.serve.engine, jaxclf.serve.server  # what scripts/serve.py loads
imports = resident_pages(os.getpid())
import jax
jax.devices()
print(json.dumps({"imports": imports, "jax_client": resident_pages(os.getpid())}))
"""


def memory_breakdown(args, model_dir: Path, work: Path, server: ServerProcess, started: dict,
                     texts: UniqueTexts) -> dict:
    """Where the soaked server's resident memory goes (MiB), then its growth over --soak-requests requests.

    The one-bucket server runs the soaked server's flags (its backend, dtype) with a single bucket."""
    import subprocess
    probe = subprocess.run([sys.executable, "-c", IMPORT_PROBE, str(Path(__file__).resolve().parent)],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        raise RuntimeError(f"import probe failed:\n{probe.stderr[-2000:]}")
    imported = json.loads(probe.stdout.strip().splitlines()[-1])
    max_length = json.loads((model_dir / "config.json").read_text())["model"]["max_position_embeddings"]
    one_flags = ["--batch-buckets", "1", "--length-buckets", str(max_length)]
    with ServerProcess(model_dir, server.extra_args + one_flags, cache_dir=work / "xla-cache", log_dir=work,
                       name="one-bucket", env=server.env) as one:
        one.wait_ready()
        time.sleep(1.0)
        one_bucket = resident_pages(one.proc.pid)
    ready, serving = started["resident"], started["serving"]
    buckets = len(serving["batch_buckets"]) * len(serving["length_buckets"])
    rng = np.random.default_rng(1)
    bodies = []
    for i in range(args.soak_requests):  # 9 in 10 /predict, 1 in 10 /predict/batch of 1-32 texts
        if i % 10 == 9:
            bodies.append(("/predict/batch", json.dumps({"texts": texts.next(int(rng.integers(1, 33)))}).encode()))
        else:
            bodies.append(("/predict", json.dumps({"text": texts.next()[0]}).encode()))
    began, errors = time.perf_counter(), collections.Counter()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=args.timeout_s)
    for path, body in bodies:
        conn.request("POST", path, body, HEADERS)
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            errors[response.status] += 1
    conn.close()
    soak_s = time.perf_counter() - began
    after = resident_pages(server.proc.pid)
    out = {"imports": imported["imports"], "jax_client": imported["jax_client"], "one_bucket_ready": one_bucket,
           "ready": ready, "buckets": buckets, "backend": serving["backend"], "after_soak": after,
           "soak_requests": args.soak_requests, "soak_s": soak_s, "soak_errors": dict(errors),
           "peak": server.rss()["VmHWM"], "per_further_bucket": (ready["rss"] - one_bucket["rss"]) / max(1, buckets - 1)}
    print(f"memory: imports {out['imports']['rss']:.0f} MiB, + JAX client {out['jax_client']['rss']:.0f}, one-bucket "
          f"server {one_bucket['rss']:.0f}, ready ({buckets} buckets) {ready['rss']:.0f}, after "
          f"{args.soak_requests} requests {after['rss']:.0f} (peak {out['peak']:.0f}) MiB", flush=True)
    return out


def breakdown_text(m: dict) -> str:
    rows = [
        ["interpreter + imports (jaxclf.serve, flask, waitress, tokenizers, jax, flax)", m["imports"]["rss"], "",
         m["imports"]["anonymous"], m["imports"]["file_backed"]],
        ["+ the JAX CPU client (jax.devices())", m["jax_client"]["rss"],
         m["jax_client"]["rss"] - m["imports"]["rss"], m["jax_client"]["anonymous"], m["jax_client"]["file_backed"]],
        [f"+ weights, engine, server threads, 1 bucket{' (its executable)' if m['backend'] == 'jax' else ''}, "
         f"{m['backend']} backend (a 1-bucket server, after /ready)",
         m["one_bucket_ready"]["rss"], m["one_bucket_ready"]["rss"] - m["jax_client"]["rss"],
         m["one_bucket_ready"]["anonymous"], m["one_bucket_ready"]["file_backed"]],
        [f"+ {m['buckets'] - 1} more buckets (after /ready; {m['per_further_bucket']:.1f} MiB each"
         f"{': an XLA executable each' if m['backend'] == 'jax' else ': planned shapes, run once'})", m["ready"]["rss"],
         m["ready"]["rss"] - m["one_bucket_ready"]["rss"], m["ready"]["anonymous"], m["ready"]["file_backed"]],
        [f"+ growth over {m['soak_requests']:,} requests (after the measured levels)", m["after_soak"]["rss"],
         m["after_soak"]["rss"] - m["ready"]["rss"], m["after_soak"]["anonymous"], m["after_soak"]["file_backed"]],
    ]
    table = markdown_table(["stage", "RSS MiB", "added MiB", "anonymous MiB", "file-backed MiB"], rows)
    return (f"\n\n### Resident memory of the first server, stage by stage\n\n{table}\n\n"
            f"After /ready {m['ready']['rss']:.0f} MiB and after {m['soak_requests']:,} more requests (9 /predict to 1 "
            f"/predict/batch of 1-32 texts, {m['soak_s']:.0f} s, errors: {m['soak_errors'] or 0}) "
            f"{m['after_soak']['rss']:.0f} MiB; peak {m['peak']:.0f} MiB; {m['after_soak']['threads']} threads. "
            f"Stages come from separate processes (an import probe, a server with one bucket), so small "
            f"differences are noise.")


def token_lengths(model_dir: Path, texts: UniqueTexts, n: int = 200) -> dict:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    sample = UniqueTexts(seed=123, path=texts.path).next(n)  # same distribution, not consuming the load's counter
    counts = [len(tok.encode(t).ids) for t in sample]
    return {"median": float(np.median(counts)), "p90": float(np.percentile(counts, 90)), "max": int(max(counts)),
            "example": sample[0]}


def tables(args, predict: dict, batch: dict, startup: dict, memory: dict, tokens: dict, breakdown: dict) -> str:
    names = list(args.servers)
    ratio = f"{names[0]} / {names[1]} (req/s)" if len(names) > 1 else "-"
    rows = []
    for level in args.concurrency:
        a, b = predict[f"{names[0]}/{level}"], predict[f"{names[min(1, len(names) - 1)]}/{level}"]
        for mode in names:
            r = predict[f"{mode}/{level}"]
            rows.append([level, r["mode"], r["requests_per_s"], r["p50_ms"], r["p99_ms"], r["texts_per_compiled_call"],
                         r["ok"], sum(r["errors"].values()),
                         a["requests_per_s"] / b["requests_per_s"] if mode == names[0] and len(names) > 1 else ""])
    predict_table = markdown_table(["concurrency", "server", "requests/s", "p50 ms", "p99 ms",
                                    "texts per compiled call", "ok", "errors", ratio], rows)
    rows = []
    for level in args.batch_concurrency:
        for mode in names:
            r = batch[f"{mode}/{level}"]
            first = batch[f"{names[0]}/{level}"]
            rows.append([level, mode, r["requests_per_s"], r["predictions_per_s"], r["p50_ms"], r["p99_ms"],
                         r["texts_per_compiled_call"], r["ok"], sum(r["errors"].values()),
                         first["predictions_per_s"] / r["predictions_per_s"] if mode != names[0] else ""])
    batch_table = markdown_table(["concurrency", "server", "requests/s", "predictions/s", "p50 ms", "p99 ms",
                                  "texts per compiled call", "ok", "errors",
                                  f"{names[0]} / this (pred/s)"], rows)
    def first_then_next(times: list[float]) -> str:
        return f"{times[0]:.1f} then {times[1]:.1f}"

    rows = [[label, s["launch_to_listening_s"], s["launch_to_ready_s"], s["engine_startup_s"], s["executables"],
             s["memory_mib"]["VmRSS"], first_then_next(s["first_requests_ms"]["/predict"]),
             first_then_next(s["first_requests_ms"]["/predict/batch"])] for label, s in startup.items()]
    start_table = markdown_table(["server start", "launch to listening s", "launch to ready s",
                                  "engine load + compile s", "executables", "RSS after ready MiB",
                                  "first two /predict ms", "first two /predict/batch ms"], rows)
    rows = [[mode, m["VmRSS"], m["VmHWM"], ", ".join(m["torch_libraries"]) or "no"] for mode, m in memory.items()]
    memory_table = markdown_table(["server", "RSS after the load MiB", "peak RSS MiB", "torch imported"], rows)
    hits = sum(r["cache_hits"] for r in list(predict.values()) + list(batch.values()))
    servers = "; ".join(f"{name}: {' '.join([f'{k}={v}' for k, v in args.server_env[name].items()] + flags) or 'default flags'}"
                        for name, flags in args.servers.items())
    return (f"Model: {args.model_desc}. Servers: {servers}. Client: {args.rounds} interleaved rounds per level "
            f"(one server after the other), {args.requests} /predict or {args.batch_requests} /predict/batch requests per round, "
            f"split over the concurrency's threads, one keep-alive connection each, on the same 2-core machine as "
            f"the servers. req/s: median over rounds; p50/p99: over every request. Texts: {args.texts or 'data/sample_texts.csv'} "
            f"sampled at random, each made unique with an appended counter word (e.g. \"{tokens['example']}\") "
            f"so the result cache never answers (cache hits during the load: {hits:.0f}); {tokens['median']:.0f} "
            f"tokens median, p90 {tokens['p90']:.0f}, max {tokens['max']} with [CLS]/[SEP]. Servers: scripts/serve.py "
            f"with {server_settings(args, startup)}.\n\n"
            f"### POST /predict (one text per request)\n\n{predict_table}\n\n"
            f"### POST /predict/batch ({args.batch_texts} texts per request)\n\n{batch_table}\n\n"
            f"### Start-up (launch to /ready)\n\n{start_table}\n\n"
            f"### Memory\n\n{memory_table}" + (breakdown_text(breakdown) if breakdown else ""))


def server_settings(args, startup: dict) -> str:
    """The measured servers' settings, as /model/info reports them (waitress threads from the command line)."""
    serving = startup[f"{next(iter(args.servers))}, cached"]["serving"] or {}
    threads = args.threads if args.threads is not None else ServeConfig().threads
    return (f"{threads} waitress threads, max batch {serving.get('max_batch_size')}, max wait {serving.get('max_wait_ms'):g} ms, "
            f"queue {serving.get('max_queue_size')}, batch buckets {serving.get('batch_buckets')}, length buckets "
            f"{serving.get('length_buckets')}, result cache {serving.get('cache_size')}")


def plot(args, predict: dict, batch: dict, path: Path) -> None:
    fig, axes = subplots(1, 3, figsize=(16, 4.6))
    for mode in args.servers:
        rs = [predict[f"{mode}/{c}"] for c in args.concurrency]
        axes[0].plot(args.concurrency, [r["requests_per_s"] for r in rs], marker="o", label=mode)
        line, = axes[1].plot(args.concurrency, [r["p50_ms"] for r in rs], marker="o", label=f"{mode} p50")
        axes[1].plot(args.concurrency, [r["p99_ms"] for r in rs], marker="x", linestyle=":", color=line.get_color(),
                     label=f"{mode} p99")
        bs = [batch[f"{mode}/{c}"] for c in args.batch_concurrency]
        axes[2].plot(args.batch_concurrency, [r["predictions_per_s"] for r in bs], marker="o", label=mode)
    titles = ("/predict: requests/s", "/predict: latency, ms",
              f"/predict/batch ({args.batch_texts} texts): predictions/s")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    save_figure(fig, path, "scripts/serve.py on CPU: " + " vs ".join(args.servers))


def main(argv=None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the servers below are always stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jaxclf-bench-serving-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        if args.model is None:
            model_dir = work / "model"
            clf = create_random_model_dir(model_dir, texts=sample_texts(args.texts) if args.texts else None)
            c = clf.config
            del clf
            args.model_desc = (f"random init, {c.num_encoder_layers} layers, d_model {c.d_model}, {c.nhead} heads, "
                               f"ff {c.dim_feedforward}, vocab {c.vocab_size}, max length {c.max_position_embeddings}")
        else:
            model_dir = Path(args.model)
            args.model_desc = f"{model_dir}"
        texts = UniqueTexts(seed=0, path=args.texts)
        tokens = token_lengths(model_dir, texts)
        servers, startup = start_servers(args, model_dir, work, stack)
        predict = measure(args, servers, texts, "/predict", args.concurrency, args.requests, 1)
        batch = measure(args, servers, texts, "/predict/batch", args.batch_concurrency, args.batch_requests,
                        args.batch_texts)
        memory = {mode: {**s.rss(), "torch_libraries": s.torch_libraries()} for mode, s in servers.items()}
        soaked = next(iter(servers))
        for mode in list(servers)[1:]:
            servers[mode].stop()  # the soak and the breakdown's probes get the machine to themselves
        breakdown = (memory_breakdown(args, model_dir, work, servers[soaked], startup[f"{soaked}, cached"], texts)
                     if args.soak_requests else {})
        exit_codes = {mode: s.stop() if s.proc.returncode is None else s.proc.returncode
                      for mode, s in servers.items()}
    torch_in_server = any(m["torch_libraries"] for m in memory.values())
    table = tables(args, predict, batch, startup, memory, tokens, breakdown)
    payload = {"args": vars(args), "predict": predict, "predict_batch": batch, "startup": startup, "memory": memory,
               "memory_breakdown": breakdown,
               "tokens": tokens, "server_exit_codes": exit_codes, "torch_imported_by_server": torch_in_server,
               "wall_s": time.perf_counter() - began}
    path = write_results(args.name, payload, table)
    if not args.no_plot:
        png = RESULTS / f"{args.name}.png"
        plot(args, predict, batch, png)
        print(f"wrote {png}")
    print(path.read_text())
    print(f"torch imported by the servers: {'YES' if torch_in_server else 'no'} (libtorch in /proc/PID/maps); "
          f"server exit codes after SIGTERM: {exit_codes}")
    print(f"total {time.perf_counter() - began:.0f}s")
    return 1 if torch_in_server else 0


if __name__ == "__main__":
    sys.exit(main())
