"""The input pipeline: read labelled texts, tokenize them once, and serve bucketed batches with Grain.

    texts, labels, report = read_examples("data/train.csv")
    vocab = label_vocabulary(labels)
    ds = tokenize_dataset(tokenizer, texts, label_ids(labels, vocab, report.path, lines=report.lines))
    batches = train_batches(ds, global_batch_size=64, seed=0, buckets=(16, 32, 64, 128), pad_id=0,
                            process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(batches)  # {"input_ids": (b, T), "attention_mask": (b, T), "labels": (b,), "weights": (b,)}

Every process builds the same GLOBAL batches (same shuffle, same padded length T) and keeps its own
rows, so a run on N hosts sees exactly the batches of a run on one. The training iterator is a grain
`DatasetIterator` that jaxclf.train.checkpoint saves next to the model state.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import grain
import numpy as np
from tokenizers import Tokenizer

from jaxclf import tokenizer as tokenization
from jaxclf.config import ConfigError
from jaxclf.errors import JaxclfError
from jaxclf.long_text import Chunking, TextTooLongError, pool_windows
from jaxclf.tokenizer import bucket_for

logger = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".array_record": "array_record",
           ".arrayrecord": "array_record"}
_BOM = b"\xef\xbb\xbf"
# Data is in memory and a batch is a few numpy copies: one background thread keeps a few batches
# ready while the device computes, without fighting the training step for a 2-core host's CPUs.
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


class DataError(JaxclfError, ValueError):
    """A data file that cannot be used as it is; the message reads `file:line: problem`."""


@dataclasses.dataclass
class ReadReport:
    """What read_examples kept and skipped from one file."""
    path: str
    rows: int                                        # rows kept
    skipped: list[str] = dataclasses.field(default_factory=list)  # "file:line: reason" per skipped row
    lines: list[int] = dataclasses.field(default_factory=list)    # line (record, for ArrayRecord) of each kept row


# ----------------------------------------------------------------------------------------------
# Reading


@dataclasses.dataclass
class _Row:
    """One parsed row: its 1-based line, and either (text, label) or the problem that rejects it."""
    line: int
    text: str | None = None
    label: str | None = None
    problem: str | None = None


def read_examples(path: str | os.PathLike, *, skip_bad: bool = False) -> tuple[list[str], list[str], ReadReport]:
    """(texts, label names, report) from a CSV, JSON Lines or ArrayRecord file chosen by extension.

    CSV: a header row naming `text` and `label` columns (others are ignored), UTF-8 with or without
    BOM, standard quoting. JSON Lines (.jsonl/.json): one {"text": ..., "label": ...} object a line.
    ArrayRecord: each record such an object, JSON-encoded in UTF-8; its "line" is the record number.
    Labels are stripped of surrounding whitespace; integer labels (JSON) become their decimal string.
    Blank lines are ignored. A bad row raises DataError, or with skip_bad=True is left out and listed
    in the report (and summarised in one warning).
    """
    path = str(path)
    suffix = data_file_suffix(path, FORMATS)
    fmt = FORMATS[suffix]
    unit = "record " if fmt == "array_record" else ""
    rows = {"csv": _csv_rows, "jsonl": _jsonl_rows, "array_record": _array_record_rows}[fmt](path)

    texts, labels, report = [], [], ReadReport(path=path, rows=0)
    for row in rows:
        problem = row.problem or example_problem(row.text, row.label)
        if problem:
            message = f"{path}:{unit}{row.line}: {problem}"
            if not skip_bad:
                raise DataError(message)
            report.skipped.append(message)
            continue
        texts.append(row.text)
        labels.append(row.label)
        report.lines.append(row.line)
    report.rows = len(texts)

    if report.skipped:
        logger.warning("%s: skipped %d bad row(s), kept %d; first: %s", path, len(report.skipped),
                       report.rows, report.skipped[0])
    if not texts:
        if report.skipped:
            raise DataError(f"{path}: no valid rows ({len(report.skipped)} skipped; first: {report.skipped[0]})")
        raise DataError(f"{path}: no rows" + (" after the header" if fmt == "csv" else ""))
    return texts, labels, report


def data_file_suffix(path: str, formats: Sequence[str], what: str = "") -> str:
    """The lower-cased extension of an existing data file among `formats`; DataError naming the problem."""
    suffix = Path(path).suffix.lower()
    if suffix not in formats:
        raise DataError(f"{path}: unsupported extension {suffix or '(none)'!r}{what}; "
                        f"accepted: {', '.join(formats)}")
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a data file")
    return suffix


def example_problem(text: str, label: str) -> str | None:
    """Why a parsed (text, label) pair cannot be trained on, or None; the rule for files and in-memory data alike."""
    if not text.strip():
        return "text is empty"
    if not label:
        return "label is empty"
    return None


def _read_bytes(path: str) -> tuple[bytes, int]:
    """The file's bytes without a UTF-8 BOM, and the BOM's length (to report file offsets)."""
    data = Path(path).read_bytes()
    bom = len(_BOM) if data.startswith(_BOM) else 0
    if not data[bom:].strip():
        raise DataError(f"{path}: file is empty")
    return data[bom:], bom


def _decode_lines(data: bytes, start_offset: int) -> tuple[list[str], dict[int, str]]:
    """Lines (ends kept) decoded strictly as UTF-8, and {line: problem} for undecodable ones (kept as "\\n").

    A UTF-8 multi-byte character never contains a \\r or \\n byte, so splitting before decoding is safe.
    """
    lines, bad, offset = [], {}, start_offset
    for number, raw in enumerate(data.splitlines(keepends=True), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            bad[number] = (f"not valid UTF-8: byte 0x{raw[e.start]:02x} at byte offset {offset + e.start} "
                           f"of the file (byte {e.start + 1} of the line); save the file as UTF-8")
            lines.append("\n")
        offset += len(raw)
    return lines, bad


def csv_records(lines: Iterable[str]) -> Iterator[tuple[int, int, list[str] | None, csv.Error | None]]:
    """(first line, last line, fields, None) per CSV record, or (first, last, None, error) for a malformed one.

    Lines are counted physically, so a quoted field spanning lines is reported at its first line.
    strict: a stray quote or an unclosed quoted field is an error, not a silently merged row.
    """
    reader = csv.reader(lines, strict=True)
    end = 0  # last physical line consumed by the reader
    while True:
        start = end + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            end = reader.line_num
            yield start, end, None, e
            continue
        end = reader.line_num
        yield start, end, fields, None


def _csv_rows(path: str) -> Iterator[_Row]:
    data, bom = _read_bytes(path)
    lines, bad = _decode_lines(data, bom)
    header: list[str] | None = None
    text_col = label_col = -1
    for start, end, fields, error in csv_records(lines):
        if error is not None:
            hint = ("a quoted field opened here is never closed" if "end of data" in str(error) else
                    'a field containing quotes must itself be quoted, with inner quotes doubled ("")')
            yield _Row(start, problem=f"malformed CSV ({error}): {hint}")
            continue
        undecodable = [n for n in range(start, end + 1) if n in bad]
        if undecodable:
            if header is None:
                raise DataError(f"{path}:{undecodable[0]}: header row: {bad[undecodable[0]]}")
            for n in undecodable:
                yield _Row(n, problem=bad[n])
            continue
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue  # a blank line
        if header is None:
            header = [name.strip() for name in fields]
            missing = [c for c in ("text", "label") if c not in header]
            if missing:
                raise DataError(f"{path}:{start}: header has no {' or '.join(map(repr, missing))} column; "
                                f"found columns: {', '.join(map(repr, header))}; expected a header row "
                                f"naming 'text' and 'label' columns")
            text_col, label_col = header.index("text"), header.index("label")
            continue
        if len(fields) != len(header):
            yield _Row(start, problem=f"{len(fields)} fields, expected {len(header)} like the header "
                                      f"({','.join(header)}); quote fields that contain commas")
            continue
        yield _Row(start, text=fields[text_col], label=fields[label_col].strip())


def _jsonl_rows(path: str) -> Iterator[_Row]:
    data, bom = _read_bytes(path)
    lines, bad = _decode_lines(data, bom)
    for number, line in enumerate(lines, start=1):
        if number in bad:
            yield _Row(number, problem=bad[number])
        elif line.strip():
            yield _json_row(number, line)


def _array_record_rows(path: str) -> Iterator[_Row]:
    from array_record.python.array_record_module import ArrayRecordReader
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: file is empty")
    try:
        reader = ArrayRecordReader(path)
        try:
            records = reader.read_all()
        finally:
            reader.close()
    except RuntimeError as e:  # the reader's only signal for a corrupt or foreign file
        raise DataError(f"{path}: not a readable ArrayRecord file ({e})") from e
    if not records:
        raise DataError(f"{path}: no records (empty, or not an ArrayRecord file)")
    for number, record in enumerate(records, start=1):
        try:
            text = record.decode("utf-8")
        except UnicodeDecodeError as e:
            yield _Row(number, problem=f"not valid UTF-8: byte 0x{record[e.start]:02x} at byte offset "
                                       f"{e.start} of the record")
            continue
        yield _json_row(number, text)


def _json_row(number: int, line: str) -> _Row:
    """A {"text": str, "label": str | int} object (other keys ignored) -> _Row."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return _Row(number, problem=f"malformed JSON: {e.msg} at column {e.colno}; "
                                    f"expected one JSON object per line")
    if not isinstance(obj, dict):
        return _Row(number, problem=f'expected a JSON object {{"text": ..., "label": ...}}, '
                                    f"got {type(obj).__name__}")
    missing = [k for k in ("text", "label") if k not in obj]
    if missing:
        return _Row(number, problem=f"missing key {' and '.join(map(repr, missing))}; "
                                    f"found keys: {', '.join(map(repr, obj)) or 'none'}")
    text, label = obj["text"], obj["label"]
    if not isinstance(text, str):
        return _Row(number, problem=f"'text' must be a string, got {type(text).__name__} {text!r:.40}")
    if isinstance(label, int) and not isinstance(label, bool):
        label = str(label)
    if not isinstance(label, str):
        return _Row(number, problem=f"'label' must be a string or an integer, "
                                    f"got {type(label).__name__} {label!r:.40}")
    return _Row(number, text=text, label=label.strip())


