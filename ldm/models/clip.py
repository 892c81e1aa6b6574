"""The CLIP text encoders of Stable Diffusion, tau_theta(y) for text.

``CLIPTextEncoder`` is Stable Diffusion v1's frozen CLIP ViT-L/14 text tower, run through
transformers' ``CLIPTextModel``. Its keys in a checkpoint are
``cond_stage_model.transformer.text_model.*``; transformers 5 dropped the ``text_model`` level from
``CLIPTextModel``, so a small holder module keeps that level and the original keys load unchanged.

``OpenCLIPTextEncoder`` is Stable Diffusion 2.x's frozen OpenCLIP ViT-H/14 text tower, written here
with the module names of open_clip so that the original ``cond_stage_model.model.*`` keys load
unchanged. It returns the penultimate layer's output after the final layer norm, as SD 2.x does.

Both use the CLIP BPE tokenizer (``ldm.text.clip_tokenizer``). Prompts longer than 75 tokens are
split into chunks of 75, each wrapped in start/end tokens and padded to 77, encoded separately and
concatenated along the sequence (as AUTOMATIC1111 does). CLIP pads with its end token, OpenCLIP with
token 0.

``encode`` reads AUTOMATIC1111's emphasis syntax (``ldm.text.prompt_syntax``), as its
``sd_hijack_clip`` does: each weighted piece is tokenized on its own, ``BREAK`` starts a new chunk,
and a chunk that would overflow is cut after its last comma when that comma is within
``COMMA_BACKTRACK`` tokens of the end (the rest moves to the next chunk). After the encoder each
token's embedding is multiplied by its weight and, in the "Original" emphasis, each chunk's mean is
restored. A1111 takes that mean over the whole batch of texts encoded together; here it is each
prompt's own chunk mean, so a prompt's conditioning does not depend on the others in the batch (the
same number for A1111's usual batch of one prompt). A chunk whose weights are all 1 is left as
encoded, so a prompt with no syntax encodes exactly as the literal text does.

Textual-inversion embeddings are inserted as A1111 inserts them: ``encode(..., embeddings={name:
vectors})`` looks for each name's token sequence in the prompt's tokens (the longest name first);
where one appears its tokens are dropped and ``n_vec`` placeholder positions take their place,
carrying the current emphasis weight. An embedding never straddles two chunks: one that would not
fit in the current chunk starts the next. After the token-embedding lookup the placeholders' rows
are replaced with the embedding's vectors; the position embeddings and the transformer run as usual.
(A1111 leaves an embedding behind when the comma backtrack moves it to the next chunk; here it moves
with its placeholders.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from ldm.text.prompt_syntax import Piece, check_emphasis, parse_emphasis

COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
CLIP_LAYERS = ("last", "penultimate")


@dataclass(frozen=True)
class CLIPTextEncoderConfig:
    """The CLIP text transformer. Defaults are ViT-L/14 (SD v1)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = 77
    hidden_act: str = "quick_gelu"
    # "last": the last layer after the final layer norm (SD v1); "penultimate": the output of the layer
    # before it, with no final norm (SDXL's FrozenCLIPEmbedder layer "hidden", layer_idx 11 of 12)
    layer: str = "last"

    def __post_init__(self):
        if self.layer not in CLIP_LAYERS:
            raise ValueError(f"CLIP layer {self.layer!r} is not known; use one of {', '.join(CLIP_LAYERS)}")

    @property
    def context_dim(self) -> int:
        return self.hidden_size

    @property
    def chunk_tokens(self) -> int:
        """Prompt tokens per chunk: the context length less the start and end tokens."""
        return self.max_positions - 2


PLACEHOLDER = 0  # the token id an embedding's positions carry until its vectors replace them (A1111's)


class EmbeddingFix(NamedTuple):
    """One embedding's place in the encoded rows: its vectors replace the placeholders' token vectors."""

    row: int  # the chunk's row among the B * chunks rows encoded
    offset: int  # its first position among the chunk's prompt tokens (the start token not counted)
    name: str
    vectors: torch.Tensor  # (n_vec, width)


