"""Issue #12, serving findings: each test is named after the finding it reproduces (it failed on the code
before the fix), plus the resource metrics of issue #13 item 6. In-process cases use Flask's test
client; the server's own behaviour (waitress limits, shutdown) runs `scripts/serve.py` as tests/test_service.py
does."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import jaxclf
from jaxclf import classifier, hf, model_dir
from jaxclf.config import TrainingConfig
from jaxclf.registry import Registry, RegistryError
from jaxclf.serve.app import create_app
from jaxclf.serve.cache import ResultCache
from jaxclf.serve.config import ServeConfig
from jaxclf.serve.engine import InferenceEngine
from jaxclf.serve.errors import QueueFullError
from jaxclf.serve.results import PredictionResult
from jaxclf.weights import WeightsError
from test_service import JSON, REPO, Server

BACKTRACKING = "(a|aa)+$"  # with "a" * 40 + "b": Oniguruma gives up (retry limit) and tokenizers panics
PANIC_TEXT = "a" * 40 + "b"


# --- fixtures ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = InferenceEngine(tiny_model_dir, max_batch_size=4, batch_buckets=(1, 4), max_wait_ms=1)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(tiny_model_dir, xla_cache, tmp_path_factory):
    """A real server with a 4 KiB body limit, logging every request (the access log is in server.log)."""
    srv = Server(tiny_model_dir, tmp_path_factory.mktemp("server") / "serve.log", "--log-level", "info",
                 "--max-body-bytes", "4096", "--max-batch-size", "4", "--batch-buckets", "1,4",
                 "--compilation-cache-dir", str(xla_cache))
    srv.wait_ready()
    yield srv
    assert srv.stop() == 0


def with_regex_step(source: Path, target: Path, pattern: str = BACKTRACKING) -> Path:
    """A copy of model directory `source` whose tokenizer first splits on the regex `pattern`."""
    shutil.copytree(source, target)
    state = json.loads((target / model_dir.TOKENIZER_FILE).read_text())
    split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
    state["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, state["pre_tokenizer"]]}
    (target / model_dir.TOKENIZER_FILE).write_text(json.dumps(state))
    return target


@pytest.fixture(scope="module")
def regex_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return with_regex_step(tiny_model_dir, tmp_path_factory.mktemp("regex") / "model")


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    return response.get_json()["error"]


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes and read until the server closes or `timeout`; what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


def http_parts(raw: bytes) -> tuple[int, str, dict]:
    """(status, headers text, JSON body) of one raw HTTP response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, head.decode("latin-1"), json.loads(body)


# --- 1: unbounded metric labels ------------------------------------------------------------------------

