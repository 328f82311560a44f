"""Named presets (a ModelConfig plus a TrainingConfig) and dotted `section.key=value` overrides.

Every knob has its default and comment in ModelConfig / TrainingConfig; a preset overrides a few.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from jaxclf.config import ConfigError, ModelConfig, TrainingConfig


def _small() -> tuple[ModelConfig, TrainingConfig]:
    """The default, sized to data/sample_texts.csv (1,092 rows; 873 train, 219 held out): a person's first run.

        python scripts/train.py

    Measured with benchmarks/first_run.py (results/first_run.md), where the numbers below come from:
    .721 accuracy / .720 macro-F1 on the 219 held-out rows against .699 / .695 for TF-IDF + LinearSVC
    on the same split (.718 / .715 over 5 folds of all rows); 25.5 s median wall for the whole
    `python scripts/train.py` process on 2 quiet cores.
    873 short sentences from scratch cannot feed the 4-layer d256 model this preset used to be (3.4M
    parameters: train loss 0.003, eval loss 1.09 -> 2.61, .52 held-out accuracy on the 240-row sample,
    and 80 s here); that model is the `medium` preset.
    """
    model = ModelConfig(
        # One layer, d128 (0.4M parameters, most of them the 2,000-token embedding table): two layers
        # (.69) and d64 (.69) did worse on the held-out rows than this (.72), and it trains in a few seconds.
        d_model=128, nhead=4, num_encoder_layers=1, dim_feedforward=256,
        max_position_embeddings=64,  # the longest sample text is 38 tokens
        dropout=0.3,  # at 0.2 train loss fell below 0.1 by epoch 5; 0.4 (with weight decay 0.3) scored .70
        attention_dropout=0.1,
        pooling="mean",  # every token's vector, not one [CLS] vector, reaches the head: less to learn from few rows
    )
    train = TrainingConfig(
        output_dir="runs/default",
        tokenizer_vocab_size=2000,  # BPE pieces shared by inflections ("disappoint-ed/-ing") that TF-IDF keeps apart
        length_buckets=(32, 64),  # two compiled shapes of each step instead of three: compiles dominate this run
        per_device_train_batch_size=32, micro_batches=1,  # 27 steps an epoch; no micro-batching at 128 wide
        learning_rate=1e-3, warmup_steps=27,  # one epoch of warmup, then linear decay
        weight_decay=0.1,  # ten times the library default: the run is small-data, regularise hard
        num_train_epochs=12,  # an upper bound: early stopping ends the run near epoch 6
        eval_steps=27, save_steps=27, logging_steps=9,  # evaluate (and checkpoint) once an epoch
        metric_for_best_model="macro_f1",  # the export is the best held-out macro-F1 checkpoint
        # Eval loss bottoms out near epoch 2 and then climbs as the model grows confident while
        # accuracy still improves until epoch 4-5; two evaluations without a macro-F1 gain stop the run,
        # and the export's temperature scaling (calibration) corrects the confidence.
        early_stopping_patience=2,
    )
    return model, train


def _medium() -> tuple[ModelConfig, TrainingConfig]:
    """4 layers, d_model 256 (3.4M parameters): a from-scratch model for real data sets of thousands of rows.

        python scripts/train.py --config medium --train train.csv --eval eval.csv
    """
    return (ModelConfig(d_model=256, nhead=4, num_encoder_layers=4, dim_feedforward=1024,
                        max_position_embeddings=128, dropout=0.1, attention_dropout=0.1),
            TrainingConfig(output_dir="runs/medium", num_train_epochs=12, per_device_train_batch_size=16,
                           micro_batches=2, learning_rate=5e-4, warmup_steps=10, eval_steps=24, save_steps=24,
                           logging_steps=6, tokenizer_vocab_size=2000))


def _tiny() -> tuple[ModelConfig, TrainingConfig]:
    """Seconds on a laptop; what the tests use.

        python scripts/train.py --config tiny
    """
    return (ModelConfig(d_model=32, nhead=2, num_encoder_layers=1, dim_feedforward=64,
                        max_position_embeddings=32, dropout=0.1, attention_dropout=0.0),
            TrainingConfig(output_dir="runs/tiny", max_steps=20, per_device_train_batch_size=8,
                           learning_rate=1e-3, warmup_steps=2, eval_steps=10, save_steps=5,
                           logging_steps=5, tokenizer_vocab_size=500))


def _base() -> tuple[ModelConfig, TrainingConfig]:
    """BERT-base shapes in bf16 for a TPU/GPU host; give it a real data set.

        python scripts/train.py --config base --train data.jsonl --eval eval.jsonl
    """
    return (ModelConfig(d_model=768, nhead=12, num_encoder_layers=12, dim_feedforward=3072,
                        max_position_embeddings=512, type_vocab_size=2, pooling="pooler"),
            TrainingConfig(output_dir="runs/base", num_train_epochs=3, per_device_train_batch_size=32,
                           learning_rate=1e-4, warmup_steps=500, eval_steps=1000, save_steps=1000,
                           logging_steps=50, mixed_precision="bf16", tokenizer_vocab_size=30000))


PRESETS = {"small": _small, "tiny": _tiny, "medium": _medium, "base": _base}


def get_preset(name_or_file: str) -> tuple[ModelConfig, TrainingConfig]:
    """A preset by name, or a JSON file {"model": {...}, "train": {...}} over the `small` defaults."""
    if name_or_file in PRESETS:
        return PRESETS[name_or_file]()
    path = Path(name_or_file)
    if not path.is_file():
        raise ConfigError(f"--config {name_or_file!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    unknown = set(spec) - {"base", "model", "train"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; expected base, model, train")
    model, train = PRESETS[spec.get("base", "small")]()
    return (_replace(model, spec.get("model", {}), f"{path} model"),
            _replace(train, spec.get("train", {}), f"{path} train"))


def _replace(obj, changes: dict, where: str):
    fields = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
    if isinstance(obj, ModelConfig) and "id2label" in changes:
        changes = dict(changes, id2label=tuple(changes["id2label"]))
    return obj.replace(**changes)  # TrainingConfig.replace keeps mixed_precision / fp16 / bf16 consistent


def _parse(field_type: Any, text: str, key: str) -> Any:
    """Parse an override string by the dataclass field's annotation."""
    origin = typing.get_origin(field_type)
    args = [a for a in typing.get_args(field_type) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null", ""):
            return None
        return _parse(args[0], text, key)
    if origin is tuple or field_type is tuple:
        items = [x for x in text.split(",") if x]
        inner = args[0] if args else str
        return tuple(_parse(inner, x, key) for x in items)
    try:
        if field_type is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if field_type is int:
            return int(text)
        if field_type is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"override {key}={text!r}: expected {field_type.__name__}") from None
    return text


def apply_overrides(model: ModelConfig, train: TrainingConfig, overrides: Sequence[str],
                    train_changes: dict[str, Any] | None = None) -> tuple[ModelConfig, TrainingConfig]:
    """Apply `model.d_model=128`, `train.num_train_epochs=2`, ... (comma-separated for tuples).

    train_changes (command-line flags) apply under the overrides in the same replace, so settings
    checked together (unlabeled_file needs distill_from) may come one from each.
    """
    sections = {"model": {}, "train": dict(train_changes or {})}
    targets = {"model": model, "train": train}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in sections:
            raise ConfigError(f"override {item!r} must look like model.KEY=VALUE or train.KEY=VALUE")
        hints = typing.get_type_hints(type(targets[section]))
        if name not in hints:
            raise ConfigError(f"override {item!r}: {section} has no field {name!r}; fields: "
                              f"{', '.join(sorted(hints))}")
        sections[section][name] = _parse(hints[name], value, key)
    return (_replace(model, sections["model"], "overrides"), _replace(train, sections["train"], "overrides"))
