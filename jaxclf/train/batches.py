"""Tokenized examples and the batches training and evaluation read: a ragged token store and Grain.

    ds = tokenize_dataset(tokenizer, texts, label_ids(labels, vocab, report.path, lines=report.lines))
    batches = train_batches(ds, global_batch_size=64, seed=0, buckets=(16, 32, 64, 128), pad_id=0,
                            process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(batches)  # {"input_ids": (b, T), "attention_mask": (b, T), "labels": (b,), "weights": (b,)}

Every text is tokenized once, unpadded, by the model's long-text rule (a text under long_text=chunks
may become several rows, its windows). Every process builds the same GLOBAL batches (same shuffle,
same padded length T) and keeps its own rows, so a run on N hosts sees exactly the batches of a run
on one. The training iterator is a grain `DatasetIterator` that jaxclf.train.checkpoint saves next
to the model state. Reading the labelled files is jaxclf.train.data.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from typing import Mapping, Sequence

import grain
import numpy as np
from tokenizers import Tokenizer

from jaxclf import tokenizer as tokenization
from jaxclf.config import ConfigError
from jaxclf.long_text import Chunking, TextTooLongError, pool_windows
from jaxclf.tokenizer import bucket_for
from jaxclf.train.data import DataError

logger = logging.getLogger(__name__)

# Data is in memory and a batch is a few numpy copies: one background thread keeps a few batches
# ready while the device computes, without fighting the training step for a 2-core host's CPUs.
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedDataset:
    """Tokenized rows, ragged in one flat array; a grain RandomAccessDataSource.

    Row i is ids[offsets[i]:offsets[i + 1]] with label labels[i]. A row is one text, except under
    long_text=chunks, where a text longer than the model is several rows (its windows, see
    jaxclf.long_text): `owner[i]` is then the index of the text row i was cut from, and each of
    the text's per-example values (its label, ...) is repeated on every one of its windows
    (`expand_to_windows`). owner None means one row per text.
    """
    ids: np.ndarray      # (total_tokens,) int32
    offsets: np.ndarray  # (N + 1,) int64, offsets[0] == 0
    labels: np.ndarray   # (N,) int32
    owner: np.ndarray | None = None  # (N,) int64, non-decreasing 0, 0, 1, 2, 2, 2, ...: each row's text
    special_tokens: int = 0  # per row, its [CLS]/[SEP]-like tokens (not text: "weighted" pooling ignores them)
    # Other per-row arrays, batched under their names with a leading batch axis (distillation's
    # "teacher_logits" (N, C) float32 and "has_label" (N,) float32); padding rows get zeros.
    extras: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name, values in self.extras.items():
            if name in ("ids", "label") or len(values) != len(self.labels):
                raise ValueError(f"extra per-row array {name!r} has {len(values)} rows for {len(self.labels)} "
                                 f"rows (names ids and label are taken)")
        if self.offsets.ndim != 1 or len(self.offsets) != len(self.labels) + 1 or self.offsets[0] != 0 \
                or self.offsets[-1] != len(self.ids) or np.any(np.diff(self.offsets) < 0):
            raise ValueError(f"inconsistent ragged store: {len(self.ids)} ids, {len(self.offsets)} offsets, "
                             f"{len(self.labels)} labels")
        if self.owner is not None and (
                self.owner.shape != self.labels.shape
                or (len(self.owner) and (self.owner[0] != 0 or np.any(~np.isin(np.diff(self.owner), (0, 1)))))):
            raise ValueError(f"owner must give each of the {len(self.labels)} rows its text index, "
                             f"0, 0, 1, 2, 2, ... (every text at least one row, in order)")

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]], labels: Sequence[int],
                       owner: np.ndarray | None = None, special_tokens: int = 0,
                       extras: Mapping[str, np.ndarray] | None = None) -> TokenizedDataset:
        """Build from one token-id sequence per row and their label ids (and texts, see the class)."""
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        ids = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int32, count=int(lengths.sum()))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls(ids, offsets, np.asarray(labels, dtype=np.int32).reshape(-1),
                   None if owner is None else np.asarray(owner, np.int64), special_tokens,
                   {name: np.asarray(values) for name, values in (extras or {}).items()})

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per row, (N,) int64."""
        return np.diff(self.offsets)

    @property
    def num_texts(self) -> int:
        """Texts (documents) the rows were cut from: len(self) unless texts were read as windows."""
        return len(self) if self.owner is None or not len(self.owner) else int(self.owner[-1]) + 1

    @property
    def text_labels(self) -> np.ndarray:
        """(num_texts,) int32: each text's label (its windows all carry it)."""
        if self.owner is None:
            return self.labels
        first = np.flatnonzero(np.diff(self.owner, prepend=-1))  # first row of each text
        return self.labels[first]

    def pool(self, row_logits: np.ndarray, pooling: str) -> np.ndarray:
        """(N, C) logits of the rows -> (num_texts, C) logits of the texts (long_text.pool_windows)."""
        if self.owner is None:
            return np.asarray(row_logits, np.float32)
        return pool_windows(row_logits, self.owner, self.num_texts, pooling,
                            (self.lengths - self.special_tokens).astype(np.float64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        """{"ids": int32 (L,), "label": int, **one row of each extra array}."""
        i = range(len(self))[index]
        return {"ids": self.ids[self.offsets[i]:self.offsets[i + 1]], "label": int(self.labels[i]),
                **{name: values[i] for name, values in self.extras.items()}}


def expand_to_windows(owner: np.ndarray | None, **per_text: np.ndarray | None) -> dict[str, np.ndarray | None]:
    """Per-text arrays (first axis = texts) -> per-row arrays: each text's value repeated on each of its windows.

    The one place a text becomes rows: every per-example array of a TokenizedDataset goes through it,
    so a text's windows all carry its label (and anything else recorded per text). None stays None;
    owner None (one row per text) returns the arrays as they are.
    """
    if owner is None:
        return dict(per_text)
    return {name: None if values is None else np.asarray(values)[owner] for name, values in per_text.items()}


def tokenize_dataset(tokenizer: Tokenizer, texts: Sequence[str], labels_ids: Sequence[int] | np.ndarray, *,
                     truncation_head: int | None = None, chunking: Chunking | None = None,
                     tokenize_batch: int = 8192,
                     extras: Mapping[str, np.ndarray] | None = None) -> TokenizedDataset:
    """Tokenize every text once, unpadded, by the model's long-text rule (tokenizer.TextEncoder).

    truncation_head and chunking are TextEncoder's (TextEncoder.for_config reads them from a
    ModelConfig). Under chunks a long text becomes one row per window (at most max_chunks), each
    carrying the text's label (the training design: see jaxclf.long_text), and `owner` maps rows
    back to texts so that evaluation scores texts (`TokenizedDataset.pool`), never windows.
    """
    if len(texts) != len(labels_ids):
        raise ValueError(f"{len(texts)} texts but {len(labels_ids)} labels")
    encoder = tokenization.TextEncoder(tokenizer, truncation_head, chunking)  # refuses a tokenizer without truncation
    sequences: list[list[int]] = []
    owners: list[np.ndarray] = []
    special_tokens = 0
    for start in range(0, len(texts), tokenize_batch):
        try:
            windows = encoder.windows(list(texts[start:start + tokenize_batch]))
        except TextTooLongError as e:  # chunk_overflow=refuse: name the example
            first = start + _first_too_long(encoder, texts, start, tokenize_batch)
            raise DataError(f"example {first + 1}: {e}") from None
        sequences.extend(windows.rows)
        owners.append(windows.owner + start)
        special_tokens = windows.special_tokens
    empty = [k for k, s in enumerate(sequences) if not s]
    if empty:  # an all-padding row would give attention nothing to attend to
        raise DataError(f"{len(empty)} text(s) produced no tokens, first example {empty[0] + 1}: "
                         f"{texts[empty[0]][:60]!r}")
    owner = np.concatenate(owners) if chunking is not None and owners else None
    extras = dict(extras or {})  # per text, like the labels (e.g. distillation's teacher logits)
    per_row = expand_to_windows(owner, labels=np.asarray(labels_ids, np.int32).reshape(-1), **extras)
    ds = TokenizedDataset.from_sequences(sequences, per_row["labels"], owner, special_tokens,
                                         {name: per_row[name] for name in extras})
    if owner is None:
        logger.info("tokenized %d texts: %d tokens, longest %d", len(ds), len(ds.ids), ds.lengths.max())
    else:
        logger.info("tokenized %d texts as %d windows (%d texts over one window): %d tokens", ds.num_texts,
                    len(ds), int((np.bincount(owner) > 1).sum()), len(ds.ids))
    return ds


def _first_too_long(encoder: tokenization.TextEncoder, texts: Sequence[str], start: int, count: int) -> int:
    """Index (from `start`) of the first text the encoder refuses as too long."""
    for k, text in enumerate(texts[start:start + count]):
        try:
            encoder.windows([text])
        except TextTooLongError:
            return k
    return 0


# ----------------------------------------------------------------------------------------------
# Batches


def train_batches(ds: TokenizedDataset, *, global_batch_size: int, seed: int, buckets: Sequence[int],
                  pad_id: int, process_index: int = 0, process_count: int = 1,
                  num_epochs: int | None = None) -> grain.DatasetIterator:
    """Shuffled, bucketed training batches for this process: dicts of (b, T) / (b,) arrays, b = global // count.

    Each epoch is shuffled anew and batched on its own (the last global_batch_size-incomplete part of
    each epoch is dropped), so an epoch is len(ds) // global_batch_size steps. Infinite if num_epochs
    is None. The iterator's get_state()/set_state() resume it exactly.
    """
    _check_batching(ds, global_batch_size, buckets, process_index, process_count)
    if len(ds) < global_batch_size:
        raise ConfigError(f"global_batch_size {global_batch_size} is larger than the data set "
                         f"({len(ds)} examples): no full training batch")
    if seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed}")
    collate = functools.partial(_collate, global_batch_size=global_batch_size, buckets=tuple(buckets),
                                pad_id=pad_id, process_index=process_index, process_count=process_count)
    # grain reshuffles epoch e with seed + e, so user seeds s and s+1 would share all but one epoch's
    # order; hashing the seed first keeps the streams of different seeds unrelated.
    shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1, dtype=np.uint32)[0])
    batches = (grain.MapDataset.source(ds)
               .shuffle(seed=shuffle_seed)
               .batch(global_batch_size, drop_remainder=True, batch_fn=collate)  # batches never span epochs
               .repeat(num_epochs))
    return iter(batches.to_iter_dataset(READ_OPTIONS))


