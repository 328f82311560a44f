"""Long documents (jaxclf.long_text): windows, pooling, the `chunks` rule in config, data, training and jaxclf.load.

The learning test is the issue's: a class keyword that only appears past a text's first window is
learnt with long_text=chunks and not with truncate. Parity with torch_ref and ONNX Runtime is in
parity_tests/test_chunks.py and parity_tests/test_onnx_export.py.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from tokenizers import Tokenizer

import jaxclf
from jaxclf import long_text, model_dir, tokenizer as tokenization
from jaxclf.classifier import TextClassifier
from jaxclf.config import ConfigError, ModelConfig, TrainingConfig
from jaxclf.long_text import Chunking, TextTooLongError, pool_windows, window_spans
from jaxclf.model import create_model
from jaxclf.train import batches, data
from jaxclf.train.loop import train

FILLER = ("the a of and to in is it that was for on with as this at by from or so "
          "then when where which while who will would year but").split()
KEYWORDS = {"negative": "awful", "positive": "wonderful"}


# ----------------------------------------------------------------------------- windows


@pytest.mark.parametrize("num_tokens, window, stride, max_windows", [
    (1, 5, 3, 8), (5, 5, 3, 8), (6, 5, 3, 8), (20, 5, 3, 8), (21, 5, 4, 8), (23, 10, 10, 8), (100, 14, 7, 20)])
def test_windows_cover_the_text_in_order_and_the_last_ends_at_its_end(num_tokens, window, stride, max_windows):
    spans = window_spans(num_tokens, window, Chunking(stride, max_windows))
    covered = np.zeros(num_tokens, bool)
    for start, end in spans:
        assert 0 <= start < end <= num_tokens and end - start == min(window, num_tokens)
        covered[start:end] = True
    assert covered.all(), f"tokens not read: {np.flatnonzero(~covered)}"
    assert spans[-1][1] == num_tokens
    starts = [s for s, _ in spans]
    assert starts == sorted(set(starts)) and starts[:-1] == [k * stride for k in range(len(spans) - 1)]
    assert len(spans) == 1 + -(-max(num_tokens - window, 0) // stride)  # no window more than needed


def test_a_text_past_max_chunks_is_cut_or_refused_as_configured():
    cut = window_spans(50, 10, Chunking(stride=10, max_windows=3, overflow="truncate"))
    assert cut == [(0, 10), (10, 20), (20, 30)]  # the first windows; tokens 30.. are not read
    with pytest.raises(TextTooLongError, match=r"text of 50 tokens needs 5 windows of 10 tokens \(stride 10\) "
                                               r"but max_chunks is 3; raise max_chunks or set chunk_overflow"):
        window_spans(50, 10, Chunking(stride=10, max_windows=3, overflow="refuse"))
    assert len(window_spans(30, 10, Chunking(stride=10, max_windows=3, overflow="refuse"))) == 3  # fits exactly


def test_pooling_rules_on_known_windows():
    logits = np.array([[1, 0], [3, -4], [2, 2], [0, 5], [-1, 1]], np.float32)  # text 0: rows 0-1, 1: row 2, 2: 3-4
    owner = np.array([0, 0, 1, 2, 2])
    weights = np.array([10, 30, 7, 1, 3])
    np.testing.assert_allclose(pool_windows(logits, owner, 3, "mean"), [[2, -2], [2, 2], [-0.5, 3]])
    np.testing.assert_allclose(pool_windows(logits, owner, 3, "max"), [[3, 0], [2, 2], [0, 5]])
    np.testing.assert_allclose(pool_windows(logits, owner, 3, "weighted", weights),
                               [[2.5, -3], [2, 2], [-0.75, 2]])
    order = np.random.default_rng(0).permutation(5)  # the batching order does not matter
    for rule in long_text.CHUNK_POOLINGS:
        np.testing.assert_array_equal(pool_windows(logits[order], owner[order], 3, rule, weights[order]),
                                      pool_windows(logits, owner, 3, rule, weights))
    with pytest.raises(ValueError, match="every one of 3 texts needs a window"):
        pool_windows(logits[:2], owner[:2], 3, "mean")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [" ".join(FILLER)] * 3 + list(KEYWORDS.values()) * 3
    return tokenization.configure(tokenization.train_tokenizer(texts, vocab_size=200), 16, 0)


def chunked(tok, **settings) -> tokenization.TextEncoder:
    return tokenization.TextEncoder.for_config(tok, ModelConfig(max_position_embeddings=16, long_text="chunks",
                                                                **settings))


def test_encoder_windows_of_a_long_text_and_a_short_one(tok):
    encoder = chunked(tok, chunk_stride=10)
    long_doc = " ".join(FILLER[:30])  # 30 words, one token each: windows of 14 text tokens at 0, 10, 16
    short = "the year it was"
    windows = encoder.windows([short, long_doc, ""])
    assert windows.counts().tolist() == [1, 3, 1] and windows.owner.tolist() == [0, 1, 1, 1, 2]
    truncating = tokenization.TextEncoder(tok)
    # A text that fits is one window: exactly the row `truncate` reads; so is a long text's first window.
    assert windows.rows[0] == truncating.ids_one(short) and windows.rows[4] == truncating.ids_one("")
    assert windows.rows[1] == truncating.ids_one(long_doc)
    whole = Tokenizer.from_str(tok.to_str())
    whole.no_truncation()
    content = whole.encode(long_doc, add_special_tokens=False).ids
    assert len(content) == 30
    cls, sep = tok.token_to_id(tokenization.CLS), tok.token_to_id(tokenization.SEP)
    for row, (start, end) in zip(windows.rows[1:4], [(0, 14), (10, 24), (16, 30)]):
        assert row == [cls, *content[start:end], sep]
    assert windows.text_tokens.tolist() == [4, 14, 14, 14, 0]
    with pytest.raises(ValueError, match="use windows"):
        encoder.ids([short])


def test_default_stride_follows_the_tokenizer_window_not_the_position_table(tok):
    # An imported MiniLM has 512 positions but reads 256-token windows: the default stride is 3/4 of
    # the window the tokenizer gives (here 14 text tokens -> 10), never one that skips tokens.
    encoder = tokenization.TextEncoder.for_config(tok, ModelConfig(max_position_embeddings=512, long_text="chunks"))
    assert encoder.chunking.stride == 10
    spans = window_spans(30, 14, encoder.chunking)
    assert all(b[0] < a[1] for a, b in zip(spans, spans[1:]))  # consecutive windows overlap: no token skipped
    with pytest.raises(ValueError, match="chunk_stride 20 must be in \\[1, 14\\]"):
        tokenization.TextEncoder.for_config(tok, ModelConfig(max_position_embeddings=512, long_text="chunks",
                                                             chunk_stride=20))


def test_refused_overflow_names_the_example_in_training_data(tok):
    long_doc = " ".join(FILLER * 2)
    with pytest.raises(data.DataError,
                       match=r"example 2: text of 60 tokens needs 6 windows of 14 tokens .* max_chunks is 2"):
        batches.tokenize_dataset(tok, ["the a", long_doc], [0, 1],
                              chunking=Chunking(stride=10, max_windows=2, overflow="refuse"))


def test_tokenized_training_data_repeats_each_text_label_on_its_windows_and_pools_back(tok):
    texts = ["the year", " ".join(FILLER[:30]), " ".join(FILLER[:20]), "awful"]
    ds = batches.tokenize_dataset(tok, texts, [1, 0, 1, 0], chunking=Chunking(stride=10, max_windows=8))
    assert ds.owner.tolist() == [0, 1, 1, 1, 2, 2, 3] and ds.labels.tolist() == [1, 0, 0, 0, 1, 1, 0]
    assert ds.num_texts == 4 and ds.text_labels.tolist() == [1, 0, 1, 0]
    assert [ds[i]["label"] for i in range(len(ds))] == ds.labels.tolist()
    row_logits = np.arange(14, dtype=np.float32).reshape(7, 2)
    np.testing.assert_allclose(ds.pool(row_logits, "mean"), [[0, 1], [4, 5], [9, 10], [12, 13]])
    plain = batches.tokenize_dataset(tok, texts, [1, 0, 1, 0])
    assert plain.owner is None and len(plain) == plain.num_texts == 4


# ----------------------------------------------------------------------------- config


def test_chunks_config_round_trips_config_json_and_a_hf_export_warns(tmp_path, tok, caplog):
    config = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=16, nhead=2, num_encoder_layers=1,
                         dim_feedforward=16, max_position_embeddings=16, num_classes=2, long_text="chunks",
                         chunk_stride=5, max_chunks=3, chunk_overflow="refuse", chunk_pooling="weighted",
                         pooling="pooler")
    assert ModelConfig.from_dict(json.loads(config.to_json())) == config
    d = TextClassifier(create_model(config), Tokenizer.from_str(tok.to_str())).save(tmp_path / "m")
    loaded = model_dir.read_config(d)
    assert loaded == config and loaded.chunking == Chunking(5, 3, "refuse", "weighted")
    assert ModelConfig(max_position_embeddings=130, long_text="chunks").chunking.stride is None  # TextEncoder: 3/4 of its window
    from jaxclf import hf

    with caplog.at_level("WARNING", logger="jaxclf.hf"):
        hf.export_hf(d, tmp_path / "hf")
    assert "up to 3 windows whose logits are pooled by weighted" in caplog.text  # HF reads the first window only


def test_config_json_from_before_long_text_still_loads():
    old = json.loads(ModelConfig(max_position_embeddings=32).to_json())
    for key in ("long_text", "chunk_stride", "max_chunks", "chunk_overflow", "chunk_pooling", "temperature"):
        old.pop(key, None)
    assert ModelConfig.from_dict(old).long_text == "truncate"
    assert ModelConfig.from_dict({**old, "truncation_head": 8}).long_text == "head_tail"


@pytest.mark.parametrize("settings, message", [
    ({"long_text": "windows"}, "long_text must be one of truncate, head_tail, chunks; got 'windows'"),
    ({"long_text": "chunks", "chunk_pooling": "sum"}, "chunk_pooling must be one of mean, max, weighted"),
    ({"long_text": "chunks", "chunk_stride": 15}, r"chunk_stride must be null or an integer in \[1, 14\]"),
    ({"long_text": "chunks", "max_chunks": 0}, "max_chunks must be a positive integer"),
    ({"long_text": "chunks", "truncation_head": 4}, "truncation_head=4 belongs to long_text=head_tail"),
])
def test_bad_chunk_settings_are_refused_by_name(settings, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(max_position_embeddings=16, **settings)


# ----------------------------------------------------------------------------- jaxclf.load


def test_load_logits_pool_every_window_and_leave_short_texts_as_truncate_reads_them(tmp_path, tok):
    base = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=16, nhead=2, num_encoder_layers=1,
                       dim_feedforward=16, max_position_embeddings=16, num_classes=2, dropout=0.0,
                       attention_dropout=0.0, pooling="mean")
    model = create_model(base, seed=1)
    tensors = TextClassifier(model, Tokenizer.from_str(tok.to_str())).torch_state()
    texts = ["the year", " ".join(FILLER[:30]), " ".join(FILLER[5:29]), "", " ".join(FILLER[2:16])]
    plain = TextClassifier(model, Tokenizer.from_str(tok.to_str())).logits(texts)
    for pooling in long_text.CHUNK_POOLINGS:
        config = base.replace(long_text="chunks", chunk_stride=10, chunk_pooling=pooling)
        clf = jaxclf.load(model_dir.write(tmp_path / pooling, config, tensors, Tokenizer.from_str(tok.to_str()), {}))
        got = clf.logits(texts, batch_size=2)  # a text's windows split across batches
        windows = clf.encoder.windows(texts)
        ids, mask = tokenization.pad_rows(windows.rows, 0)
        rows = TextClassifier(model, Tokenizer.from_str(tok.to_str())).model(ids, mask)  # every window at once
        np.testing.assert_allclose(got, windows.pool(np.asarray(rows), pooling), atol=1e-5)
        short = windows.counts() == 1
        np.testing.assert_allclose(got[short], plain[short], atol=1e-6)  # short texts score as under truncate
        assert not np.allclose(got[~short], plain[~short], atol=1e-3), "long texts read past their first window"
        assert got.shape == (5, 2) and clf.logits([]).shape == (0, 2)


# ----------------------------------------------------------------------------- learning


def keyword_documents(n: int, seed: int) -> tuple[list[str], list[str]]:
    """Texts of 30 filler words whose class keyword sits at word 15-28: past a 16-token model's first window."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = list(KEYWORDS)[i % 2]
        words = [rng.choice(FILLER) for _ in range(29)]
        words.insert(rng.randint(15, 28), KEYWORDS[label])
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def test_a_keyword_past_the_first_window_is_learnt_with_chunks_and_not_with_truncate(tmp_path):
    train_file, eval_file = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    data.write_jsonl(train_file, *keyword_documents(160, seed=0))
    eval_texts, eval_labels = keyword_documents(80, seed=1)
    data.write_jsonl(eval_file, eval_texts, eval_labels)
    model = ModelConfig(d_model=32, nhead=2, num_encoder_layers=1, dim_feedforward=64, max_position_embeddings=16,
                        dropout=0.0, attention_dropout=0.0, pooling="mean")
    accuracy = {}
    for rule in ("chunks", "truncate"):
        cfg = TrainingConfig(output_dir=str(tmp_path / rule), train_file=str(train_file), eval_file=str(eval_file),
                             max_steps=120, per_device_train_batch_size=32, learning_rate=3e-3,
                             lr_schedule="constant", warmup_steps=0, eval_steps=1000, save_steps=1000,
                             logging_steps=1000, tokenizer_vocab_size=200, async_checkpointing=False,
                             progress_bar=False)
        result = train(model.replace(long_text=rule), cfg)
        clf = jaxclf.load(result.model_dir)
        assert clf.config.long_text == rule  # recorded in config.json
        predicted = [p["label"] for p in clf.predict(eval_texts)]
        accuracy[rule] = float(np.mean([p == y for p, y in zip(predicted, eval_labels)]))
        # The loop's evaluation scored the 80 documents (not their windows), as jaxclf.load does.
        assert sum(result.eval_metrics["predicted_label_counts"]) == 80
        assert result.eval_metrics["accuracy"] == pytest.approx(accuracy[rule])
    assert accuracy["chunks"] >= 0.9, accuracy
    assert accuracy["truncate"] <= 0.7, accuracy  # the keyword was never read: about chance (0.5)
