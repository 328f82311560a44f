#!/usr/bin/env python
"""Replicas behind a real load balancer: `scripts/serve.py` x N on 127.0.0.1 behind Debian's nginx.

The topology of docker-compose.yml and of a Kubernetes Service, on one machine: N server processes
read one model registry and share one compilation cache; nginx (the routes and retry rules of
deploy/nginx/jaxclf-proxy.conf) spreads POST /predict over them. Measured:

- aggregate predictions/s through nginx with 1, 2, 3 replicas (interleaved rounds, medians), and
  the same client load straight at one replica (what the balancer costs);
- start-up: launch to /ready with an empty compilation cache (cold), and a replica restarted under
  load from the shared cache;
- a registry promote then POST /admin/reload of every replica, under load: failed requests, reload
  seconds, and each replica's peak resident memory (VmHWM) with the reload's second model.

    python benchmarks/replicas.py                      # 4-layer d_model 256 model; ~2 min on 2 cores
    python benchmarks/replicas.py --tiny --seconds 2   # the test suite's tiny model

Writes benchmarks/results/replicas.{json,md}. tests/test_replicas.py imports Balancer, Replica,
Load and make_registry from here. Every loop is bounded in requests and seconds, and every process
started here is ended (SIGTERM, then SIGKILL) on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, median, write_results  # noqa: E402
from server_process import (REPO, SERVE_SCRIPT, ServerProcess, create_random_model_dir, http_json,  # noqa: E402
                            sample_texts)

NGINX = Path("/usr/sbin/nginx")  # Debian's package `nginx` (.ci/run installs it)
# Replicas read the registry through a read-only bind mount (their own mount namespace), as pods read a
# readOnly volume; that takes root and util-linux's unshare. Elsewhere they read the directory itself.
READ_ONLY_MOUNTS = os.geteuid() == 0 and shutil.which("unshare") is not None
PROXY_ROUTES = REPO / "deploy" / "nginx" / "jaxclf-proxy.conf"
MODEL_NAME = "m"
ADMIN_TOKEN = "replicas-benchmark-admin-token-0123456789"
# The test's replicas: few buckets (compiled in seconds), enough for its load's batches; no result cache,
# so every request runs the model.
SERVE_ARGS = ("--batch-buckets", "1,4,16", "--max-batch-size", "16", "--cache-size", "0", "--threads", "16",
              "--log-level", "warning")
# The benchmark's: the server's default buckets, as docker-compose.yml and deploy/k8s run it (their
# start-up time and memory size the Kubernetes probes and limits); no result cache either.
DEPLOYED_ARGS = ("--cache-size", "0", "--log-level", "warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_registry(root: Path, *model_dirs: Path, production: int = 1):
    """A registry at root holding each model directory as MODEL_NAME@v1, v2, ...; production -> v`production`."""
    from jaxclf.registry import Registry
    registry = Registry(root)
    for path in model_dirs:
        registry.register(path, MODEL_NAME)
    registry.promote(MODEL_NAME, production, to="production")
    return registry


# --- the replicas -------------------------------------------------------------------------------------

class Replica(ServerProcess):
    """`scripts/serve.py --registry ROOT --model m@production` on a fixed 127.0.0.1 port: a restart on the
    same port rejoins the balancer's upstream list, as a restarted pod keeps its Service.

    With READ_ONLY_MOUNTS the replica sees the registry only at `registry_view`, a read-only bind mount
    of `registry` in a mount namespace of its own; writers (register, promote) keep using `registry`.
    """

    def __init__(self, registry: Path, port: int, cache_dir: Path, log_dir: Path, name: str,
                 ref: str = f"{MODEL_NAME}@production", extra_args: tuple[str, ...] = SERVE_ARGS):
        super().__init__(ref, list(extra_args), cache_dir=cache_dir, log_dir=log_dir, name=name)
        self.registry, self.fixed_port = registry, port
        self.registry_view = registry.with_name(registry.name + "-read-only") if READ_ONLY_MOUNTS else registry

    def start(self) -> None:
        cmd = [sys.executable, str(SERVE_SCRIPT), "--registry", str(self.registry_view), "--model",
               str(self.model_dir), "--host", "127.0.0.1", "--port", str(self.fixed_port),
               "--compilation-cache-dir", str(self.cache_dir), *self.extra_args]
        if READ_ONLY_MOUNTS:  # unshare and sh exec into the server: signals reach it directly
            self.registry_view.mkdir(exist_ok=True)
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount --bind -o ro "$1" "$2" && shift 2 && exec "$@"', "sh", str(self.registry),
                   str(self.registry_view), *cmd]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu", "JAXCLF_ADMIN_TOKEN": ADMIN_TOKEN}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.launched_at = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)

    def registry_mount_options(self) -> list[str]:
        """Mount options of the registry as this replica sees it (/proc/PID/mountinfo); [] if not a mount."""
        for line in Path(f"/proc/{self.proc.pid}/mountinfo").read_text().splitlines():
            fields = line.split()
            if fields[4] == str(self.registry_view):
                return fields[5].split(",")
        return []

    def kill(self) -> None:
        """SIGKILL: the process vanishes mid-request, as an OOM kill or a lost node would end it."""
        self.proc.kill()
        self.proc.wait(timeout=30)
        self._log.close()

    def reload(self) -> tuple[int, dict]:
        """POST /admin/reload on this replica (not through the balancer: every replica must get one)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request("POST", "/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()


def start_replicas(registry: Path, ports: list[int], cache_dir: Path, log_dir: Path,
                   serve_args: tuple[str, ...] = SERVE_ARGS) -> list[Replica]:
    """Launch one replica per port at once, then wait for all to be ready (stops them all on failure)."""
    replicas = [Replica(registry, port, cache_dir, log_dir, f"replica{i}", extra_args=serve_args)
                for i, port in enumerate(ports)]
    try:
        for r in replicas:
            r.start()
        for r in replicas:
            r.wait_ready(timeout_s=300)
    except BaseException:
        for r in replicas:
            r.stop(grace_s=10)
        raise
    return replicas


# --- the balancer -------------------------------------------------------------------------------------

NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format jaxclf '$msec $status "$upstream_addr" "$upstream_status" $request_time';
    access_log {dir}/access.log jaxclf;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream jaxclf_api {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        add_header X-Upstream-Addr $upstream_addr always;  # which replica(s) a request went to
        include {routes};
    }}
}}
"""


class Balancer:
    """Debian's nginx on a free 127.0.0.1 port, with an upstream of the given replica ports and the
    routes of deploy/nginx/jaxclf-proxy.conf; its own config, logs and pid file live in `workdir`."""

    def __init__(self, workdir: Path, upstream_ports: list[int], fail_timeout_s: float = 2.0):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        # Passive health checks: one failure takes a replica out for fail_timeout, then one request
        # probes it again (docker-compose uses 5 s; shorter here so a restarted replica rejoins quickly).
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout={fail_timeout_s:g}s;"
                            for p in upstream_ports)
        self.conf = workdir / "nginx.conf"
        self.conf.write_text(NGINX_CONF.format(dir=workdir, servers=servers, port=self.port, routes=PROXY_ROUTES))
        self.proc = subprocess.Popen([str(NGINX), "-p", str(workdir), "-c", str(self.conf), "-e",
                                      str(workdir / "error.log")], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nginx did not start: {self.proc.stderr.read().decode(errors='replace')}"
                                   f"{self.error_log()}")
            time.sleep(0.02)

    def error_log(self) -> str:
        path = self.workdir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def retried(self) -> int:
        """Requests nginx sent to more than one replica (its access log lists each attempt)."""
        path = self.workdir / "access.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return sum("," in line.split('"')[1] for line in lines if line.count('"') >= 4)  # "addr1, addr2"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # nginx's graceful shutdown
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc.stderr.close()

    def __enter__(self) -> "Balancer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --- the clients --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Answer:
    sent: float             # time.monotonic() when the request was sent
    done: float             # ... when its answer (or its failure) came
    status: int             # HTTP status; 0 when the connection failed
    version: str | None     # model_version of a 200
    upstream: str           # nginx's X-Upstream-Addr: every replica tried, in order
    error: str = ""


class Load:
    """Client threads posting /predict to one port, each on its own keep-alive connection, never retrying:
    every answer is recorded, and any non-200 or broken connection is a failed request.

    Bounded: each thread stops after max_requests or max_seconds, or when the context exits.
    `rate` (requests/s per thread) makes a steady load; None sends as fast as answers come back.
    """

    def __init__(self, port: int, texts: list[str], threads: int = 3, rate: float | None = None,
                 max_requests: int = 100_000, max_seconds: float = 120.0):
        self.port, self.texts, self.rate = port, texts, rate
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        started = time.monotonic()
        headers = {"Content-Type": "application/json"}
        for n in range(self.max_requests):
            if self._stop.is_set() or time.monotonic() - started > self.max_seconds:
                break
            if self.rate:
                time.sleep(max(0.0, started + n / self.rate - time.monotonic()))
            body = json.dumps({"text": self.texts[(index * 7919 + n) % len(self.texts)]})
            sent = time.monotonic()
            try:
                conn.request("POST", "/predict", body, headers)
                response = conn.getresponse()
                raw = response.read()
                upstream = response.getheader("X-Upstream-Addr", "")
                version = json.loads(raw).get("model_version") if response.status == 200 else None
                answer = Answer(sent, time.monotonic(), response.status, version, upstream,
                                "" if response.status == 200 else raw[:200].decode(errors="replace"))
            except (OSError, http.client.HTTPException, ValueError) as e:
                conn.close()  # http.client reconnects on the next request
                answer = Answer(sent, time.monotonic(), 0, None, "", repr(e))
            with self._lock:
                self.answers.append(answer)
        conn.close()

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def snapshot(self) -> list[Answer]:
        with self._lock:
            return list(self.answers)

    def wait_for(self, count: int, timeout: float = 60.0) -> None:
        """Until `count` more answers have come in."""
        self.wait_until(lambda answers, start=len(self.snapshot()): len(answers) >= start + count, timeout,
                        f"{count} more answers")

    def wait_until(self, condition: Callable[[list[Answer]], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition(self.snapshot()):
            if time.monotonic() > deadline or not any(t.is_alive() for t in self._threads):
                raise TimeoutError(f"load: no {what} within {timeout:.0f}s ({len(self.answers)} answers so far)")
            time.sleep(0.01)

    def failures(self) -> list[Answer]:
        return [a for a in self.snapshot() if a.status != 200]


def measure_rate(port: int, texts: list[str], seconds: float, threads: int) -> dict:
    """Predictions/s through `port` over `seconds` of unthrottled load (after a short warm-up)."""
    with Load(port, texts, threads=threads, max_seconds=seconds + 5) as load:
        load.wait_for(20)
        start, start_count = time.monotonic(), len(load.snapshot())
        time.sleep(seconds)
        end, answers = time.monotonic(), load.snapshot()
    window = answers[start_count:]
    ok = [a for a in window if a.status == 200 and a.done <= end]
    latencies = sorted(a.done - a.sent for a in ok)
    return {"predictions_per_s": len(ok) / (end - start),
            "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else None,
            "failed": len(load.failures()), "replicas_used": sorted({a.upstream for a in ok})}


def throughput_by_replica_count(replicas: list[Replica], workdir: Path, texts: list[str], seconds: float,
                                threads: int, rounds: int = 1) -> dict[str, dict]:
    """Rounds of: one replica direct, then nginx over 1, 2, ... replicas; medians of predictions/s."""
    variants = {"1 replica, direct": None, **{f"{n} behind nginx": n for n in range(1, len(replicas) + 1)}}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, count in variants.items():
            if count is None:
                runs[name].append(measure_rate(replicas[0].port, texts, seconds, threads))
                continue
            with Balancer(workdir / f"lb-{count}-{r}", [x.port for x in replicas[:count]]) as lb:
                runs[name].append(measure_rate(lb.port, texts, seconds, threads))
    return {name: {"predictions_per_s": median([m["predictions_per_s"] for m in ms]),
                   "by_round": [round(m["predictions_per_s"], 1) for m in ms],
                   "p50_ms": median([m["p50_ms"] for m in ms]), "p99_ms": median([m["p99_ms"] for m in ms]),
                   "failed": sum(m["failed"] for m in ms), "replicas_used": len(ms[-1]["replicas_used"])}
            for name, ms in runs.items()}


# --- the benchmark ------------------------------------------------------------------------------------

@contextlib.contextmanager
def fleet(model_dirs: list[Path], workdir: Path, count: int,
          serve_args: tuple[str, ...]) -> Iterator[tuple[list[Replica], object, float]]:
    """`count` replicas of a fresh registry (production = v1); yields them, the registry and the cold
    start-up seconds of the first (an empty compilation cache: it compiles; the others find its work)."""
    registry = make_registry(workdir / "registry", *model_dirs)
    cache, logs, ports = workdir / "xla-cache", workdir / "logs", [free_port() for _ in range(count)]
    first = Replica(registry.root, ports[0], cache, logs, "replica0-cold", extra_args=serve_args)
    first.start()
    try:
        cold_s = first.wait_ready(timeout_s=300)
    except BaseException:
        first.stop(grace_s=10)
        raise
    replicas = [first]  # the caller may replace a restarted replica in this list; all are stopped at the end
    try:
        replicas += start_replicas(registry.root, ports[1:], cache, logs, serve_args)
        yield replicas, registry, cold_s
    finally:
        for r in replicas:
            r.stop(grace_s=60)


def restart_under_load(replicas: list[Replica], index: int, balancer: Balancer, texts: list[str]) -> dict:
    """SIGKILL one replica under a steady load through the balancer, restart it on its port; seconds to ready."""
    old = replicas[index]
    with Load(balancer.port, texts, threads=3, rate=30) as load:
        load.wait_for(30)
        old.kill()
        new = Replica(old.registry, old.fixed_port, old.cache_dir, old.log_dir, f"{old.name}-restarted",
                      extra_args=tuple(old.extra_args))
        new.start()
        replicas[index] = new
        ready_s = new.wait_ready(timeout_s=120)
        load.wait_for(30)
    return {"restart_to_ready_s": ready_s, "failed": len(load.failures()), "requests": len(load.answers)}


def promote_and_reload(replicas: list[Replica], registry, balancer: Balancer, texts: list[str]) -> dict:
    """Promote v2 to production, reload every replica under load; failures, reload seconds, peak RSS."""
    registry.promote(MODEL_NAME, 2, to="production")
    seconds = []
    with Load(balancer.port, texts, threads=3, rate=30) as load:
        load.wait_for(30)
        for r in replicas:
            started = time.perf_counter()
            status, body = r.reload()
            seconds.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"reload of {r.name} answered {status}: {body}")
        load.wait_for(30)
    versions = [http_json(r.port, "GET", "/ready")[1].get("model_version") for r in replicas]
    return {"failed": len(load.failures()), "requests": len(load.answers), "reload_s": seconds,
            "serving_after": versions, "peak_rss_mib": [round(r.rss()["VmHWM"]) for r in replicas],
            "rss_mib": [round(r.rss()["VmRSS"]) for r in replicas]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=3, help="most replicas behind the balancer")
    p.add_argument("--seconds", type=float, default=4.0, help="measured seconds per variant and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    p.add_argument("--threads", type=int, default=8, help="client threads (one keep-alive connection each)")
    p.add_argument("--tiny", action="store_true", help="the test suite's tiny model instead of 4-layer d_model 256")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not NGINX.exists():
        print(f"{NGINX} not found: apt-get install nginx", file=sys.stderr)
        return 2
    texts = sample_texts()
    with tempfile.TemporaryDirectory(prefix="jaxclf-replicas-") as tmp:
        work = Path(tmp)
        shape = dict(layers=1, d_model=32, heads=2, ff=64, vocab=500, max_length=32) if args.tiny else {}
        models = [work / "v1", work / "v2"]
        for seed, path in enumerate(models):
            create_random_model_dir(path, seed=seed, **shape)
        started = time.perf_counter()
        serve_args = SERVE_ARGS if args.tiny else DEPLOYED_ARGS
        with fleet(models, work, args.replicas, serve_args) as (replicas, registry, cold_s):
            warm_s = [r.ready_s for r in replicas[1:]]
            executables = (replicas[0].ready_info or {}).get("compilations")
            rss = [round(r.rss()["VmRSS"]) for r in replicas]
            rates = throughput_by_replica_count(replicas, work, texts, args.seconds, args.threads, args.rounds)
            with Balancer(work / "lb-failover", [r.port for r in replicas]) as lb:
                restart = restart_under_load(replicas, len(replicas) - 1, lb, texts)
                reload = promote_and_reload(replicas, registry, lb, texts)
        model = "tiny (1 layer, d_model 32, max length 32)" if args.tiny else \
            "random init, 4 layers, d_model 256, 4 heads, ff 1024, vocab 8000, max length 128"
        payload = {"args": vars(args), "model": model, "serve_args": list(serve_args),
                   "read_only_registry": READ_ONLY_MOUNTS,
                   "startup": {"cold_launch_to_ready_s": cold_s, "warm_launch_to_ready_s": warm_s,
                               "executables": executables,
                               "rss_after_ready_mib": rss},
                   "throughput": rates, "restart": restart, "reload": reload,
                   "wall_s": time.perf_counter() - started}
    write_results("replicas", payload, report(payload))
    print(report(payload))
    return 0


def report(p: dict) -> str:
    a = p["args"]
    rows = [[name, m["predictions_per_s"], ", ".join(f"{x:g}" for x in m["by_round"]), m["p50_ms"], m["p99_ms"],
             m["replicas_used"], m["failed"]] for name, m in p["throughput"].items()]
    s, r, rl = p["startup"], p["restart"], p["reload"]
    return "\n".join([
        f"Model: {p['model']}. Replicas: scripts/serve.py {' '.join(p['serve_args'])}, one registry "
        f"({'a read-only bind mount' if p['read_only_registry'] else 'a plain directory'}), one compilation "
        f"cache; balancer: Debian's nginx, 1 worker, deploy/nginx/jaxclf-proxy.conf (a new connection to a "
        f"replica per request). Client: {a['threads']} threads, one keep-alive connection each, POST /predict "
        f"(one sample text), {a['seconds']:g} s per variant, {a['rounds']} interleaved rounds, medians; all "
        f"on the same {os.cpu_count()}-core machine.", "",
        "### Aggregate throughput", "",
        markdown_table(["variant", "predictions/s", "by round", "p50 ms", "p99 ms", "replicas answering",
                        "failed"], rows), "",
        "### Start-up, restart, reload", "",
        markdown_table(["what", "value"], [
            ["executables compiled at start-up", s["executables"]],
            ["launch to /ready, empty compilation cache (s)", s["cold_launch_to_ready_s"]],
            ["launch to /ready, shared cache, started together (s)",
             ", ".join(f"{x:.2f}" for x in s["warm_launch_to_ready_s"])],
            ["SIGKILL + restart under load: launch to /ready (s)", r["restart_to_ready_s"]],
            ["failed requests during kill + restart", f"{r['failed']} of {r['requests']}"],
            ["promote + POST /admin/reload of each replica (s)", ", ".join(f"{x:.2f}" for x in rl["reload_s"])],
            ["failed requests during the reloads", f"{rl['failed']} of {rl['requests']}"],
            ["serving after the reloads", ", ".join(rl["serving_after"])],
            ["RSS after /ready (MiB)", ", ".join(map(str, s["rss_after_ready_mib"]))],
            ["peak RSS, reload included (MiB)", ", ".join(map(str, rl["peak_rss_mib"]))],
        ]),
    ])


if __name__ == "__main__":
    sys.exit(main())
