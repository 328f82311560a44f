"""Running scripts/train.py in a subprocess, and comparing what runs leave: the training tests' shared helpers.

The heavier training tests run scripts/train.py in subprocesses, because the number of (simulated)
devices is fixed when JAX starts and because a kill must hit a real process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import safetensors.numpy

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "train.py"
SAMPLE = ROOT / "data" / "sample_texts.csv"

# A small, fast run: ~25k parameters, 30 steps, checkpoints every 5 steps.
TINY = ["--config", "tiny", "--train", str(SAMPLE), "train.max_steps=30", "train.save_steps=5",
        "train.eval_steps=10", "train.logging_steps=1", "train.async_checkpointing=false"]


def subprocess_env(devices: int = 1) -> dict:
    """The environment of a JAX subprocess: CPU, `devices` simulated devices (and the suite's XLA cache, conftest)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    return env


def run_train(out: Path, *args: str, devices: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--output", str(out), *args], cwd=ROOT,
                          env=subprocess_env(devices), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"train.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def weights_of(model_dir: Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(str(model_dir / "model.safetensors"))


def train_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    worst = max((float(np.abs(a[k] - b[k]).max()) for k in different), default=0.0)
    assert not different, f"{len(different)} tensors differ (max abs diff {worst:g}), e.g. {different[:3]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



# One small job (6 steps, an eval at step 6, checkpoints at 3 and 6) that the sharding tests run on
# several device layouts; conftest's one_device_run and eight_device_run hold its two common layouts.
MESH_JOB = ("train.max_steps=6", "train.eval_split=0.2", "train.eval_steps=6", "train.save_steps=3")


def assert_runs_match(a: Path, b: Path) -> None:
    """Per-step losses and final weights of two runs of one job agree to 1e-5."""
    la, lb = train_losses(a), train_losses(b)
    assert la.keys() == lb.keys() and len(la) >= 5
    worst = max(abs(la[s] - lb[s]) for s in la)
    assert worst < 1e-5, f"per-step losses differ by up to {worst:g}: {la} vs {lb}"
    wa, wb = weights_of(a / "model"), weights_of(b / "model")
    worst_w = max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)
    assert worst_w < 1e-5, f"final weights differ by {worst_w:g}"