def eval_batches(ds: TokenizedDataset, *, global_batch_size: int, buckets: Sequence[int], pad_id: int,
                 process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """Every example once, in order, for this process; the last batch is filled with weight-0 padding rows."""
    _check_batching(ds, global_batch_size, buckets, process_index, process_count)
    collate = functools.partial(_collate, global_batch_size=global_batch_size, buckets=tuple(buckets),
                                pad_id=pad_id, process_index=process_index, process_count=process_count)
    batches = grain.MapDataset.source(ds).batch(global_batch_size, drop_remainder=False, batch_fn=collate)
    return iter(batches.to_iter_dataset(READ_OPTIONS))


def _check_batching(ds: TokenizedDataset, global_batch_size: int, buckets: Sequence[int],
                    process_index: int, process_count: int) -> None:
    if global_batch_size <= 0 or process_count <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                         f"process_count {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] <= 0:
        raise ConfigError(f"length buckets must be distinct positive lengths in increasing order, "
                          f"got {tuple(buckets)}")
    longest = int(ds.lengths.max()) if len(ds) else 0
    if longest > buckets[-1]:
        raise ConfigError(f"the longest example has {longest} tokens but the largest bucket is {buckets[-1]}; "
                         f"set length_buckets up to the model's max length")


def _collate(examples: Sequence[dict], *, global_batch_size: int, buckets: tuple[int, ...], pad_id: int,
             process_index: int, process_count: int) -> dict[str, np.ndarray]:
    """This process's rows of one global batch, padded to the bucket of the global batch's longest example.

    Rows past the real examples (an eval batch's tail) are padding: weight 0, label 0, all ids pad_id and
    a mask with a single 1 at position 0, so attention never sees an empty row.
    """
    length = bucket_for(max(len(e["ids"]) for e in examples), buckets)  # T, the same in every process
    b = global_batch_size // process_count
    input_ids = np.full((b, length), pad_id, dtype=np.int32)  # (b, T)
    attention_mask = np.zeros((b, length), dtype=np.int32)    # (b, T)
    labels = np.zeros((b,), dtype=np.int32)
    weights = np.zeros((b,), dtype=np.float32)
    extras = {name: np.zeros((b, *np.shape(value)), np.asarray(value).dtype)  # TokenizedDataset.extras
              for name, value in examples[0].items() if name not in ("ids", "label")}
    for row, k in enumerate(range(process_index * b, (process_index + 1) * b)):
        if k < len(examples):
            ids = examples[k]["ids"]
            input_ids[row, :len(ids)] = ids
            attention_mask[row, :len(ids)] = 1
            labels[row] = examples[k]["label"]
            weights[row] = 1.0
            for name, values in extras.items():
                values[row] = examples[k][name]
        else:
            attention_mask[row, 0] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "weights": weights,
            **extras}
