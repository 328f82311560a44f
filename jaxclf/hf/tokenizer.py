"""A Hugging Face checkpoint's tokenizer: read (tokenizer.json or vocab.txt), checked, and its truncation."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from jaxclf.hf.checkpoint import HFCheckpointError, read_json

log = logging.getLogger(__name__)

SPECIAL_TOKEN_KEYS = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
SPECIAL_TOKEN_DEFAULTS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                          "cls_token": "[CLS]", "mask_token": "[MASK]"}
UNLIMITED_LENGTH = 10 ** 6  # tokenizer_config's "no limit" is int(1e30); anything this large means none


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


def prepend_lowercase(tok: Tokenizer) -> Tokenizer:
    """sentence-transformers' do_lower_case: text.lower() before the tokenizer's own normalizer."""
    state = json.loads(tok.to_str())
    current = state.get("normalizer")
    steps = [{"type": "Lowercase"}] + ([current] if current else [])
    state["normalizer"] = {"type": "Sequence", "normalizers": steps}
    return Tokenizer.from_str(json.dumps(state))


def read_tokenizer(directory: Path, source: str) -> tuple[Tokenizer, dict[str, Any]]:
    """(tokenizer, tokenizer_config) of a checkpoint: tokenizer.json if present, else vocab.txt."""
    cfg_file = directory / "tokenizer_config.json"
    tok_cfg = read_json(cfg_file) if cfg_file.is_file() else {}
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


def check_tokenizer(tok: Tokenizer, tok_cfg: Mapping[str, Any], pad_token_id: int | None,
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
