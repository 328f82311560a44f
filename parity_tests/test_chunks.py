"""long_text=chunks: torch_ref.load(d).logits(texts) == jaxclf.load(d).logits(texts) to 1e-5 on long texts.

Both sides cut texts into the same windows (jaxclf.tokenizer.TextEncoder is the tokenizer side of
the model-directory contract), run them through their own model and pool them with their own code:
numpy's np.add.at / np.maximum.at in jaxclf.long_text, torch's index_add_ / scatter_reduce in
torch_ref.loader. The parity suite's model (max length 24) reads the long texts as many windows.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import jaxclf
import torch_ref
from jaxclf import long_text
from jaxclf.long_text import TextTooLongError
from parity_tests import twins
from parity_tests.twins import sample_texts


def chunked_dir(saved_model_dir, tmp_path, **settings):
    """The parity suite's model directory with long_text=chunks and `settings` in its config.json."""
    d = tmp_path / "_".join(f"{k}-{v}" for k, v in settings.items())
    shutil.copytree(saved_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"].update(long_text="chunks", **settings)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def documents() -> list[str]:
    """Texts of 1 to ~13 windows of the 24-token model, mixed with short and empty ones."""
    texts = sample_texts()
    docs = [" ".join(texts[i:i + n]) for i, n in ((0, 12), (12, 3), (20, 1), (30, 7), (40, 2))]
    return docs + ["", "ok", texts[50]]


@pytest.mark.parametrize("pooling", long_text.CHUNK_POOLINGS)
def test_chunked_long_texts_agree_with_torch_ref(saved_model_dir, tmp_path, pooling):
    d = chunked_dir(saved_model_dir, tmp_path, chunk_pooling=pooling, max_chunks=16, chunk_stride=13)
    jax_side, torch_side = jaxclf.load(d), torch_ref.load(d)
    texts = documents()
    counts = jax_side.encoder.windows(texts).counts()
    assert counts.max() >= 8 and (counts == 1).sum() >= 3, counts  # long and short texts both
    ids, mask = jax_side.encode(texts)
    tids, tmask = torch_side.encode(texts)
    n = tids.shape[1]
    assert ids.shape[0] == tids.shape[0] == counts.sum() and np.array_equal(ids[:, :n], tids.numpy())
    with twins.highest():
        want = jax_side.logits(texts, batch_size=5)  # windows of one text split across batches
    for batch_size in (64, 3):
        got = torch_side.logits(texts, batch_size=batch_size)
        err = twins.record(f"chunks {pooling} logits max-abs", twins.max_abs(got, want))
        assert err <= twins.LOGITS_TOL, f"{pooling}: logits differ by {err:.3e} (torch batch {batch_size})"
    assert want.shape == (len(texts), 3)
    # Pooling is in effect: a long text's score is not its first window's.
    first_windows = torch_side.logits([texts[0]], batch_size=64)
    d_plain = chunked_dir(saved_model_dir, tmp_path, chunk_pooling=pooling, max_chunks=1)
    assert twins.max_abs(torch_ref.load(d_plain).logits([texts[0]]), first_windows) > 1e-3


def test_windows_past_max_chunks_are_cut_or_refused_alike(saved_model_dir, tmp_path):
    texts = documents()
    cut = chunked_dir(saved_model_dir, tmp_path, max_chunks=2)
    with twins.highest():
        want = jaxclf.load(cut).logits(texts)
    assert twins.max_abs(torch_ref.load(cut).logits(texts), want) <= twins.LOGITS_TOL
    refuse = chunked_dir(saved_model_dir, tmp_path, max_chunks=2, chunk_overflow="refuse")
    for side in (jaxclf.load(refuse), torch_ref.load(refuse)):
        with pytest.raises(TextTooLongError, match="but max_chunks is 2"):
            side.logits(texts)
        assert side.logits(texts[6:]).shape == (2, 3)  # texts that fit are read
