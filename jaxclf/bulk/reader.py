"""Streaming input of a bulk job: CSV, JSON Lines, plain text or ArrayRecord rows as a Grain pipeline.

    files = resolve_inputs(["crawl/*.jsonl"])
    stream = chunk_stream(files, config, encoder, wanted=lambda block: True)   # a grain.IterDataset
    for chunk in stream: ...   # Chunk: one sort window of one output shard, tokenized

Nothing is read whole: text files are read line by line, ArrayRecord files by record, so memory
stays flat whatever the input size. Every row has a *position*, its 0-based index among all rows of
all input files (in the order given, each glob sorted); position // shard_rows is the output shard
(block) it lands in. A process reads only the rows of the blocks it wants (its own, not yet
committed) and skips the rest without parsing them.

Rows: CSV with a header naming the text column (and the id column); JSON Lines and ArrayRecord
records are JSON objects with those keys (ArrayRecord as jaxclf.train.data.write_array_record
writes them); plain text is one document a line. Blank lines are not rows. A row that cannot be
used (malformed JSON, a missing key, a text that is not a string, bytes that are not UTF-8) is a
BadRow named `file:line: problem` (`file:record N` for ArrayRecord): the job fails on it, or with
skip_bad lists it in summary.json.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np

from jaxclf.bulk.spec import INPUT_FORMATS, BulkConfig
from jaxclf.config import ConfigError
from jaxclf.long_text import TextTooLongError, Windows
from jaxclf.tokenizer import TextEncoder
from jaxclf.train.data import DataError, csv_records

FORMAT_BY_EXTENSION = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
                       ".txt": "text", ".text": "text", ".array_record": "array_record",
                       ".arrayrecord": "array_record"}
_BOM = b"\xef\xbb\xbf"
# csv's default limit (128 KiB a field) would call a long document malformed.
_CSV_FIELD_LIMIT = 1 << 30
# Tokenized chunks kept ready ahead of the device: enough to hide a slow read, few enough to stay small.
PREFETCH_CHUNKS = 2


@dataclasses.dataclass(frozen=True)
class InputFile:
    """One input file, with what identifies its content for a resumed job."""

    path: str
    format: str  # one of INPUT_FORMATS
    size: int  # bytes
    mtime_ns: int

    def fingerprint(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "size": self.size, "mtime_ns": self.mtime_ns}


@dataclasses.dataclass(frozen=True)
class BadRow:
    position: int  # 0-based input position
    where: str  # file:line (file:record N for ArrayRecord)
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


@dataclasses.dataclass
class Chunk:
    """The rows of one sort window of one output shard (block) that this process predicts.

    The last chunk of a stream holds no rows and carries total_rows, the input's row count.
    """

    block: int
    positions: list[int]  # input positions of the good rows, increasing
    ids: list[Any]  # their ids (the id field's values, or the positions)
    texts: list[str] | None  # their texts; None once tokenized
    bad: list[BadRow]
    sources: list[tuple[Callable[[int], str], int]] = dataclasses.field(default_factory=list)  # (where, line)
    input_bytes: int = 0  # input bytes read when the chunk was cut (for the progress bar)
    tokens: list[list[int]] | None = None  # token-id rows the model reads, set by Tokenize (= windows.rows)
    # Which good row each token row belongs to: one each, or under long_text=chunks a long text's windows.
    windows: Windows | None = None
    total_rows: int | None = None


def resolve_inputs(patterns: Sequence[str], input_format: str | None = None) -> list[InputFile]:
    """The files that paths and globs name, in the order given (each glob's matches sorted), without repeats."""
    if not patterns:
        raise ConfigError("no input given; pass --input FILE_OR_GLOB")
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"{pattern}: no file matches this pattern")
        elif os.path.isdir(pattern):
            raise DataError(f"{pattern}: is a directory; pass its files, e.g. '{pattern.rstrip('/')}/*.jsonl'")
        elif not os.path.isfile(pattern):
            raise DataError(f"{pattern}: file not found")
        else:
            matches = [pattern]
        paths.extend(p for p in matches if p not in paths)
    files = []
    for path in paths:
        fmt = input_format or FORMAT_BY_EXTENSION.get(Path(path).suffix.lower())
        if fmt is None:
            raise DataError(f"{path}: cannot tell the format from the extension {Path(path).suffix or '(none)'!r}; "
                            f"known: {', '.join(FORMAT_BY_EXTENSION)}, or pass --input-format "
                            f"({', '.join(INPUT_FORMATS)})")
        stat = os.stat(path)
        files.append(InputFile(os.path.abspath(path), fmt, stat.st_size, stat.st_mtime_ns))
    return files


