"""import_hf: a Hugging Face BERT-family checkpoint -> a jaxclf model directory (exact, or refused)."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from jaxclf import model_dir, tokenizer as tokenization, weights
from jaxclf.config import ConfigError, ModelConfig
from jaxclf.hf.checkpoint import (WITH_CLASSIFIER, HFCheckpointError, SentenceTransformersLayout,
                                  architecture, checkpoint_labels, model_config_fields, normalize_names,
                                  read_json, read_sentence_transformers, read_tensors, resolve_hf_dir)
from jaxclf.hf.tokenizer import check_tokenizer, prepend_lowercase, read_tokenizer, truncation_length
from jaxclf.long_text import LONG_TEXT_FIELDS

log = logging.getLogger(__name__)


def _fresh_tensors(config: ModelConfig, names: Sequence[str], seed: int) -> dict[str, np.ndarray]:
    """Freshly initialised tensors (jaxclf's own init) for the given names."""
    from jaxclf.model import create_model

    fresh = weights.to_torch_state(create_model(config, seed))
    return {k: fresh[k] for k in names}


@dataclasses.dataclass
class _Head:
    """What import does above the encoder: the labels, the pooling, and which tensors are new or dropped."""

    labels: tuple[str, ...]
    pooling: str
    fresh: list[str]  # tensors initialised by jaxclf
    dropped: list[str]  # checkpoint tensors left out


def _choose_head(arch: str, st: SentenceTransformersLayout | None, hf: Mapping[str, Any],
                 tensors: dict[str, np.ndarray], labels: tuple[str, ...] | None, root: Path,
                 source: str) -> _Head:
    """Keep a classifier head (renamed by `labels` of the same size), or plan a fresh one for `labels`.

    Removes from `tensors` what the head leaves out (an unused BERT pooler, a replaced classifier).
    """
    head = _Head(labels=(), pooling=st.pooling if st else "pooler", fresh=[], dropped=[])
    if st:  # the declared pooling does not use BERT's pooler
        head.dropped += sorted(k for k in tensors if k.startswith("pooler."))
    if arch in WITH_CLASSIFIER and not st:
        head_labels = checkpoint_labels(hf, source)
        rows = tensors["classifier.weight"].shape[0] if "classifier.weight" in tensors else len(head_labels)
        head_labels = head_labels or tuple(f"LABEL_{i}" for i in range(rows))  # transformers' default names
        head.labels = labels or head_labels
        if len(head.labels) != rows:
            log.warning("%s: the checkpoint's %d-class classifier head is replaced by a fresh %d-class one",
                        source, rows, len(head.labels))
            head.dropped += sorted(k for k in tensors if k.startswith("classifier."))
            head.fresh += ["classifier.weight", "classifier.bias"]
    else:
        if labels is None:
            raise HFCheckpointError(
                f"{root} has no classifier head (architecture {arch}"
                f"{', sentence-transformers' if st else ''}); pass --labels a,b,c or --num-classes N to add "
                f"a freshly initialised one")
        head.labels = labels
        clash = sorted(k for k in tensors if k.startswith("classifier."))
        if clash:
            raise HFCheckpointError(f"{source}: architecture {arch} has no classifier head, but the weights "
                                    f"hold {', '.join(clash)}; fix config.json's architectures")
        head.fresh += ["classifier.weight", "classifier.bias"]
        if head.pooling == "pooler" and not any(k.startswith("pooler.") for k in tensors):
            log.warning("%s: no BERT pooler weights; the pooler is freshly initialised (as transformers does)",
                        source)
            head.fresh += ["pooler.dense.weight", "pooler.dense.bias"]
    for k in head.dropped:
        del tensors[k]
    return head


def _label_names(labels: Sequence[str] | None, num_classes: int | None) -> tuple[str, ...] | None:
    if labels is not None and num_classes is not None:
        raise HFCheckpointError("pass --labels or --num-classes, not both")
    if num_classes is not None:
        labels = [f"LABEL_{i}" for i in range(num_classes)]
    if labels is not None and len(labels) < 2:
        raise HFCheckpointError(f"a classifier needs at least 2 labels, got {list(labels)}")
    return tuple(labels) if labels is not None else None


def import_hf(hf_dir: str | os.PathLike, output: str | os.PathLike, labels: Sequence[str] | None = None,
              num_classes: int | None = None, max_length: int | None = None, seed: int = 0,
              truncation_head: int | None = None, long_text: Mapping[str, Any] | None = None,
              allow_regex_tokenizer: bool = False) -> Path:
    """Convert a HF BERT-family checkpoint directory (or a known name) into a jaxclf model directory.

    labels / num_classes: the classes of a fresh head; required when the checkpoint has no
    classifier; with a classifier of another size they replace it. seed: the fresh tensors' init.
    long_text: ModelConfig's long-text settings for the model directory, e.g. {"long_text": "chunks",
    "chunk_pooling": "max"} (keys: LONG_TEXT_FIELDS); truncation_head is the head_tail rule's.
    allow_regex_tokenizer: accept a tokenizer with regex steps (see model_dir.check_tokenizer_regex).
    """
    labels = _label_names(labels, num_classes)
    root = resolve_hf_dir(hf_dir)
    st = read_sentence_transformers(root)
    directory = st.transformer_dir if st else root
    source = str(directory / "config.json")
    if not (directory / "config.json").is_file():
        raise HFCheckpointError(f"{directory}: no config.json; is this a Hugging Face checkpoint directory?")
    hf = read_json(directory / "config.json")
    fields = model_config_fields(hf, source)
    raw = read_tensors(directory)
    arch = architecture(hf, raw, source)
    tensors, dropped = normalize_names(raw, str(directory))
    head = _choose_head(arch, st, hf, tensors, labels, root, source)

    tok, tok_cfg = read_tokenizer(directory, source)
    try:
        model_dir.check_tokenizer_regex(tok, allow_regex_tokenizer, source=str(directory / "tokenizer.json"))
    except model_dir.ModelDirectoryError as e:
        raise HFCheckpointError(str(e)) from None
    if st and st.lowercase:
        tok = prepend_lowercase(tok)
    pad_id = check_tokenizer(tok, tok_cfg, hf.get("pad_token_id"), source)
    try:
        config = ModelConfig(**fields, pooling=head.pooling, pad_token_id=pad_id, num_classes=len(head.labels),
                             id2label=head.labels)
    except (ConfigError, TypeError) as e:
        raise HFCheckpointError(f"{source} does not give a valid jaxclf config: {e}") from e
    if tok.get_vocab_size() > config.vocab_size:
        raise HFCheckpointError(f"{source}: the tokenizer has {tok.get_vocab_size()} tokens but vocab_size is "
                                f"{config.vocab_size}")
    if head.fresh:
        tensors.update(_fresh_tensors(config, head.fresh, seed))
    weights.check_tensors(tensors, weights.expected_shapes(config), source=str(directory))

    length = truncation_length(config.max_position_embeddings, tok_cfg, st.max_seq_length if st else None,
                               max_length)
    if truncation_head is not None:
        if not 1 <= truncation_head < length:
            raise HFCheckpointError(f"--truncation-head must be in [1, {length}), the max length in tokens; "
                                    f"got {truncation_head}")
        config = config.replace(truncation_head=truncation_head)
    if long_text:
        unknown = sorted(set(long_text) - set(LONG_TEXT_FIELDS))
        if unknown:
            raise HFCheckpointError(f"long-text settings {unknown} are not among {list(LONG_TEXT_FIELDS)}")
        try:
            config = config.replace(**long_text)
        except ConfigError as e:
            raise HFCheckpointError(f"long-text settings {dict(long_text)}: {e}") from None
    tok = tokenization.configure(tok, length, pad_id)
    dropped = sorted(dropped + head.dropped)
    provenance = {"hf_dir": str(root), "architecture": arch, "sentence_transformers": bool(st),
                  "pooling": head.pooling, "fresh_tensors": sorted(head.fresh), "dropped_tensors": dropped,
                  "max_length": length, "truncation_head": truncation_head, "long_text": dict(long_text or {})}
    log.info("importing %s (%s, %d layers, d_model %d) -> %s; fresh: %s; dropped: %s", root, arch,
             config.num_encoder_layers, config.d_model, output, head.fresh or "none", dropped or "none")
    return model_dir.write(output, config, tensors, tok, metrics={"imported_from": provenance})
