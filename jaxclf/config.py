"""ModelConfig: the architecture of a jaxclf classifier, shared by the JAX model and torch_ref.

This module must stay free of JAX and PyTorch imports: torch_ref reads config.json through it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
POSITION_EMBEDDINGS = ("learned", "sinusoidal")
POOLINGS = ("cls", "mean", "pooler")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
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
    # How a text longer than the model's max length is cut (a tokenizer setting, not architecture):
    # None keeps its first max_length tokens; N keeps the first N and the last max_length - N
    # ("head+tail", [CLS] and [SEP] included), which keeps a long document's conclusion.
    truncation_head: int | None = None
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
        if isinstance(id2label, Mapping):
            try:
                ids = sorted(int(k) for k in id2label)
            except ValueError as e:
                raise ConfigError(f"id2label keys must be integers, got {list(id2label)}") from e
            if ids != list(range(len(ids))):
                raise ConfigError(f"id2label keys must be 0..N-1, got {ids}")
            id2label = tuple(id2label[str(i)] if str(i) in id2label else id2label[i] for i in ids)
        kwargs["id2label"] = tuple(id2label)
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


PRESETS: dict[str, ModelConfig] = {
    # The default: fast on 2 CPU cores, big enough to learn the sample data.
    "small": ModelConfig(),
    # A few seconds per epoch on CPU; used by tests and quick demos.
    "tiny": ModelConfig(d_model=64, nhead=2, num_encoder_layers=2, dim_feedforward=128, vocab_size=2000),
    # BERT-base shapes, for TPU/GPU.
    "base": ModelConfig(vocab_size=30522, d_model=768, nhead=12, num_encoder_layers=12,
                        dim_feedforward=3072, max_position_embeddings=512, type_vocab_size=2,
                        pooling="pooler", dtype="bfloat16"),
}
