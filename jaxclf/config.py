"""ModelConfig (the architecture, shared by the JAX model and torch_ref) and TrainingConfig (the training knobs).

Every knob has its default and its comment here, once; presets (jaxclf.train.presets) override a few.
This module must stay free of JAX and PyTorch imports: torch_ref reads config.json through it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

from jaxclf.errors import JaxclfError
from jaxclf.long_text import CHUNK_OVERFLOWS, CHUNK_POOLINGS, LONG_TEXT_RULES, Chunking

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
POSITION_EMBEDDINGS = ("learned", "sinusoidal")
POOLINGS = ("cls", "mean", "pooler")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(JaxclfError, ValueError):
    """A configuration value is invalid; the message names the field and the value."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of the encoder classifier. Defaults: a small post-LN BERT-style model."""

    vocab_size: int = 8000  # rows of the word embedding table (the tokenizer's vocabulary size)
    d_model: int = 256  # hidden width (BERT: hidden_size)
    nhead: int = 4  # attention heads; d_model must be divisible by nhead
    num_encoder_layers: int = 4  # transformer blocks
    dim_feedforward: int = 1024  # width of the feed-forward block (BERT: intermediate_size)
    max_position_embeddings: int = 128  # longest sequence, special tokens included
    # How a text longer than max_position_embeddings is read (a tokenizer-side rule, not architecture;
    # jaxclf.long_text): "truncate" keeps its first tokens; "head_tail" its first truncation_head and
    # last max_length - truncation_head tokens (a long document's conclusion); "chunks" reads it all
    # as overlapping windows whose logits are pooled. Setting truncation_head alone means head_tail.
    long_text: str = "truncate"
    truncation_head: int | None = None
    # chunks: text tokens between window starts; None: 3/4 of a window (windows overlap by 1/4, so a
    # phrase cut by one window's edge is whole in the next).
    chunk_stride: int | None = None
    max_chunks: int = 8  # chunks: windows read per text (at 128 tokens: ~750 text tokens)
    chunk_overflow: str = "truncate"  # chunks, a text past max_chunks: "truncate" (read the first) or "refuse"
    chunk_pooling: str = "mean"  # chunks: document logits = "mean", "max" or "weighted" mean of window logits
    # Calibration (temperature scaling): logits are divided by this, fitted on held-out data at export
    # (jaxclf.calibration); 1.0 = uncalibrated. Predictions never change, confidences do.
    temperature: float = 1.0
    num_classes: int = 3  # output logits
    dropout: float = 0.1  # on embeddings, sub-layer outputs and before the classifier
    attention_dropout: float = 0.1  # on attention probabilities
    activation: str = "gelu"  # "gelu" (exact, erf), "gelu_tanh" (approximate) or "relu"
    norm_first: bool = False  # True: pre-LN blocks plus a final LayerNorm; False: post-LN (BERT)
    position_embedding: str = "learned"  # "learned" table or fixed "sinusoidal"
    type_vocab_size: int = 0  # token-type (segment) embeddings; 0 disables them
    pooling: str = "cls"  # "cls" token, masked "mean" over tokens, or BERT "pooler" (dense+tanh on CLS)
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon (BERT: 1e-12)
    initializer_range: float = 0.02  # std of the truncated-normal weight init
    pad_token_id: int = 0  # id used for padding; padded positions are masked everywhere
    dtype: str = "float32"  # compute dtype of matmuls ("bfloat16" on TPU/GPU)
    param_dtype: str = "float32"  # storage dtype of parameters
    gradient_checkpointing: bool = False  # rematerialise each layer in the backward pass
    id2label: tuple[str, ...] = ()  # label name per class id; empty means LABEL_0, LABEL_1, ...

    def __post_init__(self) -> None:
        if self.truncation_head is not None and self.long_text == "truncate":
            object.__setattr__(self, "long_text", "head_tail")  # config.json files from before long_text
        if not self.id2label:
            object.__setattr__(self, "id2label", tuple(f"LABEL_{i}" for i in range(self.num_classes)))
        else:
            object.__setattr__(self, "id2label", tuple(self.id2label))
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "nhead", "num_encoder_layers", "dim_feedforward",
                     "max_position_embeddings", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_classes < 2:
            raise ConfigError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.truncation_head is not None and (
                not isinstance(self.truncation_head, int) or isinstance(self.truncation_head, bool)
                or not 1 <= self.truncation_head < self.max_position_embeddings):
            raise ConfigError(f"truncation_head must be null (keep the first tokens) or an integer in "
                              f"[1, max_position_embeddings={self.max_position_embeddings}), "
                              f"got {self.truncation_head!r}")
        self._validate_long_text()
        if (not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool)
                or not 0 < self.temperature < float("inf")):
            raise ConfigError(f"temperature must be a positive number, got {self.temperature!r}")
        if self.d_model % self.nhead != 0:
            raise ConfigError(
                f"d_model % nhead != 0: d_model={self.d_model} is not divisible by nhead={self.nhead}")
        if self.position_embedding == "sinusoidal" and self.d_model % 2 != 0:
            raise ConfigError(f"sinusoidal position embeddings need an even d_model, got {self.d_model}")
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
        if not isinstance(self.layer_norm_eps, (int, float)) or not self.layer_norm_eps > 0:
            raise ConfigError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if not isinstance(self.initializer_range, (int, float)) or not self.initializer_range > 0:
            raise ConfigError(f"initializer_range must be > 0, got {self.initializer_range!r}")
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            raise ConfigError(f"type_vocab_size must be an integer >= 0, got {self.type_vocab_size!r}")
        if not isinstance(self.pad_token_id, int) or not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(
                f"pad_token_id must be in [0, vocab_size={self.vocab_size}), got {self.pad_token_id!r}")
        for name, allowed in (("activation", ACTIVATIONS), ("position_embedding", POSITION_EMBEDDINGS),
                              ("pooling", POOLINGS), ("dtype", DTYPES), ("param_dtype", DTYPES)):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        for name in ("norm_first", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if len(self.id2label) != self.num_classes:
            raise ConfigError(
                f"id2label has {len(self.id2label)} labels but num_classes={self.num_classes}: "
                f"{list(self.id2label)}")
        if len(set(self.id2label)) != len(self.id2label) or not all(
                isinstance(x, str) and x for x in self.id2label):
            raise ConfigError(f"id2label must hold distinct non-empty names, got {list(self.id2label)}")

    def _validate_long_text(self) -> None:
        for name, allowed in (("long_text", LONG_TEXT_RULES), ("chunk_overflow", CHUNK_OVERFLOWS),
                              ("chunk_pooling", CHUNK_POOLINGS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.long_text == "head_tail" and self.truncation_head is None:
            raise ConfigError("long_text=head_tail needs truncation_head (the tokens kept from the start)")
        if self.long_text == "chunks" and self.truncation_head is not None:
            raise ConfigError(f"truncation_head={self.truncation_head} belongs to long_text=head_tail, "
                              f"not chunks; drop one of them")
        window = self.max_position_embeddings - 2  # [CLS] and [SEP]
        if self.chunk_stride is not None and (
                not _is_int(self.chunk_stride) or not 1 <= self.chunk_stride <= window):
            raise ConfigError(f"chunk_stride must be null or an integer in [1, {window}] (the text tokens "
                              f"of one window), got {self.chunk_stride!r}")
        if not _is_int(self.max_chunks) or self.max_chunks < 1:
            raise ConfigError(f"max_chunks must be a positive integer, got {self.max_chunks!r}")

    @property
    def chunking(self) -> Chunking | None:
        """The chunks rule's settings (jaxclf.long_text.Chunking), or None under truncate / head_tail."""
        if self.long_text != "chunks":
            return None
        # stride None: TextEncoder resolves it from the tokenizer's window, which may be shorter than
        # max_position_embeddings (an imported MiniLM reads 256 of its 512 positions).
        return Chunking(self.chunk_stride, self.max_chunks, self.chunk_overflow, self.chunk_pooling)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.nhead

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.id2label)}

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; id2label is written Hugging Face style as {"0": name, ...}."""
        out = dataclasses.asdict(self)
        out["id2label"] = {str(i): label for i, label in enumerate(self.id2label)}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """Build from a dict, refusing unknown keys by name (a typo must not be silently ignored)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"model config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s): {', '.join(unknown)}; "
                              f"known fields: {', '.join(sorted(known))}")
        kwargs = dict(data)
        id2label = kwargs.get("id2label", ())
        kwargs["id2label"] = labels_in_id_order(id2label) if isinstance(id2label, Mapping) else tuple(id2label)
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def labels_in_id_order(id2label: Mapping[Any, Any]) -> tuple:
    """The values of an {id: label} mapping (keys ints or their strings, as JSON has them) in id order 0..N-1."""
    try:
        by_id = {int(k): v for k, v in id2label.items()}
    except ValueError as e:
        raise ConfigError(f"id2label keys must be integers, got {list(id2label)}") from e
    ids = sorted(by_id)
    if len(by_id) != len(id2label) or ids != list(range(len(ids))):
        raise ConfigError(f"id2label keys must be 0..N-1, got {sorted(int(k) for k in id2label)}")
    return tuple(by_id[i] for i in ids)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_dtype_override(value: object) -> None:
    """A compute dtype an engine or bulk job runs a model in: one of DTYPES, or None for the model's own."""
    if value is not None and value not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)} (or unset: the model's), got {value!r}")


MIXED_PRECISION = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}
# fp16=True / bf16=True (the original framework's and Hugging Face's flags) are another way to set
# mixed_precision; the three are one setting, kept consistent by TrainingConfig.
_PRECISION_FIELDS = frozenset({"mixed_precision", "fp16", "bf16"})


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """Training knobs (Hugging Face Trainer names where one exists). The model is in ModelConfig."""

    output_dir: str = "runs/default"  # checkpoints, logs, and the exported model at OUTPUT/model
    train_file: str = "data/sample_texts.csv"  # CSV (text,label), JSONL or ArrayRecord
    eval_file: str | None = None  # None: hold out `eval_split` of train_file (stratified, seeded)
    eval_split: float = 0.2  # fraction held out when eval_file is None; 0 disables evaluation
    # Fit a temperature on the evaluation data at export (jaxclf.calibration), so confidences match
    # accuracy; metrics.json records ECE/Brier before and after, OUTPUT/reliability.png the diagram.
    calibrate: bool = True
    labels: tuple[str, ...] = ()  # label names in id order; empty: sorted labels of the training data
    init_from: str | None = None  # model directory to fine-tune (its tokenizer and labels are kept)
    skip_bad_rows: bool = False  # skip (count and report) malformed data rows instead of failing
    # From scratch, a BPE tokenizer is trained on the training texts. None: up to ModelConfig.vocab_size
    # tokens, and the embedding table keeps exactly vocab_size rows. N: up to N tokens, and the model's
    # vocab_size becomes the number of tokens actually learned (a small corpus may give fewer than N).
    tokenizer_vocab_size: int | None = None
    # A from-scratch model may borrow another tokenizer instead of training one: a model directory
    # (its tokenizer.json) or a tokenizer.json file, e.g. a distillation teacher's. init_from needs
    # none: it brings its tokenizer along with its weights, and it fixes the architecture, so a
    # smaller student cannot be init_from its teacher. vocab_size becomes the borrowed tokenizer's size.
    tokenizer_from: str | None = None
    # Distillation (jaxclf.train.distill): train on a teacher model's soft labels. Loss per labelled
    # example: (1 - distill_alpha) * CE(hard label) + distill_alpha * T^2 * KL(teacher/T || student/T).
    distill_from: str | None = None  # teacher model directory; None: no distillation
    distill_temperature: float = 2.0  # T: softens both distributions in the soft term
    distill_alpha: float = 0.5  # weight of the soft (teacher) term; 1 - alpha on the hard labels
    unlabeled_file: str | None = None  # extra texts without labels (a text a line, or CSV/JSONL with a text column), soft term only
    # A TinyBERT-style transfer set: N perturbed copies of every labelled training text (words dropped,
    # replaced by other training words, or half spliced with another text), labelled by the teacher
    # only (soft term), like unlabeled_file's texts. 0: none.
    distill_augment: int = 0
    length_buckets: tuple[int, ...] = ()  # padded lengths; empty: powers of two up to max_position_embeddings
    num_train_epochs: float = 10.0  # ignored when max_steps > 0
    max_steps: int = -1  # total optimiser steps; -1: from num_train_epochs
    per_device_train_batch_size: int = 16  # global batch = this x number of devices
    per_device_eval_batch_size: int = 64
    learning_rate: float = 5e-4  # peak learning rate after warmup
    lr_schedule: str = "linear"  # decay after warmup: "linear", "cosine" or "constant"
    warmup_steps: int = 10
    weight_decay: float = 0.01  # AdamW decoupled decay, masked off biases and LayerNorm
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # global-norm clipping; 0 disables it
    layerwise_lr_decay: float = 1.0  # encoder layer k of L learns at lr * decay**(L-k), embeddings at decay**L; 1 disables
    freeze_embeddings: bool = False  # no updates (and no AdamW state) for the embeddings.* parameters
    logging_steps: int = 10
    eval_steps: int = 50  # evaluate (and checkpoint) every N steps, and at the end
    save_steps: int = 50  # checkpoint every N steps
    save_total_limit: int = 2  # latest checkpoints kept (the newest is never deleted)
    save_best_total: int = 1  # best checkpoints kept by metric_for_best_model
    metric_for_best_model: str = "macro_f1"  # "accuracy", "macro_f1" or "loss"
    early_stopping_patience: int = 0  # stop after N evaluations without improvement; 0 = never
    early_stopping_threshold: float = 0.0  # an improvement must exceed this much to reset the patience
    gradient_checkpointing: bool = False  # rematerialise each layer in the backward pass
    # Split each step's batch into this many micro-batches, run one after another inside the jitted
    # step (lax.scan) with their gradients summed: the same update as the whole batch (up to float
    # summation order; dropout masks differ), but a CPU keeps a micro-batch's activations in cache
    # (4 x 8 rows of 128 tokens: a 1.4x faster step on 2 cores). 1 on TPU/GPU.
    micro_batches: int = 1
    mixed_precision: str = "no"  # "no" (fp32), "bf16", or "fp16" with dynamic loss scaling
    fp16: bool = False  # True: mixed_precision="fp16" (and reads True whenever mixed_precision is "fp16")
    bf16: bool = False  # True: mixed_precision="bf16" (and reads True whenever mixed_precision is "bf16")
    loss_scale_init: float = 2.0 ** 15  # fp16 only
    loss_scale_period: int = 2000  # fp16: double the scale after this many finite steps
    seed: int = 42  # init, shuffling, dropout and the eval split all derive from it
    mesh_data: int = -1  # mesh axis sizes; -1 takes the remaining devices
    mesh_fsdp: int = 1
    mesh_tensor: int = 1
    async_checkpointing: bool = True
    progress_bar: bool = True  # shown only when stderr is a terminal

    def __post_init__(self):
        for name, ok, accepted in self._checks():
            try:
                passed = bool(ok())
            except TypeError:  # e.g. a string where a number belongs
                passed = False
            if not passed:
                raise ConfigError(f"{name} must be {accepted}, got {getattr(self, name)!r}")
        self._resolve_precision_flags()
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "length_buckets", tuple(self.length_buckets))

    def _checks(self) -> list[tuple[str, Any, str]]:
        """(field, predicate, what is accepted): each check names the one field it tests."""
        positive_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1
        soft_labels = lambda: bool(self.distill_from) and self.distill_alpha > 0  # texts a teacher alone labels learn
        return [
            ("mixed_precision", lambda: self.mixed_precision in MIXED_PRECISION, f"one of {', '.join(MIXED_PRECISION)}"),
            ("lr_schedule", lambda: self.lr_schedule in ("linear", "cosine", "constant"), "linear, cosine or constant"),
            ("metric_for_best_model", lambda: self.metric_for_best_model in ("accuracy", "macro_f1", "loss"),
             "accuracy, macro_f1 or loss"),
            ("eval_split", lambda: 0.0 <= self.eval_split < 1.0, "in [0, 1)"),
            ("tokenizer_vocab_size", lambda: self.tokenizer_vocab_size is None
             or positive_int(self.tokenizer_vocab_size), "null (use ModelConfig.vocab_size) or an integer >= 1"),
            ("distill_temperature", lambda: 0 < self.distill_temperature < float("inf")
             and not isinstance(self.distill_temperature, bool), "a number > 0"),
            ("distill_alpha", lambda: 0.0 <= self.distill_alpha <= 1.0
             and not isinstance(self.distill_alpha, bool), "in [0, 1]"),
            ("distill_augment", lambda: isinstance(self.distill_augment, int)
             and not isinstance(self.distill_augment, bool) and self.distill_augment >= 0
             and (self.distill_augment == 0 or soft_labels()),
             "an integer >= 0, and 0 unless distill_from is set and distill_alpha > 0 (the copies learn only "
             "from a teacher's soft labels)"),
            ("unlabeled_file", lambda: self.unlabeled_file is None or soft_labels(),
             "unset unless distill_from is set and distill_alpha > 0 (unlabeled texts learn only from a "
             "teacher's soft labels)"),
            ("tokenizer_from", lambda: self.tokenizer_from is None or not self.init_from,
             "unset with init_from (the model directory fine-tuned brings its own tokenizer)"),
            ("per_device_train_batch_size", lambda: positive_int(self.per_device_train_batch_size), "an integer >= 1"),
            ("per_device_eval_batch_size", lambda: positive_int(self.per_device_eval_batch_size), "an integer >= 1"),
            ("learning_rate", lambda: self.learning_rate > 0, "> 0"),
            ("num_train_epochs", lambda: self.max_steps > 0 or self.num_train_epochs > 0, "> 0 when max_steps <= 0"),
            ("logging_steps", lambda: positive_int(self.logging_steps), "an integer >= 1"),
            ("eval_steps", lambda: positive_int(self.eval_steps), "an integer >= 1"),
            ("save_steps", lambda: positive_int(self.save_steps), "an integer >= 1"),
            ("warmup_steps", lambda: self.warmup_steps >= 0, ">= 0"),
            ("max_grad_norm", lambda: self.max_grad_norm >= 0, ">= 0"),
            ("layerwise_lr_decay", lambda: 0.0 < self.layerwise_lr_decay <= 1.0, "in (0, 1]"),
            ("early_stopping_patience", lambda: self.early_stopping_patience >= 0, ">= 0"),
            ("early_stopping_threshold", lambda: self.early_stopping_threshold >= 0, ">= 0"),
            ("micro_batches", lambda: positive_int(self.micro_batches)
             and self.per_device_train_batch_size % self.micro_batches == 0,
             f"a divisor of per_device_train_batch_size={self.per_device_train_batch_size}"),
            ("seed", lambda: isinstance(self.seed, int) and self.seed >= 0, "an integer >= 0"),
            ("fp16", lambda: isinstance(self.fp16, bool), "true or false"),
            ("bf16", lambda: isinstance(self.bf16, bool), "true or false"),
            ("calibrate", lambda: isinstance(self.calibrate, bool), "true or false"),
        ]

    def _resolve_precision_flags(self) -> None:
        """fp16=True / bf16=True set mixed_precision; afterwards the three always agree."""
        if self.fp16 and self.bf16:
            raise ConfigError("fp16=True and bf16=True are both set; choose one (or set mixed_precision)")
        flag = "fp16" if self.fp16 else "bf16" if self.bf16 else None
        if flag is not None:
            if self.mixed_precision not in ("no", flag):
                raise ConfigError(f"{flag}=True conflicts with mixed_precision={self.mixed_precision!r}; "
                                  f"set only one of them")
            object.__setattr__(self, "mixed_precision", flag)
        object.__setattr__(self, "fp16", self.mixed_precision == "fp16")
        object.__setattr__(self, "bf16", self.mixed_precision == "bf16")

    @property
    def greater_is_better(self) -> bool:
        return self.metric_for_best_model != "loss"

    def replace(self, **changes: Any) -> "TrainingConfig":
        """A copy with `changes`; changing any of mixed_precision / fp16 / bf16 re-derives the other two."""
        if _PRECISION_FIELDS & changes.keys():
            changes = {"mixed_precision": "no", "fp16": False, "bf16": False, **changes}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