class WeightedTokens(NamedTuple):
    ids: torch.Tensor  # (B, chunks, size + 2) token ids
    weights: torch.Tensor  # (B, chunks, size + 2) float32 emphasis; start, end and padding are 1
    fixes: tuple[EmbeddingFix, ...] = ()


def _token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]


class _NameIndex:
    """Embedding names by the first of their tokens, the longest first (A1111's ``register_embedding_by_name``)."""

    def __init__(self, tokenizer, names: Iterable[str]):
        self.by_first: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        for name in names:
            ids = tuple(_token_ids(tokenizer, name))
            if ids:
                self.by_first.setdefault(ids[0], []).append((ids, name))
        for entries in self.by_first.values():
            entries.sort(key=lambda entry: len(entry[0]), reverse=True)

    def at(self, tokens: list[int], position: int) -> tuple[int, str] | None:
        """(the name's token count, the name) of the embedding whose tokens start at ``position``, or None."""
        for ids, name in self.by_first.get(tokens[position], ()):
            if tuple(tokens[position : position + len(ids)]) == ids:
                return len(ids), name
        return None


@dataclass
class _Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, str]] = field(default_factory=list)  # (offset, embedding name)

    def split(self, cut: int) -> tuple[_Chunk, _Chunk]:
        """The tokens before ``cut`` and those from it, each with its embeddings."""
        head = _Chunk(self.tokens[:cut], self.weights[:cut], [(o, n) for o, n in self.fixes if o < cut])
        tail = _Chunk(self.tokens[cut:], self.weights[cut:], [(o - cut, n) for o, n in self.fixes if o >= cut])
        return head, tail


def _piece_chunks(tokenizer, pieces: list[Piece], size: int, backtrack: int,
                  embeddings: Mapping[str, torch.Tensor] | None = None, names: _NameIndex | None = None) -> list[_Chunk]:
    """One prompt's chunks of at most ``size`` tokens, as A1111's ``tokenize_line``; where the tokens of a
    name in ``names`` appear, that embedding's ``n_vec`` placeholders instead (``embeddings``: name -> vectors)."""
    comma = _token_ids(tokenizer, ",")
    comma = comma[0] if len(comma) == 1 else None
    chunks: list[_Chunk] = []
    chunk, last_comma = _Chunk(), -1
    for piece in pieces:
        if piece.is_break:
            chunks.append(chunk)
            chunk, last_comma = _Chunk(), -1
            continue
        tokens, position = _token_ids(tokenizer, piece.text), 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(chunk.tokens)
            elif backtrack and len(chunk.tokens) == size and last_comma != -1 and size - last_comma <= backtrack:
                head, chunk = chunk.split(last_comma + 1)  # the tokens after the comma start the next chunk
                chunks.append(head)
                last_comma = -1
            if len(chunk.tokens) == size:
                chunks.append(chunk)
                chunk, last_comma = _Chunk(), -1
            found = names.at(tokens, position) if names is not None else None
            if found is None:
                chunk.tokens.append(token)
                chunk.weights.append(piece.weight)
                position += 1
                continue
            name_tokens, name = found
            count = len(embeddings[name])
            if len(chunk.tokens) + count > size:  # an embedding is never split between chunks
                chunks.append(chunk)
                chunk, last_comma = _Chunk(), -1
            chunk.fixes.append((len(chunk.tokens), name))
            chunk.tokens += [PLACEHOLDER] * count
            chunk.weights += [piece.weight] * count
            position += name_tokens
    if chunk.tokens or not chunks:
        chunks.append(chunk)
    return chunks


