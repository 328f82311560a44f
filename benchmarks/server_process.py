"""What the inference and serving benchmarks need around a real server: a model directory to serve,
`scripts/serve.py` run as a subprocess on 127.0.0.1, and a look at that process from outside
(resident memory, whether it mapped PyTorch's libraries).

Everything here is bounded: start-up waits have a deadline, and `ServerProcess` is a context manager
that always ends its server with SIGTERM (then SIGKILL if it has not exited within the grace period).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SERVE_SCRIPT = REPO / "scripts" / "serve.py"
SAMPLE_TEXTS = REPO / "data" / "sample_texts.csv"
_LISTENING = re.compile(r"listening on http://([^\s:/]+|\[[^\]]+\]):(\d+)")


def sample_texts(path: str | os.PathLike = SAMPLE_TEXTS) -> list[str]:
    """The `text` column of a CSV or JSONL file; by default the shipped sample (short, review/tweet-like)."""
    from jaxclf.train.data import read_examples
    texts, _, _ = read_examples(path)
    return texts


def create_random_model_dir(path: str | os.PathLike, layers: int = 4, d_model: int = 256, heads: int = 4,
                            ff: int = 1024, vocab: int = 8000, max_length: int = 128, seed: int = 0,
                            texts: list[str] | None = None):
    """A randomly initialised model directory (3 labels) with a BPE tokenizer trained on `texts` (default: the sample).

    Returns the TextClassifier it saved, so a caller can run the very same weights in process.
    """
    import jaxclf
    from jaxclf.config import ModelConfig
    from jaxclf.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(texts if texts is not None else sample_texts(), vocab_size=vocab)
    config = ModelConfig(vocab_size=vocab, d_model=d_model, nhead=heads, num_encoder_layers=layers,
                         dim_feedforward=ff, max_position_embeddings=max_length, num_classes=3,
                         id2label=("negative", "neutral", "positive"))
    clf = jaxclf.create(config, tokenizer, seed=seed)
    clf.save(path)
    return clf


def export_onnx(model_dir: str | os.PathLike, graph: str | os.PathLike) -> None:
    """`jaxclf export-onnx` in its own process, for the graph backends: torch never enters this one."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jaxclf", "export-onnx", "--model", str(model_dir), "--output", str(graph)],
                   check=True, stdout=subprocess.DEVNULL)
    print(f"exported {graph} in {time.perf_counter() - started:.1f}s for the graph backends", flush=True)


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (peak resident) of a process, in MiB, from /proc/PID/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return out


def resident_pages(pid: int) -> dict[str, float]:
    """Resident memory of a process by kind, in MiB, from /proc/PID/smaps_rollup: Rss, Anonymous (heap,
    stacks, JAX buffers and executables) and file-backed (Rss - Anonymous: shared libraries' pages)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        fields[key] = int(value.split()[0]) / 1024
    return {"rss": fields["Rss"], "anonymous": fields["Anonymous"], "file_backed": fields["Rss"] - fields["Anonymous"],
            "threads": len(list(Path(f"/proc/{pid}/task").iterdir()))}


def mapped_torch_libraries(pid: int) -> list[str]:
    """PyTorch shared libraries mapped into a process; non-empty exactly when it imported torch."""
    libs = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split()[-1] if len(line.split()) >= 6 else ""
        name = os.path.basename(path)
        if name.startswith(("libtorch", "libc10")) or "/torch/lib/" in path:
            libs.add(name)
    return sorted(libs)


def http_json(port: int, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
    """One request to 127.0.0.1:port on a fresh connection; (status, parsed JSON or raw text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        conn.request(method, path, payload, {"Content-Type": "application/json"} if payload else {})
        response = conn.getresponse()
        raw = response.read().decode("utf-8", "replace")
        try:
            return response.status, json.loads(raw)
        except json.JSONDecodeError:
            return response.status, raw
    finally:
        conn.close()


class ServerProcess:
    """`scripts/serve.py --model DIR --host 127.0.0.1 --port 0 ...` as a subprocess, ended on exit.

        with ServerProcess(model_dir, ["--no-batching"], cache_dir=tmp) as server:
            server.wait_ready()          # seconds from launch to /ready == 200
            server.port, server.rss()

    stdout and stderr go to a log file (not pipes, which would fill and block the server).
    """

    def __init__(self, model_dir: str | os.PathLike, extra_args: list[str] | None = None,
                 cache_dir: str | os.PathLike | None = None, log_dir: str | os.PathLike | None = None,
                 name: str = "server", env: dict[str, str] | None = None):
        self.model_dir, self.extra_args, self.cache_dir, self.name = model_dir, list(extra_args or []), cache_dir, name
        self.env = dict(env or {})  # set in the server's environment (e.g. XLA_FLAGS), over this process's
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="jaxclf-bench-logs-"))
        self.log_path = self.log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.launched_at = 0.0
        self.listening_s = self.ready_s = None
        self.ready_info: dict | None = None

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        cache = (["--compilation-cache-dir", str(self.cache_dir)] if self.cache_dir is not None
                 else ["--no-compilation-cache"])
        cmd = [sys.executable, str(SERVE_SCRIPT), "--model", str(self.model_dir), "--host", "127.0.0.1",
               "--port", "0", *cache, *self.extra_args]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.launched_at = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _check_alive(self, what: str) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name}: scripts/serve.py exited with code {self.proc.returncode} while "
                               f"{what}; its log ({self.log_path}) ends:\n{self.log_tail()}")

    def wait_ready(self, timeout_s: float = 300.0) -> float:
        """Block until /ready answers 200; returns seconds from launch. Raises past timeout_s."""
        deadline = self.launched_at + timeout_s
        while self.port is None:
            self._check_alive("starting")
            match = _LISTENING.search(self.log_tail(100_000))
            if match:
                self.port = int(match.group(2))
                self.listening_s = time.perf_counter() - self.launched_at
                break
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{self.name}: no 'listening on' line within {timeout_s:.0f}s; log:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.02)
        while True:
            self._check_alive("loading the model")
            try:
                status, body = http_json(self.port, "GET", "/ready", timeout=5)
            except OSError:
                status, body = None, None
            if status == 200:
                self.ready_s = time.perf_counter() - self.launched_at
                self.ready_info = body
                return self.ready_s
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{self.name}: /ready not 200 within {timeout_s:.0f}s (last: {status}); "
                                   f"log:\n{self.log_tail()}")
            time.sleep(0.05)

    def rss(self) -> dict[str, float]:
        return proc_status(self.proc.pid)

    def torch_libraries(self) -> list[str]:
        return mapped_torch_libraries(self.proc.pid)

    def metrics_text(self) -> str:
        status, body = http_json(self.port, "GET", "/metrics")
        return body if status == 200 and isinstance(body, str) else ""

    def stop(self, grace_s: float = 60.0) -> int | None:
        """SIGTERM, wait up to grace_s for a clean exit, else SIGKILL; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()
        return self.proc.returncode


def metric_sum(metrics_text: str, name: str) -> float:
    """Sum of every sample of one Prometheus metric (all label sets) in /metrics text; 0 if absent."""
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})?\s+(\S+)$")
    for line in metrics_text.splitlines():
        match = pattern.match(line)
        if match:
            total += float(match.group(1))
    return total
