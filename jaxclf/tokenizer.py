"""Tokenization with Hugging Face `tokenizers`: train a BPE vocabulary, load any tokenizer.json.

The max length and padding are configured here, once, on the `tokenizers.Tokenizer` itself
(saved inside tokenizer.json); `TextEncoder` adds the model's long-text rule (truncate, head_tail
or chunks: jaxclf.long_text), so every caller gets the same ids and masks.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from jaxclf.long_text import Chunking, Windows, window_rows

if TYPE_CHECKING:
    from jaxclf.config import ModelConfig

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK]  # ids 0..4 in a trained vocabulary


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2,
                    lowercase: bool = True, decodable: bool = False) -> Tokenizer:
    """Train a BPE tokenizer with BERT-style pre-tokenization and specials ([CLS] text [SEP], [PAD]=0).

    BPE rather than WordPiece because `tokenizers`' WordPiece trainer (and BPE with a `##`
    continuation prefix or an end-of-word suffix) picks a different vocabulary from run to run
    on ties, so two identical training runs would not give identical models; plain BPE training
    is deterministic, which resumable, reproducible runs need.

    decodable=True splits words at spaces and marks them with "▁" (SentencePiece's Metaspace)
    instead of BERT's pre-tokenizer, so decode(encode(text)) gives the (normalised) text back with
    its spaces; still plain, deterministic BPE. SimpleTokenizer uses it.
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    norm = [normalizers.NFD(), normalizers.StripAccents()]
    if lowercase:
        norm.insert(1, normalizers.Lowercase())
    tok.normalizer = normalizers.Sequence(norm)
    if decodable:
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    else:
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.BertPreTokenizer(), decoders.BPEDecoder()
    # Every printable ASCII character is in the vocabulary even if the corpus lacks it ("!" -> not [UNK]).
    alphabet = sorted(set(string.ascii_lowercase if lowercase else string.ascii_letters)
                      | set(string.digits) | set(string.punctuation) | ({"▁"} if decodable else set()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id(CLS), tok.token_to_id(SEP)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, cls_id), (SEP, sep_id)])
    return tok