def weighted_token_chunks(tokenizer, prompts: list[list[Piece]], size: int, pad_id: int, min_chunks: int = 1,
                          backtrack: int = COMMA_BACKTRACK,
                          embeddings: Mapping[str, torch.Tensor] | None = None) -> WeightedTokens:
    """Token ids and weights of parsed prompts: each chunk of at most ``size`` tokens is wrapped in the
    start and end tokens and padded with ``pad_id``; every prompt gets the same number of chunks (an
    added chunk is an empty prompt's). ``embeddings`` (name -> (n_vec, width) vectors) are found by
    their names' tokens and placed as ``fixes``."""
    tok = tokenizer
    names = _NameIndex(tok, embeddings) if embeddings else None
    per_prompt = [_piece_chunks(tok, pieces, size, backtrack, embeddings, names) for pieces in prompts]
    count = max([min_chunks] + [len(c) for c in per_prompt])
    ids, weights, fixes = [], [], []
    for i, chunks in enumerate(per_prompt):
        chunks = chunks + [_Chunk() for _ in range(count - len(chunks))]
        for k, chunk in enumerate(chunks):
            pad = size - len(chunk.tokens)
            ids.append([tok.bos_token_id, *chunk.tokens, tok.eos_token_id] + [pad_id] * pad)
            weights.append([1.0, *chunk.weights, 1.0] + [1.0] * pad)
            fixes += [EmbeddingFix(i * count + k, offset, name, embeddings[name]) for offset, name in chunk.fixes]
    shape = (len(prompts), count, size + 2)
    return WeightedTokens(torch.tensor(ids, dtype=torch.long).view(shape), torch.tensor(weights).view(shape), tuple(fixes))


def embedding_names_in(tokenizer, texts: Iterable[str], names: Iterable[str]) -> list[str]:
    """The ``names`` whose tokens appear in the texts (A1111 syntax), matched as ``encode`` matches them,
    in the order they first appear."""
    index, found = _NameIndex(tokenizer, names), {}
    for text in texts:
        for piece in parse_emphasis(text):
            tokens, position = ([] if piece.is_break else _token_ids(tokenizer, piece.text)), 0
            while position < len(tokens):
                match = index.at(tokens, position)
                if match is not None:
                    found[match[1]] = None
                position += match[0] if match is not None else 1
    return list(found)


def put_vectors(token_vectors: torch.Tensor, fixes: Iterable[EmbeddingFix]) -> torch.Tensor:
    """Token vectors (rows, N, C) with each embedding's vectors in place of its placeholders, in place
    (A1111's ``EmbeddingsWithFixes``)."""
    for fix in fixes:
        start = fix.offset + 1  # after the start token
        count = min(token_vectors.shape[1] - start - 1, len(fix.vectors))
        token_vectors[fix.row, start : start + count] = fix.vectors[:count].to(token_vectors.device, token_vectors.dtype)
    return token_vectors


def bpe_token_chunks(tokenizer, prompts: list[str], size: int, pad_id: int, min_chunks: int = 1) -> torch.Tensor:
    """Token ids (B, chunks, size + 2) of CLIP BPE prompts read literally: each chunk of ``size`` tokens
    is wrapped in the start and end tokens and padded with ``pad_id``; every prompt gets the same
    number of chunks."""
    tok = tokenizer
    ids = [tok(p, add_special_tokens=False, truncation=False, verbose=False)["input_ids"] for p in prompts]
    chunks = max([min_chunks] + [math.ceil(len(i) / size) for i in ids])
    rows = []
    for prompt_ids in ids:
        for c in range(chunks):
            part = prompt_ids[c * size : (c + 1) * size]
            rows.append([tok.bos_token_id, *part, tok.eos_token_id] + [pad_id] * (size - len(part)))
    return torch.tensor(rows, dtype=torch.long).view(len(prompts), chunks, size + 2)


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor, mode: str = "Original") -> torch.Tensor:
    """Token embeddings ``z`` (B, chunks * N, C) times their ``weights`` (B, chunks, N); "Original"
    then rescales each prompt's chunk to its mean before weighting, "No norm" does not. A chunk whose
    weights are all 1 is returned as it was."""
    check_emphasis(mode)
    b, chunks, n = weights.shape
    z_chunks = z.view(b, chunks, n, -1)  # (B, chunks, N, C)
    weights = weights.to(z.device)
    weighted = (weights != 1).any(dim=-1)  # (B, chunks)
    if not weighted.any():
        return z
    out = z_chunks.clone()
    for i, k in weighted.nonzero().tolist():
        chunk = z_chunks[i, k].float()  # (N, C)
        scaled = chunk * weights[i, k, :, None]
        if mode == "Original":
            scaled = scaled * (chunk.mean() / scaled.mean())
        out[i, k] = scaled.to(z.dtype)
    return out.view(b, chunks * n, -1)


