"""export_hf: a jaxclf model directory -> a Hugging Face BertForSequenceClassification directory."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from tokenizers import Tokenizer

from jaxclf import calibration, model_dir, weights
from jaxclf.config import ModelConfig
from jaxclf.hf.checkpoint import HFCheckpointError
from jaxclf.hf.tokenizer import SPECIAL_TOKEN_DEFAULTS

log = logging.getLogger(__name__)

EXPORT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def export_refusals(config: ModelConfig) -> list[str]:
    """Why a model is not a BertForSequenceClassification (empty when it is)."""
    problems = []
    if config.norm_first:
        problems.append("norm_first=true (pre-LN); BERT is post-LN")
    if config.position_embedding != "learned":
        problems.append(f"position_embedding={config.position_embedding!r}; BERT has learned positions")
    if config.pooling != "pooler":
        problems.append(f"pooling={config.pooling!r}; BertForSequenceClassification classifies the BERT pooler "
                        f"output (tanh(dense(h[:, 0]))), so only pooling=\"pooler\" is exported")
    return problems


def hf_config(config: ModelConfig) -> dict[str, Any]:
    """The config.json of the exported BertForSequenceClassification."""
    return {
        "architectures": ["BertForSequenceClassification"], "model_type": "bert",
        "vocab_size": config.vocab_size, "hidden_size": config.d_model,
        "num_hidden_layers": config.num_encoder_layers, "num_attention_heads": config.nhead,
        "intermediate_size": config.dim_feedforward, "hidden_act": EXPORT_ACTIVATIONS[config.activation],
        "hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.attention_dropout,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": max(config.type_vocab_size, 1), "initializer_range": config.initializer_range,
        "layer_norm_eps": config.layer_norm_eps, "pad_token_id": config.pad_token_id,
        "position_embedding_type": "absolute", "classifier_dropout": None,
        "problem_type": "single_label_classification",
        "id2label": {str(i): name for i, name in enumerate(config.id2label)},
        "label2id": {name: i for i, name in enumerate(config.id2label)},
        "is_decoder": False, "add_cross_attention": False, "use_cache": False, "dtype": "float32",
    }


def hf_tensors(config: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """jaxclf (torch_ref) names -> BertForSequenceClassification names (`bert.` prefix but the head)."""
    out = {(k if k.startswith("classifier.") else f"bert.{k}"): np.ascontiguousarray(v, dtype=np.float32)
           for k, v in tensors.items()}
    if config.type_vocab_size == 0:  # one zero row: BERT always adds a token-type embedding
        out["bert.embeddings.token_type_embeddings.weight"] = np.zeros((1, config.d_model), np.float32)
    return out


def _tokenizer_config(tok: Tokenizer, config: ModelConfig, max_length: int) -> dict[str, Any]:
    specials = {key: token for key, token in SPECIAL_TOKEN_DEFAULTS.items() if tok.token_to_id(token) is not None}
    specials["pad_token"] = tok.id_to_token(config.pad_token_id)
    # The generic fast tokenizer reads tokenizer.json as is; BertTokenizer would rebuild it from a vocab.
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
            "padding_side": "right", "truncation_side": "right", **specials}


def export_hf(model_directory: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a jaxclf model directory as a HF BertForSequenceClassification directory (atomically)."""
    config, tensors, tok, _ = model_dir.read(model_directory)
    problems = export_refusals(config)
    if problems:
        raise HFCheckpointError(f"{model_directory} is not exported as BertForSequenceClassification: "
                                + "; ".join(problems))
    weights.check_tensors(tensors, weights.expected_shapes(config), source=str(model_directory))
    # BERT has no temperature: 1/T goes into the classifier head, so transformers computes the same logits.
    tensors = calibration.fold_temperature(tensors, config.temperature)
    truncation = tok.truncation
    max_length = truncation["max_length"] if truncation else config.max_position_embeddings
    if config.truncation_head is not None:
        log.warning("%s keeps the first %d and last %d tokens of a longer text (truncation_head); Hugging Face "
                    "tokenizers cut from the right, so texts over %d tokens will be read differently there",
                    model_directory, config.truncation_head, max_length - config.truncation_head, max_length)
    if config.chunking is not None:
        log.warning("%s reads a text longer than %d tokens as up to %d windows whose logits are pooled by %s "
                    "(long_text=chunks); a Hugging Face pipeline reads only its first %d tokens: split and pool "
                    "as jaxclf.long_text does to get the same predictions", model_directory, max_length,
                    config.max_chunks, config.chunk_pooling, max_length)
    tok.no_padding()
    tok.no_truncation()

    import safetensors.numpy

    target = Path(out_dir)
    if target.exists():  # replaced whole: refuse a directory that holds anything but a previous export
        foreign = sorted(p.name for p in target.iterdir()) if target.is_dir() else [target.name]
        foreign = [name for name in foreign if name not in EXPORT_FILES]
        if foreign:
            raise HFCheckpointError(f"{target} exists and holds {', '.join(foreign[:5])}; export writes a "
                                    f"new directory, give a path that does not exist or an earlier export")
    with model_dir.atomic_directory(target) as tmp:  # a failure leaves any previous export intact
        (tmp / "config.json").write_text(json.dumps(hf_config(config), indent=2) + "\n", encoding="utf-8")
        safetensors.numpy.save_file(hf_tensors(config, tensors), str(tmp / "model.safetensors"),
                                    metadata={"format": "pt"})
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(_tokenizer_config(tok, config, max_length), indent=2) + "\n", encoding="utf-8")
    log.info("exported %s -> %s (BertForSequenceClassification, %d labels)", model_directory, target,
             config.num_classes)
    return target
