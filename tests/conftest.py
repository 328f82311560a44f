"""Fixtures shared by the test suite. Each builds one named thing; add yours below in the same style."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CSV = REPO / "data" / "sample_texts.csv"


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
def xla_cache(tmp_path_factory) -> Path:
    """One persistent XLA compilation cache for every server the suite starts (--compilation-cache-dir)."""
    return tmp_path_factory.mktemp("xla_cache")
