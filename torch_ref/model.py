"""PyTorch reference of the jaxclf encoder classifier.

A plain, readable twin of the JAX model: same config (jaxclf.config.ModelConfig), same maths, and
parameter names equal to Hugging Face BERT's without the ``bert.`` prefix, so a ``model.safetensors``
written by jaxclf loads here with ``load_state_dict(strict=True)`` and the logits agree to ~1e-5.

Numerics: the module runs in whatever dtype it was cast to, but attention scores/softmax and every
LayerNorm are computed in float32 (cast up, then back down), and logits are returned as float32.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jaxclf.config import ModelConfig


def sinusoidal_table(num_positions: int, d_model: int) -> np.ndarray:
    """Fixed sin/cos position table (P, D): computed in float64, then cast to float32."""
    pos = np.arange(num_positions)[:, None]
    i = np.arange(0, d_model, 2)
    angle = pos / np.power(10000.0, i / d_model)  # (P, D/2)
    pe = np.zeros((num_positions, d_model))
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle)
    return pe.astype(np.float32)


def layer_norm(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """Apply ``ln`` in float32 whatever the dtype of ``x``; the result has ``x``'s dtype."""
    out = F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)
    return out.to(x.dtype)


def activation_fn(name: str):
    if name == "gelu":
        return F.gelu  # exact (erf)
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"unknown activation {name!r}")


class Embeddings(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        D, P = config.d_model, config.max_position_embeddings
        self.word_embeddings = nn.Embedding(config.vocab_size, D)
        if config.position_embedding == "learned":
            self.position_embeddings = nn.Embedding(P, D)
        else:
            # Not a parameter and not saved: it is recomputed identically from the config.
            self.register_buffer("position_table", torch.from_numpy(sinusoidal_table(P, D)),
                                 persistent=False)
        if config.type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(config.type_vocab_size, D)
        self.LayerNorm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if self.config.position_embedding == "learned":
            pos = self.position_embeddings.weight[:T]  # (T, D)
        else:
            pos = self.position_table[:T]  # (T, D)
        # Sum order matters at the last ulp: word + position, then + token type.
        x = self.word_embeddings(input_ids) + pos[None]  # (B, T, D)
        if self.config.type_vocab_size > 0:
            x = x + self.token_type_embeddings(token_type_ids)
        x = layer_norm(self.LayerNorm, x)
        return self.dropout(x)


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        D = config.d_model
        self.nhead = config.nhead
        self.head_dim = config.head_dim
        self.query = nn.Linear(D, D)
        self.key = nn.Linear(D, D)
        self.value = nn.Linear(D, D)
        self.dropout = nn.Dropout(config.attention_dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, D = h.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(B, T, self.nhead, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

        q, k, v = heads(self.query(h)), heads(self.key(h)), heads(self.value(h))
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(self.head_dim))  # (B, H, T, T)
        # Padding keys get the most negative finite float32 (not -inf), so a fully padded row
        # gives a uniform softmax instead of NaN; the JAX twin does the same.
        scores = scores.masked_fill(~mask[:, None, None, :].bool(), torch.finfo(torch.float32).min)
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        probs = self.dropout(probs)
        ctx = torch.matmul(probs, v)  # (B, H, T, Dh)
        return ctx.transpose(1, 2).reshape(B, T, D)  # (B, T, D)


class AttentionOutput(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.LayerNorm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self = SelfAttention(config)
        self.output = AttentionOutput(config)  # dense projection + the block's first LayerNorm

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output.dense(self.self(h, mask))


class Intermediate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.dim_feedforward)


class Output(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.dim_feedforward, config.d_model)
        self.LayerNorm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)


class Layer(nn.Module):
    """One transformer block, post-LN (BERT) or pre-LN depending on config.norm_first."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm_first = config.norm_first
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = Output(config)
        self.act = activation_fn(config.activation)
        self.dropout = nn.Dropout(config.dropout)

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        return self.output.dense(self.act(self.intermediate.dense(h)))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ln1, ln2 = self.attention.output.LayerNorm, self.output.LayerNorm
        if self.norm_first:
            h = h + self.dropout(self.attention(layer_norm(ln1, h), mask))
            h = h + self.dropout(self.ffn(layer_norm(ln2, h)))
        else:
            h = layer_norm(ln1, h + self.dropout(self.attention(h, mask)))
            h = layer_norm(ln2, h + self.dropout(self.ffn(h)))
        return h


class Encoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm_first = config.norm_first
        self.layer = nn.ModuleList(Layer(config) for _ in range(config.num_encoder_layers))
        if config.norm_first:
            self.LayerNorm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)  # final LN

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            h = layer(h, mask)
        if self.norm_first:
            h = layer_norm(self.LayerNorm, h)
        return h


class Pooler(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)


class TransformerClassifier(nn.Module):
    """Encoder + pooling + linear classifier; state_dict names are HF BERT's minus ``bert.``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        if config.pooling == "pooler":
            self.pooler = Pooler(config)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.d_model, config.num_classes)

    @classmethod
    def from_config(cls, config: ModelConfig, seed: int = 0) -> "TransformerClassifier":
        """A freshly initialised model; the same seed gives the same weights."""
        model = cls(config)
        model._init_weights(torch.Generator().manual_seed(seed))
        return model

    @torch.no_grad()
    def _init_weights(self, generator: Optional[torch.Generator] = None) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
                if isinstance(module, nn.Linear):
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, return_hidden: bool = False):
        """input_ids (B, T) int64 -> logits (B, num_classes) float32.

        attention_mask: (B, T), 1 = real token, 0 = padding; default ``input_ids != pad_token_id``.
        token_type_ids: (B, T), default zeros; ignored when type_vocab_size == 0.
        return_hidden: return {"logits", "last_hidden_state" (B, T, D), "pooled" (B, D)} instead.
        """
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_token_id
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)

        h = self.embeddings(input_ids, token_type_ids)  # (B, T, D)
        h = self.encoder(h, attention_mask)  # (B, T, D)

        pooling = self.config.pooling
        if pooling == "cls":
            pooled = h[:, 0]
        elif pooling == "mean":
            m = attention_mask.float()  # (B, T)
            # Summed in float32 whatever the compute dtype, as in jaxclf; clamp: an all-padding
            # row divides by 1 instead of 0.
            pooled = ((h.float() * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)).to(h.dtype)
        else:  # "pooler"
            pooled = torch.tanh(self.pooler.dense(h[:, 0]))  # (B, D)

        logits = self.classifier(self.dropout(pooled)).float()  # (B, C)
        if self.config.temperature != 1.0:  # calibration: confidences change, predictions never do
            logits = logits / self.config.temperature
        if return_hidden:
            return {"logits": logits, "last_hidden_state": h, "pooled": pooled}
        return logits
