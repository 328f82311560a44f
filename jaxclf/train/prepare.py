"""Phase 1 of a training run: read, label and tokenize everything, and settle the model config; writes nothing.

    prepared = prepare_data(model_config, train_config)   # -> PreparedData
    prepared.train_ds, prepared.config, prepared.tokenizer

Everything a run reads is validated here, before the loop (jaxclf.train.loop) writes anything:
the splits (an eval file, or a stratified hold-out), the label vocabulary (the data's, the
fine-tuned model's or the teacher's), the tokenizer (trained on the texts, borrowed, the run's own
when resuming, or the fine-tuned model's), the model config sized to it, the teacher's logits when
distilling, and the tokenized datasets (jaxclf.train.batches) under the model's long-text rule.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from tokenizers import Tokenizer

from jaxclf import calibration, model_dir, tokenizer as tokenization
from jaxclf.config import MIXED_PRECISION, ConfigError, ModelConfig, TrainingConfig
from jaxclf.train import batches, data, distill

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"  # OUTPUT/tokenizer.json: the vocabulary the checkpoints were trained with


@dataclasses.dataclass
class PreparedData:
    """What a run reads and derives before it writes anything."""

    tokenizer: Tokenizer  # configured with the model's max length and padding
    new_tokenizer: bool  # trained (or given) now, to be saved at OUTPUT/tokenizer.json
    config: ModelConfig  # the model as the steps compute it (mixed-precision dtype, remat)
    export_config: ModelConfig  # the model as its directory records it (float32 compute unless asked)
    init_tensors: dict | None  # weights to start from (fine-tuning), PyTorch names
    label_names: tuple[str, ...]
    train_ds: batches.TokenizedDataset
    eval_ds: batches.TokenizedDataset | None
    buckets: tuple[int, ...]
    distillation: distill.Distillation | None = None  # the teacher and its logits, when distilling


def load_splits(cfg: TrainingConfig):
    """((texts, labels, file lines), (eval texts, labels, lines)); eval held out of train when no eval_file."""
    texts, labels, report = data.read_examples(cfg.train_file, skip_bad=cfg.skip_bad_rows)
    train = (texts, labels, report.lines)
    if cfg.eval_file:
        eval_texts, eval_labels, eval_report = data.read_examples(cfg.eval_file, skip_bad=cfg.skip_bad_rows)
        held = (eval_texts, eval_labels, eval_report.lines)
    elif cfg.eval_split > 0:
        train_idx, eval_idx = data.stratified_split(labels, cfg.eval_split, cfg.seed)
        pick = lambda idx: tuple([column[i] for i in idx] for column in train)
        train, held = pick(train_idx), pick(eval_idx)
    else:
        held = ([], [], [])
    log.info("training examples: %d (%s), evaluation examples: %d", len(train[0]), cfg.train_file, len(held[0]))
    return train, held


def _vocabulary_size(model_cfg: ModelConfig, cfg: TrainingConfig, tok: Tokenizer, source: str) -> int:
    """The model's vocab_size for a from-scratch tokenizer, with a log line saying which and why."""
    learned = tok.get_vocab_size()
    if cfg.tokenizer_vocab_size is not None or cfg.tokenizer_from:
        which = "train.tokenizer_from" if cfg.tokenizer_from else "train.tokenizer_vocab_size"
        replaced = f" (model.vocab_size={model_cfg.vocab_size} is not used when {which} " \
                   f"is set)" if model_cfg.vocab_size != learned else ""
        log.info("vocabulary: %s has %d tokens; model vocab_size = %d%s", source, learned, learned, replaced)
        return learned
    if learned > model_cfg.vocab_size:
        raise ConfigError(f"{source} has {learned} tokens but model.vocab_size={model_cfg.vocab_size}; raise "
                          f"vocab_size (a BPE vocabulary holds at least every character of the corpus)")
    unused = model_cfg.vocab_size - learned
    log.info("vocabulary: %s has %d tokens; model vocab_size = %d as configured%s", source, learned,
             model_cfg.vocab_size, f" ({unused} embedding rows unused; set train.tokenizer_vocab_size to "
                                   f"size the model to the tokenizer)" if unused else "")
    return model_cfg.vocab_size


def _borrowed_tokenizer(path: str) -> Tokenizer:
    """train.tokenizer_from: a model directory's tokenizer.json, or a tokenizer.json file."""
    file = Path(path) / TOKENIZER_FILE if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise ConfigError(f"tokenizer_from={path!r}: no such tokenizer.json file or model directory")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises its own exception type for a malformed file
        raise ConfigError(f"tokenizer_from={path!r}: {file} is not a tokenizers file ({e})") from None