def check_fields(files: Sequence[InputFile], config: BulkConfig) -> None:
    """Fail early, before the model loads, on settings no row of these files could satisfy."""
    for file in files:
        if file.format == "text" and config.id_field is not None:
            raise ConfigError(f"{file.path}: plain text rows have no fields, so --id-field "
                              f"{config.id_field!r} cannot apply; drop it (ids are then input positions)")
        if file.format == "csv":
            _CsvRows(file, config).header()


# ----------------------------------------------------------------------------------------------
# One reader per format: iterate (line, raw) for every row, parse(raw) -> (id, text) only when wanted.


class _LineRows:
    """Non-blank lines of a text file as (line number, raw bytes); tracks the bytes read."""

    def __init__(self, file: InputFile, config: BulkConfig):
        self.file, self.config = file, config
        self.bytes_read = 0

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        with open(self.file.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                self.bytes_read += len(raw)
                if number == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM):]
                if raw.strip():
                    yield number, raw

    def where(self, line: int) -> str:
        return f"{self.file.path}:{line}"

    def decode(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _RowProblem(f"not valid UTF-8: byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line; "
                              f"save the file as UTF-8") from None


class _RowProblem(Exception):
    """Why one row cannot be predicted (becomes a BadRow)."""


class _TextRows(_LineRows):
    def parse(self, raw: bytes) -> tuple[Any, str]:
        return None, self.decode(raw).rstrip("\r\n")


class _JsonRows(_LineRows):
    def parse(self, raw: bytes) -> tuple[Any, str]:
        return _json_fields(self.decode(raw), self.config)


def _json_fields(line: str, config: BulkConfig) -> tuple[Any, str]:
    """(id, text) of one JSON object."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _RowProblem(f"malformed JSON: {e.msg} at column {e.colno}; expected one JSON object per line") from None
    if not isinstance(obj, dict):
        raise _RowProblem(f"expected a JSON object with a {config.text_field!r} key, got {type(obj).__name__}")
    wanted = [config.text_field] + ([config.id_field] if config.id_field else [])
    missing = [k for k in wanted if k not in obj]
    if missing:
        raise _RowProblem(f"missing key {' and '.join(map(repr, missing))}; found keys: "
                          f"{', '.join(map(repr, list(obj)[:10])) or 'none'}")
    text = obj[config.text_field]
    if not isinstance(text, str):
        raise _RowProblem(f"{config.text_field!r} must be a string, got {type(text).__name__} {text!r:.40}")
    row_id = obj[config.id_field] if config.id_field else None
    if config.id_field and (isinstance(row_id, bool) or not isinstance(row_id, (str, int))):
        raise _RowProblem(f"{config.id_field!r} must be a string or an integer, got "
                          f"{type(row_id).__name__} {row_id!r:.40}")
    return row_id, text


class _CsvRows:
    """CSV records (a quoted field may span lines) as (first line, fields), after the header."""

    def __init__(self, file: InputFile, config: BulkConfig):
        self.file, self.config = file, config
        self.bytes_read = 0
        self._bad_lines: dict[int, str] = {}

    def where(self, line: int) -> str:
        return f"{self.file.path}:{line}"

    def _decoded_lines(self, f) -> Iterator[str]:
        for number, raw in enumerate(f, start=1):
            self.bytes_read += len(raw)
            if number == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                self._bad_lines[number] = (f"not valid UTF-8: byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                                           f"of the line; save the file as UTF-8")
                yield "\n"  # keeps csv's line count; the row is reported bad below

    def _records(self) -> Iterator[tuple[int, list[str] | str]]:
        """(first line, fields) per record, or (line, problem) for a malformed one; blank records skipped."""
        csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
        with open(self.file.path, "rb") as f:
            for start, end, fields, error in csv_records(self._decoded_lines(f)):
                if error is not None:
                    yield start, f"malformed CSV ({error}): quote fields that contain quotes, commas or newlines"
                    continue
                bad = next((n for n in range(start, end + 1) if n in self._bad_lines), None)
                if bad is not None:
                    yield bad, self._bad_lines.pop(bad)
                elif fields and not (len(fields) == 1 and not fields[0].strip()):
                    yield start, fields

    def header(self) -> tuple[list[str], int, int | None, Iterator[tuple[int, list[str] | str]]]:
        """(columns, text column, id column, the remaining records); DataError if the header lacks a field."""
        records = self._records()
        first = next(records, None)
        if first is None:
            raise DataError(f"{self.file.path}: file is empty; expected a header row naming a "
                            f"{self.config.text_field!r} column")
        line, fields = first
        if isinstance(fields, str):
            raise DataError(f"{self.where(line)}: header row: {fields}")
        columns = [name.strip() for name in fields]
        wanted = [self.config.text_field] + ([self.config.id_field] if self.config.id_field else [])
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise DataError(f"{self.where(line)}: header has no {' or '.join(map(repr, missing))} column; found "
                            f"columns: {', '.join(map(repr, columns))}; name the columns with --text-field "
                            f"(and --id-field)")
        id_col = columns.index(self.config.id_field) if self.config.id_field else None
        return columns, columns.index(self.config.text_field), id_col, records

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        columns, self._text_col, self._id_col, records = self.header()
        self._width = len(columns)
        self._columns = columns
        yield from records

    def parse(self, fields: list[str] | str) -> tuple[Any, str]:
        if isinstance(fields, str):
            raise _RowProblem(fields)
        if len(fields) != self._width:
            raise _RowProblem(f"{len(fields)} fields, expected {self._width} like the header "
                              f"({','.join(self._columns)}); quote fields that contain commas")
        return (fields[self._id_col] if self._id_col is not None else None), fields[self._text_col]


class _ArrayRecordRows:
    """Records of an ArrayRecord file as (record number, index); parse reads the record (random access)."""

    def __init__(self, file: InputFile, config: BulkConfig):
        self.file, self.config = file, config
        self.bytes_read = 0
        if file.size == 0:
            raise DataError(f"{file.path}: file is empty")
        try:
            self.source = grain.sources.ArrayRecordDataSource([file.path])
            self.length = len(self.source)
        except RuntimeError as e:  # the reader's only signal for a corrupt or foreign file
            raise DataError(f"{file.path}: not a readable ArrayRecord file ({e})") from e

    def where(self, record: int) -> str:
        return f"{self.file.path}:record {record}"

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        for index in range(self.length):
            self.bytes_read = self.file.size * (index + 1) // self.length
            yield index + 1, index

    def parse(self, index: int) -> tuple[Any, str]:
        record = self.source[index]
        try:
            line = record.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _RowProblem(f"not valid UTF-8: byte 0x{record[e.start]:02x} at byte {e.start + 1} "
                              f"of the record") from None
        return _json_fields(line, self.config)


_READERS = {"csv": _CsvRows, "jsonl": _JsonRows, "text": _TextRows, "array_record": _ArrayRecordRows}


# ----------------------------------------------------------------------------------------------
# Rows -> chunks -> a Grain pipeline


def iter_chunks(files: Sequence[InputFile], config: BulkConfig, wanted: Callable[[int], bool]) -> Iterator[Chunk]:
    """This process's chunks, in input order, then a final Chunk(total_rows=...) with no rows.

    A chunk is the wanted rows of one sort window (sort_window consecutive positions of one
    block); windows never cross a block, so a block's chunks are the same on every run.
    """
    position, bytes_before = 0, 0
    current: Chunk | None = None
    current_key = None
    for file in files:
        rows = _READERS[file.format](file, config)
        for line, raw in rows:
            block, offset = divmod(position, config.shard_rows)
            position += 1
            if not wanted(block):
                continue
            key = (block, offset // config.sort_window)
            if key != current_key:
                if current is not None:
                    yield current
                current, current_key = Chunk(block, [], [], [], []), key
            current.input_bytes = bytes_before + rows.bytes_read
            try:
                row_id, text = rows.parse(raw)
            except _RowProblem as e:
                current.bad.append(BadRow(position - 1, rows.where(line), str(e)))
                continue
            current.positions.append(position - 1)
            current.ids.append(position - 1 if config.id_field is None else row_id)
            current.texts.append(text)
            current.sources.append((rows.where, line))
        bytes_before += file.size
    if current is not None:
        yield current
    yield Chunk(block=-1, positions=[], ids=[], texts=[], bad=[], input_bytes=bytes_before, total_rows=position)


class ChunkDataset(grain.IterDataset):
    """iter_chunks as a Grain source; its iterator's state is the number of chunks it has produced."""

    def __init__(self, files: Sequence[InputFile], config: BulkConfig, wanted: Callable[[int], bool]):
        super().__init__()
        self.files, self.config, self.wanted = list(files), config, wanted

    def __iter__(self) -> "_ChunkIterator":
        return _ChunkIterator(self)


class _ChunkIterator(grain.DatasetIterator):
    def __init__(self, dataset: ChunkDataset):
        super().__init__()
        self._dataset = dataset
        self._restart(0)

    def _restart(self, produced: int) -> None:
        self._chunks = iter_chunks(self._dataset.files, self._dataset.config, self._dataset.wanted)
        self._produced = 0
        for _ in range(produced):  # chunks are deterministic: replaying reaches the same point
            next(self._chunks)
            self._produced += 1

    def __next__(self) -> Chunk:
        chunk = next(self._chunks)
        self._produced += 1
        return chunk

    def get_state(self) -> dict[str, int]:
        return {"chunks_produced": self._produced}

    def set_state(self, state: dict[str, int]) -> None:
        self._restart(int(state["chunks_produced"]))


class Tokenize:
    """Chunk -> Chunk with the token rows the model reads, by its rule (TextEncoder: max length and
    long_text: truncate, head_tail, or chunks, where a long text becomes several window rows).

    encode_batch runs in the `tokenizers` library's own thread pool, across every core, outside the
    GIL. A row becomes a BadRow if its text gives no token at all (attention would see nothing) or
    needs more than max_chunks windows under chunk_overflow=refuse.
    """

    def __init__(self, encoder: TextEncoder):
        self.encoder = encoder

    def __call__(self, chunk: Chunk) -> Chunk:
        if not chunk.texts:
            chunk.tokens, chunk.texts, chunk.sources = [], None, []
            chunk.windows = Windows([], np.zeros(0, np.int64), 0)
            return chunk
        try:
            windows, problems = self.encoder.windows(chunk.texts), {}
        except TextTooLongError:
            problems = self._refused(chunk.texts)
            keep = np.array([k not in problems for k in range(len(chunk.texts))])
            windows = self.encoder.windows([t for t, kept in zip(chunk.texts, keep) if kept])
            windows.owner = np.flatnonzero(keep)[windows.owner]  # back to the chunk's row numbers
            windows.num_texts = len(chunk.texts)
        tokens_per_row = np.bincount(windows.owner, weights=[len(r) for r in windows.rows],
                                     minlength=len(chunk.texts))
        problems.update({int(k): "the text gives no tokens" for k in np.flatnonzero(tokens_per_row == 0)
                         if k not in problems})
        if problems:
            chunk.bad.extend(BadRow(chunk.positions[k], chunk.sources[k][0](chunk.sources[k][1]), problem)
                             for k, problem in sorted(problems.items()))
            keep = np.array([k not in problems for k in range(len(chunk.texts))])
            windows = _keep_texts(windows, keep)
            chunk.positions = [p for p, kept in zip(chunk.positions, keep) if kept]
            chunk.ids = [i for i, kept in zip(chunk.ids, keep) if kept]
        chunk.tokens, chunk.windows, chunk.texts, chunk.sources = windows.rows, windows, None, []
        return chunk

    def _refused(self, texts: list[str]) -> dict[int, str]:
        """Which texts the chunks rule refuses (a rare case: each text is encoded alone to find them)."""
        problems = {}
        for k, text in enumerate(texts):
            try:
                self.encoder.windows([text])
            except TextTooLongError as e:
                problems[k] = str(e)
        return problems


def _keep_texts(windows: Windows, keep: np.ndarray) -> Windows:
    """The rows of the texts where `keep` (bool per text) is set, their texts renumbered 0, 1, ..."""
    row_kept = keep[windows.owner]
    renumbered = np.cumsum(keep) - 1
    return Windows([r for r, kept in zip(windows.rows, row_kept) if kept], renumbered[windows.owner[row_kept]],
                   int(keep.sum()), windows.special_tokens)


def chunk_stream(files: Sequence[InputFile], config: BulkConfig, encoder: TextEncoder,
                 wanted: Callable[[int], bool]) -> grain.IterDataset:
    """Read -> tokenize in a background thread, PREFETCH_CHUNKS chunks ahead of the caller."""
    tokenized = ChunkDataset(files, config, wanted).map(Tokenize(encoder))
    return grain.experimental.ThreadPrefetchIterDataset(tokenized, prefetch_buffer_size=PREFETCH_CHUNKS)
