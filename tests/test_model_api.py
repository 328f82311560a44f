"""The original framework's model-level API on jaxclf: typed outputs, block names, save/from_pretrained,
SimpleTokenizer, and the one `jaxclf` command table."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import jaxclf


def test_typed_outputs_match_the_logits(tiny_model_dir):
    clf = jaxclf.load(tiny_model_dir)
    clf.model.eval()  # dropout off, as clf.logits runs it
    ids, mask = clf.encode(["a lovely little cafe", "cold soup"])
    out = clf.model(ids, mask, return_outputs=True)
    assert isinstance(out, jaxclf.ModelOutput)
    assert out.logits.shape == (2, clf.config.num_classes)
    assert out.hidden_states.shape == (2, ids.shape[1], clf.config.d_model)
    assert out.pooled_output.shape == (2, clf.config.d_model)
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(clf.model(ids, mask)))
    np.testing.assert_allclose(np.asarray(out.logits), clf.logits(["a lovely little cafe", "cold soup"]),
                               atol=1e-6)


def test_seed_block_names_are_the_model_blocks():
    from jaxclf import model
    assert jaxclf.MultiHeadAttention is model.SelfAttention
    assert jaxclf.TransformerEncoderBlock is model.Layer
    layer = jaxclf.create_model(jaxclf.ModelConfig(vocab_size=50, d_model=16, nhead=2, num_encoder_layers=2,
                                                   dim_feedforward=32)).encoder.layer[0]
    assert isinstance(layer, jaxclf.TransformerEncoderBlock)
    assert isinstance(layer.attention.self, jaxclf.MultiHeadAttention)


def test_save_pretrained_round_trip(tiny_model_dir, tmp_path):
    clf = jaxclf.TextClassifier.from_pretrained(tiny_model_dir)
    texts = ["a lovely little cafe", "the waiter was rude"]
    out = clf.save_pretrained(tmp_path / "copy")
    np.testing.assert_array_equal(jaxclf.load(out).logits(texts), clf.logits(texts))
    module = jaxclf.TransformerClassifier.from_pretrained(out)
    assert isinstance(module, jaxclf.TransformerClassifier) and module.config == clf.config
    again = module.save_pretrained(tmp_path / "from-module", clf.tokenizer)
    np.testing.assert_array_equal(jaxclf.load(again).logits(texts), clf.logits(texts))


def test_simple_tokenizer_builds_encodes_decodes_saves(sample_texts, tmp_path):
    tok = jaxclf.SimpleTokenizer(vocab_size=400, max_length=12).build_vocab(sample_texts)
    assert tok.vocab_size == 400 and tok.pad_token_id == 0
    text = "the soup was cold, and the waiter rude."
    ids = tok.encode(text, max_length=64)
    assert tok.decode(ids) == text  # Metaspace BPE: spaces come back
    assert len(tok.encode("word " * 50)) == 12  # truncated to max_length, [SEP] kept last
    assert tok.encode("word " * 50)[-1] == ids[-1]
    tok.save(tmp_path / "tokenizer.json")
    again = jaxclf.SimpleTokenizer.load(tmp_path / "tokenizer.json", max_length=12)
    assert again.encode(text, max_length=64) == ids
    # the same vocabulary from a second build: training is deterministic
    assert jaxclf.SimpleTokenizer(vocab_size=400).build_vocab(sample_texts).encode(text, 64) == ids
    with pytest.raises(ValueError, match="build_vocab"):
        jaxclf.SimpleTokenizer().encode("no vocabulary yet")


def test_simple_tokenizer_feeds_a_model_directory(sample_texts, tmp_path):
    tok = jaxclf.SimpleTokenizer(vocab_size=300).build_vocab(sample_texts)
    config = jaxclf.ModelConfig(vocab_size=tok.vocab_size, d_model=16, nhead=2, num_encoder_layers=1,
                                dim_feedforward=32, max_position_embeddings=32)
    path = jaxclf.create(config, tok.tokenizer).save_pretrained(tmp_path / "m")
    assert len(jaxclf.load(path).predict(["hello there"])) == 1


def test_jaxclf_command_lists_every_command_and_refuses_unknown_ones():
    from jaxclf.cli import COMMANDS
    out = subprocess.run([sys.executable, "-m", "jaxclf", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout
    bad = subprocess.run([sys.executable, "-m", "jaxclf", "nonsense"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown command 'nonsense'" in bad.stderr


def test_every_command_module_has_a_main():
    from jaxclf.cli import COMMANDS, command
    for name in COMMANDS:
        assert callable(command(name)), name
