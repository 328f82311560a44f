"""Load a jaxclf model directory (config.json, model.safetensors, tokenizer.json) into PyTorch."""

from __future__ import annotations

import json
import os
from typing import Iterable, Union

import numpy as np
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from jaxclf.config import ConfigError, ModelConfig
from jaxclf.tokenizer import TextEncoder  # the truncation rule is part of the model directory contract
from torch_ref.model import TransformerClassifier

Texts = Union[str, Iterable[str]]


def _require(model_dir: str, name: str) -> str:
    path = os.path.join(model_dir, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name} not found in model directory {model_dir!r}")
    return path


def _read_config(path: str) -> ModelConfig:
    """The ModelConfig in config.json; every error names the file (and the field, for bad values)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"{path}: expected a JSON object with a \"model\" section (the ModelConfig)")
    try:
        return ModelConfig.from_dict(data["model"])
    except ConfigError as e:  # names the field and the value
        raise ConfigError(f"{path}: {e}") from e
    except TypeError as e:
        raise ValueError(f"{path}: {e}") from e


def _check_state_dict(model: torch.nn.Module, sd: dict, path: str) -> None:
    """Raise one ValueError listing every missing, extra and misshapen tensor."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in sd.items()}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    misshapen = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if not (missing or extra or misshapen):
        return
    lines = [f"{path} does not match the model config:"]
    if missing:
        lines.append(f"  missing tensors: {', '.join(missing)}")
    if extra:
        lines.append(f"  unexpected tensors: {', '.join(extra)}")
    for k in misshapen:
        lines.append(f"  {k}: expected shape {list(expected[k])}, found {list(found[k])}")
    raise ValueError("\n".join(lines))


class TorchClassifier:
    """A loaded model with its tokenizer: encode, logits and predict on raw texts."""

    def __init__(self, config: ModelConfig, model: TransformerClassifier, tokenizer: Tokenizer):
        self.config = config
        self.labels = list(config.id2label)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.encoder = TextEncoder(tokenizer, config.truncation_head)

    def encode(self, texts: Texts) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize (truncated, padded to the longest) -> (input_ids, attention_mask), both (N, T) int64."""
        input_ids, attention_mask = self.encoder.encode([texts] if isinstance(texts, str) else list(texts))
        return torch.from_numpy(input_ids).long(), torch.from_numpy(attention_mask).long()

    def logits(self, texts: Texts, batch_size: int = 64) -> np.ndarray:
        """(N, num_classes) float32 logits, computed in eval mode in batches of ``batch_size``."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        self.model.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                input_ids, attention_mask = self.encode(texts[start:start + batch_size])
                out.append(self.model(input_ids, attention_mask=attention_mask).float().numpy())
        if not out:
            return np.zeros((0, self.config.num_classes), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)

    def predict(self, texts: Texts) -> list[dict]:
        """Per text: {"label", "confidence", "probabilities": {label: p}} from the softmax."""
        logits = self.logits(texts)
        shifted = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(shifted)
        probs /= probs.sum(axis=1, keepdims=True)
        results = []
        for row in probs:
            best = int(row.argmax())
            results.append({
                "label": self.labels[best],
                "confidence": float(row[best]),
                "probabilities": {label: float(p) for label, p in zip(self.labels, row)},
            })
        return results


def load(model_dir: str) -> TorchClassifier:
    """Load config.json ({"model": ModelConfig dict}), model.safetensors and tokenizer.json."""
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
    config_path = _require(model_dir, "config.json")
    weights_path = _require(model_dir, "model.safetensors")
    tokenizer_path = _require(model_dir, "tokenizer.json")

    config = _read_config(config_path)
    model = TransformerClassifier(config)
    try:
        sd = load_file(weights_path)
    except Exception as e:  # safetensors raises its own error type for truncated/corrupt files
        raise ValueError(f"{weights_path}: cannot be read as safetensors ({e})") from e
    _check_state_dict(model, sd, weights_path)
    model.load_state_dict(sd, strict=True)

    try:
        tok = Tokenizer.from_file(tokenizer_path)
    except Exception as e:
        raise ValueError(f"{tokenizer_path}: not a valid tokenizers file ({e})") from e
    # As jaxclf: truncate at max_position_embeddings, or at a shorter length tokenizer.json records.
    max_length = config.max_position_embeddings
    if tok.truncation is not None:
        max_length = min(max_length, tok.truncation["max_length"])
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=config.pad_token_id,
                       pad_token=tok.id_to_token(config.pad_token_id) or "[PAD]")
    return TorchClassifier(config, model, tok)
