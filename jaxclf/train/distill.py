"""Distillation: train a student on a teacher model's soft labels (TrainingConfig.distill_*).

    jaxclf train --config tiny train.distill_from=runs/teacher/model --unlabeled extra.txt

The teacher is any jaxclf model directory. Its logits for every training text (the labelled ones,
then the unlabelled ones of `unlabeled_file`, then `distill_augment` perturbed copies of the labelled
ones, see `augment`) are computed once, with `jaxclf.load(teacher).logits`:
the teacher's own tokenizer, long-text rule and calibration temperature, whatever the student's
tokenizer. They are cached next to the run, OUTPUT/teacher_logits/<key>.npy, keyed by a hash of the
teacher's files and of the texts (one file for the labelled texts, one for each set of extra texts),
so a resumed or repeated run reads them back instead of running the teacher again. The teacher's
columns are mapped to the student's labels by name.

They travel with the data: each training example carries "teacher_logits" (C,) float32 and
"has_label" (1.0, or 0.0 for an unlabelled text, whose label id 0 is a placeholder) in
TokenizedDataset.extras, so they are shuffled, batched, sharded (like the labels) and checkpointed
with the Grain iterator as everything else. The loss is jaxclf.train.step.distillation_loss.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxclf import model_dir
from jaxclf.config import ConfigError, TrainingConfig
from jaxclf.train import data
from jaxclf.train.data import DataError

log = logging.getLogger(__name__)

CACHE_DIR = "teacher_logits"  # OUTPUT/teacher_logits/<key>.npy
TEXT_FORMATS = (".txt", ".csv", ".jsonl", ".json")


# ----------------------------------------------------------------------------------------------
# Unlabelled texts


def read_texts(path: str | os.PathLike, *, skip_bad: bool = False) -> list[str]:
    """Texts without labels: .txt (one text a line, blank lines ignored), .csv with a `text` column,
    or .jsonl/.json with one {"text": ...} object a line (other columns and keys, a label included,
    are ignored). A bad row raises DataError `file:line: problem`, or with skip_bad is left out."""
    path = str(path)
    suffix = data.data_file_suffix(path, TEXT_FORMATS, " for unlabelled texts")
    raw, bom = data._read_bytes(path)
    lines, undecodable = data._decode_lines(raw, bom)
    rows = {".txt": _txt_rows, ".csv": _csv_rows}.get(suffix, _jsonl_rows)(path, lines, undecodable)
    texts, skipped = [], []
    for line, text, problem in rows:
        if problem is None and not text.strip():
            problem = "text is empty"
        if problem is not None:
            if not skip_bad:
                raise DataError(f"{path}:{line}: {problem}")
            skipped.append(f"{path}:{line}: {problem}")
            continue
        texts.append(text)
    if skipped:
        log.warning("%s: skipped %d bad row(s), kept %d; first: %s", path, len(skipped), len(texts), skipped[0])
    if not texts:
        raise DataError(f"{path}: no texts")
    return texts


def _txt_rows(path, lines, undecodable):
    for number, line in enumerate(lines, start=1):
        if number in undecodable:
            yield number, None, undecodable[number]
        elif line.strip():
            yield number, line.rstrip("\r\n"), None


def _csv_rows(path, lines, undecodable):
    text_col, width = -1, 0
    for start, end, fields, error in data.csv_records(lines):
        bad = next((undecodable[n] for n in range(start, end + 1) if n in undecodable), None)
        if error is not None or bad is not None:
            if text_col < 0:
                raise DataError(f"{path}:{start}: header row: {bad or f'malformed CSV ({error})'}")
            yield start, None, bad or f"malformed CSV ({error})"
        elif not fields or (len(fields) == 1 and not fields[0].strip()):
            continue  # a blank line
        elif text_col < 0:
            header = [name.strip() for name in fields]
            if "text" not in header:
                raise DataError(f"{path}:{start}: header has no 'text' column; found columns: "
                                f"{', '.join(map(repr, header))}")
            text_col, width = header.index("text"), len(header)
        elif len(fields) != width:
            yield start, None, f"{len(fields)} fields, expected {width} like the header; quote fields that contain commas"
        else:
            yield start, fields[text_col], None


def _jsonl_rows(path, lines, undecodable):
    for number, line in enumerate(lines, start=1):
        if number in undecodable:
            yield number, None, undecodable[number]
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield number, None, f"malformed JSON: {e.msg} at column {e.colno}"
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            yield number, None, 'expected a JSON object with a string "text"'
            continue
        yield number, obj["text"], None


# ----------------------------------------------------------------------------------------------
# A transfer set made from the training texts


# Per word of a copy: dropped, or replaced by a word drawn from all training texts; and the share of
# copies whose second half is another text's (a mixed text the teacher labels softly). TinyBERT
# (Jiao et al. 2020) grows its transfer set the same way, with BERT-predicted replacements.
AUGMENT_DROP, AUGMENT_REPLACE, AUGMENT_SPLICE = 0.1, 0.1, 0.25


def augment(texts: Sequence[str], copies: int, seed: int) -> list[str]:
    """`copies` perturbed versions of every text (all first copies, then all second ones, ...), seeded.

    A copy keeps each word with probability 1 - AUGMENT_DROP - AUGMENT_REPLACE, replaces it with a word
    drawn from the texts' own words, or drops it; AUGMENT_SPLICE of the copies then take their second
    half from another text's second half. Words are whitespace-separated; a copy is never empty.
    """
    rng = np.random.default_rng(seed)
    words = [t.split() for t in texts]
    pool = [w for ws in words for w in ws]
    if not pool:
        return []
    out = []
    for _ in range(copies):
        for i, ws in enumerate(words):
            fate = rng.random(len(ws))
            new = [pool[rng.integers(len(pool))] if f < AUGMENT_REPLACE else w
                   for w, f in zip(ws, fate) if f < AUGMENT_REPLACE or f >= AUGMENT_REPLACE + AUGMENT_DROP]
            if rng.random() < AUGMENT_SPLICE and len(words) > 1:
                other = words[(i + 1 + rng.integers(len(words) - 1)) % len(words)]
                new = new[:len(new) // 2] + other[len(other) // 2:]
            out.append(" ".join(new) if new else pool[rng.integers(len(pool))])
    return out


# ----------------------------------------------------------------------------------------------
# The teacher


def fingerprint(paths: Sequence[Path]) -> str:
    """sha256 over the files' names and contents."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            file_hash = hashlib.file_digest(f, "sha256").hexdigest()
        digest.update(f"{path.name}:{file_hash}\n".encode())
    return digest.hexdigest()