class SimpleTokenizer:
    """The original framework's tokenizer API (build a vocabulary, encode, decode, save, load) over `tokenizers`.

        tok = SimpleTokenizer(vocab_size=2000).build_vocab(texts)
        ids = tok.encode("a lovely little cafe")      # [CLS] ... [SEP], truncated to max_length
        tok.decode(ids)                               # "a lovely little cafe"
        tok.save("tokenizer.json"); SimpleTokenizer.load("tokenizer.json")

    `tok.tokenizer` is the Hugging Face Tokenizer that jaxclf.create / model directories take.
    """

    def __init__(self, vocab_size: int = 8000, max_length: int = 128, lowercase: bool = True,
                 tokenizer: Tokenizer | None = None):
        self.requested_vocab_size, self.max_length, self.lowercase = vocab_size, max_length, lowercase
        self.tokenizer = tokenizer

    def build_vocab(self, texts: Iterable[str], min_frequency: int = 2) -> "SimpleTokenizer":
        """Trains the BPE vocabulary on `texts` (deterministic); returns self."""
        self.tokenizer = train_tokenizer(texts, self.requested_vocab_size, min_frequency, self.lowercase,
                                         decodable=True)
        return self

    def _tok(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("the tokenizer has no vocabulary yet: call build_vocab(texts) or load(path) first")
        return self.tokenizer

    @property
    def vocab_size(self) -> int:
        return self._tok().get_vocab_size()

    @property
    def pad_token_id(self) -> int:
        return self._tok().token_to_id(PAD)

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Token ids of one text, [CLS] and [SEP] included, truncated to max_length (not padded)."""
        ids = self._tok().encode(text).ids
        limit = max_length or self.max_length
        return ids if len(ids) <= limit else ids[:limit - 1] + ids[-1:]

    def encode_batch(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        return [self.encode(t, max_length) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok().decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, path: str) -> None:
        """Writes tokenizer.json (a plain JSON file: loading it never runs code)."""
        self._tok().save(str(path))

    @classmethod
    def load(cls, path: str, max_length: int = 128) -> "SimpleTokenizer":
        tok = Tokenizer.from_file(str(path))
        return cls(vocab_size=tok.get_vocab_size(), max_length=max_length, tokenizer=tok)


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


def truncate_head_tail(ids: Sequence[int], max_length: int, head: int) -> list[int]:
    """The first `head` and the last `max_length - head` ids of a longer sequence; a short one as is."""
    if len(ids) <= max_length:
        return list(ids)
    return list(ids[:head]) + list(ids[len(ids) - (max_length - head):])


class TextEncoder:
    """Texts -> token ids the way a model reads them: its tokenizer, max length and long-text rule.

    tok must be configured (see `configure`): its truncation length is the model's limit. With
    truncation_head=None a longer text keeps its first max_length tokens (ending in [SEP]);
    with N it keeps the first N and the last max_length - N (head+tail: [CLS] + the opening +
    the ending + [SEP]); with `chunking` (jaxclf.long_text) it is read whole as several windows,
    so a text is one row or more: use `windows`. The same rule serves training, evaluation,
    serving and torch_ref; `for_config` picks it from a ModelConfig.
    """

    def __init__(self, tok: Tokenizer, truncation_head: int | None = None, chunking: Chunking | None = None):
        if tok.truncation is None:
            raise ValueError("the tokenizer has no truncation; configure() it with the model's max length first")
        if truncation_head is not None and chunking is not None:
            raise ValueError("truncation_head (head_tail) and chunking are two long-text rules; pick one")
        self.tokenizer = tok
        self.max_length = tok.truncation["max_length"]
        self.pad_id = tok.padding["pad_id"] if tok.padding else 0
        self.truncation_head = truncation_head
        self.chunking = chunking
        if truncation_head is not None and not 1 <= truncation_head < self.max_length:
            raise ValueError(f"truncation_head={truncation_head} must be in [1, {self.max_length}), the "
                             f"tokenizer's max length")
        self._unpadded = Tokenizer.from_str(tok.to_str())  # a copy: the caller's tokenizer keeps its padding
        self._unpadded.no_padding()
        if truncation_head is not None or chunking is not None:
            self._unpadded.no_truncation()  # whole texts, cut below
        if chunking is not None:
            # The special tokens around a text ([CLS] ... [SEP] for BERT), read off a probe encoding.
            probe = self._unpadded.encode("a")
            content = [i for i, s in enumerate(probe.sequence_ids) if s is not None]
            if not content:
                raise ValueError("chunks: the tokenizer maps the probe text 'a' to no tokens")
            self._prefix = probe.ids[:content[0]]
            self._suffix = probe.ids[content[-1] + 1:]
            if self.max_length - len(self._prefix) - len(self._suffix) < 1:
                raise ValueError(f"chunks: max length {self.max_length} leaves no room for text")
            self.chunking = chunking.for_window(self.max_length - len(self._prefix) - len(self._suffix))

    @classmethod
    def for_config(cls, tok: Tokenizer, config: ModelConfig) -> "TextEncoder":
        """The encoder of a model's rule: config.long_text with its truncation_head / chunk settings."""
        return cls(tok, config.truncation_head, config.chunking)

    def _check_one_row(self) -> None:
        if self.chunking is not None:
            raise ValueError("under long_text=chunks a text may be several rows: use windows(), not ids()")

    def ids_one(self, text: str) -> list[int]:
        self._check_one_row()
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        ids = self._unpadded.encode(text).ids
        return ids if self.truncation_head is None else truncate_head_tail(ids, self.max_length,
                                                                           self.truncation_head)

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Unpadded id lists, each at most max_length long (one per text: not under chunks)."""
        self._check_one_row()
        _check_strings(texts)
        out = [e.ids for e in self._unpadded.encode_batch(list(texts))]
        if self.truncation_head is not None:
            out = [truncate_head_tail(ids, self.max_length, self.truncation_head) for ids in out]
        return out

    def windows(self, texts: Sequence[str]) -> Windows:
        """Every row the model reads for these texts, each at most max_length long, with its text's index.

        One row per text under truncate and head_tail; under chunks one per window (TextTooLongError
        for a text past max_chunks with chunk_overflow=refuse).
        """
        texts = list(texts)
        if self.chunking is None:
            return Windows(self.ids(texts), np.arange(len(texts)), len(texts))
        _check_strings(texts)
        rows: list[list[int]] = []
        owner: list[int] = []
        for i, enc in enumerate(self._unpadded.encode_batch(texts, add_special_tokens=False)):
            text_rows = window_rows(enc.ids, self._prefix, self._suffix, self.max_length, self.chunking)
            rows += text_rows
            owner += [i] * len(text_rows)
        return Windows(rows, np.asarray(owner, np.int64), len(texts), len(self._prefix) + len(self._suffix))

    def windows_one(self, text: str) -> list[list[int]]:
        """One text's rows (see `windows`)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        return self.windows([text]).rows

    def encode(self, texts: Sequence[str] | str) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), both int32 (N, T) with T the longest text of the batch."""
        return pad_rows(self.ids([texts] if isinstance(texts, str) else list(texts)), self.pad_id)


def _check_strings(texts: Sequence[Any]) -> None:
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int,
             shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Id lists -> right-padded (input_ids, attention_mask), int32 `shape` (default: rows x longest)."""
    if shape is None:
        shape = (len(rows), max((len(r) for r in rows), default=0))
    ids = np.full(shape, pad_id, np.int32)
    mask = np.zeros(shape, np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return ids, mask


def pad_to(ids: np.ndarray, mask: np.ndarray, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad (N, T) ids and mask to (N, length); padding never changes a logit."""
    extra = length - ids.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad length {ids.shape[1]} down to {length}")
    return (np.pad(ids, ((0, 0), (0, extra)), constant_values=pad_id),
            np.pad(mask, ((0, 0), (0, extra)), constant_values=0))


def length_buckets(max_length: int, smallest: int = 16, midpoints: bool = False) -> tuple[int, ...]:
    """Padded lengths: powers of two from `smallest`, capped by max_length.

    midpoints=True adds 1.5 × each power of two from 32 (48, 96, 192, 384): texts just past a
    power of two (a 33-token tweet) then pad to 48 rather than 64. Serving uses them; training
    does not, as every length bucket costs one more compilation of the train step.
    """
    buckets, n = set(), smallest
    while n < max_length:
        buckets.add(n)
        if midpoints and n >= 32 and n * 3 // 2 < max_length:
            buckets.add(n * 3 // 2)
        n *= 2
    buckets.add(max_length)
    return tuple(sorted(buckets))


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} is longer than the largest bucket {buckets[-1]}")
