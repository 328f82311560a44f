"""The original framework's training API, over jaxclf's training loop (jaxclf.train.loop.train).

    from jaxclf import ModelConfig
    from jaxclf.train import TrainingConfig, train_model

    model_config = ModelConfig(vocab_size=10000, d_model=256, nhead=8, num_encoder_layers=6, num_classes=3)
    training_config = TrainingConfig(output_dir="./model-output", num_train_epochs=10, fp16=True)
    model, trainer = train_model(model_config=model_config, training_config=training_config)
    model.save_pretrained("./final-model")      # a model directory (jaxclf.load, torch_ref.load, the server)
    trainer.evaluate()                          # {"eval_loss", "eval_accuracy", "eval_f1", ..., "epoch"}

Texts in memory train the same way as a file: `train_model(..., train_texts=[...], train_labels=[...])`,
or `Trainer(..., train_dataset=TextClassificationDataset(texts, labels))`. They are written to
OUTPUT/data/{train,eval}.jsonl, so the run stays resumable and its metrics.json names what it read.
Integer labels are class ids: class k is named "k", and the model has max(num_classes, largest id + 1)
outputs. String labels are named as given, in sorted order (or TrainingConfig.labels' order).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tokenizers import Tokenizer

from jaxclf import tokenizer as tokenization
from jaxclf.classifier import TextClassifier, load
from jaxclf.config import ConfigError, ModelConfig, TrainingConfig
from jaxclf.errors import JaxclfError
from jaxclf.train import data
from jaxclf.train.evaluate import evaluate_classifier
from jaxclf.train.loop import TrainResult, train
from jaxclf.train.prepare import load_splits

log = logging.getLogger(__name__)

__all__ = ["TrainingConfig", "TextClassificationDataset", "EarlyStoppingCallback", "Trainer", "train_model"]


class TrainerError(JaxclfError, RuntimeError):
    """A Trainer method called out of order (evaluate or save_model before train), or without data."""


class TextClassificationDataset:
    """Labelled texts for the Trainer: `len(ds)`, and `ds[i]` a dict.

    ds[i] = {"text": str, "labels": int class id}, plus, when a tokenizer is given,
    "input_ids" and "attention_mask": int32 (max_length,), right-padded, [CLS] ... [SEP] truncated
    to max_length. `tokenizer` is a tokenizers.Tokenizer or a jaxclf SimpleTokenizer; the Trainer
    then trains with it instead of training a BPE tokenizer on the texts.
    Labels are strings (class names) or integers (class ids), not a mix; every text must be a
    non-empty string. A bad example is a DataError naming its index.
    """

    def __init__(self, texts: Sequence[str], labels: Sequence[str | int], tokenizer: Any = None,
                 max_length: int = 128):
        texts, labels = list(texts), list(labels)
        if len(texts) != len(labels):
            raise data.DataError(f"{len(texts)} texts but {len(labels)} labels")
        if not texts:
            raise data.DataError("no examples: texts is empty")
        self.integer_labels = all(isinstance(y, (int, np.integer)) and not isinstance(y, bool) for y in labels)
        for i, (text, label) in enumerate(zip(texts, labels)):
            problem = _example_problem(text, label, self.integer_labels)
            if problem:
                raise data.DataError(f"example {i}: {problem}")
        self.texts = texts
        self.label_strings = [str(int(y)) if self.integer_labels else y.strip() for y in labels]
        if self.integer_labels:
            self.label_names = tuple(str(k) for k in range(max(int(y) for y in labels) + 1))
        else:
            self.label_names = data.label_vocabulary(self.label_strings)
        self.label_ids = data.label_ids(self.label_strings, self.label_names, "dataset")
        self.max_length = max_length
        self.tokenizer = _hf_tokenizer(tokenizer)
        self._encoder = None
        if self.tokenizer is not None:
            configured = tokenization.configure(Tokenizer.from_str(self.tokenizer.to_str()), max_length,
                                                _pad_id(self.tokenizer))
            self._encoder = tokenization.TextEncoder(configured)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = range(len(self))[index]
        item: dict[str, Any] = {"text": self.texts[i], "labels": int(self.label_ids[i])}
        if self._encoder is not None:
            ids, mask = tokenization.pad_rows([self._encoder.ids_one(self.texts[i])], self._encoder.pad_id,
                                              shape=(1, self.max_length))
            item.update(input_ids=ids[0], attention_mask=mask[0])
        return item


def _example_problem(text: Any, label: Any, integer_labels: bool) -> str | None:
    if not isinstance(text, str):
        return f"text must be a string, got {type(text).__name__}"
    if integer_labels:
        return "label must be a class id >= 0" if int(label) < 0 else data.example_problem(text, str(label))
    if not isinstance(label, str):
        return (f"labels must be all strings (class names) or all integers (class ids); "
                f"got {type(label).__name__} {label!r}")
    return data.example_problem(text, label.strip())


def _hf_tokenizer(tokenizer: Any) -> Tokenizer | None:
    """A tokenizers.Tokenizer from a Tokenizer or a SimpleTokenizer (None stays None)."""
    if tokenizer is None or isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, tokenization.SimpleTokenizer):
        if tokenizer.tokenizer is None:
            raise ConfigError("the SimpleTokenizer has no vocabulary yet: call build_vocab(texts) first")
        return tokenizer.tokenizer
    raise ConfigError(f"tokenizer must be a tokenizers.Tokenizer or a jaxclf SimpleTokenizer, "
                      f"got {type(tokenizer).__name__}")


def _pad_id(tok: Tokenizer) -> int:
    pad = tok.token_to_id(tokenization.PAD)
    return 0 if pad is None else pad


@dataclasses.dataclass(frozen=True)
class EarlyStoppingCallback:
    """Stop when the evaluation metric (TrainingConfig.metric_for_best_model) has not improved by more than
    `threshold` for `patience` evaluations; sets early_stopping_patience / early_stopping_threshold."""

    patience: int = 3
    threshold: float = 0.0

    def __post_init__(self):
        if not isinstance(self.patience, int) or isinstance(self.patience, bool) or self.patience < 1:
            raise ConfigError(f"EarlyStoppingCallback patience must be an integer >= 1, got {self.patience!r}")
        if not isinstance(self.threshold, (int, float)) or self.threshold < 0:
            raise ConfigError(f"EarlyStoppingCallback threshold must be >= 0, got {self.threshold!r}")

    def apply(self, cfg: TrainingConfig) -> TrainingConfig:
        return cfg.replace(early_stopping_patience=self.patience, early_stopping_threshold=float(self.threshold))


class Trainer:
    """Trains a classifier with jaxclf.train.loop.train; then `.model` is the trained TextClassifier.

    Data: train_dataset / eval_dataset (TextClassificationDataset), or else training_config.train_file
    and eval_file (without an eval file, eval_split of the training data is held out).
    """

    def __init__(self, model_config: ModelConfig, training_config: TrainingConfig,
                 train_dataset: TextClassificationDataset | None = None,
                 eval_dataset: TextClassificationDataset | None = None, callbacks: Sequence[Any] = ()):
        if train_dataset is None and eval_dataset is not None:
            raise ConfigError("eval_dataset was given without train_dataset; give both, or neither and set "
                              "training_config.train_file / eval_file")
        for callback in callbacks:
            if not isinstance(callback, EarlyStoppingCallback):
                raise ConfigError(f"unsupported callback {type(callback).__name__}; supported: EarlyStoppingCallback")
            training_config = callback.apply(training_config)
        self.model_config, self.training_config = model_config, training_config
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.model: TextClassifier | None = None
        self.result: TrainResult | None = None

    def train(self) -> TrainResult:
        """Train (or resume, with the same output_dir) and load the exported model as `self.model`."""
        cfg = self.training_config
        if cfg.early_stopping_patience and self.eval_dataset is None and not cfg.eval_file and not cfg.eval_split:
            raise ConfigError("early stopping needs evaluation data: give eval_dataset, eval_file or eval_split > 0")
        tokenizer = None
        if self.train_dataset is not None:
            cfg = self._write_datasets(cfg)
            tokenizer = self.train_dataset.tokenizer
        self.training_config = cfg
        self.result = train(self.model_config, cfg, tokenizer=tokenizer)
        if self.result.preempted:
            raise TrainerError(f"training was preempted at step {self.result.steps}; call train() again to resume")
        self.model = load(self.result.model_dir)
        return self.result

    def _write_datasets(self, cfg: TrainingConfig) -> TrainingConfig:
        """Write the in-memory datasets as OUTPUT/data/*.jsonl and point the config at them."""
        folder = Path(cfg.output_dir) / "data"
        folder.mkdir(parents=True, exist_ok=True)
        parts = {"train_file": (self.train_dataset, folder / "train.jsonl")}
        if self.eval_dataset is not None:
            parts["eval_file"] = (self.eval_dataset, folder / "eval.jsonl")
        for dataset, path in parts.values():
            data.write_jsonl(path, dataset.texts, dataset.label_strings)
        changes: dict[str, Any] = {name: str(path) for name, (_, path) in parts.items()}
        if self.train_dataset.integer_labels and not cfg.labels:
            datasets = [d for d, _ in parts.values()]
            if not all(d.integer_labels for d in datasets):
                raise data.DataError("train_dataset has integer labels but eval_dataset has label names")
            classes = max([self.model_config.num_classes] + [len(d.label_names) for d in datasets])
            changes["labels"] = tuple(str(k) for k in range(classes))
        return cfg.replace(**changes)

    def _trained(self) -> TextClassifier:
        if self.model is None:
            raise TrainerError("no trained model yet: call train() first")
        return self.model

    def evaluate(self, eval_dataset: TextClassificationDataset | None = None) -> dict[str, float]:
        """eval_loss, eval_accuracy, eval_f1 / eval_precision / eval_recall (macro averages) and epoch.

        On eval_dataset, else the Trainer's eval_dataset, else the run's evaluation file or held-out split.
        """
        model = self._trained()
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is not None:
            texts, labels, source, lines = dataset.texts, dataset.label_strings, "eval_dataset", None
        else:
            texts, labels, lines = load_splits(self.training_config)[1]
            source = self.training_config.eval_file or self.training_config.train_file
            if not texts:
                raise TrainerError("no evaluation data: pass eval_dataset, or set eval_file or eval_split > 0")
        report = evaluate_classifier(model, texts, labels, source=source, lines=lines,
                                     batch_size=self.training_config.per_device_eval_batch_size)
        return {"eval_loss": report["loss"], "eval_accuracy": report["accuracy"], "eval_f1": report["macro_f1"],
                "eval_precision": report["macro_precision"], "eval_recall": report["macro_recall"],
                "epoch": self.result.epoch}

    def save_model(self, output_dir: str | os.PathLike) -> Path:
        """Write the trained model as a model directory (config.json, model.safetensors, tokenizer.json, metrics.json)."""
        return self._trained().save(output_dir)


def train_model(model_config: ModelConfig, training_config: TrainingConfig,
                train_texts: Sequence[str] | None = None, train_labels: Sequence[str | int] | None = None,
                eval_texts: Sequence[str] | None = None, eval_labels: Sequence[str | int] | None = None,
                ) -> tuple[TextClassifier, Trainer]:
    """Train a classifier in one call: (the trained TextClassifier, its Trainer).

    Without texts, reads training_config.train_file (default: the shipped sample data).
    """
    if (train_texts is None) != (train_labels is None) or (eval_texts is None) != (eval_labels is None):
        raise ConfigError("give texts together with their labels (train_texts with train_labels, "
                          "eval_texts with eval_labels)")
    train_ds = TextClassificationDataset(train_texts, train_labels) if train_texts is not None else None
    eval_ds = TextClassificationDataset(eval_texts, eval_labels) if eval_texts is not None else None
    trainer = Trainer(model_config, training_config, train_dataset=train_ds, eval_dataset=eval_ds)
    trainer.train()
    return trainer.model, trainer
