"""Serving from the registry: alias -> serve -> promote -> POST /admin/reload with zero failed requests under
load -> rollback -> reload; the admin endpoint's auth; the A/B traffic split (router and real server); drift
monitoring (PSI) on synthetic streams and through the service."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from jaxclf import model_dir
from jaxclf.classifier import softmax
from jaxclf.serve.engine import InferenceEngine
from jaxclf.serve.slot import RegistrySource, TrafficSplit, key_point, parse_split
from jaxclf.serve.monitoring import DriftMonitor, confidence_bin, psi
from jaxclf.registry import Registry
from jaxclf.serve.app import create_app
from test_service import JSON, REPO, Server, metric_value  # the real server as tests/test_service.py starts it

TOKEN = "registry-serving-test-token-0123"
SMALL = ("--max-batch-size", "4", "--batch-buckets", "1,4", "--max-wait-ms", "2", "--cache-size", "0")
ENGINE_OPTIONS = {"max_batch_size": 4, "batch_buckets": (1, 4), "max_wait_ms": 1, "cache_size": 0}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def registry_with(root: Path, *model_dirs: Path, **aliases: int) -> Registry:
    reg = Registry(root)
    for d in model_dirs:
        reg.register(d, "m")
    for alias, version in aliases.items():
        reg.promote("m", version, to=alias)
    return reg


# --- the traffic split -------------------------------------------------------------------------------

def test_split_over_10k_keys_matches_the_weights_and_is_sticky():
    for weights in ([0.9, 0.1], [0.5, 0.3, 0.2]):
        split = TrafficSplit(weights)
        keys = [f"user-{i}" for i in range(10_000)]
        arms = [split.choose(k) for k in keys]
        shares = np.bincount(arms, minlength=len(weights)) / len(keys)
        print(f"split {weights}: measured {np.round(shares, 4).tolist()} over 10,000 keys")
        assert np.all(np.abs(shares - weights) < 0.02), shares
        assert [split.choose(k) for k in keys] == arms  # sticky: the same key, the same arm
    assert TrafficSplit([0.9, 0.1]).choose("user-7") == TrafficSplit([9, 1]).choose("user-7")  # scale-free
    assert 0 <= key_point("") < 1 and key_point("a") != key_point("b")
    unkeyed = np.bincount([TrafficSplit([0.9, 0.1]).choose(None) for _ in range(10_000)], minlength=2) / 10_000
    assert abs(unkeyed[0] - 0.9) < 0.02  # no key: random, in proportion


def test_parse_split():
    assert parse_split("m@production=0.9, m@staging=0.1") == [("m@production", 0.9), ("m@staging", 0.1)]
    assert parse_split("m@a=3,m@b=1") == [("m@a", 0.75), ("m@b", 0.25)]
    for bad, match in [("m@production", "NAME@ALIAS=WEIGHT"), ("m@a=x", "NAME@ALIAS=WEIGHT"),
                       ("m@a=0.5,m@a=0.5", "twice"), ("m@a=-1,m@b=2", "positive"), ("m@a=nan", "positive")]:
        with pytest.raises(ValueError, match=match):
            parse_split(bad)


# --- drift: PSI on synthetic streams -------------------------------------------------------------------

REF_CONFIDENCE = [0, 0, 0, 40, 200, 300, 250, 150, 50, 10]
REF_LABELS = [500, 300, 200]
LABELS = ["negative", "neutral", "positive"]


def synthetic_stream(rng, n: int, confidence_hist, label_counts) -> list[tuple[str, float]]:
    """n (label, confidence) pairs drawn from the given histograms (confidence uniform inside its bin)."""
    bins = rng.choice(len(confidence_hist), size=n, p=np.asarray(confidence_hist) / np.sum(confidence_hist))
    labels = rng.choice(len(label_counts), size=n, p=np.asarray(label_counts) / np.sum(label_counts))
    conf = (bins + rng.uniform(0, 1, n)) / len(confidence_hist)
    return [(LABELS[k], float(c)) for k, c in zip(labels, conf)]


def test_psi():
    assert psi([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0)
    assert psi([50, 50], [90, 10]) == pytest.approx(0.4 * np.log(0.9 / 0.5) - 0.4 * np.log(0.1 / 0.5))
    assert np.isfinite(psi([10, 0], [0, 10]))  # empty bins count as eps
    assert [confidence_bin(c, 10) for c in (0.0, 0.05, 0.3, 0.999, 1.0)] == [0, 0, 3, 9, 9]
    with pytest.raises(ValueError):
        psi([1, 2], [1, 2, 3])


def test_drift_psi_stays_low_for_the_reference_distribution_and_crosses_for_a_shift(caplog):
    rng = np.random.default_rng(0)
    monitor = DriftMonitor("m@v1", LABELS, REF_CONFIDENCE, REF_LABELS, window=1000, threshold=0.2)
    caplog.set_level(logging.INFO, logger="jaxclf.serve.monitoring")
    for label, conf in synthetic_stream(rng, 1000, REF_CONFIDENCE, REF_LABELS):
        monitor.observe(label, conf)
    unshifted = monitor.values()
    # Shifted: over-confident and mostly one label, as when traffic moves to an easy, one-sided topic.
    for label, conf in synthetic_stream(rng, 1000, [0, 0, 0, 0, 0, 0, 10, 50, 200, 740], [100, 100, 800]):
        monitor.observe(label, conf)
    shifted = monitor.values()
    print(f"PSI unshifted {unshifted}, shifted {shifted}")
    assert unshifted["confidence"] < 0.05 and unshifted["label"] < 0.05
    assert shifted["confidence"] > 0.2 and shifted["label"] > 0.2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    # Once per crossing, although the sliding window wobbles around the threshold on the way up.
    assert sorted(r.getMessage().split()[2] for r in warnings) == ["confidence", "label"]
    # Back to normal: falls below (logged at info), re-armed, and a new shift warns again.
    for label, conf in synthetic_stream(rng, 1000, REF_CONFIDENCE, REF_LABELS):
        monitor.observe(label, conf)
    assert not any(monitor.above_threshold().values())
    assert sum("back below" in r.getMessage() for r in caplog.records) == 2
    for _ in range(1000):
        monitor.observe("positive", 0.99)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 4


def test_drift_needs_a_reference_and_a_minimum_sample():
    assert DriftMonitor.from_metrics("m@v1", LABELS, {}) is None
    assert DriftMonitor.from_metrics("m@v1", LABELS, {"eval": {"confidence_histogram": [1] * 10,
                                                               "predicted_label_counts": [1, 2]}}) is None
    monitor = DriftMonitor.from_metrics("m@v1", LABELS, {"eval": {"confidence_histogram": REF_CONFIDENCE,
                                                                  "predicted_label_counts": REF_LABELS}},
                                        window=50, min_samples=20)
    for _ in range(19):
        monitor.observe("positive", 0.99)
    assert monitor.values() == {}  # too few to say anything
    for _ in range(200):
        monitor.observe(2, 0.99)
    assert monitor.samples == 50 and monitor.values()["label"] > 1


@pytest.fixture(scope="module")
def drift_model(tiny_model_dir, sample_texts, tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """A model whose predictions depend on the text, with its eval distributions in metrics.json.

    The tiny random model scores every text almost alike; centring and scaling its head spreads the
    predictions over all labels and confidences. The reference is its own output on the sample texts,
    as training would record it. Returns (model dir, texts by predicted label).
    """
    import jaxclf
    config, tensors, tokenizer, _ = model_dir.read(tiny_model_dir)
    logits = jaxclf.load(tiny_model_dir).logits(sample_texts).astype(np.float64)
    mean, scale = logits.mean(0), 1.0 / logits.std(0).mean()
    tensors = dict(tensors)
    tensors["classifier.weight"] = tensors["classifier.weight"] * scale
    tensors["classifier.bias"] = (tensors["classifier.bias"] - mean) * scale
    probs = softmax(scale * (logits - mean))
    metrics = {"eval": {"confidence_histogram": np.histogram(probs.max(-1), bins=10, range=(0, 1))[0].tolist(),
                        "predicted_label_counts": np.bincount(probs.argmax(-1), minlength=3).tolist()}}
    path = model_dir.write(tmp_path_factory.mktemp("drift") / "model", config, tensors, tokenizer, metrics)
    by_label = {label: [t for t, k in zip(sample_texts, probs.argmax(-1)) if k == i]
                for i, label in enumerate(config.id2label)}
    assert sum(len(v) >= 30 for v in by_label.values()) >= 2, metrics  # the labels really are spread
    return path, by_label


def test_drift_through_the_service(drift_model, sample_texts, caplog):
    path, by_label = drift_model
    engine = InferenceEngine(path, **ENGINE_OPTIONS)
    try:
        client = create_app(engine, drift_window=400, drift_min_samples=100).test_client()

        def send(texts: list[str]) -> None:
            for start in range(0, len(texts), 64):
                assert client.post("/predict/batch", json={"texts": texts[start:start + 64]}).status_code == 200

        def gauges() -> dict[str, float]:
            text = client.get("/metrics").get_data(as_text=True)
            return {kind: float(line.rsplit(" ", 1)[1]) for kind in ("confidence", "label")
                    for line in text.splitlines() if line.startswith("jaxclf_drift_psi{") and f'kind="{kind}"' in line}

        caplog.set_level(logging.INFO, logger="jaxclf.serve.monitoring")
        rng = random.Random(0)
        send([rng.choice(sample_texts) for _ in range(400)])  # drawn from the evaluation distribution
        unshifted = gauges()
        majority = max(by_label, key=lambda k: len(by_label[k]))
        minority = min((k for k in by_label if by_label[k]), key=lambda k: len(by_label[k]))
        send([rng.choice(by_label[minority]) for _ in range(400)])  # only texts of one class
        shifted = gauges()
        print(f"service PSI: unshifted {unshifted}, only '{minority}' texts {shifted} (majority label {majority})")
        assert unshifted["label"] < 0.1 and unshifted["confidence"] < 0.2
        assert shifted["label"] > 0.2
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len([w for w in warnings if "label PSI" in w]) == 1 and engine.version in warnings[0]
    finally:
        engine.close()


# --- the admin endpoint (in-process) ----------------------------------------------------------------

def test_admin_reload_refuses_without_or_with_a_wrong_token(tmp_path, tiny_model_dir, tiny_model_dir_seed1):
    reg = registry_with(tmp_path / "reg", tiny_model_dir, tiny_model_dir_seed1, production=1)
    app = create_app(RegistrySource(reg.root, [("m@production", 1.0)]), engine_options=ENGINE_OPTIONS,
                     admin_token=TOKEN)
    service = app.extensions["jaxclf"]
    assert service.wait_ready(60), service.load_error
    client = app.test_client()
    assert client.get("/ready").get_json()["model_version"] == "m@v1"
    for headers, status, code in [({}, 401, "unauthorized"), ({"Authorization": f"Basic {TOKEN}"}, 401, "unauthorized"),
                                  ({"Authorization": "Bearer "}, 401, "unauthorized"),
                                  ({"Authorization": "Bearer wrong-token"}, 403, "forbidden"),
                                  ({"Authorization": f"Bearer {TOKEN}x"}, 403, "forbidden")]:
        response = client.post("/admin/reload", headers=headers)
        assert response.status_code == status and response.get_json()["error"]["code"] == code, headers
    assert client.get("/admin/reload").status_code == 405
    unchanged = client.post("/admin/reload", headers=AUTH).get_json()
    assert unchanged["reloaded"] is False and "already serving m@v1" in unchanged["message"]

    # A version whose files changed since registration is refused; the old one keeps serving.
    v2 = reg.promote("m", 2, to="production")
    (v2.path / "metrics.json").chmod(0o644)
    (v2.path / "metrics.json").write_text('{"eval": {"accuracy": 1.0}}')
    response = client.post("/admin/reload", headers=AUTH)
    error = response.get_json()["error"]
    assert response.status_code == 409 and error["code"] == "reload_failed" and "modified" in error["message"]
    assert client.post("/predict", json={"text": "hi"}).get_json()["model_version"] == "m@v1"
    service.close()

    engine = InferenceEngine(tiny_model_dir, **ENGINE_OPTIONS)
    try:
        off = create_app(engine).test_client().post("/admin/reload", headers=AUTH)
        assert off.status_code == 404 and "--admin-token" in off.get_json()["error"]["message"]
        fixed = create_app(engine, admin_token=TOKEN).test_client().post("/admin/reload", headers=AUTH)
        assert fixed.status_code == 409 and fixed.get_json()["error"]["code"] == "reload_unavailable"
    finally:
        engine.close()


# --- the real server ----------------------------------------------------------------------------------

class Load:
    """A few client threads posting /predict in bounded loops, recording every answer with its timing."""

    def __init__(self, server: Server, texts: list[str], threads: int = 4, max_requests: int = 3000):
        self.server, self.texts, self.max_requests = server, texts, max_requests
        self.stop = threading.Event()
        self.results: list[tuple[float, float, int, dict | str, str]] = []  # (sent, answered, status, body, text)
        self.errors: list[str] = []
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, i: int) -> None:
        for n in range(self.max_requests):
            if self.stop.is_set():
                return
            text = self.texts[(i * 7 + n) % len(self.texts)]
            sent = time.monotonic()
            try:
                status, _, body = self.server.request("POST", "/predict", {"text": text}, timeout=30)
            except Exception as e:  # a dropped connection is a failed request too
                self.errors.append(repr(e))
                continue
            self.results.append((sent, time.monotonic(), status, body, text))

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def wait_for(self, n: int, timeout: float = 30) -> None:
        """Until n more answers have come in."""
        target, deadline = len(self.results) + n, time.monotonic() + timeout
        while len(self.results) < target:
            assert time.monotonic() < deadline and not self.errors, self.errors[:3]
            time.sleep(0.01)


@pytest.mark.slow
def test_promote_and_reload_switch_a_running_server_without_failing_a_request(
        tmp_path, tiny_model_dir, tiny_model_dir_seed1, xla_cache, sample_texts):
    reg = registry_with(tmp_path / "reg", tiny_model_dir, production=1)
    os.environ["JAXCLF_ADMIN_TOKEN"] = TOKEN  # the server reads the token from the environment
    try:
        srv = Server("m@production", tmp_path / "serve.log", "--registry", str(reg.root), *SMALL,
                     "--threads", "16", "--compilation-cache-dir", str(xla_cache))
    finally:
        del os.environ["JAXCLF_ADMIN_TOKEN"]
    try:
        assert srv.wait_ready()["model_version"] == "m@v1"
        assert srv.request("POST", "/admin/reload")[0] == 401
        assert srv.request("POST", "/admin/reload", headers={"Authorization": "Bearer nope"})[0] == 403

        reg.register(tiny_model_dir_seed1, "m")
        reg.promote("m", 2, to="production")
        texts = sample_texts[:20]
        marks = {}
        with Load(srv, texts) as load:
            load.wait_for(100)
            marks["reload1_sent"] = time.monotonic()
            status, _, body = srv.request("POST", "/admin/reload", headers=AUTH, timeout=120)
            marks["reload1_done"] = time.monotonic()
            assert status == 200 and body["reloaded"] and body["serving"][0]["model_version"] == "m@v2", body
            load.wait_for(200)
            reg.rollback("m", "production")
            marks["reload2_sent"] = time.monotonic()
            status, _, body = srv.request("POST", "/admin/reload", headers=AUTH, timeout=120)
            marks["reload2_done"] = time.monotonic()
            assert status == 200 and body["serving"][0]["model_version"] == "m@v1", body
            load.wait_for(200)
        results = load.results
        failures = [(s, b) for _, _, s, b, _ in results if s != 200] + load.errors
        versions = [b["model_version"] for _, _, s, b, _ in results if s == 200]
        print(f"reload under load: {len(results) + len(load.errors)} requests, {len(failures)} failed; "
              f"answered by m@v1 {versions.count('m@v1')}, m@v2 {versions.count('m@v2')}; "
              f"reloads took {marks['reload1_done'] - marks['reload1_sent']:.2f}s and "
              f"{marks['reload2_done'] - marks['reload2_sent']:.2f}s")
        assert not failures, failures[:5]

        def answered_by(start: float, end: float) -> set[str]:
            return {b["model_version"] for sent, done, _, b, _ in results if sent >= start and done <= end}

        assert answered_by(0, marks["reload1_sent"]) == {"m@v1"}
        assert answered_by(marks["reload1_done"], marks["reload2_sent"]) == {"m@v2"}
        assert answered_by(marks["reload2_done"], float("inf")) == {"m@v1"}
        # Each version answers as itself: a text always gets the same probabilities from the same version,
        # and different ones from the other version.
        answers: dict[tuple[str, str], list[dict]] = {}
        for _, _, _, b, text in results:
            answers.setdefault((b["model_version"], text), []).append(b["probabilities"])
        for probabilities in answers.values():
            assert all(p == pytest.approx(probabilities[0], abs=1e-6) for p in probabilities)
        both = [t for t in texts if ("m@v1", t) in answers and ("m@v2", t) in answers]
        assert both and all(answers[("m@v1", t)][0] != pytest.approx(answers[("m@v2", t)][0], abs=1e-3)
                            for t in both)

        samples = srv.metrics()
        assert metric_value(samples["jaxclf_compilations"], "jaxclf_compilations_total", kind="request") == 0
        assert {s.labels["version"] for s in samples["jaxclf_model_info"]} == {"m@v1"}  # v2 retired
        assert {s.labels["version"] for s in samples["jaxclf_predictions"]} == {"m@v1", "m@v2"}
        assert srv.request("GET", "/ready")[2]["model_version"] == "m@v1"
    finally:
        assert srv.stop() == 0


class ABServer(Server):
    """scripts/serve.py started with --ab (and no --model)."""

    def __init__(self, log: Path, *args: str):
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}
        env.pop("JAXCLF_ADMIN_TOKEN", None)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "scripts" / "serve.py"), "--host", "127.0.0.1", "--port", "0",
                 "--log-level", "warning", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.port = self._wait_for(r"listening on http://127\.0\.0\.1:(\d+)", timeout=60)


@pytest.mark.slow
def test_ab_split_through_the_server(tmp_path, tiny_model_dir, tiny_model_dir_seed1, xla_cache):
    reg = registry_with(tmp_path / "reg", tiny_model_dir, tiny_model_dir_seed1, production=1, staging=2)
    srv = ABServer(tmp_path / "serve.log", "--registry", str(reg.root), "--ab", "m@production=0.9,m@staging=0.1",
                   *SMALL, "--threads", "8", "--compilation-cache-dir", str(xla_cache))
    try:
        ready = srv.wait_ready()
        assert ready["model_version"] == "m@v1"
        assert [(d["model_version"], d["weight"]) for d in ready["model_versions"]] == [("m@v1", 0.9), ("m@v2", 0.1)]
        split, versions = TrafficSplit([0.9, 0.1]), ["m@v1", "m@v2"]
        keys = [f"user-{i}" for i in range(300)]
        chosen = [k for k in keys if split.choose(k) == 1][:6] + [k for k in keys if split.choose(k) == 0][:14]
        for key in chosen:
            expected = versions[split.choose(key)]
            by_body = srv.request("POST", "/predict", {"text": "tacos", "key": key})[2]
            again = srv.request("POST", "/predict", {"text": "more tacos", "key": key})[2]
            by_header = srv.request("POST", "/predict", {"text": "tacos"}, {**JSON, "X-Request-Key": key})[2]
            batch = srv.request("POST", "/predict/batch", {"texts": ["a", "b"], "key": key})[2]
            assert by_body["model_version"] == again["model_version"] == by_header["model_version"] \
                == batch["model_version"] == expected, key
        unkeyed = [srv.request("POST", "/predict", {"text": "x"}) for _ in range(20)]
        assert all(status == 200 and body["model_version"] in versions for status, _, body in unkeyed)

        samples = srv.metrics()
        assert {s.labels["version"] for s in samples["jaxclf_predictions"]} == set(versions)
        assert {s.labels["version"]: s.value for s in samples["jaxclf_traffic_weight"]} == pytest.approx(
            {"m@v1": 0.9, "m@v2": 0.1})
        assert {s.labels["version"] for s in samples["jaxclf_model_info"]} == set(versions)
        assert metric_value(samples["jaxclf_compilations"], "jaxclf_compilations_total", kind="request") == 0
        assert srv.request("POST", "/admin/reload", headers=AUTH)[0] == 404  # no admin token: off
    finally:
        assert srv.stop() == 0
