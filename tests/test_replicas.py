"""Replicas for real: Debian's nginx in front of 3 `scripts/serve.py` processes reading one model registry.

The topology docker-compose.yml and Kubernetes run, on 127.0.0.1: the replicas read the registry through
a read-only bind mount (as root; see benchmarks/replicas.py) and share one compilation cache; the
balancer uses the routes and
retry rules of deploy/nginx/jaxclf-proxy.conf (passive health checks: max_fails/fail_timeout, and
`proxy_next_upstream ... non_idempotent` so a POST /predict that a dead replica dropped is retried on
another). Under a steady client load that never retries by itself, the tests show:

  (a) SIGKILL of a replica loses no request, and (d) the restarted replica compiles nothing (every program
      comes from the shared compilation cache, which is what makes it ready in seconds; benchmarks/replicas.py
      times it), then takes traffic again;
  (b) a SIGTERM'd replica drains (finishes what it received, exits 0) with no failed request;
  (c) `registry promote` then POST /admin/reload to each replica switches every replica to the new
      version with no failed request;
and measure predictions/s through nginx with 1, 2 and 3 replicas (benchmarks/replicas.py does it properly).
The helpers are benchmarks/replicas.py's. Each test leaves the fleet as it found it.
"""

from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from replicas import (MODEL_NAME, NGINX, READ_ONLY_MOUNTS, Balancer, Load, Replica, free_port,  # noqa: E402
                      make_registry, start_replicas, throughput_by_replica_count)
from server_process import http_json  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not NGINX.exists(), reason=f"Debian's nginx ({NGINX}) is not installed: "
                                                             f"apt-get install nginx (.ci/run does)")]

STEADY = dict(threads=3, rate=25)  # requests/s per client thread: a steady load that leaves the CPUs room


class Fleet:
    """3 replicas (m@production = v1 of a registry holding v1 and v2) behind one nginx, one shared cache."""

    def __init__(self, workdir: Path, model_dirs: list[Path], count: int = 3):
        self.workdir = workdir
        self.registry = make_registry(workdir / "registry", *model_dirs, production=1)
        self.cache = workdir / "xla-cache"
        self.replicas = start_replicas(self.registry.root, [free_port() for _ in range(count)], self.cache,
                                       workdir / "logs")
        try:
            self.balancer = Balancer(workdir / "nginx", [r.port for r in self.replicas])
        except BaseException:
            for r in self.replicas:
                r.stop(grace_s=10)
            raise

    def restart(self, index: int, name: str) -> Replica:
        old = self.replicas[index]
        new = Replica(old.registry, old.fixed_port, self.cache, old.log_dir, name, extra_args=tuple(old.extra_args))
        new.start()
        self.replicas[index] = new
        return new

    def versions(self) -> list[str]:
        return [http_json(r.port, "GET", "/ready")[1]["model_version"] for r in self.replicas]

    def stop(self) -> list[int | None]:
        self.balancer.stop()
        return [r.stop(grace_s=60) for r in self.replicas]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_model_dir, tiny_model_dir_seed1):
    fleet = Fleet(tmp_path_factory.mktemp("replicas"), [tiny_model_dir, tiny_model_dir_seed1])
    yield fleet
    fleet.stop()


@pytest.fixture(scope="module")
def texts(sample_texts) -> list[str]:
    return sample_texts[:40]


def replica_of(answer, replica: Replica) -> bool:
    """Whether nginx's final attempt for this answer went to `replica`."""
    return answer.upstream.split(", ")[-1] == f"127.0.0.1:{replica.fixed_port}"


