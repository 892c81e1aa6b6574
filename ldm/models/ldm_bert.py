"""LDM's token transformer (the original's ``BERTEmbedder`` / ``TransformerEmbedder``), tau_theta(y)
trained with the diffusion model: LDM BERT for LDM's text2img models, the layout encoder of
layout2img, and the embedded default model's word-and-layout encoder. Its tokenizer is one of
``ldm.text``'s (bert-base-uncased WordPiece, LDM's layout tokens, or the project's words).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TransformerEmbedderConfig:
    """A token transformer trained with the diffusion model (LDM's ``BERTEmbedder``): token and absolute
    position embeddings, pre-norm blocks of attention (``heads`` x ``head_dim``) and a GELU MLP, and a
    final norm. ``vocab`` names the tokenizer: "bert-base-uncased", "layout" (ids given directly) or
    a vocabulary file of the project's word-and-layout tokenizer."""

    vocab_size: int
    max_seq_len: int
    dim: int
    depth: int
    heads: int = 8
    head_dim: int = 64
    vocab: str = "layout"
    # For a word-and-layout vocabulary file (see ldm.text.word_tokenizer):
    caption_tokens: int = 0
    max_objects: int = 0
    grid: int = 0

    @property
    def context_dim(self) -> int:
        return self.dim

    @property
    def takes_text(self) -> bool:
        """False for an encoder of layout ids alone (``vocab: layout``)."""
        return self.vocab != "layout"


class _TokenAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (self.to_q(x), self.to_k(x), self.to_v(x)))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class _TokenFeedForward(nn.Module):
    """``net.0.0`` Linear dim -> 4 dim (then GELU), ``net.1`` dropout, ``net.2`` Linear 4 dim -> dim."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU()), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _PositionEmbedding(nn.Module):
    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)

    def forward(self, n: int) -> torch.Tensor:
        return self.emb(torch.arange(n, device=self.emb.weight.device))[None]


class _AttentionLayers(nn.Module):
    """``layers.{2i}`` = (LayerNorm, attention), ``layers.{2i+1}`` = (LayerNorm, feed-forward); pre-norm residuals."""

    def __init__(self, c: TransformerEmbedderConfig):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(c.depth):
            self.layers.append(nn.ModuleList([nn.LayerNorm(c.dim), _TokenAttention(c.dim, c.heads, c.head_dim)]))
            self.layers.append(nn.ModuleList([nn.LayerNorm(c.dim), _TokenFeedForward(c.dim)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, block in self.layers:
            x = x + block(norm(x))
        return x


class _TokenTransformer(nn.Module):
    def __init__(self, c: TransformerEmbedderConfig):
        super().__init__()
        self.token_emb = nn.Embedding(c.vocab_size, c.dim)
        self.pos_emb = _PositionEmbedding(c.dim, c.max_seq_len)
        self.attn_layers = _AttentionLayers(c)
        self.norm = nn.LayerNorm(c.dim)
        self.to_logits = nn.Linear(c.dim, c.vocab_size)  # kept for the checkpoint layout; unused for embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_emb(ids) + self.pos_emb(ids.shape[1])
        return self.norm(self.attn_layers(x))


class TransformerEmbedder(nn.Module):
    """Encodes token ids (B, N) to (B, N, dim). Text and layouts become ids through ``tokenizer``, a
    loaded resource attached after construction (``encode``)."""

    def __init__(self, config: TransformerEmbedderConfig, tokenizer=None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.transformer = _TokenTransformer(config)

    def init_non_persistent_buffers(self) -> None:
        """Nothing to recreate: every tensor of this encoder is stored."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"{ids.shape[1]} tokens exceed this encoder's {self.config.max_seq_len}")
        return self.transformer(ids.to(self.transformer.token_emb.weight.device))

    def encode(self, prompts: list[str], min_chunks: int = 1, layouts: list | None = None) -> torch.Tensor:
        if self.tokenizer is None:
            raise RuntimeError("TransformerEmbedder has no tokenizer attached; load the model through ldm.checkpoints")
        return self(self.tokenizer.encode_batch(prompts, layouts))
