"""Sharding: one small job on several device layouts and across processes gives the same losses and weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from training_runs import MESH_JOB, ROOT, SCRIPT, TINY, assert_runs_match, free_port, run_train, subprocess_env


@pytest.mark.slow
def test_eight_devices_data_x_fsdp_match_one_device(one_device_run, eight_device_run):
    assert_runs_match(one_device_run, eight_device_run)


@pytest.mark.slow
def test_eight_devices_in_two_micro_batches_match_one_device_in_two(tmp_path):
    # Against its own one-device run: each micro-batch draws its own dropout masks.
    one, eight = tmp_path / "one", tmp_path / "eight"
    run_train(one, *MESH_JOB, "train.per_device_train_batch_size=16", "train.micro_batches=2")
    run_train(eight, *MESH_JOB, "train.per_device_train_batch_size=2", "train.mesh_data=2", "train.mesh_fsdp=4",
              "train.micro_batches=2", devices=8)
    assert_runs_match(one, eight)


RESTORE_CHECK = """
import sys, numpy as np, jax, safetensors.numpy
from jaxclf import weights
from jaxclf.train import sharding
from jaxclf.train.loop import restore_checkpoint
out, fsdp = sys.argv[1], int(sys.argv[2])
mesh = sharding.make_mesh(data=-1, fsdp=fsdp)
state, meta = restore_checkpoint(out, mesh=mesh)
assert jax.device_count() == mesh.size
from flax import nnx
from jaxclf.model import create_model
from jaxclf.config import ModelConfig
model = create_model(ModelConfig.from_dict(meta["model_config"]))
nnx.update(model, jax.tree.map(np.asarray, state["params"]))
restored = weights.to_torch_state(model)
exported = safetensors.numpy.load_file(out + "/model/model.safetensors")
bad = [k for k in exported if not np.array_equal(exported[k], restored[k])]
shardings = {str(x.sharding.spec) for x in jax.tree.leaves(state["params"])}
print("devices", jax.device_count(), "specs", sorted(shardings))
assert not bad, bad
"""


@pytest.mark.slow
def test_checkpoint_restores_across_meshes(one_device_run, eight_device_run):
    """Saved on 8 devices (data 2 x fsdp 4) -> restored on 1; saved on 1 -> restored on 4 (fsdp 4)."""
    for out, devices, fsdp in ((eight_device_run, 1, 1), (one_device_run, 4, 4)):
        proc = subprocess.run([sys.executable, "-c", RESTORE_CHECK, str(out), str(fsdp)], cwd=ROOT,
                              env=subprocess_env(devices), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"devices {devices}" in proc.stdout
        if fsdp > 1:
            assert "fsdp" in proc.stdout, "restored params were not sharded over the new mesh"


@pytest.mark.slow
def test_two_processes_with_jax_distributed_match_one_process(tmp_path, one_device_run):
    multi = tmp_path / "multi"
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, str(SCRIPT), *TINY, "--output", str(multi), *MESH_JOB,
         "train.per_device_train_batch_size=8", "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", "2", "--process-id", str(i)],
        cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert_runs_match(one_device_run, multi)
    ma = json.loads((one_device_run / "model" / "metrics.json").read_text())["eval"]
    mb = json.loads((multi / "model" / "metrics.json").read_text())["eval"]
    assert ma["confusion_matrix"] == mb["confusion_matrix"]