class _TextTransformer(nn.Module):
    """Holds ``text_model`` so the checkpoint keys keep transformers 4's ``text_model.`` level."""

    def __init__(self, config):
        from transformers import CLIPTextModel  # imported where a model is built: it takes a second to import

        super().__init__()
        self.text_model = CLIPTextModel(config)


class CLIPTextEncoder(nn.Module):
    """Encodes prompts to (B, 77 * chunks, hidden) token embeddings (the last layer, after its final norm).

    The tokenizer is a loaded resource (found by ``ldm.text``), not model weights; it is
    attached after construction.
    """

    def __init__(self, config: CLIPTextEncoderConfig, tokenizer=None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        from transformers import CLIPTextConfig

        hf_config = CLIPTextConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            max_position_embeddings=config.max_positions,
            hidden_act=config.hidden_act,
            bos_token_id=config.vocab_size - 2,
            eos_token_id=config.vocab_size - 1,
            pad_token_id=config.vocab_size - 1,
        )
        self.transformer = _TextTransformer(hf_config)

    def init_non_persistent_buffers(self) -> None:
        """Recreate the position-id buffer that checkpoints do not store (after a meta-device build)."""
        embeddings = self.transformer.text_model.embeddings
        positions = torch.arange(self.config.max_positions, device=embeddings.token_embedding.weight.device)
        embeddings.register_buffer("position_ids", positions.expand(1, -1), persistent=False)

    def token_chunks(self, prompts: list[str], min_chunks: int = 1) -> torch.Tensor:
        """Token ids (B, chunks, 77): every prompt gets the same number of chunks, padding with empty ones."""
        if self.tokenizer is None:
            raise RuntimeError("CLIPTextEncoder has no tokenizer attached; load the model through ldm.checkpoints")
        return bpe_token_chunks(self.tokenizer, prompts, self.config.chunk_tokens, self.tokenizer.pad_token_id, min_chunks)

    def forward(self, token_chunks: torch.Tensor, fixes: tuple[EmbeddingFix, ...] = ()) -> torch.Tensor:
        b, chunks, n = token_chunks.shape
        text = self.transformer.text_model
        ids = token_chunks.view(b * chunks, n).to(text.embeddings.token_embedding.weight.device)
        out = _run_with_vectors(text, ids, fixes, self.config.layer)
        return out.reshape(b, chunks * n, -1)  # (B, chunks*77, hidden)

    def weighted_chunks(self, prompts: list[str], min_chunks: int = 1,
                        embeddings: Mapping[str, torch.Tensor] | None = None) -> WeightedTokens:
        """Token ids and emphasis weights (B, chunks, 77) of prompts in A1111's syntax, and where the
        ``embeddings`` (name -> (n_vec, hidden) vectors) named in them go."""
        if self.tokenizer is None:
            raise RuntimeError("CLIPTextEncoder has no tokenizer attached; load the model through ldm.checkpoints")
        return weighted_token_chunks(self.tokenizer, [parse_emphasis(p) for p in prompts], self.config.chunk_tokens,
                                     self.tokenizer.pad_token_id, min_chunks, embeddings=embeddings)

    def encode(self, prompts: list[str], min_chunks: int = 1, emphasis: str = "Original",
               embeddings: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Prompts in A1111's syntax to (B, 77 * chunks, hidden), weights applied as ``emphasis`` says; the
        names of ``embeddings`` in them stand for those vectors."""
        tokens = self.weighted_chunks(prompts, min_chunks, embeddings)
        return apply_emphasis(self(tokens.ids, tokens.fixes), tokens.weights, emphasis)


def _run_with_vectors(text, ids: torch.Tensor, fixes: tuple[EmbeddingFix, ...], layer: str = "last") -> torch.Tensor:
    """transformers' ``CLIPTextModel.forward`` from token ids, the embeddings' vectors put in place of
    their placeholders: the same steps, position embeddings, causal mask, encoder, and then the final norm
    of the last layer's output ("last"), or the penultimate layer's output as it is ("penultimate")."""
    if not fixes and layer == "last":
        return text(input_ids=ids).last_hidden_state
    from transformers.masking_utils import create_causal_mask

    x = text.embeddings(inputs_embeds=put_vectors(text.embeddings.token_embedding(ids), fixes))
    mask = create_causal_mask(config=text.config, inputs_embeds=x, attention_mask=None, past_key_values=None)
    if layer == "penultimate":  # the encoder's layers but the last, as transformers' CLIPEncoder runs them
        for encoder_layer in text.encoder.layers[:-1]:
            x = encoder_layer(x, mask, is_causal=True)
        return x
    x = text.encoder(inputs_embeds=x, attention_mask=mask, is_causal=True).last_hidden_state
    return text.final_layer_norm(x)


OPEN_CLIP_LAYERS = ("last", "penultimate")


class TextConditioning(NamedTuple):
    context: torch.Tensor  # (B, N, width) tokens for cross-attention
    pooled: torch.Tensor | None  # (B, embed_dim) one vector per prompt, where the encoder gives one


@dataclass(frozen=True)
class OpenCLIPTextEncoderConfig:
    """The OpenCLIP text transformer. Defaults are ViT-H/14 as SD 2.x uses it (open_clip
    ``model_configs/ViT-H-14.json``): width 1024, 16 heads, 24 layers, plain GELU; ``layer`` is the
    block whose output SD 2.x takes ("penultimate": blocks 0..22 run, then the final norm)."""

    vocab_size: int = 49408
    width: int = 1024
    heads: int = 16
    layers: int = 24
    context_length: int = 77
    embed_dim: int = 1024  # the text projection's width; kept for the checkpoint, unused for conditioning
    mlp_ratio: int = 4
    layer: str = "penultimate"
    # ln_final on the context (SD 2.x, open_clip's "legacy"); SDXL's FrozenOpenCLIPEmbedder2(legacy=False) takes
    # the penultimate block's output as it is, and ln_final only for the pooled vector
    final_norm: bool = True

    def __post_init__(self):
        if self.layer not in OPEN_CLIP_LAYERS:
            raise ValueError(f"OpenCLIP layer {self.layer!r} is not known; use one of {', '.join(OPEN_CLIP_LAYERS)}")
        if self.width % self.heads:
            raise ValueError(f"OpenCLIP width {self.width} does not split into {self.heads} heads")

    @property
    def context_dim(self) -> int:
        return self.width

    @property
    def chunk_tokens(self) -> int:
        return self.context_length - 2

    @property
    def blocks_run(self) -> int:
        return self.layers - 1 if self.layer == "penultimate" else self.layers


class _CausalSelfAttention(nn.Module):
    """``in_proj_weight`` (3W, W) holds [q; k; v] stacked, ``out_proj`` maps back: the layout of
    ``torch.nn.MultiheadAttention``, which open_clip uses."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, width = x.shape
        qkv = torch.nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, N, 3W)
        # (B, N, W) -> (B, heads, N, d)
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, N, d)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, width))


