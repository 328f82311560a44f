"""The HTTP service. Error cases run in-process with Flask's test client (fast); the properties of
the real server (waitress, readiness, batching under concurrency, queue limits, SIGTERM, the
browser page) run against `scripts/serve.py` started as a subprocess on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families

from jaxclf.serve import api_schema
from jaxclf.serve.engine import InferenceEngine
from jaxclf.serve.app import create_app
REPO = Path(__file__).resolve().parents[1]
JSON = {"Content-Type": "application/json"}
CHROMIUM = Path("/usr/bin/chromium")


# --- in-process: Flask test client ------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = InferenceEngine(tiny_model_dir, max_batch_size=16, batch_buckets=(1, 4, 16), max_wait_ms=1)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def client(engine):
    return create_app(engine, max_texts=8, max_chars=200).test_client()


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return body["error"]


def test_info_endpoints(client, engine):
    index = client.get("/").get_json()
    assert index["ready"] and index["model_version"] == engine.version and "POST /predict" in index["endpoints"]
    assert client.get("/health").get_json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.get_json()["compilations"] == 3  # batch 1, 4, 16 x length 32 (the tiny model's max)
    info = client.get("/model/info").get_json()
    assert info["labels"] == ["negative", "neutral", "positive"] and info["model_version"] == engine.version
    assert info["config"]["d_model"] == 32 and info["serving"]["batch_buckets"] == [1, 4, 16]
    assert info["metrics"] == {}


def test_predict_and_batch(client, engine):
    one = client.post("/predict", json={"text": "Best tacos in town"})
    assert one.status_code == 200
    body = one.get_json()
    assert set(body) == {"label", "confidence", "probabilities", "windows", "model_version"}
    assert body["windows"] == 1  # a truncate model reads one row per text
    assert body["model_version"] == engine.version and set(body["probabilities"]) == set(engine.labels)
    expected = engine.predict_single("Best tacos in town")
    assert body["label"] == expected.predicted_class
    assert body["probabilities"] == pytest.approx(expected.probabilities, abs=1e-9)

    texts = ["zzz", "Best tacos in town", "ok", "word " * 30]
    batch = client.post("/predict/batch", json={"texts": texts}).get_json()
    assert batch["model_version"] == engine.version and len(batch["predictions"]) == 4
    for text, p in zip(texts, batch["predictions"]):
        assert p["probabilities"] == pytest.approx(engine.predict_single(text).probabilities, abs=1e-9)


@pytest.mark.parametrize("body, status, code, names", [
    (b"{not json", 400, "invalid_json", "not valid JSON"),
    (b"\xff\xfe", 400, "invalid_json", "not UTF-8"),
    (b"[1, 2]", 400, "invalid_request", "request body must be a JSON object"),
    (b'{"text": 5}', 400, "invalid_request", "'text' must be a JSON string, got number"),
    (b'{"txt": "hi"}', 400, "invalid_request", "'text' is required"),
    (b'{"text": "hi", "lang": "en"}', 400, "invalid_request", "unknown field 'lang'"),
    (b'{"text": "\\ud800"}', 400, "invalid_request", "unpaired UTF-16 surrogate"),
    (b'{"text": ""}', 422, "empty_text", "'text' must not be empty"),
    (json.dumps({"text": "x" * 201}).encode(), 413, "text_too_long", "max_chars=200"),
])
def test_predict_rejects_bad_bodies(client, body, status, code, names):
    error = error_of(client.post("/predict", data=body, headers=JSON), status)
    assert error["code"] == code and names in error["message"]


@pytest.mark.parametrize("body, status, code, names", [
    ({"texts": "one text"}, 400, "invalid_request", "'texts' must be a JSON array, got string"),
    ({"texts": ["fine", None]}, 400, "invalid_request", "'texts[1]' must be a JSON string, got null"),
    ({"texts": []}, 422, "empty_list", "at least 1"),
    ({"texts": ["a"] * 9}, 413, "too_many_texts", "max_texts=8"),
    ({"texts": ["a", "y" * 201]}, 413, "text_too_long", "'texts[1]'"),
])
def test_batch_rejects_bad_bodies(client, body, status, code, names):
    error = error_of(client.post("/predict/batch", json=body), status)
    assert error["code"] == code and names in error["message"]


def test_wrong_content_type_is_415(client):
    error = error_of(client.post("/predict", data='{"text": "hi"}', headers={"Content-Type": "text/plain"}), 415)
    assert "application/json" in error["message"] and "text/plain" in error["message"]
    error_of(client.post("/predict/batch", data="texts=a"), 415)


def test_body_over_the_limit_is_413(engine):
    small = create_app(engine, max_body_bytes=100).test_client()
    error = error_of(small.post("/predict", data=json.dumps({"text": "x" * 200}), headers=JSON), 413)
    assert "max_body_bytes=100" in error["message"]


def test_unknown_route_and_method_are_json(client):
    assert "GET /nope" in error_of(client.get("/nope"), 404)["message"]
    response = client.get("/predict")
    assert error_of(response, 405)["code"] == "method_not_allowed" and "POST" in response.headers["Allow"]
    error_of(client.delete("/health"), 405)


def test_unexpected_errors_are_json_without_a_trace(engine):
    app = create_app(engine)

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret internals")

    response = app.test_client().get("/boom", headers={"X-Request-ID": "req-42"})
    error = error_of(response, 500)
    assert error["code"] == "internal_error" and "req-42" in error["message"]
    assert "secret" not in response.get_data(as_text=True) and "Traceback" not in response.get_data(as_text=True)


def test_request_id_is_echoed_or_made(client):
    assert client.get("/health", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    made = client.get("/health").headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert client.get("/nope", headers={"X-Request-ID": "bad id\u00e9"}).headers["X-Request-ID"] != "bad id\u00e9"


def test_rate_limit_is_per_client_and_off_by_default(engine, client):
    assert all(client.get("/").status_code == 200 for _ in range(20))
    limited = create_app(engine, rate_limit=0.5, rate_burst=2).test_client()
    a = {"REMOTE_ADDR": "10.0.0.1"}
    assert [limited.get("/", environ_base=a).status_code for _ in range(2)] == [200, 200]
    response = limited.get("/", environ_base=a)
    assert error_of(response, 429)["code"] == "rate_limited" and int(response.headers["Retry-After"]) >= 1
    assert limited.get("/", environ_base={"REMOTE_ADDR": "10.0.0.2"}).status_code == 200
    assert limited.get("/health", environ_base=a).status_code == 200  # probes are never limited


def test_cors_is_off_by_default_and_configurable(engine, client):
    origin = {"Origin": "http://localhost:5173"}
    assert "Access-Control-Allow-Origin" not in client.get("/", headers=origin).headers
    app = create_app(engine, cors_origins=["http://localhost:5173"]).test_client()
    assert app.get("/", headers=origin).headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    preflight = app.options("/predict", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200 and "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "Access-Control-Allow-Origin" not in app.get("/", headers={"Origin": "http://localhost:1"}).headers


def test_cors_preflight_allows_the_sticky_routing_header(engine):
    """A browser on another origin must be allowed to send X-Request-Key (A/B routing by key)."""
    app = create_app(engine, cors_origins=["http://localhost:5173"]).test_client()
    preflight = app.options("/predict", headers={"Origin": "http://localhost:5173",
                                                 "Access-Control-Request-Method": "POST",
                                                 "Access-Control-Request-Headers": "content-type, x-request-key"})
    allowed = {h.strip().lower() for h in preflight.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"content-type", "x-request-id", "x-request-key"} <= allowed


def test_routes_index_and_openapi_come_from_one_table(engine):
    from jaxclf.serve.routes import ENDPOINTS

    declared = {(e.method, e.path) for e in ENDPOINTS}
    for admin_token in (None, "a-long-enough-admin-token"):
        app = create_app(engine, admin_token=admin_token)
        routed = {(m, rule.rule) for rule in app.url_map.iter_rules() if rule.endpoint != "static"
                  for m in rule.methods - {"HEAD", "OPTIONS"}}
        assert routed == declared
        client = app.test_client()
        documented = {(m.upper(), path) for path, ops in client.get("/openapi.json").get_json()["paths"].items()
                      for m in ops}
        assert documented == declared
        listed = client.get("/").get_json()["endpoints"]
        assert listed == [f"{e.method} {e.path}" for e in ENDPOINTS if not e.admin or admin_token]


def test_not_ready_and_failed_load_answer_503(tiny_model_dir, tmp_path):
    waiting = create_app(tiny_model_dir, load_now=False).test_client()
    assert waiting.get("/health").status_code == 200
    for response in (waiting.get("/ready"), waiting.post("/predict", json={"text": "hi"})):
        assert error_of(response, 503)["code"] == "not_ready" and response.headers["Retry-After"] == "1"
    app = create_app(tmp_path / "missing")
    assert not app.extensions["jaxclf"].wait_ready(timeout=10)
    error = error_of(app.test_client().get("/ready"), 503)
    # The cause names paths: it goes to the log (and load_error), never to clients (issue #12, finding 12).
    assert error["code"] == "model_load_failed" and "missing" not in error["message"]
    assert "missing" in app.extensions["jaxclf"].load_error
    assert app.test_client().get("/health").status_code == 503


def test_openapi_is_built_from_the_validating_schemas(client):
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    assert doc["components"]["schemas"]["PredictRequest"] == api_schema.predict_request(200)
    assert doc["components"]["schemas"]["BatchRequest"] == api_schema.batch_request(8, 200)
    for path in ("/", "/health", "/ready", "/model/info", "/predict", "/predict/batch", "/metrics",
                 "/openapi.json", "/ui"):
        assert path in doc["paths"]
    assert "413" in doc["paths"]["/predict"]["post"]["responses"]


def test_ui_page_is_self_contained(client):
    response = client.get("/ui")
    page = response.get_data(as_text=True)
    assert response.status_code == 200 and response.mimetype == "text/html"
    assert 'id="text"' in page and 'id="submit"' in page and 'id="bars"' in page
    assert "http://" not in page and "https://" not in page and "src=" not in page  # no external assets
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]


def test_metrics_parse_and_count(client):
    client.post("/predict", json={"text": "metrics please"})
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))}
    for name in ("jaxclf_http_requests", "jaxclf_http_request_duration_seconds", "jaxclf_queue_wait_seconds",
                 "jaxclf_batch_size", "jaxclf_cache_hits", "jaxclf_cache_misses", "jaxclf_predictions",
                 "jaxclf_prediction_confidence", "jaxclf_compilations", "jaxclf_model_info"):
        assert name in families, name
    requests = {(s.labels["endpoint"], s.labels["status"]) for s in families["jaxclf_http_requests"].samples}
    assert ("/predict", "200") in requests


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(
        st.sampled_from(["text", "texts", "x"]) | st.text(max_size=5), children, max_size=4),
    max_leaves=20)
bodies = (json_values.map(lambda v: json.dumps(v).encode())
          | st.fixed_dictionaries({"text": json_values}).map(lambda v: json.dumps(v).encode())
          | st.fixed_dictionaries({"texts": st.lists(json_values, max_size=10)}).map(lambda v: json.dumps(v).encode())
          | st.binary(max_size=300))
content_types = st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain",
                                 "application/x-www-form-urlencoded", "", "application/jsonx", "multipart/form-data"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(["/predict", "/predict/batch"]), body=bodies, content_type=content_types)
def test_fuzzed_bodies_never_get_a_500(client, path, body, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post(path, data=body, headers=headers)
    assert response.status_code in (200, 400, 413, 415, 422), response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert ("error" in body) == (response.status_code != 200)


# --- the command line: python -m jaxclf.serve ----------------------------------------------------------

def run_serve(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "jaxclf.serve", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.parametrize("args, names", [
    ((), "give the model to serve: --model"),
    (("--model", "/no/such/model"), "/no/such/model"),
    (("--model", "m@production"), "add --registry ROOT"),
    (("--registry", "/no/such/registry", "--ab", "m@a=0.9,m@b"), "cannot read 'm@b' in the traffic split"),
    (("--model", "{model}", "--batch-buckets", "1,x"), "expected comma-separated int values"),
    (("--model", "{model}", "--batch-buckets", "1,4", "--max-batch-size", "8"),
     "the largest of batch_buckets must equal max_batch_size=8"),
    (("--model", "{model}", "--length-buckets", "16,64"),
     "must equal the model's max text length (max_position_embeddings, or its tokenizer's truncation)=32"),
    (("--model", "{model}", "--max-texts", "0"), "max_texts must be an integer > 0, got 0"),
    (("--model", "{model}", "--device", "abacus"), "invalid choice: 'abacus'"),
])
def test_command_line_user_errors_are_one_line_and_exit_2(tiny_model_dir, args, names):
    out = run_serve(*(a.format(model=tiny_model_dir) for a in args))
    assert out.returncode == 2, out.stderr
    assert names in out.stderr and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("jaxclf serve: error: ")
    assert out.stdout == ""


def test_scripts_serve_is_the_same_command():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "serve.py"), "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--max-batch-size" in out.stdout and "--cors-origins" in out.stdout
    assert (REPO / "scripts" / "serve.py").read_text().count("\n") < 10  # a shim: the logic is in the package


# --- the real server: scripts/serve.py under waitress ----------------------------------------------

class Server:
    """`python scripts/serve.py` on 127.0.0.1 with an OS-chosen free port; output goes to a log file."""

    def __init__(self, model: Path, log: Path, *args: str):
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "scripts" / "serve.py"), "--model", str(model), "--host", "127.0.0.1",
                 "--port", "0", "--log-level", "warning", *args],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.port = self._wait_for(r"listening on http://127\.0\.0\.1:(\d+)", timeout=60)

    def _wait_for(self, pattern: str, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log.read_text(errors="replace"))
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.proc.kill()
        raise AssertionError(f"server did not start:\n{self.log.read_text(errors='replace')}")

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 30):
        """(status, headers, parsed JSON or text) of one request on a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
            hdrs = dict(headers or ({"Content-Type": "application/json"} if body is not None else {}))
            conn.request(method, path, body=data, headers=hdrs)
            response = conn.getresponse()
            raw = response.read()
            content = json.loads(raw) if response.getheader("Content-Type", "").startswith(
                "application/json") else raw.decode()
            return response.status, response.headers, content  # headers: case-insensitive
        finally:
            conn.close()

    def wait_ready(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, _, body = self.request("GET", "/ready")
            if status == 200:
                return body
            assert self.proc.poll() is None, self.log.read_text(errors="replace")
            time.sleep(0.05)
        raise AssertionError("server not ready in time")

    def metrics(self) -> dict[str, list]:
        _, _, text = self.request("GET", "/metrics")
        return {f.name: f.samples for f in text_string_to_metric_families(text)}

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def metric_value(samples, name: str, **labels) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def server(tiny_model_dir, xla_cache, tmp_path_factory):
    srv = Server(tiny_model_dir, tmp_path_factory.mktemp("server") / "serve.log",
                 "--threads", "40", "--max-batch-size", "16", "--batch-buckets", "1,4,16", "--max-wait-ms", "20",
                 "--cache-size", "0", "--compilation-cache-dir", str(xla_cache))
    # Listening before the model is loaded: not ready yet, and says so with Retry-After.
    status, headers, body = srv.request("GET", "/ready")
    assert status == 503 and body["error"]["code"] == "not_ready" and headers["Retry-After"] == "1"
    assert srv.request("GET", "/health")[0] == 200
    srv.wait_ready()
    yield srv
    assert srv.stop() == 0


def test_a_refused_oversized_body_still_gets_its_413(server):
    """waitress refuses a body over max_body_bytes from its Content-Length alone, while the client is still
    sending it: the server must read and drop the rest, or closing the socket on unread bytes resets the
    connection and the client never sees the answer."""
    body = b'{"text": "' + b"x" * (16 << 20) + b'"}'  # far more than the socket buffers hold
    for _ in range(3):
        status, headers, answer = server.request("POST", "/predict", body, JSON)
        assert status == 413 and answer["error"]["code"] == "request_entity_too_large"
        assert headers["Connection"] == "close"
    assert server.request("POST", "/predict", {"text": "tacos"})[0] == 200  # the server carries on


def test_real_server_endpoints_and_errors(server):
    assert server.request("GET", "/")[2]["ready"] is True
    assert server.request("GET", "/health")[0] == 200
    assert server.request("GET", "/ready")[2]["compilations"] == 3
    assert server.request("GET", "/model/info")[2]["labels"] == ["negative", "neutral", "positive"]
    status, headers, body = server.request("POST", "/predict", {"text": "tacos"}, {**JSON, "X-Request-ID": "r-1"})
    assert status == 200 and body["label"] in ("negative", "neutral", "positive") and headers["X-Request-ID"] == "r-1"
    assert len(server.request("POST", "/predict/batch", {"texts": ["a", "b", "c"]})[2]["predictions"]) == 3
    status, headers, text = server.request("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain") and "jaxclf_model_info" in text
    assert server.request("GET", "/openapi.json")[2]["openapi"].startswith("3.")
    assert "<form" in server.request("GET", "/ui")[2]
    for method, path, body, headers, expected in [
        ("POST", "/predict", b"{oops", JSON, 400),
        ("POST", "/predict", {"text": 1}, JSON, 400),
        ("POST", "/predict", b'{"text": "hi"}', {"Content-Type": "text/plain"}, 415),
        ("POST", "/predict", {"text": "x" * 20_000}, JSON, 413),
        ("POST", "/predict", b'{"text": "' + b"x" * (2 << 20) + b'"}', JSON, 413),
        ("POST", "/predict/batch", {"texts": ["a"] * 65}, JSON, 413),
        ("POST", "/predict/batch", {"texts": []}, JSON, 422),
        ("GET", "/nope", None, None, 404),
        ("PUT", "/predict", None, None, 405),
    ]:
        status, headers, body = server.request(method, path, body, headers)
        assert status == expected and set(body) == {"error"}, (method, path, status, body)
        assert "X-Request-ID" in headers


def test_real_server_batches_concurrent_clients_and_never_compiles(server, sample_texts):
    pool = sample_texts[:24] + ["ok", "Ünïcödé café ☕", "word " * 60]  # 2 to 32+ tokens
    ready = server.request("GET", "/ready")[2]
    # Single-request answers first, one at a time (each runs as a batch of one).
    single = {t: server.request("POST", "/predict", {"text": t})[2] for t in pool}
    answers: list[tuple[str, dict]] = []
    batch_answers: list[tuple[list[str], dict]] = []
    errors: list[str] = []
    start = threading.Barrier(32)

    def client(i: int) -> None:
        start.wait()
        try:
            for k in range(4):
                if (i + k) % 4 == 3:  # some mixed-length batch requests too
                    texts = [pool[(i * 7 + k + j) % len(pool)] for j in range(1 + i % 6)]
                    status, _, body = server.request("POST", "/predict/batch", {"texts": texts})
                    batch_answers.append((texts, body))
                else:
                    text = pool[(i * 4 + k) % len(pool)]
                    status, _, body = server.request("POST", "/predict", {"text": text})
                    answers.append((text, body))
                if status != 200:
                    errors.append(f"{status}: {body}")
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert len(answers) + len(batch_answers) == 128
    for text, body in answers:
        assert body["label"] == single[text]["label"]
        assert body["probabilities"] == pytest.approx(single[text]["probabilities"], abs=1e-6)
    for texts, body in batch_answers:
        for text, p in zip(texts, body["predictions"], strict=True):
            assert p["probabilities"] == pytest.approx(single[text]["probabilities"], abs=1e-6)

    samples = server.metrics()
    count = metric_value(samples["jaxclf_batch_size"], "jaxclf_batch_size_count")
    batches_of_one = metric_value(samples["jaxclf_batch_size"], "jaxclf_batch_size_bucket", le="1.0")
    assert count > batches_of_one, "no batch carried more than one request"
    assert metric_value(samples["jaxclf_compilations"], "jaxclf_compilations_total", kind="request") == 0
    assert metric_value(samples["jaxclf_compilations"], "jaxclf_compilations_total", kind="aot") == 3
    assert server.request("GET", "/ready")[2]["compilations"] == ready["compilations"] == 3


@pytest.mark.slow
def test_full_queue_503s_at_once_and_sigterm_finishes_requests_in_flight(tiny_model_dir, xla_cache, tmp_path,
                                                                         sample_texts):
    # Batches of up to 16 wait 1.5 s to fill, so 4 requests sit in a queue of 4.
    srv = Server(tiny_model_dir, tmp_path / "serve.log", "--threads", "16", "--max-batch-size", "16",
                 "--batch-buckets", "1,16", "--max-queue-size", "4", "--max-wait-ms", "1500", "--cache-size", "0",
                 "--compilation-cache-dir", str(xla_cache))
    try:
        srv.wait_ready()
        results: list[tuple[int, dict]] = []
        threads = [threading.Thread(target=lambda t=t: results.append(srv.request("POST", "/predict", {"text": t})[::2]))
                   for t in sample_texts[:4]]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while metric_value(srv.metrics()["jaxclf_queue_depth"], "jaxclf_queue_depth") < 4:
            assert time.monotonic() < deadline, "requests never reached the queue"
            time.sleep(0.02)

        sent = time.perf_counter()
        status, headers, body = srv.request("POST", "/predict", {"text": "one too many"})
        assert status == 503 and body["error"]["code"] == "queue_full" and headers["Retry-After"] == "1"
        assert time.perf_counter() - sent < 0.5  # at once, not after the batching wait

        srv.proc.send_signal(signal.SIGTERM)  # while 4 requests are still queued
        assert srv.proc.wait(timeout=30) == 0
        for t in threads:
            t.join(timeout=10)
        assert sorted(status for status, _ in results) == [200] * 4
        assert all(body["label"] in ("negative", "neutral", "positive") for _, body in results)
        with pytest.raises(OSError):  # no longer accepting
            srv.request("GET", "/health", timeout=2)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()


def test_sigterm_while_the_model_loads_exits_cleanly(tiny_model_dir, tmp_path):
    """A SIGTERM during start-up compilation used to abort the process (SIGABRT from a thread inside XLA)."""
    srv = Server(tiny_model_dir, tmp_path / "serve.log", "--max-batch-size", "4", "--no-compilation-cache")
    assert srv.stop() == 0, srv.log.read_text(errors="replace")


@pytest.mark.slow
def test_compilation_cache_makes_restart_faster(tiny_model_dir, tmp_path):
    args = ("--max-batch-size", "4", "--batch-buckets", "1,4", "--compilation-cache-dir", str(tmp_path / "xla"))
    seconds = []
    for run in ("cold", "warm"):
        srv = Server(tiny_model_dir, tmp_path / f"{run}.log", *args)
        try:
            seconds.append(srv.wait_ready()["startup_seconds"])
        finally:
            assert srv.stop() == 0
    print(f"start-up to ready: cold {seconds[0]:.2f}s, with the compile cache {seconds[1]:.2f}s")
    assert any((tmp_path / "xla").iterdir())
    assert seconds[1] < seconds[0]


def test_serving_path_never_imports_torch(tiny_model_dir):
    code = ("import sys; from jaxclf.serve.app import create_app; "
            f"app = create_app({str(tiny_model_dir)!r}, engine_options={{'max_batch_size': 1}}); "
            "assert app.extensions['jaxclf'].wait_ready(60); "
            "assert app.test_client().post('/predict', json={'text': 'hi'}).status_code == 200; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_ui_in_a_real_browser(server, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent; install Debian's chromium (apt-get install -y chromium) to run this")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 800, "height": 600})
            page.goto(f"http://127.0.0.1:{server.port}/ui", timeout=30_000)
            page.wait_for_function("document.getElementById('model').textContent.includes('version')",
                                   timeout=10_000)
            page.fill("#text", "The best tacos in town, hands down.")
            page.click("#submit")
            page.wait_for_selector("#result:not([hidden])", timeout=10_000)
            label = page.text_content("#label")
            assert label in ("negative", "neutral", "positive")
            assert page.locator("#bars .row").count() == 3
            expected = server.request("POST", "/predict", {"text": "The best tacos in town, hands down."})[2]
            assert label == expected["label"]
            shot = tmp_path / "ui.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 1000
    if os.environ.get("JAXCLF_SAVE_SCREENSHOT"):
        target = REPO / "benchmarks" / "results" / "ui.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