def _tokenizer_and_config(model_cfg: ModelConfig, cfg: TrainingConfig, texts: list[str],
                          label_names: tuple[str, ...], tokenizer: Tokenizer | None):
    """(tokenizer, is new, model config, initial weights or None). Fine-tuning keeps the tokenizer and labels."""
    if cfg.init_from:
        if tokenizer is not None:
            raise ConfigError(f"a tokenizer was given, but init_from={cfg.init_from!r} brings its own")
        init_cfg, tensors, tok, _ = model_dir.read(cfg.init_from)
        if tuple(label_names) != init_cfg.id2label:
            raise ConfigError(f"labels of the data {list(label_names)} differ from those of "
                              f"{cfg.init_from} {list(init_cfg.id2label)}; pass --labels to match")
        # The model directory defines the whole architecture, dropout included; the preset's model
        # section does not apply when fine-tuning.
        log.info("fine-tuning %s: its model config is used as is (model.* settings are ignored)", cfg.init_from)
        # A calibrated model trains at temperature 1 with 1/T folded into its head (the same logits);
        # the export fits a new temperature.
        tensors = calibration.fold_temperature(tensors, init_cfg.temperature)
        return tok, False, init_cfg.replace(temperature=1.0), tensors
    saved = Path(cfg.output_dir) / TOKENIZER_FILE
    if saved.exists():  # resuming: the vocabulary must be the one the checkpoints were trained with
        tok, new, source = Tokenizer.from_file(str(saved)), False, f"the run's tokenizer {saved}"
    elif tokenizer is not None:
        if cfg.tokenizer_from:
            raise ConfigError(f"a tokenizer was given, and tokenizer_from={cfg.tokenizer_from!r}; pass one")
        tok, new, source = Tokenizer.from_str(tokenizer.to_str()), True, "the given tokenizer"  # a copy: configure() mutates
    elif cfg.tokenizer_from:
        tok, new, source = _borrowed_tokenizer(cfg.tokenizer_from), True, f"the tokenizer of {cfg.tokenizer_from}"
    else:
        target = cfg.tokenizer_vocab_size or model_cfg.vocab_size
        which = "train.tokenizer_vocab_size" if cfg.tokenizer_vocab_size else "model.vocab_size"
        tok, new = tokenization.train_tokenizer(texts, vocab_size=target), True
        source = f"the BPE tokenizer trained on the training texts (up to {which}={target})"
    vocab_size = _vocabulary_size(model_cfg, cfg, tok, source)
    config = model_cfg.replace(vocab_size=vocab_size, num_classes=len(label_names), id2label=tuple(label_names))
    return tok, new, config, None


def prepare_data(model_cfg: ModelConfig, cfg: TrainingConfig, tokenizer: Tokenizer | None = None) -> PreparedData:
    """Read the data, settle labels, tokenizer and model config, tokenize; writes nothing."""
    (texts, labels, lines), (eval_texts, eval_labels, eval_lines) = load_splits(cfg)
    if cfg.init_from and not cfg.labels:
        label_names = model_dir.read_config(cfg.init_from).id2label
    elif cfg.distill_from and not cfg.labels:
        label_names = distill.teacher_labels(cfg.distill_from)  # the teacher's, in its order
    else:
        label_names = data.label_vocabulary(labels, cfg.labels or None)
    train_ids = data.label_ids(labels, label_names, cfg.train_file, lines=lines)
    eval_ids = data.label_ids(eval_labels, label_names, cfg.eval_file or cfg.train_file, lines=eval_lines)
    distillation = distill.prepare(cfg, label_names, texts, train_ids) if cfg.distill_from else None
    if distillation is not None:  # the unlabelled texts join the training texts (and the BPE corpus)
        texts, train_ids = distillation.texts, distillation.label_ids

    tok, new, config, init_tensors = _tokenizer_and_config(model_cfg, cfg, texts, label_names, tokenizer)
    tok = tokenization.configure(tok, config.max_position_embeddings, config.pad_token_id)
    export_config = config
    config = config.replace(gradient_checkpointing=cfg.gradient_checkpointing or config.gradient_checkpointing)
    if cfg.mixed_precision != "no":
        config = config.replace(dtype=MIXED_PRECISION[cfg.mixed_precision])
    buckets = cfg.length_buckets or tokenization.length_buckets(config.max_position_embeddings)
    if max(buckets) > config.max_position_embeddings:
        raise ConfigError(f"length_buckets {list(buckets)} exceed max_position_embeddings="
                          f"{config.max_position_embeddings}")
    max_length = tok.truncation["max_length"]
    if max(buckets) < max_length:
        # A preset's buckets are sized to its own model (small: 32, 64); a model fine-tuned from
        # init_from (MiniLM: 256 tokens) reads longer rows, which need a bucket of its max length.
        log.info("length_buckets %s stop below the max length %d: adding it as the last bucket",
                 list(buckets), max_length)
        buckets = (*buckets, max_length)
    # Under long_text=chunks a long text is several rows (windows) carrying its label; evaluation
    # pools them back into one score per text (batches.tokenize_dataset, evaluate.sharded_logits).
    rule = dict(truncation_head=config.truncation_head, chunking=config.chunking)
    # Distilling: the teacher runs now (or its cached logits are read), its logits ride with the examples.
    extras = distillation.compute(cfg.per_device_eval_batch_size) if distillation is not None else None
    train_ds = batches.tokenize_dataset(tok, texts, train_ids, extras=extras, **rule)
    eval_ds = batches.tokenize_dataset(tok, eval_texts, eval_ids, **rule) if eval_texts else None
    return PreparedData(tok, new, config, export_config, init_tensors, tuple(label_names), train_ds, eval_ds,
                        tuple(buckets), distillation)
