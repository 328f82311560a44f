"""Tokenization with Hugging Face `tokenizers`: train a BPE vocabulary, load any tokenizer.json.

Truncation and padding are configured here, once, on the `tokenizers.Tokenizer` itself
(they are saved inside tokenizer.json), so every caller gets the same ids and masks.
"""

from __future__ import annotations

import string
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK]  # ids 0..4 in a trained vocabulary


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2,
                    lowercase: bool = True) -> Tokenizer:
    """Train a BPE tokenizer with BERT-style pre-tokenization and specials ([CLS] text [SEP], [PAD]=0).

    BPE rather than WordPiece because `tokenizers`' WordPiece trainer (and BPE with a `##`
    continuation prefix or an end-of-word suffix) picks a different vocabulary from run to run
    on ties, so two identical training runs would not give identical models; plain BPE training
    is deterministic, which resumable, reproducible runs need.
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    norm = [normalizers.NFD(), normalizers.StripAccents()]
    if lowercase:
        norm.insert(1, normalizers.Lowercase())
    tok.normalizer = normalizers.Sequence(norm)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.BPEDecoder()
    # Every printable ASCII character is in the vocabulary even if the corpus lacks it ("!" -> not [UNK]).
    alphabet = sorted(set(string.ascii_lowercase if lowercase else string.ascii_letters)
                      | set(string.digits) | set(string.punctuation))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id(CLS), tok.token_to_id(SEP)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, cls_id), (SEP, sep_id)])
    return tok


def configure(tok: Tokenizer, max_length: int, pad_token_id: int) -> Tokenizer:
    """Truncate to max_length (special tokens included) and pad to the longest text of a batch.

    A shorter truncation the tokenizer already carries is kept: an imported checkpoint's
    tokenizer.json records its model_max_length / --max-length there (see jaxclf.hf).
    """
    pad_token = tok.id_to_token(pad_token_id)
    if pad_token is None:
        raise ValueError(f"pad_token_id={pad_token_id} is not in the tokenizer's vocabulary "
                         f"(size {tok.get_vocab_size()})")
    if tok.truncation is not None:
        max_length = min(max_length, tok.truncation["max_length"])
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=pad_token_id, pad_token=pad_token)
    return tok


def load(path: str, max_length: int, pad_token_id: int) -> Tokenizer:
    """Load a tokenizer.json and configure truncation/padding for the model."""
    return configure(Tokenizer.from_file(str(path)), max_length, pad_token_id)


def encode(tok: Tokenizer, texts: Sequence[str] | str) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (input_ids, attention_mask), both int32 (N, T) with T the longest text of the batch."""
    if isinstance(texts, str):
        texts = [texts]
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    encodings = tok.encode_batch(list(texts))
    ids = np.asarray([e.ids for e in encodings], dtype=np.int32).reshape(len(texts), -1)
    mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int32).reshape(len(texts), -1)
    return ids, mask


def pad_to(ids: np.ndarray, mask: np.ndarray, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad (N, T) ids and mask to (N, length); padding never changes a logit."""
    extra = length - ids.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad length {ids.shape[1]} down to {length}")
    return (np.pad(ids, ((0, 0), (0, extra)), constant_values=pad_id),
            np.pad(mask, ((0, 0), (0, extra)), constant_values=0))