def compilation_cache_lookups(replica: Replica) -> dict[str, float]:
    """The replica's persistent-cache lookups since it started, by result: hit (loaded) or miss (compiled)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = http_json(replica.port, "GET", "/metrics")
    assert status == 200, text
    return {s.labels["result"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "jaxclf_compilation_cache_lookups_total"}


def report(what: str, load: Load, balancer: Balancer, retried_before: int, **figures) -> None:
    extra = "".join(f", {k} {v}" for k, v in figures.items())
    print(f"\n{what}: {len(load.answers)} requests, {len(load.failures())} failed, "
          f"{balancer.retried() - retried_before} retried by nginx{extra}")


@pytest.mark.skipif(not READ_ONLY_MOUNTS, reason="a read-only bind mount needs root and unshare; the replicas "
                                                 "read the registry directory itself here")
def test_replicas_read_the_registry_through_a_read_only_mount(fleet):
    for replica in fleet.replicas:
        assert "ro" in replica.registry_mount_options(), replica.registry_mount_options()
    assert fleet.versions() == [f"{MODEL_NAME}@v1"] * 3  # and serve from it


def test_sigkill_loses_no_request_and_the_restarted_replica_compiles_nothing(fleet, texts):
    victim = fleet.replicas[0]
    retried_before = fleet.balancer.retried()
    with Load(fleet.balancer.port, texts, **STEADY) as load:
        load.wait_for(60)
        assert any(replica_of(a, victim) for a in load.snapshot()), "the victim took no traffic before the kill"
        killed_at = time.monotonic()
        victim.kill()
        load.wait_for(60)
        restarted_at = time.monotonic()
        restarted = fleet.restart(0, "replica0-after-sigkill")
        ready_s = restarted.wait_ready(timeout_s=60)
        ready_at = time.monotonic()
        # nginx sends it one request once its fail_timeout has passed, then keeps it in the rotation.
        load.wait_until(lambda answers: sum(replica_of(a, restarted) and a.sent > ready_at for a in answers) >= 5,
                        timeout=20, what="answers from the restarted replica")
    failures = load.failures()
    report("(a) SIGKILL of 1 of 3 replicas, (d) restart", load, fleet.balancer, retried_before,
           restart_to_ready_s=round(ready_s, 2))
    assert not failures, failures[:5]
    between = [a for a in load.snapshot() if killed_at + 0.5 < a.sent < restarted_at]
    assert between and not any(replica_of(a, victim) for a in between), "nginx kept answering from a dead replica"
    # Ready fast because nothing is compiled: every program comes from the cache the other replicas filled. The
    # restart-to-ready time is measured by benchmarks/replicas.py on a quiet machine, not asserted here.
    lookups = compilation_cache_lookups(restarted)
    assert lookups.get("miss", 0) == 0 and lookups.get("hit", 0) > 0, (
        f"the restarted replica compiled instead of loading from the shared cache: {lookups}; "
        f"log:\n{restarted.log_tail()}")


def test_sigterm_drains_with_no_failed_request(fleet, texts):
    victim = fleet.replicas[1]
    retried_before = fleet.balancer.retried()
    with Load(fleet.balancer.port, texts, **STEADY) as load:
        load.wait_for(60)
        assert any(replica_of(a, victim) for a in load.snapshot())
        signalled = time.monotonic()
        victim.proc.send_signal(signal.SIGTERM)
        exit_code = victim.proc.wait(timeout=45)
        drain_s = time.monotonic() - signalled
        load.wait_for(60)
    failures = load.failures()
    report("(b) SIGTERM of 1 of 3 replicas", load, fleet.balancer, retried_before, exit_code=exit_code,
           sigterm_to_exit_s=round(drain_s, 2))
    assert not failures, failures[:5]
    assert exit_code == 0, victim.log_tail()  # 0: every request it had received was answered in time
    # Prompt: nginx opens a connection per request, so nothing new reaches a replica that stopped listening
    # (with cached upstream connections this drain took 27 s, nearly the 30 s shutdown timeout).
    assert drain_s < 10, f"SIGTERM to exit took {drain_s:.1f}s"
    fleet.restart(1, "replica1-after-sigterm").wait_ready(timeout_s=60)


def test_promote_then_reload_switches_every_replica_with_no_failed_request(fleet, texts):
    assert fleet.versions() == [f"{MODEL_NAME}@v1"] * 3
    retried_before = fleet.balancer.retried()
    fleet.registry.promote(MODEL_NAME, 2, to="production")
    try:
        with Load(fleet.balancer.port, texts, **STEADY) as load:
            load.wait_for(60)
            first_reload = time.monotonic()
            for replica in fleet.replicas:
                status, body = replica.reload()
                assert status == 200 and body["reloaded"], body
                assert body["serving"][0]["model_version"] == f"{MODEL_NAME}@v2", body
            all_reloaded = time.monotonic()
            load.wait_for(60)
        report("(c) promote + reload of 3 replicas", load, fleet.balancer, retried_before,
               reload_s=round(all_reloaded - first_reload, 2))
        assert not load.failures(), load.failures()[:5]
        answers = load.snapshot()
        assert {a.version for a in answers if a.done < first_reload} == {f"{MODEL_NAME}@v1"}
        assert {a.version for a in answers if a.sent > all_reloaded} == {f"{MODEL_NAME}@v2"}
        assert fleet.versions() == [f"{MODEL_NAME}@v2"] * 3
    finally:  # back to v1 for the other tests
        fleet.registry.rollback(MODEL_NAME, "production")
        assert all(r.reload()[0] == 200 for r in fleet.replicas)


def test_throughput_of_one_two_three_replicas_behind_nginx(fleet, texts, tmp_path):
    rates = throughput_by_replica_count(fleet.replicas, tmp_path, texts, seconds=2.0, threads=6)
    print("\npredictions/s: " + "; ".join(f"{name} {m['predictions_per_s']:.0f} (p99 {m['p99_ms']:.0f} ms)"
                                          for name, m in rates.items()))
    for name, m in rates.items():
        assert m["failed"] == 0 and m["predictions_per_s"] > 0, (name, m)
    # Round robin: every replica behind the balancer answers.
    assert [rates[f"{n} behind nginx"]["replicas_used"] for n in (1, 2, 3)] == [1, 2, 3]


def test_the_alert_rules_name_metrics_the_replicas_export(fleet, texts):
    with Load(fleet.replicas[0].port, texts, threads=1, max_requests=20) as load:
        load.wait_for(20)
    status, text = http_json(fleet.replicas[0].port, "GET", "/metrics")
    assert status == 200
    from prometheus_client.parser import text_string_to_metric_families
    exported = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    named = {m for rule in rules for m in re.findall(r"\b(jaxclf_[a-z_]+)", rule["expr"])}
    # The drift gauge needs a reference distribution in the model's metrics.json; the tiny model has none.
    missing = named - exported - {"jaxclf_drift_psi"}
    assert not missing, f"alerts.yml names metrics no replica exports: {sorted(missing)}"
