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
from jaxclf.tokenizer import TextEncoder, pad_rows  # the long-text rule is part of the model directory contract
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
        self.encoder = TextEncoder.for_config(tokenizer, config)

    def encode(self, texts: Texts) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize -> (input_ids, attention_mask), both (R, T) int64, padded to the longest row.

        One row per text, except under long_text=chunks: one per window of each text.
        """
        rows = self.encoder.windows([texts] if isinstance(texts, str) else list(texts)).rows
        input_ids, attention_mask = pad_rows(rows, self.config.pad_token_id)
        return torch.from_numpy(input_ids).long(), torch.from_numpy(attention_mask).long()

    def logits(self, texts: Texts, batch_size: int = 64) -> np.ndarray:
        """(N, num_classes) float32 logits, computed in eval mode in batches of ``batch_size`` rows.

        Under long_text=chunks a text's logits are its windows' pooled by config.chunk_pooling (pool_windows).
        """
        windows = self.encoder.windows([texts] if isinstance(texts, str) else list(texts))
        self.model.eval()
        out = [torch.zeros((0, self.config.num_classes))]
        with torch.no_grad():
            for start in range(0, len(windows.rows), batch_size):
                ids, mask = pad_rows(windows.rows[start:start + batch_size], self.config.pad_token_id)
                out.append(self.model(torch.from_numpy(ids).long(),
                                      attention_mask=torch.from_numpy(mask).long()).float())
        row_logits = torch.cat(out)
        if self.config.chunking is not None:
            row_logits = pool_windows(row_logits, torch.from_numpy(windows.owner), windows.num_texts,
                                      self.config.chunk_pooling, windows.special_tokens,
                                      torch.tensor([len(r) for r in windows.rows]))
        return row_logits.numpy().astype(np.float32)

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


def pool_windows(row_logits: torch.Tensor, owner: torch.Tensor, num_texts: int, pooling: str,
                 special_tokens: int, row_lengths: torch.Tensor) -> torch.Tensor:
    """(R, C) window logits -> (num_texts, C) text logits, written in torch apart from jaxclf's numpy.

    "mean": the windows' mean; "max": per class, the largest; "weighted": a mean weighted by each
    window's text tokens (its length less the special tokens). Summed in float64, as jaxclf does.
    """
    logits = row_logits.double()
    index = owner.long()
    if pooling == "max":
        start = torch.full((num_texts, logits.shape[1]), -torch.inf, dtype=torch.float64)
        return start.scatter_reduce(0, index[:, None].expand_as(logits), logits, reduce="amax").float()
    if pooling == "weighted":
        weight = (row_lengths - special_tokens).double().clamp(min=1.0)  # an empty text's window: 1, not 0/0
    elif pooling == "mean":
        weight = torch.ones(len(index), dtype=torch.float64)
    else:
        raise ValueError(f"unknown chunk pooling {pooling!r}")
    total = torch.zeros((num_texts, logits.shape[1]), dtype=torch.float64)
    total.index_add_(0, index, logits * weight[:, None])
    norm = torch.zeros(num_texts, dtype=torch.float64).index_add_(0, index, weight)
    return (total / norm[:, None]).float()


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
