"""jaxclf.train.batches: tokenization, bucketed/sharded batches, resumable iterators."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxclf import tokenizer as tokenization
from jaxclf.config import ConfigError, ModelConfig
from jaxclf.train import batches, data
from jaxclf.tokenizer import bucket_for

SAMPLE_CSV = Path(__file__).resolve().parents[1] / "data" / "sample_texts.csv"
BUCKETS = (8, 16, 32, 64)


def synthetic(n: int = 50, seed: int = 0) -> batches.TokenizedDataset:
    """n examples of 1..40 tokens; the label of example k is k, so batches show which examples they hold."""
    rng = np.random.default_rng(seed)
    sequences = [[k + 100] * int(rng.integers(1, 41)) for k in range(n)]
    return batches.TokenizedDataset.from_sequences(sequences, np.arange(n))


def take(iterator, count: int) -> list[dict]:
    return [next(iterator) for _ in range(count)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ------------------------------------------------------------------------------------------------
# Tokenization


def test_tokenize_once_without_padding():
    texts, labels, _ = data.read_examples(SAMPLE_CSV)
    tok = tokenization.configure(tokenization.train_tokenizer(texts, vocab_size=500), max_length=32,
                                 pad_token_id=0)
    vocab = data.label_vocabulary(labels)
    ds = batches.tokenize_dataset(tok, texts, data.label_ids(labels, vocab, SAMPLE_CSV))
    assert len(ds) == 1092 and ds.ids.dtype == np.int32 and ds.labels.dtype == np.int32
    assert ds.lengths.max() == 32 and ds.lengths.min() < 32  # truncated, not padded
    assert tok.padding is not None  # the caller's tokenizer keeps its padding
    ids, mask = tokenization.TextEncoder(tok).encode(texts[:20])
    assert ids.shape[1] == max(ds.lengths[:20])
    for k in range(20):
        np.testing.assert_array_equal(ds[k]["ids"], ids[k][mask[k] == 1])
        assert ds[k]["label"] == vocab.index(labels[k])


def test_head_tail_truncation_keeps_the_opening_and_the_ending():
    texts, labels, _ = data.read_examples(SAMPLE_CSV)
    tok = tokenization.configure(tokenization.train_tokenizer(texts, vocab_size=500), max_length=16,
                                 pad_token_id=0)
    long_text = " ".join(texts[:5])
    whole = tokenization.TextEncoder(tokenization.configure(
        tokenization.train_tokenizer(texts, vocab_size=500), max_length=10_000, pad_token_id=0)).ids_one(long_text)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    assert len(whole) > 16 and whole[0] == cls_id and whole[-1] == sep_id

    ds = batches.tokenize_dataset(tok, [long_text, "short text"], [0, 1], truncation_head=5)
    assert ds[0]["ids"].tolist() == whole[:5] + whole[-11:]  # [CLS] + 4 opening tokens, 10 closing + [SEP]
    assert ds[1]["ids"].tolist() == tokenization.TextEncoder(tok).ids_one("short text")  # short: untouched
    plain = batches.tokenize_dataset(tok, [long_text], [0])
    assert plain[0]["ids"].tolist() == whole[:15] + [sep_id]  # the default keeps the opening only

    encoder = tokenization.TextEncoder(tok, truncation_head=5)
    ids, mask = encoder.encode([long_text, "short text"])
    assert ids.shape == (2, 16) and ids[0].tolist() == ds[0]["ids"].tolist() and mask[1].sum() == len(ds[1]["ids"])
    with pytest.raises(ValueError, match=r"truncation_head=16 must be in \[1, 16\)"):
        tokenization.TextEncoder(tok, truncation_head=16)
    with pytest.raises(ConfigError, match="truncation_head must be null.*max_position_embeddings=32.*got 32"):
        ModelConfig(max_position_embeddings=32, truncation_head=32)


# ------------------------------------------------------------------------------------------------
# Training batches


def test_train_batches_are_bucketed_minimal_and_typed():
    ds = synthetic()
    for batch in take(batches.train_batches(ds, global_batch_size=8, seed=0, buckets=BUCKETS, pad_id=0), 12):
        b, t = batch["input_ids"].shape
        assert b == 8 and t in BUCKETS
        assert t == bucket_for(int(batch["attention_mask"].sum(1).max()), BUCKETS)
        assert batch["input_ids"].dtype == batch["attention_mask"].dtype == batch["labels"].dtype == np.int32
        assert batch["weights"].dtype == np.float32 and np.all(batch["weights"] == 1)
        lengths = ds.lengths[batch["labels"]]
        np.testing.assert_array_equal(batch["attention_mask"].sum(1), lengths)
        np.testing.assert_array_equal(batch["input_ids"][:, 0], batch["labels"] + 100)
        assert np.all(batch["input_ids"][batch["attention_mask"] == 0] == 0)


def test_train_batches_depend_on_the_seed_only():
    ds = synthetic()
    first = take(batches.train_batches(ds, global_batch_size=8, seed=3, buckets=BUCKETS, pad_id=0), 10)
    again = take(batches.train_batches(ds, global_batch_size=8, seed=3, buckets=BUCKETS, pad_id=0), 10)
    other = take(batches.train_batches(ds, global_batch_size=8, seed=4, buckets=BUCKETS, pad_id=0), 10)
    assert_same_batches(first, again)
    assert not all(np.array_equal(x["labels"], y["labels"]) for x, y in zip(first, other))
    # grain reseeds epoch e with seed + e; jaxclf hashes the seed so seed 4 does not replay seed 3's epoch 1
    assert not all(np.array_equal(x["labels"], y["labels"]) for x, y in zip(first[6:], other[:4]))


def test_every_example_once_per_epoch_and_epochs_reshuffled():
    ds = synthetic(50)
    seen_batches = list(batches.train_batches(ds, global_batch_size=8, seed=0, buckets=BUCKETS, pad_id=0,
                                              num_epochs=3))
    assert len(seen_batches) == 3 * (50 // 8)  # each epoch drops its own last 2 examples
    epochs = [np.concatenate([b["labels"] for b in seen_batches[e * 6:(e + 1) * 6]]) for e in range(3)]
    for seen in epochs:
        assert len(seen) == 48 and len(set(seen.tolist())) == 48
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_two_processes_split_the_global_batch():
    ds = synthetic()
    single = take(batches.train_batches(ds, global_batch_size=8, seed=1, buckets=BUCKETS, pad_id=0), 8)
    parts = [take(batches.train_batches(ds, global_batch_size=8, seed=1, buckets=BUCKETS, pad_id=0,
                                     process_index=p, process_count=2), 8) for p in range(2)]
    for k, whole in enumerate(single):
        assert parts[0][k]["input_ids"].shape == parts[1][k]["input_ids"].shape == (4, whole["input_ids"].shape[1])
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([parts[0][k][key], parts[1][k][key]]), whole[key])


def test_batching_arguments_are_checked():
    ds = synthetic()
    with pytest.raises(ValueError, match="multiple of process_count 3"):
        batches.train_batches(ds, global_batch_size=8, seed=0, buckets=BUCKETS, pad_id=0, process_count=3)
    with pytest.raises(ValueError, match="largest bucket is 32"):
        batches.train_batches(ds, global_batch_size=8, seed=0, buckets=(16, 32), pad_id=0)
    with pytest.raises(ValueError, match="larger than the data set"):
        batches.train_batches(ds, global_batch_size=64, seed=0, buckets=BUCKETS, pad_id=0)


# ------------------------------------------------------------------------------------------------
# Evaluation batches


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_example_once_in_order(process_count):
    ds = synthetic(50)
    per_process = [list(batches.eval_batches(ds, global_batch_size=8, buckets=BUCKETS, pad_id=7,
                                          process_index=p, process_count=process_count))
                   for p in range(process_count)]
    assert all(len(batches) == 7 for batches in per_process)
    whole = [{key: np.concatenate([batches[k][key] for batches in per_process]) for key in per_process[0][k]}
             for k in range(7)]
    labels = np.concatenate([b["labels"] for b in whole])
    weights = np.concatenate([b["weights"] for b in whole])
    np.testing.assert_array_equal(labels[weights == 1], np.arange(50))
    assert weights.sum() == 50 and np.all(weights[50:] == 0)
    last = whole[-1]
    assert np.all(last["input_ids"][2:] == 7) and np.all(last["labels"][2:] == 0)
    assert np.all(last["attention_mask"][2:, 0] == 1) and np.all(last["attention_mask"][2:, 1:] == 0)
    assert last["input_ids"].shape[1] == bucket_for(int(ds.lengths[48:].max()), BUCKETS)


# ------------------------------------------------------------------------------------------------
# Resuming the training iterator


def test_iterator_state_round_trip():
    ds = synthetic()
    make = lambda: batches.train_batches(ds, global_batch_size=8, seed=5, buckets=BUCKETS, pad_id=0)
    iterator = make()
    take(iterator, 7)  # past the first epoch's 6 batches
    state = json.loads(json.dumps(iterator.get_state()))  # plain JSON, as checkpoints store it
    expected = take(iterator, 5)
    resumed = make()
    resumed.set_state(state)
    assert_same_batches(take(resumed, 5), expected)


def test_orbax_saves_and_restores_the_iterator_with_the_state(tmp_path):
    import orbax.checkpoint as ocp
    from jaxclf.train import checkpoint
    ds = synthetic()
    make = lambda: batches.train_batches(ds, global_batch_size=8, seed=2, buckets=BUCKETS, pad_id=0)
    iterator = make()
    take(iterator, 4)
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.array(4, dtype=np.int32)}
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                data=checkpoint.iterator_checkpoint_args(iterator)))
        expected = take(iterator, 5)  # moving on must not change what was saved
        manager.wait_until_finished()
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        fresh = make()
        restored = manager.restore(manager.latest_step(),
                                   args=ocp.args.Composite(state=ocp.args.StandardRestore(tree),
                                                           data=checkpoint.iterator_restore_args(fresh)))
    np.testing.assert_array_equal(restored.state["w"], tree["w"])
    assert_same_batches(take(fresh, 5), expected)
