"""What a version must hold, checked on the staged copy just before it is committed (register and import).

Parsed, never executed, and without JAX: config.json as a ModelConfig; the safetensors header
(the library checks that the tensors' offsets cover the file exactly, so nothing hides behind
them); the tensors whose shapes the config alone fixes; tokenizer.json by `tokenizers`;
metrics.json as a JSON object. The name-by-name shape check needs the model's structure (JAX)
and is made when a version is loaded; these checks refuse, before a version number is handed
out, what cannot be a model of its config.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from safetensors import safe_open
from tokenizers import Tokenizer

from jaxclf import model_dir
from jaxclf.config import ModelConfig
from jaxclf.registry.errors import RegistryError

JSON_FILES = (model_dir.CONFIG_FILE, model_dir.TOKENIZER_FILE, model_dir.METRICS_FILE)
MAX_JSON_DEPTH = 32  # nesting of a manifest, config.json or metrics.json; real ones stay under 8
_LAYER = re.compile(r"encoder\.layer\.([0-9]+)\.")


def _too_deep(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:  # iterative: the point is not to recurse as deep as the document
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def parse_json(data: bytes | str, source: str, error: type[RegistryError] = RegistryError) -> Any:
    """JSON text -> value, or `error` naming `source`: invalid, or nested more than MAX_JSON_DEPTH levels
    (the registry stores such values and walks them when comparing versions)."""
    deep = error(f"{source}: nested more than {MAX_JSON_DEPTH} levels deep; refused")
    try:
        value = json.loads(data)
    except RecursionError:
        raise deep from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise error(f"{source}: not valid JSON ({e})") from None
    if _too_deep(value, MAX_JSON_DEPTH):
        raise deep
    return value


def _library_error(e: BaseException) -> bool:
    """An error of a Rust-backed library: an Exception, or a pyo3 PanicException (which is a BaseException)."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


def tensor_shapes(path: Path, source: str) -> dict[str, tuple[int, ...]]:
    """name -> shape from a safetensors header; the data is not read."""
    try:
        with safe_open(path, framework="numpy") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except BaseException as e:
        if not _library_error(e):
            raise
        raise RegistryError(f"{source}: {model_dir.WEIGHTS_FILE} cannot be read as safetensors ({e})") from None


def check_shapes(shapes: dict[str, tuple[int, ...]], config: ModelConfig, source: str) -> None:
    """The tensors whose shapes the config alone fixes, in every architecture variant (HF BERT names)."""
    where = f"{source}: {model_dir.WEIGHTS_FILE}"
    d, ff = config.d_model, config.dim_feedforward
    fixed = {"embeddings.word_embeddings.weight": (config.vocab_size, d),
             "classifier.weight": (config.num_classes, d), "classifier.bias": (config.num_classes,)}
    layers = sorted({int(m.group(1)) for name in shapes if (m := _LAYER.match(name))})
    # distinct and sorted, so this is layers == [0, ..., L-1] without building a list of the config's length
    if len(layers) != config.num_encoder_layers or layers[-1] != config.num_encoder_layers - 1:
        raise RegistryError(f"{where} holds encoder layers {layers[:8]}{'...' if len(layers) > 8 else ''} but "
                            f"config.json says num_encoder_layers={config.num_encoder_layers}")
    for i in layers:
        fixed[f"encoder.layer.{i}.attention.self.query.weight"] = (d, d)
        fixed[f"encoder.layer.{i}.intermediate.dense.weight"] = (ff, d)
    for name, expected in fixed.items():
        if name not in shapes:
            raise RegistryError(f"{where} has no tensor {name} (config.json needs one of shape {expected})")
        if shapes[name] != expected:
            raise RegistryError(f"{where}: tensor {name} has shape {shapes[name]} but config.json needs "
                                f"{expected}")


def _check_tokenizer(path: Path, config: ModelConfig, source: str) -> None:
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except BaseException as e:
        if not _library_error(e):
            raise
        raise RegistryError(f"{source}: {model_dir.TOKENIZER_FILE} is not a valid tokenizers file ({e})") from None
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise RegistryError(f"{source}: {model_dir.TOKENIZER_FILE} has {tokenizer.get_vocab_size()} tokens but "
                            f"config.json's vocab_size is {config.vocab_size}")


def check_version_files(directory: Path, source: str, allow_regex_tokenizer: bool = False,
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, metrics.json or {}) of a staged version, after checking that every file is what its
    name says; RegistryError naming `source` (the model directory or archive) otherwise.

    A tokenizer with regex steps is refused unless allow_regex_tokenizer (model_dir.check_tokenizer_regex).
    """
    config_data = parse_json((directory / model_dir.CONFIG_FILE).read_bytes(), f"{source}: {model_dir.CONFIG_FILE}")
    try:
        config = model_dir.read_config(directory)
    except model_dir.ModelDirectoryError as e:  # named by file, not by the work directory it was staged in
        raise RegistryError(f"{source}: not a valid model: {str(e).replace(f'{directory}{os.sep}', '')}") from None
    check_shapes(tensor_shapes(directory / model_dir.WEIGHTS_FILE, source), config, source)
    _check_tokenizer(directory / model_dir.TOKENIZER_FILE, config, source)
    try:
        model_dir.check_tokenizer_regex(directory / model_dir.TOKENIZER_FILE, allow_regex_tokenizer,
                                        source=f"{source}: {model_dir.TOKENIZER_FILE}")
    except model_dir.ModelDirectoryError as e:
        raise RegistryError(str(e)) from None
    metrics_file = directory / model_dir.METRICS_FILE
    metrics = parse_json(metrics_file.read_bytes(), f"{source}: {model_dir.METRICS_FILE}") \
        if metrics_file.is_file() else {}
    if not isinstance(metrics, dict):
        raise RegistryError(f"{source}: {model_dir.METRICS_FILE} must hold a JSON object, got "
                            f"{type(metrics).__name__}")
    return config_data, metrics
