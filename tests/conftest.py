"""Fixtures shared by the test suite. Each builds one named thing; add yours below in the same style."""

from __future__ import annotations

import atexit
import csv
import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CSV = REPO / "data" / "sample_texts.csv"

# One persistent XLA compilation cache for every process the suite starts (training runs, servers, bulk jobs,
# examples), through the environment they inherit: most run the same tiny programs, and a tiny training run
# takes 9 s with them cached against 16-20 s compiling. Compiled or loaded, an executable computes the same
# bits, so the bitwise-resume tests are unaffected. A server given --compilation-cache-dir uses that instead.
# pytest-xdist's controller imports this module before it starts the workers, which inherit the variable and so
# share the one cache; only the process that made it removes it.
SUITE_XLA_CACHE = os.environ.get("JAXCLF_SUITE_XLA_CACHE", "")
if not SUITE_XLA_CACHE:
    SUITE_XLA_CACHE = os.environ["JAXCLF_SUITE_XLA_CACHE"] = tempfile.mkdtemp(prefix="jaxclf-tests-xla-")
    atexit.register(shutil.rmtree, SUITE_XLA_CACHE, ignore_errors=True)
os.environ.update(JAX_COMPILATION_CACHE_DIR=SUITE_XLA_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


def _read_sample_texts() -> list[str]:
    with open(SAMPLE_CSV, newline="", encoding="utf-8") as f:
        return [row["text"] for row in csv.DictReader(f)]


@pytest.fixture(scope="session")
def sample_texts() -> list[str]:
    """The texts of data/sample_texts.csv, in file order."""
    return _read_sample_texts()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A freshly initialised tiny classifier (3 labels, max 32 tokens) saved as a model directory."""
    import jaxclf
    from jaxclf.config import ModelConfig
    from jaxclf.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(_read_sample_texts(), vocab_size=500)
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size(), d_model=32, nhead=2, num_encoder_layers=1,
                         dim_feedforward=64, max_position_embeddings=32,
                         id2label=("negative", "neutral", "positive"))
    path = tmp_path_factory.mktemp("tiny_model") / "model"
    jaxclf.create(config, tokenizer).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir_seed1(tiny_model_dir, tmp_path_factory) -> Path:
    """Same config and tokenizer as tiny_model_dir, different weights (seed=1): a second model version."""
    import jaxclf
    from jaxclf import model_dir

    config, _, tokenizer, _ = model_dir.read(tiny_model_dir)
    path = tmp_path_factory.mktemp("tiny_model_seed1") / "model"
    jaxclf.create(config, tokenizer, seed=1).save(path)
    return path


@pytest.fixture(scope="session")
def xla_cache() -> Path:
    """The suite's persistent XLA compilation cache (SUITE_XLA_CACHE), for a server's --compilation-cache-dir."""
    return Path(SUITE_XLA_CACHE)


# The sharding tests (tests/test_train_sharding.py, tests/test_multihost_env.py) compare device layouts on one
# small job, training_runs.MESH_JOB; the two layouts below are trained once per session and only read.


@pytest.fixture(scope="session")
def one_device_run(tmp_path_factory) -> Path:
    """MESH_JOB on one device, batch 16: the reference every other layout must match."""
    from training_runs import MESH_JOB, run_train

    out = tmp_path_factory.mktemp("one_device") / "run"
    run_train(out, *MESH_JOB, "train.per_device_train_batch_size=16")
    return out


@pytest.fixture(scope="session")
def eight_device_run(tmp_path_factory) -> Path:
    """MESH_JOB on eight simulated devices, a data 2 x fsdp 4 mesh, batch 2 per device (16 in all)."""
    from training_runs import MESH_JOB, run_train

    out = tmp_path_factory.mktemp("eight_devices") / "run"
    run_train(out, *MESH_JOB, "train.per_device_train_batch_size=2", "train.mesh_data=2", "train.mesh_fsdp=4",
              devices=8)
    return out
