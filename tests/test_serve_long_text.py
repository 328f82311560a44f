"""Long documents (long_text="chunks") in the serving engine, the HTTP service and bulk prediction.

A text longer than the model is read as windows; the windows share the batcher, the queue and the
compiled buckets with every other text, and the text's logits are its windows' logits pooled.
The reference is computed here from jaxclf.load: the encoder's windows through the model, pooled.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import threading
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxclf
from jaxclf import model_dir
from jaxclf.bulk import BulkConfig, read_predictions, run
from jaxclf.config import ConfigError, ModelConfig
from jaxclf.serve.app import create_app
from jaxclf.serve.documents import DocumentFuture, DocumentTooLongError, window_parts
from jaxclf.serve.engine import InferenceEngine
from jaxclf.serve.errors import DeadlineExceeded, InferenceError, QueueFullError
from jaxclf.tokenizer import pad_rows, train_tokenizer
from jaxclf.train.data import DataError

MAX_CHUNKS = 4  # windows of 30 text tokens every 20: a text of up to 90 tokens is read whole


@pytest.fixture(scope="module")
def chunked_model_dir(sample_texts, tmp_path_factory) -> Path:
    """A tiny classifier (max 32 tokens) that reads long texts as at most 4 windows, mean-pooled."""
    tokenizer = train_tokenizer(sample_texts[:240], vocab_size=500)  # the windows below are counted with it
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size(), d_model=32, nhead=2, num_encoder_layers=1,
                         dim_feedforward=64, max_position_embeddings=32, long_text="chunks", chunk_stride=20,
                         max_chunks=MAX_CHUNKS, id2label=("negative", "neutral", "positive"))
    path = tmp_path_factory.mktemp("chunked_model") / "model"
    jaxclf.create(config, tokenizer, seed=3).save(path)
    return path


@pytest.fixture(scope="module")
def refusing_model_dir(chunked_model_dir, tmp_path_factory) -> Path:
    """The same weights, max-pooled, refusing a text past max_chunks windows instead of cutting it."""
    config, tensors, tokenizer, metrics = model_dir.read(chunked_model_dir)
    config = dataclasses.replace(config, chunk_overflow="refuse", chunk_pooling="max")
    path = tmp_path_factory.mktemp("refusing_model") / "model"
    model_dir.write(path, config, tensors, tokenizer, metrics)
    return path


@pytest.fixture(scope="module")
def documents(sample_texts) -> list[str]:
    """Short texts and documents of 2 to 4+ windows, interleaved."""
    long = [" ".join(sample_texts[i:i + n]) for i, n in ((0, 2), (0, 3), (12, 4), (40, 30))]
    return [sample_texts[50], long[0], "ok", long[1], long[2], sample_texts[51], long[3]]


@functools.cache
def _loaded(path: Path) -> jaxclf.TextClassifier:
    clf = jaxclf.load(path)
    clf.model.eval()
    return clf


def reference(path: Path, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(document logits, windows per text) from jaxclf.load: every window through the model, pooled."""
    clf = _loaded(path)
    windows = clf.encoder.windows(texts)
    rows = -(-len(windows.rows) // 16) * 16  # a few padded shapes, so a few compiles
    ids, mask = pad_rows(windows.rows, clf.config.pad_token_id, (rows, clf.config.max_position_embeddings))
    row_logits = np.asarray(_forward(clf.model, jnp.asarray(ids), jnp.asarray(mask)))[:len(windows.rows)]
    return windows.pool(row_logits, clf.config.chunk_pooling), windows.counts()


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


@pytest.fixture(scope="module")
def engine(chunked_model_dir):
    with InferenceEngine(chunked_model_dir, max_batch_size=4, max_wait_ms=2) as eng:
        yield eng


def test_documents_span_several_windows(chunked_model_dir, documents):
    _, counts = reference(chunked_model_dir, documents)
    assert counts.tolist() == [1, 2, 1, 3, 4, 1, 4]  # the last is cut at max_chunks (chunk_overflow=truncate)


@pytest.mark.parametrize("batching", [True, False])
def test_engine_pools_windows_like_the_model_and_never_compiles(chunked_model_dir, documents, batching, request):
    want, counts = reference(chunked_model_dir, documents)
    with (contextlib.nullcontext(request.getfixturevalue("engine")) if batching else
          InferenceEngine(chunked_model_dir, max_batch_size=4, batching=False)) as eng:
        before = eng.stats()
        compiled = eng.compilations
        batch = eng.predict_batch(documents).results
        singles = [eng.predict_single(t) for t in documents]  # cached now: the document's pooled result
        fresh = [eng.predict_single(t + " again") for t in documents[1:5]]
        assert eng.stray_compilations == 0 and eng.compilations == compiled
        stats = eng.stats()
    np.testing.assert_allclose([r.logits for r in batch], want, atol=1e-5)
    assert [r.windows for r in batch] == counts.tolist()
    assert [r.predicted_class for r in batch] == [eng.labels[k] for k in want.argmax(1)]
    assert all(s.cached and s.logits == b.logits and s.windows == b.windows for s, b in zip(singles, batch))
    assert all(r.processing_time_ms > 0 for r in batch + fresh)
    rows_run = stats.batched_texts - before.batched_texts  # windows, not texts
    assert rows_run == counts.sum() + sum(r.windows for r in fresh)
    want_fresh, _ = reference(chunked_model_dir, [t + " again" for t in documents[1:5]])
    np.testing.assert_allclose([r.logits for r in fresh], want_fresh, atol=1e-5)


def test_async_prediction_of_a_document(chunked_model_dir, documents, engine):
    import asyncio
    text = documents[4] + " async"
    want, counts = reference(chunked_model_dir, [text])
    result = asyncio.run(engine.predict_async(text))
    np.testing.assert_allclose(result.logits, want[0], atol=1e-5)
    assert result.windows == counts[0] == MAX_CHUNKS


def test_queue_admission_counts_windows(chunked_model_dir, documents):
    # A batch listener blocks the only worker after its first call, so later rows stay queued.
    release, running = threading.Event(), threading.Event()

    def hold(record):
        running.set()
        release.wait(10)

    with InferenceEngine(chunked_model_dir, max_batch_size=4, max_queue_size=MAX_CHUNKS, max_wait_ms=0,
                         batch_workers=1, cache_size=0) as eng:
        eng.add_batch_listener(hold)
        first = eng.submit("warm up the only worker")
        assert running.wait(10)
        document = eng.submit(documents[4])  # 4 windows: the whole queue, though only one text
        assert eng.queue_depth() == MAX_CHUNKS
        with pytest.raises(QueueFullError, match=f"4 of max_queue_size={MAX_CHUNKS} queued, 1 more"):
            eng.submit("one short text more")
        release.set()
        assert first.result(10).windows == 1 and document.result(10).windows == MAX_CHUNKS
        # A request of more windows than the queue holds is queued a part at a time.
        want, counts = reference(chunked_model_dir, documents)
        assert counts.sum() > MAX_CHUNKS
        results = eng.predict_batch(documents).results
    np.testing.assert_allclose([r.logits for r in results], want, atol=1e-5)


def test_window_parts():
    assert window_parts([1, 2, 1, 3, 4, 1, 4], 6) == [range(0, 3), range(3, 4), range(4, 6), range(6, 7)]
    assert window_parts([5, 1], 4) == [range(0, 1), range(1, 2)]  # alone over the limit: its own part
    assert window_parts([], 4) == []


def test_a_queue_smaller_than_one_document_is_refused_at_start(chunked_model_dir):
    with pytest.raises(ConfigError, match="max_queue_size=3 cannot hold one long text.*max_chunks=4"):
        InferenceEngine(chunked_model_dir, max_queue_size=3)


def test_refused_document_is_a_413_naming_the_problem(refusing_model_dir, documents):
    want, counts = reference(refusing_model_dir, documents[:6])  # the 7th needs more than 4 windows
    with InferenceEngine(refusing_model_dir, max_batch_size=4, cache_size=0) as eng:
        with pytest.raises(DocumentTooLongError, match=r"texts\[6\]: text of \d+ tokens needs \d+ windows"):
            eng.predict_batch(documents)
        client = create_app(eng, max_texts=16, max_chars=100_000).test_client()
        for path, body, where in (("/predict", {"text": documents[6]}, "text: "),
                                  ("/predict/batch", {"texts": documents}, "texts[6]: ")):
            response = client.post(path, json=body)
            assert response.status_code == 413, response.get_data(as_text=True)
            error = response.get_json()["error"]
            assert error["code"] == "text_too_long"
            assert error["message"].startswith(where) and "max_chunks is 4" in error["message"]
        ok = client.post("/predict/batch", json={"texts": documents[:6]})
        assert ok.status_code == 200 and eng.stray_compilations == 0
    predictions = ok.get_json()["predictions"]
    assert [p["windows"] for p in predictions] == counts.tolist()
    assert [p["label"] for p in predictions] == [eng.labels[k] for k in want.argmax(1)]


def test_document_future_joins_its_windows():
    windows = [concurrent.futures.Future() for _ in range(3)]
    document = DocumentFuture(windows, lambda logits: logits.sum(0).tolist())
    for k, window in enumerate(windows):
        assert not document.done()
        window.set_running_or_notify_cancel()
        window.set_result(np.array([k, 10 * k], np.float32))
    assert document.result(0) == [3.0, 30.0]

    failing = [concurrent.futures.Future() for _ in range(2)]
    document = DocumentFuture(failing, lambda logits: "never")
    failing[1].set_exception(InferenceError("inference failed: boom"))
    with pytest.raises(InferenceError, match="boom"):
        document.result(0)

    queued = [concurrent.futures.Future() for _ in range(2)]
    document = DocumentFuture(queued, lambda logits: "never")
    assert document.cancel() and all(w.cancelled() for w in queued)  # nothing had started

    half = [concurrent.futures.Future() for _ in range(2)]
    document = DocumentFuture(half, lambda logits: "never")
    half[0].set_running_or_notify_cancel()  # a worker has taken the first window
    assert not document.cancel() and half[1].cancelled()
    with pytest.raises(DeadlineExceeded, match="1 of the text's 2 windows"):
        document.result(0)


# --- bulk prediction ----------------------------------------------------------------------------

def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(texts)),
                    encoding="utf-8")
    return path


