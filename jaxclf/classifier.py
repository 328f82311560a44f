"""TextClassifier: a model, its tokenizer and its labels; the user-facing `jaxclf.load` / `jaxclf.create`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tokenizers import Tokenizer

from jaxclf import model_dir, tokenizer as tokenization, weights
from jaxclf.calibration import softmax  # noqa: F401 (float64 probabilities; re-exported for callers)
from jaxclf.config import ModelConfig
from jaxclf.model import TransformerClassifier, create_model, in_row_chunks, row_chunk_tokens
from jaxclf.tokenizer import bucket_for, length_buckets


def predictions(logits: np.ndarray, labels: Sequence[str]) -> list[dict[str, Any]]:
    """Per text: {"label", "confidence", "probabilities": {label: p}} from (N, C) logits."""
    probs = softmax(np.asarray(logits, dtype=np.float64))
    out = []
    for p in probs:
        k = int(p.argmax())
        out.append({"label": labels[k], "confidence": float(p[k]),
                    "probabilities": {label: float(x) for label, x in zip(labels, p)}})
    return out


class TextClassifier:
    """A jaxclf model with its tokenizer: `.logits(texts)`, `.predict(texts)`, `.save(dir)`."""

    def __init__(self, model: TransformerClassifier, tokenizer: Tokenizer,
                 metrics: Mapping[str, Any] | None = None):
        self.model = model
        self.config: ModelConfig = model.config
        self.tokenizer = tokenization.configure(tokenizer, self.config.max_position_embeddings,
                                                self.config.pad_token_id)
        self.encoder = tokenization.TextEncoder.for_config(self.tokenizer, self.config)
        self.metrics = dict(metrics or {})
        self.buckets = length_buckets(self.config.max_position_embeddings)
        self._forward = None

    @property
    def labels(self) -> list[str]:
        return list(self.config.id2label)

    def _compiled_forward(self):
        if self._forward is None:
            self.model.eval()  # dropout off
            graphdef, state = nnx.split(self.model)

            @jax.jit
            def forward(state, input_ids, attention_mask):
                return in_row_chunks(nnx.merge(graphdef, state), input_ids, attention_mask,
                                     row_chunk_tokens(jax.default_backend()))

            self._state = state
            self._forward = forward
        return self._forward

    def encode(self, texts: Sequence[str] | str) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) int32 (R, T) of every row the model reads, T padded up to a length bucket.

        One row per text, except under long_text=chunks: one per window (`encoder.windows(texts)`
        says which text each row belongs to).
        """
        return self._pad_rows(self.encoder.windows([texts] if isinstance(texts, str) else list(texts)).rows)

    def _pad_rows(self, rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = tokenization.pad_rows(rows, self.config.pad_token_id)
        return tokenization.pad_to(ids, mask, bucket_for(ids.shape[1], self.buckets), self.config.pad_token_id)

    def logits(self, texts: Sequence[str] | str, batch_size: int = 64) -> np.ndarray:
        """float32 logits (N, num_classes), one row per text.

        Under long_text=chunks every window of every text runs through the same compiled forward,
        `batch_size` windows a batch, and each text's logits are its windows' pooled by chunk_pooling.
        """
        windows = self.encoder.windows([texts] if isinstance(texts, str) else list(texts))
        forward = self._compiled_forward()
        out = [np.zeros((0, self.config.num_classes), np.float32)]
        for start in range(0, len(windows.rows), batch_size):
            ids, mask = self._pad_rows(windows.rows[start:start + batch_size])
            out.append(np.asarray(forward(self._state, jnp.asarray(ids), jnp.asarray(mask))))
        row_logits = np.concatenate(out).astype(np.float32)
        if self.config.chunking is None:  # one row per text
            return row_logits
        return windows.pool(row_logits, self.config.chunk_pooling)

    def predict(self, texts: Sequence[str] | str, batch_size: int = 64) -> list[dict[str, Any]]:
        """Per text: label, confidence, and the probability of every label."""
        return predictions(self.logits(texts, batch_size), self.labels)

    def torch_state(self) -> dict[str, np.ndarray]:
        return weights.to_torch_state(self.model)

    def save(self, path: str | os.PathLike, metrics: Mapping[str, Any] | None = None) -> Path:
        """Write this classifier as a model directory (atomically)."""
        if metrics is not None:
            self.metrics = dict(metrics)
        return model_dir.write(path, self.config, self.torch_state(), self.tokenizer, self.metrics)


    # The original framework's (and Hugging Face's) names for the model directory round trip.
    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Same as save(path): writes the model directory."""
        return self.save(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "TextClassifier":
        """Same as jaxclf.load(path)."""
        return load(path)


def load(path: str | os.PathLike, with_weights: bool = True, dtype: str | None = None) -> TextClassifier:
    """Load a model directory (config.json, model.safetensors, tokenizer.json, metrics.json).

    with_weights=False leaves the parameters as shapes (jax.ShapeDtypeStruct): the tokenizer, config
    and metrics of a model another runtime computes (the graph backends: ONNX Runtime, OpenVINO).
    dtype: run the model in this compute dtype, its weights held in it too (`"bfloat16"` for CPUs with
    AMX or AVX512-BF16, see README "Reduced precision"); none keeps config.json's.
    """
    check_weight_shapes(path)
    config, tensors, tok, metrics = model_dir.read(path)
    if dtype is not None:
        config = config.replace(dtype=dtype, param_dtype=dtype)
    model = create_model(config, seed=0, init_params=False)
    if with_weights:
        weights.load_torch_state(model, tensors, source=str(Path(path) / model_dir.WEIGHTS_FILE))
    return TextClassifier(model, tok, metrics)


def check_weight_shapes(path: str | os.PathLike) -> None:
    """The safetensors header against the shapes config.json implies, before anything is read or allocated.

    create_model allocates what the config says (a vocab_size of 10**9 is 128 GB at d_model 32);
    the file cannot be that large unnoticed, so its header is the check. WeightsError names the tensors.
    """
    d = model_dir.check_files(path)
    weights_file = d / model_dir.WEIGHTS_FILE
    try:
        shapes = weights.file_shapes(weights_file)
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt files
        raise model_dir.ModelDirectoryError(f"{weights_file}: cannot be read as safetensors ({e})") from None
    weights.check_shapes(shapes, weights.expected_shapes(model_dir.read_config(d)), source=str(weights_file))


def create(config: ModelConfig, tokenizer: Tokenizer, seed: int = 0) -> TextClassifier:
    """A freshly initialised classifier around a tokenizer whose ids fit config.vocab_size."""
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but config.vocab_size is "
                         f"{config.vocab_size}; set vocab_size >= the tokenizer's size")
    return TextClassifier(create_model(config, seed), tokenizer)
