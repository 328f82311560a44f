"""How a text longer than the model is read: `truncate`, `head_tail` or `chunks` (ModelConfig.long_text).

    truncate   the first max_length tokens ([CLS] + the opening + [SEP])
    head_tail  the first truncation_head tokens and the last max_length - truncation_head
    chunks     the whole text as overlapping windows of max_length tokens, each [CLS] + a slice + [SEP];
               the windows run through the model as rows of a batch and the document's logits are the
               windows' logits pooled (`pool_windows`): "mean", "max" (per class) or "weighted" (a mean
               weighted by each window's number of text tokens, so a short last window counts less)

Windows start every `chunk_stride` text tokens and the last one ends at the text's end; at most
`max_chunks` windows are read, and a longer text is either cut after them (`chunk_overflow`
"truncate": the tail past the last window is not read) or refused ("refuse": TextTooLongError).
A text that fits is one window, exactly what `truncate` reads, so short texts score the same
under every rule.

Training under chunks: each window of a training text is a training example of its own carrying
the text's label (at most max_chunks of them; train.batches.tokenize_dataset, expand_to_windows).
Windows are cut once, before training, so the Grain pipeline shuffles, batches and resumes rows
exactly as it does texts (a resumed run is bitwise the uninterrupted one), and an epoch is a pass
over every window. A window that does not say its text's class is a noisy example; the model
learns to give such windows flat logits, which the pooled document score then outweighs. Evaluation
(the training loop's and train.evaluate.evaluate_classifier) pools each text's window logits with
the model's chunk_pooling and scores texts, never windows, just as jaxclf.load(...).logits does.

This module is plain Python and NumPy: training, evaluation, the engine, bulk prediction and
torch_ref all cut texts through tokenizer.TextEncoder, which calls `window_spans` here.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxclf.errors import JaxclfError

LONG_TEXT_RULES = ("truncate", "head_tail", "chunks")
CHUNK_POOLINGS = ("mean", "max", "weighted")
CHUNK_OVERFLOWS = ("truncate", "refuse")
# ModelConfig's fields of the chunks rule, with long_text itself (truncation_head belongs to head_tail)
LONG_TEXT_FIELDS = ("long_text", "chunk_stride", "max_chunks", "chunk_overflow", "chunk_pooling")


class TextTooLongError(JaxclfError, ValueError):
    """A text needs more windows than max_chunks allows and chunk_overflow is "refuse"."""


@dataclasses.dataclass(frozen=True)
class Chunking:
    """The `chunks` rule's settings, from ModelConfig (see there for their defaults)."""

    stride: int | None  # text tokens between the starts of two consecutive windows; None: 3/4 of a window
    max_windows: int
    overflow: str = "truncate"
    pooling: str = "mean"

    def for_window(self, window: int) -> "Chunking":
        """These settings for windows of `window` text tokens: the default stride resolved, a longer one refused."""
        stride = self.stride if self.stride is not None else max(1, window * 3 // 4)
        if not 1 <= stride <= window:
            raise ValueError(f"chunk_stride {stride} must be in [1, {window}], the text tokens of one window "
                             f"(a larger stride would skip tokens between windows)")
        return dataclasses.replace(self, stride=stride)


def window_spans(num_tokens: int, window: int, chunking: Chunking) -> list[tuple[int, int]]:
    """[start, end) spans over a text's `num_tokens` tokens (special tokens excluded), each at most `window`.

    Starts are 0, stride, 2*stride, ...; the last window is moved back to end at the text's end
    (so it is full, overlapping its neighbour more), unless the windows run out first.
    """
    if num_tokens <= window:
        return [(0, num_tokens)]
    needed = 1 + -(-(num_tokens - window) // chunking.stride)  # ceil: windows to reach the end
    if needed > chunking.max_windows:
        if chunking.overflow == "refuse":
            raise TextTooLongError(
                f"text of {num_tokens} tokens needs {needed} windows of {window} tokens (stride "
                f"{chunking.stride}) but max_chunks is {chunking.max_windows}; raise max_chunks or set "
                f"chunk_overflow=truncate to read only the first {chunking.max_windows}")
        return [(k * chunking.stride, k * chunking.stride + window) for k in range(chunking.max_windows)]
    starts = [k * chunking.stride for k in range(needed - 1)] + [num_tokens - window]
    return [(s, s + window) for s in starts]


@dataclasses.dataclass
class Windows:
    """Rows to run (token ids, specials included) and, per row, the index of the text it belongs to."""

    rows: list[list[int]]
    owner: np.ndarray  # int64 (len(rows),): text index of each row, non-decreasing
    num_texts: int
    special_tokens: int = 0  # per row, the [CLS]/[SEP]-like tokens around the text

    @property
    def text_tokens(self) -> np.ndarray:
        """Per row, its number of text tokens: the weights of the "weighted" pooling."""
        return np.array([len(r) - self.special_tokens for r in self.rows], np.float64)

    def pool(self, logits: np.ndarray, pooling: str = "mean") -> np.ndarray:
        """(len(rows), C) row logits -> (num_texts, C) text logits (see pool_windows)."""
        return pool_windows(logits, self.owner, self.num_texts, pooling, self.text_tokens)

    def counts(self) -> np.ndarray:
        """Windows per text."""
        return np.bincount(self.owner, minlength=self.num_texts)


def pool_windows(logits: np.ndarray, owner: np.ndarray, num_texts: int, pooling: str = "mean",
                 weights: np.ndarray | None = None) -> np.ndarray:
    """(R, C) window logits -> (num_texts, C) document logits by `pooling`; every text has >= 1 window.

    "mean" and "weighted" are computed in float64 and returned as float32, so the result does not
    depend on the order windows were batched in.
    """
    logits = np.asarray(logits)
    owner = np.asarray(owner)
    counts = np.bincount(owner, minlength=num_texts)
    if len(logits) != len(owner) or (counts == 0).any():
        raise ValueError(f"pool_windows: {len(logits)} rows for owners of {len(owner)} rows; every one of "
                         f"{num_texts} texts needs a window")
    if pooling == "max":
        out = np.full((num_texts, logits.shape[1]), -np.inf, np.float64)
        np.maximum.at(out, owner, logits.astype(np.float64))
        return out.astype(np.float32)
    if pooling == "mean":
        w = np.ones(len(owner), np.float64)
    elif pooling == "weighted":
        if weights is None:
            raise ValueError("weighted pooling needs the windows' token counts")
        # A window of no text tokens is an empty text's only window: weight 1, not 0/0.
        w = np.maximum(np.asarray(weights, np.float64), 1.0)
    else:
        raise ValueError(f"pooling must be one of {', '.join(CHUNK_POOLINGS)}; got {pooling!r}")
    total = np.zeros((num_texts, logits.shape[1]), np.float64)
    np.add.at(total, owner, logits.astype(np.float64) * w[:, None])
    return (total / np.bincount(owner, weights=w, minlength=num_texts)[:, None]).astype(np.float32)


def window_rows(content: Sequence[int], prefix: Sequence[int], suffix: Sequence[int], max_length: int,
                chunking: Chunking) -> list[list[int]]:
    """One text's windows as id rows: prefix ([CLS]) + a slice of its content + suffix ([SEP])."""
    window = max_length - len(prefix) - len(suffix)
    return [list(prefix) + list(content[s:e]) + list(suffix)
            for s, e in window_spans(len(content), window, chunking)]