def test_bulk_pools_each_record_and_writes_one_row_per_record(chunked_model_dir, documents, tmp_path):
    texts = documents * 3 + [""]
    want, _ = reference(chunked_model_dir, texts)
    config = BulkConfig(batch_size=4, sort_window=8, shard_rows=10, id_field="id", logits=True)
    summary = run(str(chunked_model_dir), [str(_write_jsonl(tmp_path / "in.jsonl", texts))], tmp_path / "out", config)
    rows = list(read_predictions(tmp_path / "out"))
    assert [r["id"] for r in rows] == [f"doc-{i}" for i in range(len(texts))]
    np.testing.assert_allclose([r["logits"] for r in rows], want, atol=1e-5)
    assert summary["rows"] == summary["predictions"] == len(texts)


def test_bulk_refused_records_are_bad_rows(refusing_model_dir, documents, tmp_path):
    source = str(_write_jsonl(tmp_path / "in.jsonl", documents))
    config = BulkConfig(batch_size=4, sort_window=8, shard_rows=10, id_field="id", logits=True)
    with pytest.raises(DataError, match=r"in.jsonl:7: text of \d+ tokens needs \d+ windows"):
        run(str(refusing_model_dir), [source], tmp_path / "failed", config)
    summary = run(str(refusing_model_dir), [source], tmp_path / "out", dataclasses.replace(config, skip_bad=True))
    assert summary["bad_rows"]["count"] == 1 and "max_chunks is 4" in json.dumps(summary["bad_rows"]["listed"])
    rows = list(read_predictions(tmp_path / "out"))
    want, _ = reference(refusing_model_dir, documents[:6])
    assert [r["id"] for r in rows] == [f"doc-{i}" for i in range(6)]
    np.testing.assert_allclose([r["logits"] for r in rows], want, atol=1e-5)