def texts_fingerprint(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode("utf-8")).hexdigest()


def _teacher_dir(path: str) -> tuple[Path, tuple[str, ...]]:
    """(directory, the teacher's labels); ConfigError naming distill_from if it is not a model directory."""
    try:
        d = model_dir.check_files(path)
        return d, tuple(model_dir.read_config(d).id2label)
    except model_dir.ModelDirectoryError as e:
        raise ConfigError(f"distill_from={path!r}: {e}") from None


def teacher_labels(path: str) -> tuple[str, ...]:
    """The teacher's label names in its column order: a distilling student's labels unless given."""
    return _teacher_dir(path)[1]


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A teacher model directory, checked against the student's labels."""

    path: str
    sha256: str  # of its config.json, model.safetensors and tokenizer.json
    labels: tuple[str, ...]  # the teacher's, in its column order
    columns: tuple[int, ...]  # teacher column of each student label

    @classmethod
    def open(cls, path: str, student_labels: Sequence[str]) -> "Teacher":
        """Check the directory and map its labels onto the student's by name (ConfigError if they differ)."""
        d, teacher = _teacher_dir(path)
        student = tuple(student_labels)
        if sorted(teacher) != sorted(student):
            missing, extra = sorted(set(student) - set(teacher)), sorted(set(teacher) - set(student))
            raise ConfigError(
                f"distill_from={path!r}: the teacher's labels {list(teacher)} differ from the student's "
                f"{list(student)} (the teacher lacks {missing}, has {extra} more); labels are matched by "
                f"name, so both need the same set")
        if teacher != student:
            log.info("teacher labels %s mapped by name onto the student's %s", list(teacher), list(student))
        files = [d / name for name in (model_dir.CONFIG_FILE, model_dir.WEIGHTS_FILE, model_dir.TOKENIZER_FILE)]
        return cls(str(path), fingerprint(files), teacher, tuple(teacher.index(name) for name in student))

    @functools.cached_property
    def classifier(self):
        """The teacher, loaded on first use (once for every part of the texts; never when all are cached)."""
        from jaxclf.classifier import load  # JAX is loaded by the run already; keep this module light to import
        return load(self.path)

    def logits(self, texts: Sequence[str], cache_dir: Path, batch_size: int) -> tuple[np.ndarray, Path, bool]:
        """(logits (N, C) float32 in the teacher's columns, cache file, whether it came from the cache).

        Does not write: `save` stores a computed array once the run may write (after validation).
        """
        key = hashlib.sha256(f"{self.sha256}\n{texts_fingerprint(texts)}".encode()).hexdigest()[:32]
        cache = cache_dir / f"{key}.npy"
        cached = _read_cache(cache, (len(texts), len(self.labels)))
        if cached is not None:
            log.info("teacher logits: cached (%s, %d texts)", cache, len(texts))
            return cached, cache, True
        start = time.perf_counter()
        order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths batch with less padding
        sorted_logits = self.classifier.logits([texts[i] for i in order], batch_size=batch_size)
        logits = np.empty_like(sorted_logits)
        logits[order] = sorted_logits
        if not np.isfinite(logits).all():
            raise ConfigError(f"distill_from={self.path!r}: the teacher gives non-finite logits")
        log.info("teacher logits: computed for %d texts in %.1f s", len(texts), time.perf_counter() - start)
        return logits.astype(np.float32), cache, False