class _OpenCLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class _ResidualAttentionBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = _CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = _OpenCLIPMLP(width, width * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _OpenCLIPTransformer(nn.Module):
    def __init__(self, c: OpenCLIPTextEncoderConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(_ResidualAttentionBlock(c.width, c.heads, c.mlp_ratio) for _ in range(c.layers))


class _OpenCLIPTextModel(nn.Module):
    """The text half of open_clip's ``CLIP`` (SD 2.x deletes the visual half before saving).
    ``text_projection`` and ``logit_scale`` are stored in the checkpoints; conditioning does not use them."""

    def __init__(self, c: OpenCLIPTextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.width))
        self.transformer = _OpenCLIPTransformer(c)
        self.ln_final = nn.LayerNorm(c.width)
        self.text_projection = nn.Parameter(torch.empty(c.width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.empty(()))
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=c.width**-0.5)
        nn.init.constant_(self.logit_scale, math.log(1 / 0.07))


class OpenCLIPTextEncoder(nn.Module):
    """Encodes prompts to (B, 77 * chunks, width): the output of block ``layers - 2`` (penultimate) or
    ``layers - 1`` (last), after ``ln_final``, with a causal mask. Padding is token 0, as open_clip's
    ``tokenize`` pads; the tokenizer is the CLIP BPE, attached after construction."""

    def __init__(self, config: OpenCLIPTextEncoderConfig, tokenizer=None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.model = _OpenCLIPTextModel(config)

    def init_non_persistent_buffers(self) -> None:
        """Nothing to recreate: the causal mask is built by the attention kernel."""

    def token_chunks(self, prompts: list[str], min_chunks: int = 1) -> torch.Tensor:
        """Token ids (B, chunks, 77), padded with 0; every prompt gets the same number of chunks."""
        if self.tokenizer is None:
            raise RuntimeError("OpenCLIPTextEncoder has no tokenizer attached; load the model through ldm.checkpoints")
        return bpe_token_chunks(self.tokenizer, prompts, self.config.chunk_tokens, 0, min_chunks)

    def forward(self, token_chunks: torch.Tensor, fixes: tuple[EmbeddingFix, ...] = ()) -> torch.Tensor:
        return self.context_and_pooled(token_chunks, fixes, pooled=False).context

    def context_and_pooled(self, token_chunks: torch.Tensor, fixes: tuple[EmbeddingFix, ...] = (),
                           pooled: bool = True) -> TextConditioning:
        """The context (B, chunks * 77, width) and, with ``pooled``, each prompt's pooled vector (B, embed_dim)
        of its first chunk: ln_final of the last block's output at the end token (the highest id, as open_clip
        takes ``argmax``), times ``text_projection`` (SDXL's FrozenOpenCLIPEmbedder2; A1111 pools the first chunk)."""
        b, chunks, n = token_chunks.shape
        m = self.model
        ids = token_chunks.view(b * chunks, n).to(m.token_embedding.weight.device)
        x = put_vectors(m.token_embedding(ids), fixes) + m.positional_embedding[:n]  # (B*chunks, N, width)
        for block in m.transformer.resblocks[: self.config.blocks_run]:
            x = block(x)
        context = (m.ln_final(x) if self.config.final_norm else x).reshape(b, chunks * n, -1)  # (B, chunks*77, width)
        if not pooled:
            return TextConditioning(context, None)
        first = torch.arange(b, device=ids.device) * chunks  # each prompt's first chunk among the B*chunks rows
        last = x[first]
        for block in m.transformer.resblocks[self.config.blocks_run :]:
            last = block(last)
        end = ids[first].argmax(dim=-1)  # (B,)
        vector = m.ln_final(last)[torch.arange(b, device=ids.device), end] @ m.text_projection  # (B, embed_dim)
        return TextConditioning(context, vector)

    def weighted_chunks(self, prompts: list[str], min_chunks: int = 1,
                        embeddings: Mapping[str, torch.Tensor] | None = None) -> WeightedTokens:
        """Token ids and emphasis weights (B, chunks, 77) of prompts in A1111's syntax, padded with 0, and
        where the ``embeddings`` (name -> (n_vec, width) vectors) named in them go."""
        if self.tokenizer is None:
            raise RuntimeError("OpenCLIPTextEncoder has no tokenizer attached; load the model through ldm.checkpoints")
        return weighted_token_chunks(self.tokenizer, [parse_emphasis(p) for p in prompts], self.config.chunk_tokens,
                                     0, min_chunks, embeddings=embeddings)

    def encode(self, prompts: list[str], min_chunks: int = 1, emphasis: str = "Original",
               embeddings: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Prompts in A1111's syntax to (B, 77 * chunks, width), weights applied as ``emphasis`` says; the
        names of ``embeddings`` in them stand for those vectors."""
        tokens = self.weighted_chunks(prompts, min_chunks, embeddings)
        return apply_emphasis(self(tokens.ids, tokens.fixes), tokens.weights, emphasis)

    def encode_with_pooled(self, prompts: list[str], min_chunks: int = 1, emphasis: str = "Original",
                           embeddings: Mapping[str, torch.Tensor] | None = None) -> TextConditioning:
        """``encode``'s context and the pooled vector of each prompt's first chunk; emphasis weights the
        context only (A1111 pools before it applies them)."""
        tokens = self.weighted_chunks(prompts, min_chunks, embeddings)
        context, pooled = self.context_and_pooled(tokens.ids, tokens.fixes)
        return TextConditioning(apply_emphasis(context, tokens.weights, emphasis), pooled)
