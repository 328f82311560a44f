"""A bounded soak of the real server (issue #12): 20,000 requests of hostile and ordinary traffic from several
client threads over keep-alive connections. Every request is answered, resident memory settles (the end is
within 50 MiB of the level after the first 1,000 requests) and /metrics stays small. Run alone:

    python -m pytest -q -s tests/test_soak.py        # prints the figures
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from test_service import Server

TOTAL = 20_000
WARMUP = 1_000  # RSS is compared with its level after this many requests
CLIENTS = 4
MAX_BODY = 16_384  # the server's --max-body-bytes
TIME_LIMIT_S = 170
RSS_GROWTH_LIMIT = 50 << 20
METRICS_LIMIT = 200_000
JSON = {"Content-Type": "application/json"}

# kind -> (share of the traffic, statuses it may get)
MIX = {
    "predict": (0.40, {200}), "batch": (0.10, {200}), "method": (0.15, {404, 405, 400, 501}),
    "oversized": (0.08, {413}), "malformed": (0.15, {400, 415, 413, 422}), "unknown_path": (0.07, {404}),
    "info": (0.05, {200}),
}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def make_request(kind: str, n: int, rng: random.Random) -> tuple[str, str, bytes | None, dict]:
    """(method, path, body, headers) of request number `n` of `kind`; every text is unique."""
    if kind == "predict":
        return "POST", "/predict", json.dumps({"text": f"soak {n} {rng.random()} " * rng.randint(1, 20)}).encode(), JSON
    if kind == "batch":
        texts = [f"batch {n}.{i} {rng.random()}" for i in range(rng.randint(2, 8))]
        return "POST", "/predict/batch", json.dumps({"texts": texts, "key": f"user-{n % 97}"}).encode(), JSON
    if kind == "method":
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(rng.randint(3, 3000)))
        return name, rng.choice(["/predict", "/", f"/x{n}"]), None, {}
    if kind == "oversized":
        return "POST", "/predict", b'{"text": "' + b"x" * rng.randint(MAX_BODY, 4 * MAX_BODY) + b'"}', JSON
    if kind == "malformed":
        body = rng.choice([b"{oops", b'{"text": 5}', b"[" * 5000 + b"]" * 5000, b'{"texts": []}', b"\xff\xfe",
                           b'{"text": "' + b"y" * 12_000 + b'"}', b'{"text": "\\ud800"}'])
        headers = rng.choice([JSON, {"Content-Type": "text/plain"}])
        return "POST", rng.choice(["/predict", "/predict/batch"]), body, headers
    if kind == "unknown_path":
        return "GET", f"/soak/{n}/%0A{rng.random()}", None, {}
    return "GET", rng.choice(["/model/info", "/ready", "/health"]), None, {}


class Client(threading.Thread):
    """One keep-alive connection (re-opened when the server closes it), sending requests until none are left."""

    def __init__(self, port: int, tickets, results: Counter, failures: list, seed: int):
        super().__init__(daemon=True)
        self.port, self.tickets, self.results, self.failures = port, tickets, results, failures
        self.rng = random.Random(seed)
        self.kinds, self.weights = list(MIX), [share for share, _ in MIX.values()]

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while (n := self.tickets()) is not None:
            kind = self.rng.choices(self.kinds, self.weights)[0]
            method, path, body, headers = make_request(kind, n, self.rng)
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                status, request_id = response.status, response.getheader("X-Request-ID")
            except (OSError, http.client.HTTPException) as e:
                conn.close()  # the next request opens a new connection
                self.failures.append(f"{kind} {method[:20]} {path[:40]}: {type(e).__name__}: {e}")
                continue
            if status not in MIX[kind][1] or not request_id:
                self.failures.append(f"{kind} {method[:20]} {path[:40]}: status {status}, request id {request_id!r}")
            self.results[(kind, status)] += 1
            if response.will_close:
                conn.close()


def run_clients(port: int, count: int, start: int, seed: int) -> tuple[Counter, list[str], float]:
    lock, counter = threading.Lock(), iter(range(start, start + count))

    def tickets():
        with lock:
            return next(counter, None)

    results: Counter = Counter()
    failures: list[str] = []
    started = time.monotonic()
    clients = [Client(port, tickets, results, failures, seed + i) for i in range(CLIENTS)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(timeout=TIME_LIMIT_S)
        assert not client.is_alive(), "a client is stuck: some request got no answer"
    return results, failures, time.monotonic() - started


@pytest.mark.slow
def test_soak_twenty_thousand_requests(tiny_model_dir, tmp_path):
    srv = Server(tiny_model_dir, tmp_path / "serve.log", "--max-body-bytes", str(MAX_BODY), "--threads", "8",
                 "--max-batch-size", "8", "--batch-buckets", "1,8", "--compilation-cache-dir", str(tmp_path / "xla"))
    try:
        srv.wait_ready()
        started = time.monotonic()
        warm, warm_failures, _ = run_clients(srv.port, WARMUP, 0, seed=1)
        rss_warm = rss_bytes(srv.proc.pid)
        rest, failures, seconds = run_clients(srv.port, TOTAL - WARMUP, WARMUP, seed=100)
        elapsed = time.monotonic() - started
        rss_end = rss_bytes(srv.proc.pid)
        _, _, metrics = srv.request("GET", "/metrics")
        results = warm + rest
        answered = sum(results.values())
        by_kind = Counter()
        for (kind, _), count in results.items():
            by_kind[kind] += count
        print(f"\nsoak: {answered} of {TOTAL} requests answered in {elapsed:.1f}s "
              f"({(TOTAL - WARMUP) / seconds:.0f} requests/s after the warm-up); "
              f"RSS {rss_warm / 2**20:.1f} MiB after {WARMUP}, {rss_end / 2**20:.1f} MiB at the end "
              f"({(rss_end - rss_warm) / 2**20:+.1f} MiB); /metrics {len(metrics.encode())} bytes; "
              f"by kind {dict(by_kind)}; statuses {dict(Counter(s for _, s in results.elements()))}")
        all_failures = warm_failures + failures
        assert all_failures == [], f"{len(all_failures)} failures, e.g. {all_failures[:5]}"
        assert answered == TOTAL
        assert elapsed < TIME_LIMIT_S
        assert rss_end - rss_warm < RSS_GROWTH_LIMIT
        assert len(metrics.encode()) < METRICS_LIMIT
        assert srv.request("GET", "/ready")[0] == 200
        assert "Traceback" not in srv.log.read_text(errors="replace")  # every refusal was an expected one
    finally:
        code = srv.stop()
    assert code == 0