def test_finding_01_metric_labels_stay_bounded(server):
    routes = {"/", "/health", "/ready", "/model/info", "/predict", "/predict/batch", "/metrics", "/openapi.json",
              "/ui", "/admin/reload", "other"}
    for i in range(100):  # each method a new upper-case name of ~2 KB, as the review sent (up to 256 KB)
        method = "X" * 2000 + "".join(chr(65 + int(d)) for d in str(i))
        assert server.request(method, "/predict")[0] == 405
        assert server.request("GET", f"/no/such/path/{i}")[0] == 404
    status, _, text = server.request("GET", "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = families["jaxclf_http_requests"].samples
    assert {s.labels["method"] for s in samples} <= {"GET", "POST", "HEAD", "OPTIONS", "other"}
    assert {s.labels["endpoint"] for s in samples} <= routes
    assert len(text) < 64_000, f"/metrics is {len(text)} bytes"
    # Past the header limit (32 KiB by default) waitress refuses the request itself, as JSON.
    status, headers, body = server.request("Y" * 40_000, "/predict")
    assert status == 431 and body["error"]["code"] == "request_header_fields_too_large", body
    assert "max_header_bytes" in body["error"]["message"] and "X-Request-ID" in headers
    # The access log writes a clipped method, never 2 KB of it.
    lines = server.log.read_text(errors="replace").splitlines()
    assert max(len(line) for line in lines) < 1500


# --- 2: the body limit is enforced before buffering ------------------------------------------------------

def test_finding_02_an_oversized_body_is_refused_before_it_is_read(server):
    # Headers announce 10 MB and no byte of it is sent: the answer must not wait for the body.
    started = time.monotonic()
    raw = raw_exchange(server.port, b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                                    b"Content-Length: 10000000\r\n\r\n{\"text\": \"", timeout=5)
    assert raw, "no answer: the server was waiting to buffer the whole body"
    status, headers, body = http_parts(raw)
    assert status == 413 and body["error"]["code"] == "request_entity_too_large"
    assert "max_body_bytes=4096" in body["error"]["message"] and "x-request-id:" in headers.lower()
    assert time.monotonic() - started < 3
    # A chunked body that grows past the limit is cut off too.
    chunk = b"x" * 3000
    raw = raw_exchange(server.port, b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n" + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 3)
    assert http_parts(raw)[0] == 413
    assert server.request("POST", "/predict", {"text": "still fine"})[0] == 200


def test_finding_02_waitress_limits_come_from_serve_config():
    from waitress.adjustments import Adjustments

    from jaxclf.serve.server import waitress_options

    config = ServeConfig(max_body_bytes=5000, max_header_bytes=7000, connection_limit=42, channel_timeout_s=9)
    adj = Adjustments(**waitress_options(config))
    assert (adj.max_request_body_size, adj.max_request_header_size, adj.connection_limit, adj.channel_timeout) == (
        5000, 7000, 42, 9)
    assert Adjustments(**waitress_options(ServeConfig())).max_request_body_size == ServeConfig().max_body_bytes


# --- 3: a tokenizer panic, and regex tokenizers ----------------------------------------------------------

class FakePanic(BaseException):
    """Stands for pyo3's PanicException: a BaseException, not an Exception."""


def test_finding_03_a_base_exception_in_a_request_still_gets_a_json_500(engine, monkeypatch):
    app = create_app(engine, rate_limit=1000)
    client = app.test_client()

    def panic(*args, **kwargs):
        raise FakePanic("thread panicked")

    monkeypatch.setattr(engine, "predict_batch", panic)  # inside a route
    error = error_of(client.post("/predict", json={"text": "hi"}, headers={"X-Request-ID": "req-7"}), 500)
    assert error["code"] == "internal_error" and "req-7" in error["message"]
    monkeypatch.undo()

    class ExplodingLimiter:  # outside the routes: in a request hook
        rate = burst = 1.0

        def acquire(self, client):
            raise FakePanic("thread panicked")

    app.extensions["jaxclf"].limiter = ExplodingLimiter()
    response = client.get("/model/info", headers={"X-Request-ID": "req-8"})
    assert "req-8" in error_of(response, 500)["message"] and response.headers["X-Request-ID"] == "req-8"


def test_finding_03_regex_steps_are_found_anywhere_in_the_tokenizer(regex_model_dir, tiny_model_dir, tmp_path):
    assert model_dir.regex_tokenizer_steps(regex_model_dir / "tokenizer.json") == [
        f"pre_tokenizer Split /{BACKTRACKING}/"]
    assert model_dir.regex_tokenizer_steps(tiny_model_dir / "tokenizer.json") == []
    state = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    state["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Replace", "pattern": {"String": "a"}, "content": "b"},  # a literal: fine
        {"type": "Sequence", "normalizers": [{"type": "Replace", "pattern": {"Regex": "x+y"}, "content": "z"}]}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(state))
    assert model_dir.regex_tokenizer_steps(tmp_path / "tokenizer.json") == ["normalizer Replace /x+y/"]


def test_finding_03_regex_tokenizers_are_refused_at_load_unless_allowed(regex_model_dir):
    with pytest.raises(model_dir.ModelDirectoryError, match=r"regular-expression step.*Split.*allow_regex_tokenizer"):
        InferenceEngine(regex_model_dir, max_batch_size=1)
    out = subprocess.run([sys.executable, "-m", "jaxclf.serve", "--model", str(regex_model_dir)], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--allow-regex-tokenizer" in out.stderr.strip().splitlines()[-1]
    with InferenceEngine(regex_model_dir, max_batch_size=1, allow_regex_tokenizer=True, cache_size=0) as eng:
        assert eng.predict_single("tacos").predicted_class in eng.labels


def test_finding_03_registry_refuses_regex_tokenizers_unless_allowed(regex_model_dir, tmp_path):
    registry = Registry(tmp_path / "reg")
    with pytest.raises(RegistryError, match=r"tokenizer\.json has regular-expression step"):
        registry.register(regex_model_dir, "m")
    assert registry.names() == []
    version = registry.register(regex_model_dir, "m", allow_regex_tokenizer=True)
    archive = registry.export(version.ref, tmp_path / "m.tar.gz")
    other = Registry(tmp_path / "other")
    with pytest.raises(RegistryError, match=r"tokenizer\.json has regular-expression step"):
        other.import_archive(archive)
    assert other.import_archive(archive, allow_regex_tokenizer=True).ref == "m@v1"


def test_finding_03_import_hf_refuses_regex_tokenizers_unless_allowed(tiny_model_dir, tmp_path):
    config, _, tokenizer, _ = model_dir.read(tiny_model_dir)
    bert = jaxclf.create(config.replace(pooling="pooler"), tokenizer).save(tmp_path / "bert")
    exported = hf.export_hf(bert, tmp_path / "hf")
    state = json.loads((exported / "tokenizer.json").read_text())
    split = {"type": "Split", "pattern": {"Regex": BACKTRACKING}, "behavior": "Isolated", "invert": False}
    state["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, state["pre_tokenizer"]]}
    (exported / "tokenizer.json").write_text(json.dumps(state))
    with pytest.raises(hf.HFCheckpointError, match=r"tokenizer\.json has regular-expression step"):
        hf.import_hf(exported, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    out = hf.import_hf(exported, tmp_path / "out", allow_regex_tokenizer=True)
    assert model_dir.regex_tokenizer_steps(out / "tokenizer.json")


def test_finding_03_a_real_tokenizer_panic_is_answered_and_the_server_keeps_serving(regex_model_dir, xla_cache,
                                                                                       tmp_path):
    srv = Server(regex_model_dir, tmp_path / "serve.log", "--allow-regex-tokenizer", "--max-batch-size", "4",
                 "--batch-buckets", "1,4", "--compilation-cache-dir", str(xla_cache))
    try:
        srv.wait_ready()
        started = time.monotonic()
        status, headers, body = srv.request("POST", "/predict", {"text": PANIC_TEXT},
                                            {**JSON, "X-Request-ID": "panic-1"}, timeout=20)
        assert status == 500 and body["error"]["code"] == "inference_failed", body
        assert "panic-1" in body["error"]["message"] and headers["X-Request-ID"] == "panic-1"
        assert time.monotonic() - started < 10
        for text in ("tacos", "a" * 10, "awful service"):  # the tokenizer and the batcher still work
            assert srv.request("POST", "/predict", {"text": text})[0] == 200
        status, _, body = srv.request("POST", "/predict/batch", {"texts": ["fine", PANIC_TEXT]})
        assert status == 500 and body["error"]["code"] == "inference_failed"
        assert srv.request("GET", "/ready")[0] == 200
        sent = time.monotonic()
        assert srv.stop(timeout=20) == 0
        assert time.monotonic() - sent < 10  # nothing left hanging for the drain to wait on
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()


# --- 6: the start-up race ------------------------------------------------------------------------------

class InstallOnRelease:
    """A stand-in for the service's swap lock: installs `slot` right after the first snapshot is taken,
    as the loader thread finishing at that moment would."""

    def __init__(self, service, slot):
        self.service, self.slot, self.lock = service, slot, threading.Lock()

    def __enter__(self):
        self.lock.acquire()

    def __exit__(self, *exc):
        self.lock.release()
        if self.slot is not None:
            self.service.slot, self.slot = self.slot, None


def test_finding_06_not_ready_is_always_a_503_with_retry_after(engine, tmp_path):
    app = create_app(engine)
    service = app.extensions["jaxclf"]
    slot, service.slot = service.slot, None
    service._swap_lock = InstallOnRelease(service, slot)
    response = app.test_client().post("/predict", json={"text": "hi"})
    assert error_of(response, 503)["code"] == "not_ready" and response.headers["Retry-After"] == "1"
    assert app.test_client().post("/predict", json={"text": "hi"}).status_code == 200  # installed now
    broken = tmp_path / "broken"
    shutil.copytree(engine.model_path, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    failed = create_app(broken)
    assert not failed.extensions["jaxclf"].wait_ready(60)
    for method, path in (("POST", "/predict"), ("GET", "/ready"), ("GET", "/model/info"), ("GET", "/health")):
        response = failed.test_client().open(path, method=method, json={"text": "hi"})
        assert error_of(response, 503)["code"] == "model_load_failed" and response.headers["Retry-After"] == "1"


# --- 7: log forging --------------------------------------------------------------------------------------

def test_finding_07_the_access_log_escapes_control_characters(engine, caplog):
    client = create_app(engine).test_client()
    with caplog.at_level(logging.INFO, logger="jaxclf.access"):
        client.get("/nope%0A127.0.0.1%20%22GET%20/admin/reload%22%20200%0D%1B[2J\u2028x")
    [record] = [r for r in caplog.records if r.name == "jaxclf.access"]
    line = record.getMessage()
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\u2028" not in line
    assert "\\x0a127.0.0.1 \\\"GET /admin/reload\\\" 200\\x0d\\x1b[2J\\u2028x" in line


def test_finding_07_the_real_access_log_has_one_line_per_request(server):
    assert server.request("GET", "/nope%0Aforged%20line")[0] == 404
    lines = server.log.read_text(errors="replace").splitlines()
    assert not [line for line in lines if line.startswith("forged")]
    assert any("/nope\\x0aforged line" in line for line in lines)


# --- 9: rate limiting behind a proxy ---------------------------------------------------------------------

def test_finding_09_ipv6_clients_share_a_bucket_per_64(engine):
    client = create_app(engine, rate_limit=0.01, rate_burst=1).test_client()
    assert client.get("/", environ_base={"REMOTE_ADDR": "2001:db8:1:2::1"}).status_code == 200
    rotated = client.get("/", environ_base={"REMOTE_ADDR": "2001:db8:1:2:ffff::7"})  # same /64, new address
    assert error_of(rotated, 429)["code"] == "rate_limited"
    assert client.get("/", environ_base={"REMOTE_ADDR": "2001:db8:1:3::1"}).status_code == 200  # another /64


def test_finding_09_forwarded_for_is_honoured_only_from_trusted_proxies(engine):
    client = create_app(engine, rate_limit=0.01, rate_burst=1, trusted_proxies=("10.0.0.0/8",)).test_client()
    proxy = {"REMOTE_ADDR": "10.1.2.3"}
    # Behind the proxy, each client has its own bucket (the header names the client)...
    assert client.get("/", environ_base=proxy, headers={"X-Forwarded-For": "203.0.113.5"}).status_code == 200
    assert client.get("/", environ_base=proxy, headers={"X-Forwarded-For": "203.0.113.6"}).status_code == 200
    limited = client.get("/", environ_base=proxy, headers={"X-Forwarded-For": "203.0.113.5"})
    assert limited.status_code == 429
    # ...and a client cannot pick its own: what it wrote left of the proxy's entry is not believed.
    spoofed = client.get("/", environ_base=proxy, headers={"X-Forwarded-For": "198.51.100.9, 203.0.113.5"})
    assert spoofed.status_code == 429
    # A peer that is not a trusted proxy is the client, whatever the header says.
    direct = {"REMOTE_ADDR": "192.0.2.44"}
    assert client.get("/", environ_base=direct, headers={"X-Forwarded-For": "203.0.113.77"}).status_code == 200
    assert client.get("/", environ_base=direct, headers={"X-Forwarded-For": "203.0.113.78"}).status_code == 429


def test_finding_09_a_real_server_behind_a_proxy_limits_each_client(tiny_model_dir, xla_cache, tmp_path):
    srv = Server(tiny_model_dir, tmp_path / "serve.log", "--trusted-proxies", "127.0.0.1", "--rate-limit", "0.01",
                 "--rate-burst", "1", "--max-batch-size", "1", "--compilation-cache-dir", str(xla_cache))
    try:
        srv.wait_ready()
        assert srv.request("GET", "/", headers={"X-Forwarded-For": "203.0.113.5"})[0] == 200
        assert srv.request("GET", "/", headers={"X-Forwarded-For": "203.0.113.6"})[0] == 200
        assert srv.request("GET", "/", headers={"X-Forwarded-For": "203.0.113.5"})[0] == 429
    finally:
        assert srv.stop() == 0


def test_finding_09_client_address_and_key_rules():
    from jaxclf.serve.limits import client_address, client_key, proxy_networks

    trusted = proxy_networks(["10.0.0.0/8", "fd00::/8"])
    assert client_address("10.0.0.1", "1.1.1.1, 2.2.2.2, 10.0.0.9", trusted) == "2.2.2.2"
    assert client_address("10.0.0.1", "10.0.0.8, 10.0.0.9", trusted) == "10.0.0.8"  # all proxies: the farthest
    assert client_address("10.0.0.1", "junk, 2.2.2.2", trusted) == "2.2.2.2"
    assert client_address("10.0.0.1", "2.2.2.2, junk", trusted) == "10.0.0.1"  # a proxy would not write junk
    assert client_address("8.8.8.8", "2.2.2.2", trusted) == "8.8.8.8"
    assert client_address("fd00::1", "[2001:db8::5]:443", trusted) == "2001:db8::5"
    assert client_address("::ffff:192.0.2.1", None, trusted) == "192.0.2.1"
    assert client_key("2001:db8:aa:bb:1:2:3:4") == client_key("2001:db8:aa:bb::9") == "2001:db8:aa:bb::/64"
    assert client_key("192.0.2.1") == "192.0.2.1"
    with pytest.raises(ValueError, match=r"trusted_proxies: 'ten\.0\.0\.1' is not an IP"):
        ServeConfig(trusted_proxies=("ten.0.0.1",))


# --- 10: the result cache --------------------------------------------------------------------------------

def _result(label: str = "positive") -> PredictionResult:
    return PredictionResult(label, 0.9, {"negative": 0.05, "neutral": 0.05, "positive": 0.9}, (0.1, 0.2, 0.3), "v1")


def _traced_growth(fill) -> int:
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        fill()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    return sum(stat.size_diff for stat in after.compare_to(before, "filename"))


def test_finding_10_cached_texts_are_not_kept(engine):
    cache = ResultCache(1000)
    # 100 texts of 100,000 characters: kept as keys they would hold ~10 MB.
    growth = _traced_growth(lambda: [cache.put(("v1", f"{i:06d}" + "x" * 100_000), _result()) for i in range(100)])
    assert len(cache) == 100 and growth < 500_000, f"the cache grew by {growth} bytes"
    assert cache.get(("v1", "000042" + "x" * 100_000)) is not None and cache.get(("v1", "x")) is None


def test_finding_10_the_cache_is_bounded_in_bytes(tiny_model_dir):
    cache = ResultCache(capacity=1_000_000, max_bytes=200_000)
    results = [_result() for _ in range(20_000)]
    growth = _traced_growth(lambda: [cache.put(("v1", f"text {i}"), r) for i, r in enumerate(results)])
    del results
    assert 0 < cache.bytes <= 200_000 and len(cache) < 1000
    assert growth < 400_000, f"{growth} bytes traced for a 200,000-byte cache"
    assert cache.get(("v1", "text 19999")) is not None and cache.get(("v1", "text 0")) is None
    measured = ResultCache(capacity=1000, max_bytes=1 << 30)  # the estimate against what Python allocates
    fresh = [_result() for _ in range(1000)]
    growth = _traced_growth(lambda: [measured.put(("v1", f"t{i}"), r) for i, r in enumerate(fresh)])
    total = growth + sum(sys.getsizeof(r) + sys.getsizeof(r.probabilities) + sys.getsizeof(r.logits) for r in fresh)
    assert 0.5 < measured.bytes / total < 2.0, (measured.bytes, total)
    with InferenceEngine(tiny_model_dir, max_batch_size=1, cache_max_bytes=12_345) as eng:
        assert eng.cache.max_bytes == 12_345
        info = create_app(eng).test_client().get("/model/info").get_json()
        assert info["serving"]["cache_max_bytes"] == 12_345


# --- 11: a full queue refuses before tokenizing --------------------------------------------------------------

def test_finding_11_a_full_queue_refuses_before_tokenizing(tiny_model_dir, sample_texts):
    # Batches of up to 128 wait 5 s to fill, so 64 queued texts fill the queue of 64.
    with InferenceEngine(tiny_model_dir, max_batch_size=128, batch_buckets=(1, 128), max_queue_size=64,
                         max_wait_ms=5000, cache_size=0) as eng:
        waiting = [eng.submit(f"{i} {text}") for i, text in enumerate((sample_texts * 4)[:64])]
        encoder, encoded = eng.classifier.encoder, []
        real = encoder.ids_one
        encoder.ids_one = lambda text: encoded.append(text) or real(text)
        big = [f"{i} " + "word " * 2000 for i in range(64)]
        started = time.process_time()
        with pytest.raises(QueueFullError, match="queue is full"):
            eng.predict_batch(big)
        cpu = time.process_time() - started
        assert encoded == [], f"tokenized {len(encoded)} texts before refusing"
        assert eng.stats().rejected_queue_full == 64
        print(f"refusing 64 x 10k characters took {1000 * cpu:.1f} ms of CPU")
    assert all(f.result(timeout=10).predicted_class for f in waiting)  # close() ran the queued ones


# --- 12: information leaks --------------------------------------------------------------------------------

def test_finding_12_public_endpoints_carry_no_paths_or_exception_text(tiny_model_dir, tmp_path):
    broken = tmp_path / "secret-place" / "model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    app = create_app(broken)
    assert not app.extensions["jaxclf"].wait_ready(60)
    for path in ("/health", "/ready", "/model/info", "/"):
        text = app.test_client().get(path).get_data(as_text=True)
        assert "secret-place" not in text and "safetensors" not in text.lower(), (path, text)
    assert "secret-place" in app.extensions["jaxclf"].load_error  # the operator still has the cause

    served = tmp_path / "served"
    shutil.copytree(tiny_model_dir, served)
    training = dataclasses.asdict(TrainingConfig(output_dir="/home/alice/runs/x", train_file="/data/pii.csv",
                                                 init_from="/home/alice/base"))
    (served / "metrics.json").write_text(json.dumps({
        "eval": {"accuracy": 0.5}, "train_file": "/data/pii.csv", "eval_file": "/data/pii-eval.csv",
        "training_config": training, "imported_from": {"hf_dir": "/home/alice/hf", "architecture": "bert"}}))
    app = create_app(served, engine_options={"max_batch_size": 1})
    assert app.extensions["jaxclf"].wait_ready(60)
    info = app.test_client().get("/model/info").get_json()
    text = json.dumps(info)
    assert "/home/alice" not in text and "/data/" not in text
    assert info["metrics"]["eval"] == {"accuracy": 0.5}
    assert info["metrics"]["training_config"]["learning_rate"] == training["learning_rate"]
    assert info["metrics"]["imported_from"] == {"architecture": "bert"}
    for path in ("/", "/ready", "/model/info", "/metrics"):  # nor the model directory's own path
        assert str(tmp_path) not in app.test_client().get(path).get_data(as_text=True), path
    app.extensions["jaxclf"].close()


def test_finding_12_every_path_field_of_the_training_config_is_withheld():
    from jaxclf.serve.routes import PATH_KEYS

    path_fields = {f.name for f in dataclasses.fields(TrainingConfig)
                   if f.name.endswith(("_file", "_dir", "_path")) or f.name == "init_from"}
    assert path_fields <= PATH_KEYS, path_fields - PATH_KEYS


# --- 13: shutdown under Kubernetes ------------------------------------------------------------------------

def test_finding_13_pre_drain_keeps_serving_while_ready_says_503(tiny_model_dir, xla_cache, tmp_path):
    srv = Server(tiny_model_dir, tmp_path / "serve.log", "--pre-drain-s", "3", "--shutdown-timeout-s", "10",
                 "--max-batch-size", "4", "--batch-buckets", "1,4", "--compilation-cache-dir", str(xla_cache))
    try:
        srv.wait_ready()
        srv.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        time.sleep(0.3)
        status, headers, body = srv.request("GET", "/ready")
        assert status == 503 and body["error"]["code"] == "shutting_down" and headers["Retry-After"] == "1"
        served = 0
        while time.monotonic() - sent < 2.5:  # new connections are still accepted and answered
            assert srv.request("POST", "/predict", {"text": f"still here {served}"})[0] == 200
            served += 1
        assert srv.proc.wait(timeout=15) == 0
        elapsed = time.monotonic() - sent
        assert 3 <= elapsed < 10, elapsed
        assert served > 0
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()


NEVER_LOADS = """
import sys, threading
from jaxclf.serve.app import create_app
from jaxclf.serve.config import ServeConfig
from jaxclf.serve.server import serve

class NeverResolves:
    def resolve(self):
        threading.Event().wait()
    def describe(self):
        return "a source that never resolves"

app = create_app(NeverResolves(), serve=ServeConfig(port=0, shutdown_timeout_s=3), load_now=False)
sys.exit(serve(app))
"""


def test_finding_13_the_whole_shutdown_is_capped(tmp_path):
    """Stalled clients, a load that never ends: SIGTERM to exit within shutdown_timeout_s all the same (the
    drain, the loader and the engines each used to get the whole timeout, one after another)."""
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", NEVER_LOADS], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while not (match := re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        stalled = socket.create_connection(("127.0.0.1", int(match.group(1))))  # half a request, then nothing
        stalled.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n{\"te")
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        code = proc.wait(timeout=30)
        elapsed = time.monotonic() - sent
        stalled.close()
        assert elapsed < 3 + 1.0, f"shutdown took {elapsed:.1f}s with shutdown_timeout_s=3"
        assert code == 1 and "model still loading" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert ServeConfig().shutdown_timeout_s < 30  # Kubernetes' default grace period


def test_finding_13_pre_drain_must_fit_in_the_shutdown_time():
    with pytest.raises(ValueError, match="pre_drain_s=30 must be shorter than shutdown_timeout_s=25"):
        ServeConfig(pre_drain_s=30)
    assert ServeConfig(pre_drain_s=10).pre_drain_s == 10


# --- 14: smaller ones ---------------------------------------------------------------------------------------

def test_finding_14_an_over_long_key_has_its_own_error_code(engine):
    client = create_app(engine).test_client()
    error = error_of(client.post("/predict", json={"text": "hi", "key": "k" * 300}), 400)
    assert error["code"] == "key_too_long" and "key" in error["message"]
    assert error_of(client.post("/predict/batch", json={"texts": ["hi"], "key": ""}), 400)["code"] == "empty_key"
    response = client.post("/predict", json={"text": "hi"}, headers={"X-Request-Key": "k" * 300})
    assert error_of(response, 400)["code"] == "key_too_long"
    assert client.post("/predict", json={"text": "hi", "key": "user-1"}).status_code == 200
    assert error_of(client.post("/predict", json={"text": "x" * 20_000}), 413)["code"] == "text_too_long"


def test_finding_14_serving_docs_name_only_flags_that_exist():
    from jaxclf.serve.__main__ import build_parser

    flags = {option for action in build_parser()._actions for option in action.option_strings}
    named = set()
    for source in [*(REPO / "jaxclf" / "serve").glob("*.py"), REPO / "docs" / "api.md"]:
        text = re.sub(r"jaxclf export-onnx[^\n\"']*", "", source.read_text())  # another command's flags
        named |= set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", text))
    assert named - flags == set(), f"named but not flags of jaxclf serve: {sorted(named - flags)}"


def test_finding_14_a_huge_vocab_size_fails_on_the_weights_header_before_allocating(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    huge = tmp_path / "huge"
    shutil.copytree(tiny_model_dir, huge)
    config = json.loads((huge / "config.json").read_text())
    config["model"]["vocab_size"] = 1_000_000_000  # 128 GB of embeddings at d_model 32
    (huge / "config.json").write_text(json.dumps(config))
    built = []

    def create_model(config, *args, **kwargs):  # never really allocates here: 128 GB
        built.append(config.vocab_size)
        raise MemoryError("the model was built from config.json before the weights' shapes were checked")

    monkeypatch.setattr(classifier, "create_model", create_model)
    expected = r"embeddings\.word_embeddings\.weight: expected \(1000000000, 32\), found \(\d+, 32\)"
    with pytest.raises(WeightsError, match=expected):
        jaxclf.load(huge)
    with pytest.raises(WeightsError, match=expected):
        InferenceEngine(huge, max_batch_size=1)
    assert built == []


# --- #13 item 6: resource metrics ----------------------------------------------------------------------------

def test_resource_metrics_are_exported(server):
    families = server.metrics()
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds", "process_max_fds",
                 "jaxclf_process_threads", "jaxclf_compilation_cache_lookups", "python_info"):
        assert families.get(name), f"{name} missing from /metrics"
    assert sum(s.value for s in families["process_resident_memory_bytes"]) > 50e6
    assert sum(s.value for s in families["jaxclf_process_threads"]) >= 3
    lookups = {s.labels["result"]: s.value for s in families["jaxclf_compilation_cache_lookups"]
               if s.name.endswith("_total")}
    assert set(lookups) == {"hit", "miss"} and lookups["hit"] + lookups["miss"] >= 2  # 2 buckets compiled or loaded
    assert not [n for n in families if n.startswith("jaxclf_device_memory")]  # the CPU backend reports none


def test_device_memory_is_reported_where_the_backend_has_it():
    from jaxclf.serve.resources import ResourceCollector

    class FakeGpu:
        platform = "gpu"

        def memory_stats(self):
            return {"bytes_in_use": 123, "peak_bytes_in_use": 456, "bytes_limit": 789, "other": 1}

        def __str__(self):
            return "cuda:0"

    import jax
    families = {f.name: f for f in ResourceCollector(lambda: [FakeGpu(), jax.devices("cpu")[0]]).collect()}
    assert [(s.labels, s.value) for s in families["jaxclf_device_memory_in_use_bytes"].samples] == [
        ({"device": "cuda:0", "platform": "gpu"}, 123)]
    assert families["jaxclf_device_memory_limit_bytes"].samples[0].value == 789


def test_every_metric_is_documented(server):
    from jaxclf.serve.prometheus import METRICS

    documented = {name for name, _, _ in METRICS}
    _, _, text = server.request("GET", "/metrics")
    suffix = {"counter": "_total", "info": "_info"}
    exported = {f.name + suffix.get(f.type, "") for f in text_string_to_metric_families(text)
                if not f.name.endswith("_created")}  # prometheus-client's creation times of counters and histograms
    assert exported - documented == set(), exported - documented
    assert "## Metrics" in (REPO / "docs" / "api.md").read_text()
