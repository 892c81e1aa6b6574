"""Attention layers of the latent-diffusion UNet.

Module names follow the original checkpoints (CompVis ``ldm/modules/attention.py`` and
``openaimodel.AttentionBlock``) so that their keys load with no renaming table:

- ``CrossAttention``: ``to_q``, ``to_k``, ``to_v`` (no bias), ``to_out.0`` (+ dropout at ``to_out.1``).
- ``BasicTransformerBlock``: ``attn1`` (self, or cross when self-attention is disabled),
  ``attn2`` (cross to the conditioning), ``ff.net.{0.proj,2}`` (GEGLU), ``norm1..3``.
- ``SpatialTransformer``: ``norm``, ``proj_in``, ``transformer_blocks.N``, ``proj_out``
  (1x1 convolutions, or linear layers for the SD 2.x layout).
- ``AttentionBlock``: the legacy single-tensor ``qkv`` attention, ``norm``, ``qkv``, ``proj_out``.

All attention runs through ``torch.nn.functional.scaled_dot_product_attention``, or when sampling in bf16
on a CPU with AVX512-BF16 through our kernel (``ldm.kernels.cpu_attention``; each layer's ``bf16_kernel``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.kernels.cpu_attention import attention
from ldm.kernels.memory_format import memory_format_of


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, as the original UNet does (weights in any dtype).

    On the CPU, half-precision input goes to the kernel as it is with float32 weights: the kernel
    accumulates in float32 and rounds once, the same numbers without two whole-tensor conversions
    (several times faster a norm in bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = (None if p is None else p.float() for p in (self.weight, self.bias))
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def heads_and_dim(channels: int, num_heads: int | None, head_dim: int | None) -> tuple[int, int]:
    """Resolve (heads, dim per head) from exactly one of ``num_heads`` and ``head_dim``."""
    if (num_heads is None) == (head_dim is None):
        raise ValueError(
            f"give exactly one of num_heads ({num_heads}) and head_dim ({head_dim}) "
            f"for an attention layer of {channels} channels"
        )
    if num_heads is not None:
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        return num_heads, channels // num_heads
    if channels % head_dim:
        raise ValueError(f"{channels} channels do not split into heads of {head_dim}")
    return channels // head_dim, head_dim


class CrossAttention(nn.Module):
    """Multi-head attention from ``query_dim`` tokens to ``context_dim`` tokens."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        self.bf16_kernel = False  # set by ldm.kernels.cpu_attention.set_attention_kernel

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, n, inner = q.shape
        h = self.heads
        # (B, N, heads*d) -> (B, heads, N, d)
        q, k, v = (t.view(b, -1, h, inner // h).transpose(1, 2) for t in (q, k, v))
        out = attention(q, k, v, bf16_kernel=self.bf16_kernel)  # (B, heads, N, d)
        out = out.transpose(1, 2).reshape(b, n, inner)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return x * F.gelu(gate)
        # sampling: in place over the projection's output, no new (batch x tokens x 4 dim) tensors
        # (SD v1 fp32 step on a CPU 4% faster; the next Linear reads the strided half as it is)
        return x.mul_(torch.ops.aten.gelu_(gate))


class FeedForward(nn.Module):
    """``net.0`` GEGLU (dim -> 4 dim, gated), ``net.1`` dropout, ``net.2`` Linear (4 dim -> dim)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the conditioning, GEGLU feed-forward; pre-norm residuals."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        context_dim: int | None,
        dropout: float = 0.0,
        disable_self_attn: bool = False,
    ):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on a token sequence (tau_theta(y))."""

    def __init__(
        self,
        in_channels: int,
        heads: int,
        dim_head: int,
        depth: int = 1,
        context_dim: int | None = None,
        dropout: float = 0.0,
        use_linear: bool = False,
        disable_self_attn: bool = False,
    ):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner)
            self.proj_out = zero_module(nn.Linear(inner, in_channels))
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, 1)
            self.proj_out = zero_module(nn.Conv2d(inner, in_channels, 1))
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout, disable_self_attn)
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        # (B, C, H, W) in the memory format of the input: the transpose leaves channels-last strides,
        # which the convolutions of a contiguous model would otherwise keep converting back and forth
        # (+10% time on a CPU SD v1 step); a channels-last model keeps them as they are
        x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous(memory_format=memory_format_of(x_in))
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class AttentionBlock(nn.Module):
    """The legacy spatial self-attention of the ADM/LDM UNet (one ``qkv`` 1x1 convolution).

    In the legacy order the ``qkv`` channels are laid out per head as [q, k, v]; the new order
    lays them out as [all q, all k, all v].
    """

    def __init__(self, channels: int, heads: int, legacy_order: bool = True):
        super().__init__()
        self.heads = heads
        self.legacy_order = legacy_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))
        self.bf16_kernel = False  # set by ldm.kernels.cpu_attention.set_attention_kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)  # (B, C, T)
        qkv = self.qkv(self.norm(x))  # (B, 3C, T)
        d = c // self.heads
        if self.legacy_order:
            q, k, v = qkv.reshape(b, self.heads, 3 * d, -1).split(d, dim=2)  # each (B, heads, d, T)
        else:
            q, k, v = (t.reshape(b, self.heads, d, -1) for t in qkv.chunk(3, dim=1))
        # (B, heads, T, d), contiguous so that the fused kernel applies (see autoencoder.AttnBlock)
        q, k, v = (t.transpose(2, 3).contiguous() for t in (q, k, v))
        out = attention(q, k, v, bf16_kernel=self.bf16_kernel)
        out = out.transpose(2, 3).reshape(b, c, -1)
        return (x + self.proj_out(out)).reshape(b, c, *spatial)
