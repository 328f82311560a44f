"""Preemption: a run killed (SIGKILL) or stopped (SIGTERM) mid-way resumes to the bits of an uninterrupted run."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training_runs import ROOT, SCRIPT, TINY, assert_bitwise_equal, run_train, subprocess_env, weights_of


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted tiny run on one device: the baseline the interrupted runs must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_train(out)
    return out


def start_training_until(out: Path, ready, timeout: float = 120) -> subprocess.Popen:
    """Start the TINY run in the background and return once `ready()` holds (or the run ended)."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *TINY, "--output", str(out)], cwd=ROOT,
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    return proc


@pytest.mark.slow
def test_sigkill_at_a_random_point_then_rerun_gives_bitwise_identical_weights(tmp_path, reference_run):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    proc = start_training_until(out, lambda: ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()))
    delay = random.Random().uniform(0.0, 0.6)
    time.sleep(delay)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed, f"the run finished before it could be killed: {proc.stderr.read()[-2000:]}"
    assert not (out / "model").exists()
    run_train(out)  # the same command again: resumes from the latest complete checkpoint
    assert_bitwise_equal(weights_of(out / "model"), weights_of(reference_run / "model"))


@pytest.mark.slow
def test_sigterm_checkpoints_exits_cleanly_and_resumes(tmp_path, reference_run):
    out = tmp_path / "run"
    log = out / "metrics.jsonl"
    proc = start_training_until(out, lambda: log.exists() and len(log.read_text().splitlines()) >= 4)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "preempted at step" in stderr
    from jaxclf.train.checkpoint import Checkpointer
    saved = Checkpointer(out / "checkpoints", async_save=False).latest_step()
    assert saved is not None and 0 < saved < 30, f"expected a mid-run checkpoint, got {saved}"
    assert not (out / "model").exists()
    run_train(out)
    assert_bitwise_equal(weights_of(out / "model"), weights_of(reference_run / "model"))