def _read_cache(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """The cached array if it is there and sound (shape, float32, finite), else None (recomputed)."""
    if not path.is_file():
        return None
    try:
        array = np.load(path, allow_pickle=False)  # plain .npy: loading runs no code
    except (OSError, ValueError) as e:
        log.warning("teacher logits cache %s unreadable (%s); recomputing", path, e)
        return None
    if array.shape != shape or array.dtype != np.float32 or not np.isfinite(array).all():
        log.warning("teacher logits cache %s holds %s %s, expected %s float32; recomputing",
                    path, array.dtype, array.shape, shape)
        return None
    return array


def save(path: Path, logits: np.ndarray) -> None:
    """Write the array atomically (a unique temporary file, then rename: concurrent writers are safe)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, logits, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------
# A run's distillation data


@dataclasses.dataclass
class Distillation:
    """The training texts a distilling run reads (labelled, then unlabelled) and their teacher logits."""

    teacher: Teacher
    cfg: TrainingConfig
    parts: list[list[str]]  # the labelled training texts, the unlabelled file's, the augmented copies
    label_ids: np.ndarray  # (N,) int32; 0 (a placeholder) for the unlabelled texts
    has_label: np.ndarray  # (N,) float32: 1.0 labelled, 0.0 unlabelled
    teacher_logits: np.ndarray | None = None  # (N, C) float32 in the student's label order, once computed
    # Per non-empty part, cached on its own (changing the extra texts keeps the labelled texts' logits):
    # (logits in the teacher's column order, cache file, whether it came from the cache).
    computed: list[tuple[np.ndarray, Path, bool]] = dataclasses.field(default_factory=list)

    @property
    def texts(self) -> list[str]:
        return [t for part in self.parts for t in part]

    @property
    def from_cache(self) -> bool:
        return all(cached for _, _, cached in self.computed)

    @property
    def num_unlabeled(self) -> int:
        return int((self.has_label == 0).sum())

    def compute(self, batch_size: int) -> dict[str, np.ndarray]:
        """Run (or read back) the teacher; returns the per-example arrays for TokenizedDataset.extras."""
        if self.teacher_logits is None:
            cache_dir = Path(self.cfg.output_dir) / CACHE_DIR
            self.computed = [self.teacher.logits(part, cache_dir, batch_size) for part in self.parts if part]
            raw = np.concatenate([logits for logits, _, _ in self.computed])
            self.teacher_logits = np.ascontiguousarray(raw[:, list(self.teacher.columns)])
        return {"teacher_logits": self.teacher_logits, "has_label": self.has_label}

    def save_cache(self) -> None:
        """Store freshly computed logits (the run calls this once it may write to its output directory)."""
        for logits, path, cached in self.computed:
            if not cached:
                save(path, logits)

    def summary(self) -> dict:
        """What metrics.json records about the distillation."""
        return {"teacher": self.teacher.path, "teacher_sha256": self.teacher.sha256,
                "temperature": self.cfg.distill_temperature, "alpha": self.cfg.distill_alpha,
                "unlabeled_file": self.cfg.unlabeled_file, "unlabeled_texts": self.num_unlabeled,
                "augmented_copies_per_text": self.cfg.distill_augment,
                "labelled_texts": len(self.texts) - self.num_unlabeled,
                "teacher_logits": "cached" if self.from_cache else "computed"}


def prepare(cfg: TrainingConfig, label_names: Sequence[str], texts: Sequence[str],
            label_ids: np.ndarray) -> Distillation:
    """Check the teacher against the student's labels and add the unlabelled texts; the teacher runs later."""
    teacher = Teacher.open(cfg.distill_from, label_names)
    unlabeled = read_texts(cfg.unlabeled_file, skip_bad=cfg.skip_bad_rows) if cfg.unlabeled_file else []
    copies = augment(texts, cfg.distill_augment, cfg.seed)
    log.info("distilling from %s (T=%g, alpha=%g): %d labelled + %d unlabelled texts + %d augmented copies",
             cfg.distill_from, cfg.distill_temperature, cfg.distill_alpha, len(texts), len(unlabeled), len(copies))
    extra = len(unlabeled) + len(copies)
    return Distillation(
        teacher, cfg, [list(texts), unlabeled, copies],
        np.concatenate([np.asarray(label_ids, np.int32), np.zeros(extra, np.int32)]),
        np.concatenate([np.ones(len(texts), np.float32), np.zeros(extra, np.float32)]))
