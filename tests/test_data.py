"""jaxclf.train.data: reading and checking example files (CSV, JSON Lines, ArrayRecord), labels, splits."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from jaxclf.train import data

SAMPLE_CSV = Path(__file__).resolve().parents[1] / "data" / "sample_texts.csv"


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


# ------------------------------------------------------------------------------------------------
# Reading files

BAD_INPUTS = [
    # (file name, content, line in the message or None, words of the problem)
    ("train.csv", "", None, "file is empty"),
    ("train.csv", "text,label\n", None, "no rows after the header"),
    ("train.csv", "text,sentiment\nhi,pos\n", 1, "no 'label' column; found columns: 'text', 'sentiment'"),
    ("train.csv", "text,label\na,b,c\n", 2, "3 fields, expected 2"),
    ("train.csv", 'text,label\n"   ",positive\n', 2, "text is empty"),
    ("train.csv", "text,label\nhello,\n", 2, "label is empty"),
    ("train.csv", "text,label\n\nhello,  \n", 3, "label is empty"),  # blank lines still count
    ("train.csv", 'text,label\n"two\nlines",positive\n,negative\n', 4, "text is empty"),
    ("train.csv", b"text,label\nok,positive\ncaf\xe9,positive\n", 3, "not valid UTF-8: byte 0xe9 at byte offset 26"),
    ("train.csv", b"\xef\xbb\xbftext,label\ncaf\xe9,positive\n", 2, "byte 0xe9 at byte offset 17"),
    ("train.csv", 'text,label\n"open,positive\nnext,negative\n', 2, "malformed CSV (unexpected end of data)"),
    ("train.csv", 'text,label\n"bad"x,positive\n', 2, "malformed CSV"),
    ("train.jsonl", '{"text": "a", "label": "b"}\n{"text": "a",\n', 2, "malformed JSON"),
    ("train.jsonl", "[1, 2]\n", 1, "expected a JSON object"),
    ("train.json", '{"text": 5, "label": "x"}\n', 1, "'text' must be a string, got int"),
    ("train.jsonl", '{"text": "a", "label": 1.5}\n', 1, "'label' must be a string or an integer, got float"),
    ("train.jsonl", '{"text": "a", "label": true}\n', 1, "'label' must be a string or an integer, got bool"),
    ("train.jsonl", '{"text": "a"}\n', 1, "missing key 'label'"),
    ("train.jsonl", '\n{"text": "a", "label": " "}\n', 2, "label is empty"),
    ("train.jsonl", b'{"text": "ok", "label": "x"}\n{"text": "\xff", "label": "x"}\n', 2,
     "byte 0xff at byte offset 39"),
    ("train.txt", "text,label\n", None, "unsupported extension '.txt'; accepted: .csv, .jsonl, .json"),
]


@pytest.mark.parametrize("name,content,line,problem", BAD_INPUTS)
def test_bad_input_names_file_line_and_problem(tmp_path, name, content, line, problem):
    path = write(tmp_path, name, content)
    with pytest.raises(data.DataError) as info:
        data.read_examples(path)
    message = str(info.value)
    assert str(path) + (f":{line}:" if line else ":") in message
    assert problem in message


def test_missing_file(tmp_path):
    with pytest.raises(data.DataError, match="nothere.csv: file not found"):
        data.read_examples(tmp_path / "nothere.csv")


def test_bad_array_records_name_the_record(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter
    path = tmp_path / "train.array_record"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for record in [b'{"text": "fine", "label": "a"}', b'{"text": "x\xff", "label": "a"}',
                   b'{"text": "", "label": "a"}']:
        writer.write(record)
    writer.close()
    bad_record = r"train.array_record:record 2: not valid UTF-8: byte 0xff at byte offset 11"
    with pytest.raises(data.DataError, match=bad_record):
        data.read_examples(path)
    texts, labels, report = data.read_examples(path, skip_bad=True)
    assert texts == ["fine"] and report.rows == 1
    assert report.skipped[1].endswith("train.array_record:record 3: text is empty")
    assert issubclass(data.DataError, ValueError)


def test_not_an_array_record_file(tmp_path):
    with pytest.raises(data.DataError, match="train.array_record: file is empty"):
        data.read_examples(write(tmp_path, "train.array_record", b""))


def test_skip_bad_counts_lists_and_warns_once(tmp_path, caplog):
    path = write(tmp_path, "train.csv", b"text,label\ngood one,positive\n,negative\ncaf\xe9,neutral\n"
                                        b"a,b,c\nanother good,negative\n")
    with caplog.at_level(logging.WARNING, logger="jaxclf.train.data"):
        texts, labels, report = data.read_examples(path, skip_bad=True)
    assert texts == ["good one", "another good"] and labels == ["positive", "negative"]
    assert report.rows == 2 and report.lines == [2, 6] and report.path == str(path)
    assert [s.split(": ")[0] for s in report.skipped] == [f"{path}:3", f"{path}:4", f"{path}:5"]
    assert "text is empty" in report.skipped[0] and "not valid UTF-8" in report.skipped[1]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 3 bad row(s), kept 2" in warnings[0].getMessage()


def test_skip_bad_with_nothing_left_is_an_error(tmp_path):
    with pytest.raises(data.DataError, match=r"no valid rows \(2 skipped"):
        data.read_examples(write(tmp_path, "train.csv", "text,label\n,a\nb,\n"), skip_bad=True)


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_csv_quotes_commas_bom_and_extra_columns(tmp_path, newline):
    rows = ['text,label,source', '"Hello, world",positive,x', '"She said ""hi""",neutral,y',
            '"two\nlines", negative ,z']
    path = write(tmp_path, "train.csv", "\ufeff" + newline.join(rows) + newline)
    texts, labels, report = data.read_examples(path)
    assert texts == ["Hello, world", 'She said "hi"', "two\nlines"]
    assert labels == ["positive", "neutral", "negative"]
    assert report.rows == 3 and report.lines == [2, 3, 4] and report.skipped == []


