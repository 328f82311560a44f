"""Labelled example files: read them (CSV, JSON Lines, ArrayRecord), write them, and split them.

    texts, labels, report = read_examples("data/train.csv")    # bad rows: a DataError naming file:line
    vocab = label_vocabulary(labels)
    ids = label_ids(labels, vocab, report.path, lines=report.lines)
    train_rows, eval_rows = stratified_split(labels, 0.2, seed=0)

Tokenizing and batching what is read is jaxclf.train.batches.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from jaxclf.errors import JaxclfError

logger = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".array_record": "array_record",
           ".arrayrecord": "array_record"}
_BOM = b"\xef\xbb\xbf"


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