# Characters str.splitlines() breaks lines at that json.dumps leaves raw (latin-1 mojibake has U+0085):
# escaped, so that any line-splitting reader sees one record a line.
_LINE_BREAKS_ESCAPED = {ord(c): f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"}


def write_jsonl(path: str | os.PathLike, texts: Sequence[str], labels: Sequence[str]) -> str:
    """Write (text, label) pairs as {"text", "label"} JSON lines, atomically; returns the file's sha256."""
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    body = "".join(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n" for t, y in zip(texts, labels))
    encoded = body.translate(_LINE_BREAKS_ESCAPED).encode("utf-8")
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(encoded)
    os.replace(tmp, path)
    return hashlib.sha256(encoded).hexdigest()


def write_array_record(path: str | os.PathLike, texts: Sequence[str], labels: Sequence[str]) -> None:
    """Write (text, label) pairs as an ArrayRecord file, one JSON {"text", "label"} record each."""
    from array_record.python.array_record_module import ArrayRecordWriter
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    writer = ArrayRecordWriter(str(path), "group_size:1")  # group_size 1: cheap random access
    try:
        for text, label in zip(texts, labels):
            writer.write(json.dumps({"text": text, "label": label}, ensure_ascii=False).encode("utf-8"))
    finally:
        writer.close()


# ----------------------------------------------------------------------------------------------
# Labels


def label_vocabulary(labels: Sequence[str], given: Sequence[str] | None = None) -> tuple[str, ...]:
    """The label names in id order: `given` (checked distinct and non-empty) or the data's sorted unique labels."""
    if given is None:
        if not labels:
            raise DataError("no labels to build a label vocabulary from")
        return tuple(sorted(set(labels)))
    given = tuple(given)
    bad = [name for name in given if not isinstance(name, str) or not name.strip()]
    if bad or not given:
        raise DataError(f"label names must be non-empty strings; got {list(given)!r}")
    repeated = sorted({name for name in given if given.count(name) > 1})
    if repeated:
        raise DataError(f"label names must be distinct; repeated: {', '.join(map(repr, repeated))} "
                        f"in {list(given)!r}")
    return given


def label_ids(labels: Sequence[str], vocabulary: Sequence[str], path: str | os.PathLike, *,
              lines: Sequence[int] | None = None) -> np.ndarray:
    """Label names -> ids in `vocabulary`, int32 (N,); DataError naming unknown labels and where they first occur.

    `lines` (ReadReport.lines) lets the error name file lines; without it, it names 1-based example numbers.
    """
    index = {name: i for i, name in enumerate(vocabulary)}
    unknown: dict[str, list[int]] = {}
    for k, name in enumerate(labels):
        if name not in index:
            unknown.setdefault(name, []).append(k)
    if unknown:
        where = (lambda k: f"line {lines[k]}") if lines is not None else (lambda k: f"example {k + 1}")
        found = "; ".join(f"{name!r} (first at {where(ks[0])}, {len(ks)} row{'s' * (len(ks) > 1)})"
                          for name, ks in unknown.items())
        raise DataError(f"{path}: unknown label{'s' * (len(unknown) > 1)}: {found}; "
                        f"known labels: {', '.join(map(repr, vocabulary))}")
    return np.fromiter((index[name] for name in labels), dtype=np.int32, count=len(labels))


def stratified_split(labels: Sequence[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): `fraction` of every label held out, chosen by `seed`; both sorted.

    Each label keeps at least one training example; a label with >= 2 examples gives at least one
    held-out example.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"split fraction must be in (0, 1), got {fraction!r}")
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    labels = np.asarray(labels, dtype=object)
    held: list[np.ndarray] = []
    for name in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == name)
        rng.shuffle(idx)
        n = min(max(int(round(fraction * len(idx))), 1 if len(idx) > 1 else 0), len(idx) - 1)
        held.append(idx[:n])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(len(labels)), held_out)
    return train, held_out


# ----------------------------------------------------------------------------------------------
# Tokenized examples


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
