"""Distillation (train.distill_from): the loss, the teacher's logits and their cache, the settings' errors,
and a student that learns a teacher's predictions from its soft labels alone."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import jaxclf
from jaxclf.config import ConfigError, TrainingConfig
from jaxclf.train import batches, data, distill
from jaxclf.train.data import DataError
from jaxclf.train.loop import train
from jaxclf.train.prepare import prepare_data
from jaxclf.train.presets import get_preset
from jaxclf.train.step import cross_entropy, distillation_loss

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample_texts.csv"


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_distillation_loss_equals_its_formula_on_a_hand_case():
    student = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [-3.0, 4.0, 1.0]], np.float32)
    teacher = np.array([[1.0, 0.0, -1.0], [3.0, -2.0, 0.0], [0.0, 0.0, 5.0]], np.float32)
    labels = np.array([0, 2, 1], np.int32)
    has_label = np.array([1.0, 0.0, 1.0], np.float32)  # the second text is unlabelled: soft term only
    T, alpha = 2.5, 0.3
    p_t, p_s = _softmax(teacher / T), _softmax(student / T)
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(-1)
    ce = -np.log(_softmax(student)[np.arange(3), labels])
    expected = (1 - alpha) * ce * has_label + alpha * T ** 2 * kl

    got = np.asarray(distillation_loss(jnp.asarray(student), jnp.asarray(labels), jnp.asarray(teacher),
                                       jnp.asarray(has_label), T, alpha))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert got[1] == pytest.approx(alpha * T ** 2 * kl[1], rel=1e-5)
    # alpha=0 is plain cross-entropy; a student equal to its teacher has no soft loss
    np.testing.assert_allclose(distillation_loss(student, labels, teacher, np.ones(3), T, 0.0),
                               cross_entropy(jnp.asarray(student), jnp.asarray(labels)), rtol=1e-6)
    np.testing.assert_allclose(distillation_loss(teacher, labels, teacher, np.zeros(3), T, 1.0), 0.0, atol=1e-6)


@pytest.mark.parametrize("changes, field", [
    ({"distill_alpha": 1.5, "distill_from": "t"}, "distill_alpha must be in [0, 1], got 1.5"),
    ({"distill_alpha": -0.1, "distill_from": "t"}, "distill_alpha must be in [0, 1]"),
    ({"distill_temperature": 0.0, "distill_from": "t"}, "distill_temperature must be a number > 0, got 0.0"),
    ({"unlabeled_file": "more.txt"}, "unlabeled_file must be unset unless distill_from is set"),
    ({"unlabeled_file": "more.txt", "distill_from": "t", "distill_alpha": 0.0}, "and distill_alpha > 0"),
    ({"tokenizer_from": "t", "init_from": "m"}, "tokenizer_from must be unset with init_from"),
    ({"distill_augment": -1, "distill_from": "t"}, "distill_augment must be an integer >= 0"),
    ({"distill_augment": 2}, "distill_augment must be an integer >= 0, and 0 unless distill_from is set"),
])
def test_bad_distillation_settings_are_named(changes, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        TrainingConfig(**changes)


def test_cli_flags_and_overrides_combine():
    from jaxclf.cli.train import configs, parse_args
    _, cfg = configs(parse_args(["--config", "tiny", "--unlabeled", "more.txt", "train.distill_from=runs/t",
                                 "train.distill_alpha=0.7"]))
    assert (cfg.unlabeled_file, cfg.distill_from, cfg.distill_alpha) == ("more.txt", "runs/t", 0.7)


def _student_config(tmp_path: Path, **changes) -> TrainingConfig:
    _, cfg = get_preset("tiny")
    return cfg.replace(train_file=str(SAMPLE), output_dir=str(tmp_path / "run"), eval_split=0.0,
                       progress_bar=False, async_checkpointing=False, **changes)


def test_teacher_labels_must_match_by_name_and_are_mapped_when_reordered(tmp_path, tiny_model_dir):
    model, _ = get_preset("tiny")
    with pytest.raises(ConfigError, match=r"teacher's labels \['negative', 'neutral', 'positive'\] differ"):
        prepare_data(model, _student_config(tmp_path, distill_from=str(tiny_model_dir),
                                            labels=("negative", "neutral", "positive", "mixed")))
    with pytest.raises(ConfigError, match="distill_from='/nonexistent': model directory /nonexistent does not"):
        prepare_data(model, _student_config(tmp_path, distill_from="/nonexistent"))

    reordered = ("positive", "negative", "neutral")
    prepared = prepare_data(model, _student_config(tmp_path, distill_from=str(tiny_model_dir), labels=reordered))
    texts, labels, _ = data.read_examples(SAMPLE)
    teacher = jaxclf.load(tiny_model_dir).logits(texts)
    extras = prepared.train_ds.extras
    np.testing.assert_allclose(extras["teacher_logits"], teacher[:, [2, 0, 1]], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(extras["has_label"], np.ones(len(texts), np.float32))
    assert prepared.label_names == reordered
    assert list(prepared.train_ds.labels) == [reordered.index(y) for y in labels]
    assert not (tmp_path / "run").exists()  # preparing writes nothing: the cache is written by the run


def test_augmented_copies_are_seeded_perturbations_that_only_the_teacher_labels(tmp_path, tiny_model_dir):
    texts = [f"the {w} service was {q} today at the {p}" for w, q, p in
             zip(["slow", "kind", "rude", "fast"], ["bad", "fine", "awful", "great"], ["bank", "cafe", "shop", "gym"])]
    copies = distill.augment(texts, 3, seed=5)
    assert copies == distill.augment(texts, 3, seed=5) and copies != distill.augment(texts, 3, seed=6)
    assert len(copies) == 12 and all(c.strip() for c in copies)
    pool = {w for t in texts for w in t.split()}
    assert all(set(c.split()) <= pool for c in copies)  # words come from the training texts
    changed = sum(c != texts[i % 4] for i, c in enumerate(copies))
    assert changed >= 9, f"only {changed} of 12 copies differ from their text"
    assert distill.augment(texts, 0, seed=5) == [] and distill.augment([""], 2, seed=0) == []

    model, _ = get_preset("tiny")
    prepared = prepare_data(model, _student_config(tmp_path, distill_from=str(tiny_model_dir), distill_augment=2))
    n = len(data.read_examples(SAMPLE)[0])
    extras = prepared.train_ds.extras
    np.testing.assert_array_equal(extras["has_label"], np.r_[np.ones(n), np.zeros(2 * n)].astype(np.float32))
    assert extras["teacher_logits"].shape == (3 * n, 3)


def test_tokenizer_from_borrows_a_model_directory_s_tokenizer(tmp_path, tiny_model_dir):
    model, _ = get_preset("tiny")
    prepared = prepare_data(model, _student_config(tmp_path, tokenizer_from=str(tiny_model_dir)))
    teacher = jaxclf.load(tiny_model_dir)
    assert prepared.tokenizer.get_vocab() == teacher.tokenizer.get_vocab()
    assert prepared.config.vocab_size == teacher.tokenizer.get_vocab_size()
    with pytest.raises(ConfigError, match="tokenizer_from='/nonexistent': no such tokenizer.json"):
        prepare_data(model, _student_config(tmp_path, tokenizer_from="/nonexistent"))


def test_unlabeled_texts_are_read_from_text_csv_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first text\n\nsecond, with a comma\n", encoding="utf-8")
    (tmp_path / "b.csv").write_text('id,text\n1,"quoted, text"\n2,plain\n', encoding="utf-8")
    (tmp_path / "c.jsonl").write_text('{"text": "one", "label": "x"}\n{"text": "two"}\n', encoding="utf-8")
    assert distill.read_texts(tmp_path / "a.txt") == ["first text", "second, with a comma"]
    assert distill.read_texts(tmp_path / "b.csv") == ["quoted, text", "plain"]
    assert distill.read_texts(tmp_path / "c.jsonl") == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a JSON object with a string \"text\""):
        distill.read_texts(tmp_path / "bad.jsonl")
    assert distill.read_texts(tmp_path / "bad.jsonl", skip_bad=True) == ["ok"]
    (tmp_path / "bad.csv").write_text("label\nx\n", encoding="utf-8")
    with pytest.raises(DataError, match="bad.csv:1: header has no 'text' column"):
        distill.read_texts(tmp_path / "bad.csv")
    with pytest.raises(DataError, match="unsupported extension '.parquet'"):
        distill.read_texts(tmp_path / "x.parquet")


def test_batches_carry_per_example_teacher_logits_and_resume_exactly():
    rng = np.random.default_rng(0)
    sequences = [list(range(1, 2 + k % 5)) for k in range(20)]
    extras = {"teacher_logits": rng.normal(size=(20, 3)).astype(np.float32),
              "has_label": (np.arange(20) % 2).astype(np.float32)}
    ds = batches.TokenizedDataset.from_sequences(sequences, np.arange(20) % 3, extras=extras)
    stream = batches.train_batches(ds, global_batch_size=4, seed=3, buckets=(4, 8), pad_id=0)
    first = next(stream)
    assert first["teacher_logits"].shape == (4, 3) and first["teacher_logits"].dtype == np.float32
    for row in range(4):  # each row's teacher logits are its own example's
        k = next(i for i, seq in enumerate(sequences) if first["input_ids"][row, :len(seq)].tolist() == seq
                 and first["attention_mask"][row].sum() == len(seq)
                 and np.array_equal(extras["teacher_logits"][i], first["teacher_logits"][row]))
        assert first["has_label"][row] == extras["has_label"][k] and first["labels"][row] == k % 3
    state = stream.get_state()
    expected = [next(stream) for _ in range(3)]
    resumed = batches.train_batches(ds, global_batch_size=4, seed=3, buckets=(4, 8), pad_id=0)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    last = list(batches.eval_batches(ds, global_batch_size=8, buckets=(4, 8), pad_id=0))[-1]
    np.testing.assert_array_equal(last["weights"], [1, 1, 1, 1, 0, 0, 0, 0])  # padding rows: zeros
    np.testing.assert_array_equal(last["teacher_logits"][4:], 0.0)


# ------------------------------------------------------------------------------------------------
# A student learning a teacher


KEYWORDS = {"sport": ["match", "goal", "team"], "money": ["bank", "price", "market"],
            "weather": ["rain", "wind", "storm"]}
FILLER = "the a of on in to and with for was is it this that very some more".split()


def _keyword_texts(n_per_label: int, seed: int) -> tuple[list[str], list[str]]:
    """Texts of filler words with one class keyword each: separable, and learnt in a few dozen steps."""
    rng = random.Random(seed)
    texts, labels = [], []
    for label in KEYWORDS:
        for _ in range(n_per_label):
            words = [rng.choice(FILLER) for _ in range(rng.randint(4, 8))]
            words.insert(rng.randrange(len(words) + 1), rng.choice(KEYWORDS[label]))
            texts.append(" ".join(words))
            labels.append(label)
    return texts, labels


TRAIN = dict(eval_split=0.0, progress_bar=False, async_checkpointing=False, save_steps=1000,
             logging_steps=1000, per_device_train_batch_size=16, learning_rate=3e-3, warmup_steps=2)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A tiny model trained on the keyword texts, with a smaller tokenizer than its students'."""
    out = tmp_path_factory.mktemp("teacher")
    texts, labels = _keyword_texts(40, seed=0)
    data.write_jsonl(out / "train.jsonl", texts, labels)
    model, cfg = get_preset("tiny")
    result = train(model, cfg.replace(train_file=str(out / "train.jsonl"), output_dir=str(out / "run"),
                                      max_steps=60, tokenizer_vocab_size=60, **TRAIN))
    return result.model_dir


