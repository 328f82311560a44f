"""The original framework's training API (jaxclf.train.trainer): its README snippet runs, shrunk to seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import jaxclf
from jaxclf.config import ConfigError, ModelConfig
from jaxclf.train import data
from jaxclf.train.trainer import (EarlyStoppingCallback, TextClassificationDataset, Trainer, TrainerError,
                                  TrainingConfig, train_model)

ROOT = Path(__file__).resolve().parent.parent
EVAL_KEYS = {"eval_loss", "eval_accuracy", "eval_f1", "eval_precision", "eval_recall", "epoch"}


def test_the_seed_training_config_is_accepted_as_written():
    cfg = TrainingConfig(output_dir="./model-output", num_train_epochs=10, per_device_train_batch_size=16,
                         per_device_eval_batch_size=16, learning_rate=2e-5, warmup_steps=500, save_steps=1000,
                         logging_steps=100, eval_steps=500, gradient_checkpointing=True, fp16=True)
    assert (cfg.mixed_precision, cfg.fp16, cfg.gradient_checkpointing) == ("fp16", True, True)


@pytest.mark.slow  # fp16 with remat compiles slowly on CPU
def test_the_seed_training_snippet_runs(tmp_path, monkeypatch):
    """README "Training Custom Models", sizes shrunk; it reads the shipped sample data from the working directory."""
    monkeypatch.chdir(ROOT)
    from jaxclf.train import TrainingConfig, train_model  # the seed's `from src.train import ...`

    model_config = ModelConfig(
        vocab_size=10000,
        d_model=32,
        nhead=2,
        num_encoder_layers=1,
        dim_feedforward=64,
        max_position_embeddings=64,
        num_classes=3,
        dropout=0.1,
    )
    training_config = TrainingConfig(
        output_dir=str(tmp_path / "model-output"),
        num_train_epochs=10,
        max_steps=4,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        learning_rate=2e-5,
        warmup_steps=2,
        save_steps=2,
        logging_steps=2,
        eval_steps=2,
        gradient_checkpointing=True,
        fp16=True,
    )
    model, trainer = train_model(model_config=model_config, training_config=training_config)
    final = model.save_pretrained(tmp_path / "final-model")

    assert isinstance(model, jaxclf.TextClassifier)
    assert model.config.vocab_size == 10000  # honoured, not replaced by the tokenizer's size
    assert model.labels == ["negative", "neutral", "positive"]
    predictions = jaxclf.load(final).predict(["The food was wonderful.", "Cold soup, rude waiter."])
    assert [set(p) for p in predictions] == [{"label", "confidence", "probabilities"}] * 2
    assert all(p["label"] in model.labels and 0 < p["confidence"] <= 1 for p in predictions)
    metrics = trainer.evaluate()
    assert set(metrics) == EVAL_KEYS
    assert all(np.isfinite(v) for v in metrics.values())
    _, labels, _ = data.read_examples(training_config.train_file)
    train_rows = len(data.stratified_split(labels, training_config.eval_split, training_config.seed)[0])
    assert 0 <= metrics["eval_accuracy"] <= 1 and metrics["epoch"] == pytest.approx(4 * 16 / train_rows)
    assert json.loads((final / "config.json").read_text())["model"]["dtype"] == "float32"  # fp16 only in training


def test_texts_in_memory_train_and_evaluate_like_the_training_loop(tmp_path):
    """Trainer.evaluate() on the eval texts = the loop's own evaluation of the exported checkpoint."""
    texts, labels, _ = data.read_examples(ROOT / "data" / "sample_texts.csv")
    ids = {"negative": 0, "neutral": 1, "positive": 2}
    model_config = ModelConfig(d_model=32, nhead=2, num_encoder_layers=1, dim_feedforward=64,
                               max_position_embeddings=32, num_classes=3)
    training_config = TrainingConfig(output_dir=str(tmp_path / "run"), max_steps=6, eval_steps=3,
                                     per_device_train_batch_size=16, tokenizer_vocab_size=400, progress_bar=False)
    model, trainer = train_model(model_config, training_config, train_texts=texts[:200],
                                 train_labels=[ids[y] for y in labels[:200]], eval_texts=texts[200:],
                                 eval_labels=[ids[y] for y in labels[200:]])
    assert model.labels == ["0", "1", "2"]  # integer labels are class ids
    assert (tmp_path / "run" / "data" / "train.jsonl").is_file()
    exported = json.loads((tmp_path / "run" / "model" / "metrics.json").read_text())["eval"]
    metrics = trainer.evaluate()
    assert metrics["eval_accuracy"] == exported["accuracy"] and metrics["eval_f1"] == exported["macro_f1"]
    assert metrics["eval_precision"] == exported["macro_precision"]
    assert metrics["eval_loss"] == pytest.approx(exported["loss"], abs=1e-5)
    again = trainer.evaluate(TextClassificationDataset(texts[200:], [ids[y] for y in labels[200:]]))
    assert again == metrics


def test_dataset_items_and_bad_examples(sample_texts):
    tok = jaxclf.SimpleTokenizer(vocab_size=300).build_vocab(sample_texts)
    ds = TextClassificationDataset(["a lovely little cafe", "cold soup"], ["positive", "negative"],
                                   tokenizer=tok, max_length=16)
    assert len(ds) == 2 and ds.label_names == ("negative", "positive")
    item = ds[0]
    assert item["labels"] == 1 and item["text"] == "a lovely little cafe"
    assert item["input_ids"].shape == item["attention_mask"].shape == (16,)
    n = int(item["attention_mask"].sum())
    assert list(item["input_ids"][:n]) == tok.encode("a lovely little cafe") and not item["input_ids"][n:].any()
    assert TextClassificationDataset(["x"], [0])[-1] == {"text": "x", "labels": 0}
    with pytest.raises(data.DataError, match="example 1: text is empty"):
        TextClassificationDataset(["fine", "  "], ["a", "b"])
    with pytest.raises(data.DataError, match="all strings .* or all integers"):
        TextClassificationDataset(["fine", "good"], ["a", 1])
    with pytest.raises(data.DataError, match="2 texts but 1 labels"):
        TextClassificationDataset(["fine", "good"], ["a"])


def test_trainer_refuses_misuse_by_name(tmp_path):
    model_config, cfg = ModelConfig(), TrainingConfig(output_dir=str(tmp_path), eval_split=0)
    with pytest.raises(ConfigError, match="patience must be an integer >= 1"):
        EarlyStoppingCallback(patience=0)
    trainer = Trainer(model_config, cfg, callbacks=[EarlyStoppingCallback(patience=2, threshold=0.01)])
    assert (trainer.training_config.early_stopping_patience, trainer.training_config.early_stopping_threshold) == (2, 0.01)
    with pytest.raises(ConfigError, match="early stopping needs evaluation data"):
        trainer.train()
    with pytest.raises(TrainerError, match="call train"):
        trainer.evaluate()
    with pytest.raises(ConfigError, match="unsupported callback"):
        Trainer(model_config, cfg, callbacks=[object()])
    with pytest.raises(ConfigError, match="train_texts with train_labels"):
        train_model(model_config, cfg, train_texts=["a"])
