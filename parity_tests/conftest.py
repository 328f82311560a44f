"""Shared fixtures of the parity suite: exact float32 settings, a tiny tokenizer, a saved model directory.

Plain helpers (build both twins from one config, run them, compare) live in parity_tests/twins.py.
"""

from __future__ import annotations

import pytest

from parity_tests import twins
from parity_tests.twins import sample_texts

twins.torch_fp32_exact()


@pytest.fixture(scope="session")
def tokenizer():
    """A BPE tokenizer trained on data/sample_texts.csv (a few hundred tokens)."""
    from jaxclf.tokenizer import train_tokenizer

    return train_tokenizer(sample_texts(), vocab_size=400, min_frequency=1)


@pytest.fixture(scope="session")
def text_config(tokenizer):
    """A model that reads the tokenizer's ids; short max length so long texts get truncated."""
    return twins.tiny_config(vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=24,
                             type_vocab_size=0, pooling="mean", num_encoder_layers=2,
                             id2label=("negative", "neutral", "positive"))


@pytest.fixture(scope="session")
def saved_classifier(tmp_path_factory, tokenizer, text_config):
    """(TextClassifier with non-trivial weights, the model directory `.save` wrote from it)."""
    from tokenizers import Tokenizer

    from jaxclf.classifier import TextClassifier

    clf = TextClassifier(twins.jax_model(text_config, seed=3), Tokenizer.from_str(tokenizer.to_str()))  # configure() mutates it
    return clf, clf.save(tmp_path_factory.mktemp("model") / "model", metrics={"accuracy": 0.5})


@pytest.fixture(scope="session")
def saved_model_dir(saved_classifier):
    return saved_classifier[1]


def pytest_terminal_summary(terminalreporter):
    if twins.MEASURED:
        terminalreporter.write_sep("-", "parity: worst measured values")
        for name, value in sorted(twins.MEASURED.items()):
            terminalreporter.write_line(f"{name:45s} {value:.3e}")