def test_student_learns_the_teacher_s_predictions_from_soft_labels_alone(tmp_path, teacher_dir, monkeypatch,
                                                                         caplog):
    texts, _ = _keyword_texts(16, seed=1)  # texts the teacher never saw
    labelled, unlabelled = texts[::2], texts[1::2]
    # Every hard label says "sport": with alpha=1 they do not count, so all the student knows is the teacher's.
    data.write_jsonl(tmp_path / "train.jsonl", labelled, ["sport"] * len(labelled))
    (tmp_path / "more.txt").write_text("\n".join(unlabelled) + "\n", encoding="utf-8")
    model, cfg = get_preset("tiny")
    model = model.replace(dropout=0.0)
    # After 60 steps the teacher is right but unsure (probabilities near 1/3): a low temperature makes
    # its preferences plain to the student.
    cfg = cfg.replace(train_file=str(tmp_path / "train.jsonl"), output_dir=str(tmp_path / "student"),
                      distill_from=str(teacher_dir), distill_alpha=1.0, distill_temperature=0.1,
                      unlabeled_file=str(tmp_path / "more.txt"), max_steps=60, seed=7, **TRAIN)
    cfg = cfg.replace(learning_rate=1e-2)
    result = train(model, cfg)

    teacher_says = [p["label"] for p in jaxclf.load(teacher_dir).predict(texts)]
    student = jaxclf.load(result.model_dir)
    student_says = [p["label"] for p in student.predict(texts)]
    assert len(set(teacher_says)) == 3  # the teacher tells the classes apart: agreement is not trivial
    agreement = np.mean([a == b for a, b in zip(teacher_says, student_says)])
    assert agreement >= 0.9, f"student agrees with its teacher on {agreement:.0%} of its training texts"
    assert student.tokenizer.get_vocab() != jaxclf.load(teacher_dir).tokenizer.get_vocab()  # its own tokenizer

    summary = json.loads((result.model_dir / "metrics.json").read_text())["distillation"]
    teacher_hash = distill.fingerprint([teacher_dir / f for f in ("config.json", "model.safetensors",
                                                                   "tokenizer.json")])
    assert summary == {"teacher": str(teacher_dir), "teacher_sha256": teacher_hash, "temperature": 0.1,
                       "alpha": 1.0, "unlabeled_file": str(tmp_path / "more.txt"), "unlabeled_texts": 24,
                       "augmented_copies_per_text": 0, "labelled_texts": 24, "teacher_logits": "computed"}
    # One cache file for the labelled texts, one for the unlabelled file's.
    assert len(list((tmp_path / "student" / distill.CACHE_DIR).glob("*.npy"))) == 2

    # The same command again reads the teacher's logits back: the teacher is never loaded.
    def no_teacher(path):
        raise AssertionError(f"the teacher {path} was run again")
    monkeypatch.setattr("jaxclf.classifier.load", no_teacher)
    with caplog.at_level(logging.INFO, logger="jaxclf.train.distill"):
        again = train(model, cfg)
    assert "teacher logits: cached" in caplog.text
    assert json.loads((again.model_dir / "metrics.json").read_text())["distillation"]["teacher_logits"] == "cached"


def test_new_extra_texts_leave_the_labelled_texts_logits_cached(tmp_path, tiny_model_dir, monkeypatch):
    """Adding augmented copies runs the teacher on the copies only: the labelled texts' logits are read back."""
    model, _ = get_preset("tiny")
    cfg = _student_config(tmp_path, distill_from=str(tiny_model_dir))
    first = prepare_data(model, cfg)
    first.distillation.save_cache()
    seen = []
    real_load = jaxclf.classifier.load

    def counting_load(path):
        clf = real_load(path)
        real_logits = clf.logits
        clf.logits = lambda texts, **kw: seen.append(len(texts)) or real_logits(texts, **kw)
        return clf
    monkeypatch.setattr("jaxclf.classifier.load", counting_load)
    again = prepare_data(model, cfg.replace(distill_augment=1))
    n = len(data.read_examples(SAMPLE)[0])
    assert seen == [n]  # the copies only
    np.testing.assert_array_equal(again.train_ds.extras["teacher_logits"][:n],
                                  first.train_ds.extras["teacher_logits"])
