"""Multi-host training without flags: `scripts/train.py` joins jax.distributed from a scheduler's environment.

Under SLURM, Open MPI, a Cloud TPU pod or a GKE TPU job, JAX's own cluster detection finds the
coordinator, the process count and this process's index; jaxclf adds no cluster code of its own. The
slow test runs a 2-process job on 127.0.0.1 whose processes get only what SLURM's `srun` sets (no
--coordinator flags) and checks it against the 1-process run, as tests/test_train_sharding.py's flag-based
2-process test does; the fast ones pin down the decision (plain machine: one process, no coordinator).
"""

from __future__ import annotations

import random
import socket
import subprocess
import sys

import jax
import pytest

from jaxclf.config import ConfigError
from jaxclf.train import sharding
from training_runs import MESH_JOB, ROOT, SCRIPT, TINY, assert_runs_match, subprocess_env

# Variables that make one of JAX's cluster detectors match; cleared so the machine looks plain.
CLUSTER_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                     "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST", "JAX_COORDINATOR_ADDRESS",
                     "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")
SLURM_PORT_BASE = 65535 - 2 ** 12 + 1  # JAX's SLURM detector: port = base + SLURM_JOB_ID % 4096


def slurm_step_environment(job_id: int, process: int, processes: int) -> dict[str, str]:
    """What `srun --ntasks=N` on one node sets for task `process` (the subset JAX reads, and its neighbours)."""
    return {"SLURM_JOB_ID": str(job_id), "SLURM_JOBID": str(job_id), "SLURM_STEP_ID": "0",
            "SLURM_NTASKS": str(processes), "SLURM_NPROCS": str(processes), "SLURM_PROCID": str(process),
            "SLURM_LOCALID": str(process), "SLURM_NODEID": "0", "SLURM_NNODES": "1", "SLURM_STEP_NUM_NODES": "1",
            "SLURM_STEP_NUM_TASKS": str(processes), "SLURM_NODELIST": "127.0.0.1",
            "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_TASKS_PER_NODE": str(processes)}


def slurm_job_id_with_free_port() -> int:
    """A job id whose derived coordinator port (JAX: last 4096 ports) is free on 127.0.0.1 now."""
    for _ in range(200):
        job_id = random.randrange(1, 10 ** 6)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", SLURM_PORT_BASE + job_id % 2 ** 12))
            except OSError:
                continue
        return job_id
    raise AssertionError("no free port in JAX's SLURM coordinator range")


@pytest.fixture
def plain_machine(monkeypatch):
    for name in CLUSTER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    return calls


def test_a_plain_machine_stays_single_process(plain_machine):
    sharding.initialize_distributed(None, None, None)
    assert plain_machine == []


def test_a_slurm_step_is_handed_to_jax_with_no_arguments(plain_machine, monkeypatch):
    for name, value in slurm_step_environment(4242, process=1, processes=2).items():
        monkeypatch.setenv(name, value)
    sharding.initialize_distributed(None, None, None)
    assert plain_machine == [{"coordinator_address": None, "num_processes": None, "process_id": None}]
    # ...and JAX reads from those variables what the slow test relies on.
    from jax._src import clusters
    address, processes, process, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, 10)
    assert (address, processes, process) == (f"127.0.0.1:{SLURM_PORT_BASE + 4242 % 2 ** 12}", 2, 1)


def test_flags_win_over_the_environment(plain_machine, monkeypatch):
    for name, value in slurm_step_environment(4242, process=1, processes=2).items():
        monkeypatch.setenv(name, value)
    sharding.initialize_distributed("10.0.0.1:1234", 4, 3)
    assert plain_machine == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}]


@pytest.mark.parametrize("call, environment, named", [
    ("'127.0.0.1:1', None, None", {}, "Number of processes must be defined"),
    ("None, None, None", {**slurm_step_environment(7, 0, 2), "SLURM_PROCID": "first"}, "slurm environment"),
])
def test_incomplete_or_malformed_settings_are_one_named_error(call, environment, named):
    # A fresh interpreter: jax.distributed.initialize refuses to run once this one has used a backend.
    code = ("from jaxclf.train.sharding import initialize_distributed\n"
            f"initialize_distributed({call})\n")
    env = {k: v for k, v in subprocess_env().items() if k not in CLUSTER_VARIABLES} | environment
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{ConfigError.__module__}.ConfigError: cannot join a multi-process run") \
        and named in last, proc.stderr[-2000:]


@pytest.mark.slow
def test_two_processes_from_slurm_variables_alone_match_one_process(tmp_path, one_device_run):
    multi = tmp_path / "multi"
    job_id = slurm_job_id_with_free_port()
    base_env = {k: v for k, v in subprocess_env().items() if k not in CLUSTER_VARIABLES}
    procs = [subprocess.Popen(
        [sys.executable, str(SCRIPT), *TINY, "--output", str(multi), *MESH_JOB, "train.per_device_train_batch_size=8"],
        cwd=ROOT, env=base_env | slurm_step_environment(job_id, process=i, processes=2),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    logs = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=300)
            logs.append(err)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, err in enumerate(logs):
        assert f"process {i} of 2 joined from the slurm environment" in err, err[-2000:]
    assert_runs_match(one_device_run, multi)
