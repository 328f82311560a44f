"""torch_ref.load(d).logits(texts) == jaxclf.load(d).logits(texts) to 1e-5, on arbitrary texts.

The model directory holds a BPE tokenizer trained on data/sample_texts.csv and a model with
max_position_embeddings=24, so long texts are truncated; jaxclf pads to a length bucket, torch_ref
to the longest text of the batch, which padding invariance makes irrelevant.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, target

import jaxclf
import torch_ref
from parity_tests import twins
from parity_tests.twins import sample_texts

WORDS = sorted({w for t in sample_texts() for w in t.split()})

texts = st.one_of(
    st.text(max_size=80),  # any unicode, including the empty string
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=30),
    st.sampled_from(sample_texts()),
    st.lists(st.sampled_from(WORDS), min_size=20, max_size=120).map(" ".join),  # beyond 24 tokens
    st.just(""),
)


@pytest.fixture(scope="module")
def loaded(saved_model_dir):
    return jaxclf.load(saved_model_dir), torch_ref.load(saved_model_dir)


def assert_same_logits(loaded, batch):
    jax_side, torch_side = loaded
    ids, mask = jax_side.encode(batch)
    tids, tmask = torch_side.encode(batch)
    n = tids.shape[1]
    assert n <= jax_side.config.max_position_embeddings, f"torch_ref did not truncate: {n} tokens"
    assert np.array_equal(ids[:, :n], tids.numpy()) and np.array_equal(mask[:, :n], tmask.numpy()), (
        f"the two sides tokenize differently: {batch!r}")
    assert not mask[:, n:].any(), "jaxclf has real tokens beyond torch_ref's"
    with twins.highest():
        j = jax_side.logits(batch)
    t = torch_side.logits(batch)
    err = twins.record("texts logits max-abs", twins.max_abs(j, t))
    assert err <= twins.LOGITS_TOL, f"logits differ by {err:.3e} > {twins.LOGITS_TOL:g} on {batch!r}"
    return err, n


@pytest.mark.slow
@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(st.lists(texts, min_size=1, max_size=4))
def test_logits_agree_on_arbitrary_texts(loaded, batch):
    err, _ = assert_same_logits(loaded, batch)
    target(err, label="logits max-abs")


def test_long_text_is_truncated_the_same_way(loaded):
    long_text = " ".join(sample_texts())  # thousands of tokens
    _, n = assert_same_logits(loaded, [long_text, "short", ""])
    assert n == loaded[0].config.max_position_embeddings


def test_empty_input_list(loaded):
    jax_side, torch_side = loaded
    assert jax_side.logits([]).shape == torch_side.logits([]).shape == (0, 3)


def test_shorter_truncation_recorded_in_tokenizer_json_is_honoured_by_both(saved_model_dir, tmp_path):
    """An imported tokenizer.json may truncate below max_position_embeddings (e.g. MiniLM: 256 of 512)."""
    import shutil

    from tokenizers import Tokenizer

    d = tmp_path / "short"
    shutil.copytree(saved_model_dir, d)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.enable_truncation(max_length=10)
    tok.save(str(d / "tokenizer.json"))
    pair = jaxclf.load(d), torch_ref.load(d)
    _, n = assert_same_logits(pair, [" ".join(sample_texts()[:20]), "short"])
    assert n == 10


def test_head_tail_truncation_is_applied_the_same_way_by_both(saved_model_dir, tmp_path):
    """truncation_head=N in config.json: a long text keeps [CLS] + its first N-1 tokens + its last ones + [SEP]."""
    import json
    import shutil

    d = tmp_path / "head_tail"
    shutil.copytree(saved_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"]["truncation_head"] = 8
    (d / "config.json").write_text(json.dumps(cfg))
    pair = jaxclf.load(d), torch_ref.load(d)
    plain = jaxclf.load(saved_model_dir)
    long_text = " ".join(sample_texts()[:30])
    _, n = assert_same_logits(pair, [long_text, "short", ""])
    assert n == 24
    head_only = plain.encode([long_text])[0][0].tolist()  # plain truncation: [CLS] + 22 tokens + [SEP]
    whole = pair[0].encoder._unpadded.encode(long_text).ids  # the head+tail encoder's untruncated ids
    assert len(whole) > 24 and whole[-1] == head_only[-1]  # both end in [SEP]
    ids, _ = pair[0].encode([long_text])
    assert ids[0].tolist() == whole[:8] + whole[-16:]  # [CLS] + 7 head tokens, 15 tail tokens + [SEP]
    assert ids[0, :8].tolist() == head_only[:8]
    assert not np.allclose(pair[0].logits([long_text]), plain.logits([long_text]))  # the rule changes the answer
    np.testing.assert_array_equal(pair[0].logits(["short"]), plain.logits(["short"]))  # short texts: no change