def test_sample_csv_jsonl_and_array_record_agree(tmp_path):
    texts, labels, report = data.read_examples(SAMPLE_CSV)
    assert report.rows == len(texts) == 1092 and set(labels) == {"negative", "neutral", "positive"}
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": l, "id": k}) + "\n"
                             for k, (t, l) in enumerate(zip(texts, labels))), encoding="utf-8")
    records = tmp_path / "train.array_record"
    data.write_array_record(records, texts, labels)
    for path in (jsonl, records):
        other_texts, other_labels, other_report = data.read_examples(path)
        assert (other_texts, other_labels) == (texts, labels)
        assert other_report.lines == list(range(1, 1093))


def test_integer_labels_become_strings(tmp_path):
    path = write(tmp_path, "train.jsonl", '{"text": "a", "label": 3}\n{"text": "b", "label": "0"}\n')
    assert data.read_examples(path)[1] == ["3", "0"]


# ------------------------------------------------------------------------------------------------
# Labels


def test_label_vocabulary():
    assert data.label_vocabulary(["b", "a", "b", "c"]) == ("a", "b", "c")
    assert data.label_vocabulary(["b"], given=["z", "b"]) == ("z", "b")
    with pytest.raises(ValueError, match="repeated: 'a'"):
        data.label_vocabulary([], given=["a", "b", "a"])
    with pytest.raises(ValueError, match="non-empty"):
        data.label_vocabulary([], given=["a", " "])


def test_label_ids_and_unknown_eval_label(tmp_path):
    vocab = ("negative", "neutral", "positive")
    np.testing.assert_array_equal(data.label_ids(["positive", "negative"], vocab, "x.csv"), [2, 0])
    assert data.label_ids(["neutral"], vocab, "x.csv").dtype == np.int32
    path = write(tmp_path, "eval.csv", "text,label\nfine,positive\n\nso so,mixed\nmeh,mixed\nwhat,??\n")
    texts, labels, report = data.read_examples(path)
    with pytest.raises(data.DataError) as info:
        data.label_ids(labels, vocab, report.path, lines=report.lines)
    message = str(info.value)
    assert str(path) in message
    assert "'mixed' (first at line 4, 2 rows)" in message and "'??' (first at line 6, 1 row)" in message
    assert "known labels: 'negative', 'neutral', 'positive'" in message
    with pytest.raises(data.DataError, match=r"'mixed' \(first at example 2"):
        data.label_ids(labels, vocab, report.path)
