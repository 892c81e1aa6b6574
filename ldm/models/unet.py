"""The time-conditioned UNet of latent diffusion (epsilon_theta(z_t, t, tau_theta(y))).

The module tree is the checkpoint contract of CompVis ``openaimodel.UNetModel``:
``time_embed.{0,2}``, ``label_emb``, ``input_blocks.N.M``, ``middle_block.{0,1,2}``,
``output_blocks.N.M``, ``out.{0,2}``; ResBlocks keep ``in_layers.{0,2}``, ``emb_layers.1``,
``out_layers.{0,3}`` and ``skip_connection``.

Read top-down: leaf modules, then the typed config, then the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.kernels.winograd import Conv3x3
from ldm.models.attention import AttentionBlock, SpatialTransformer, heads_and_dim, normalization, zero_module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``cat([cos, sin])`` of (possibly fractional) timesteps, float32 (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.conv = Conv3x3(channels, channels) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class ResBlock(nn.Module):
    """Residual block with the timestep (and class) embedding added between its two convolutions."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), Conv3x3(channels, out_channels))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, use_conv=False), Upsample(channels, use_conv=False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, use_conv=False), Downsample(channels, use_conv=False)
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(Conv3x3(out_channels, out_channels)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class TimestepEmbedSequential(nn.Sequential):
    """A sequence whose ResBlocks get the embedding and whose transformers get the context."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a UNet. Give exactly one of ``num_heads`` and ``head_dim`` when it has attention.

    ``num_classes`` is an int (class embedding table, e.g. the x4 upscaler's noise level),
    ``"sequential"`` (an ADM vector of ``adm_in_channels``), or None.
    """

    in_channels: int
    out_channels: int
    model_channels: int
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_heads: int | None = None
    head_dim: int | None = None
    dropout: float = 0.0
    conv_resample: bool = True
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    use_spatial_transformer: bool = False
    # transformer blocks per attention layer: one number, or one per level (SDXL's [1, 2, 10]); a level
    # whose resolution is not in attention_resolutions has none whatever its entry says
    transformer_depth: int | tuple[int, ...] = 1
    transformer_depth_middle: int | None = None  # None: the last level's depth, as the original
    context_dim: int | None = None
    use_linear_in_transformer: bool = False
    disable_self_attentions: tuple[bool, ...] | None = None
    disable_middle_self_attn: bool = False
    middle_attention: bool = True  # False: a purely convolutional UNet that applies at any size
    num_classes: int | str | None = None
    adm_in_channels: int | None = None

    def __post_init__(self):
        if self.use_spatial_transformer and self.context_dim is None:
            raise ValueError("a UNet with spatial transformers needs context_dim (the conditioning width)")
        if self.disable_self_attentions is not None and len(self.disable_self_attentions) != len(self.channel_mult):
            raise ValueError(
                f"disable_self_attentions has {len(self.disable_self_attentions)} entries; "
                f"it needs one per level ({len(self.channel_mult)})"
            )
        if isinstance(self.transformer_depth, tuple) and len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError(
                f"transformer_depth has {len(self.transformer_depth)} entries; it needs one per level "
                f"({len(self.channel_mult)}) or a single number"
            )
        if self.num_classes == "sequential" and not self.adm_in_channels:
            raise ValueError("num_classes 'sequential' takes an ADM vector: set adm_in_channels (its width)")
        if isinstance(self.num_classes, str) and self.num_classes != "sequential":
            raise ValueError(f"num_classes {self.num_classes!r} is not supported; use an int, 'sequential' or None")

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def depth_at(self, level: int | None) -> int:
        """Transformer blocks per attention layer at ``level`` (None: the middle block)."""
        depths = self.transformer_depth if isinstance(self.transformer_depth, tuple) else (self.transformer_depth,)
        if level is None:
            return depths[-1] if self.transformer_depth_middle is None else self.transformer_depth_middle
        return depths[level] if len(depths) > 1 else depths[0]


class UNetModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c = config
        mc = c.model_channels
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if isinstance(c.num_classes, int):
            self.label_emb = nn.Embedding(c.num_classes, emb_dim)
        elif c.num_classes == "sequential":
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(c.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            )

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(Conv3x3(c.in_channels, mc))])
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [self._resblock(ch, mult * mc)]
                ch = mult * mc
                if ds in c.attention_resolutions:
                    layers.append(self._attention(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                down = self._resblock(ch, ch, down=True) if c.resblock_updown else Downsample(ch, c.conv_resample)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        attention = [self._attention(ch, level=None)] if c.middle_attention else []
        self.middle_block = TimestepEmbedSequential(self._resblock(ch, ch), *attention, self._resblock(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [self._resblock(ch + skip_channels.pop(), mc * mult)]
                ch = mc * mult
                if ds in c.attention_resolutions:
                    layers.append(self._attention(ch, level))
                if level and i == c.num_res_blocks:
                    layers.append(self._resblock(ch, ch, up=True) if c.resblock_updown else Upsample(ch, c.conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), zero_module(Conv3x3(mc, c.out_channels)))

    def _resblock(self, channels: int, out_channels: int, *, up: bool = False, down: bool = False) -> ResBlock:
        c = self.config
        emb_dim = c.model_channels * 4
        return ResBlock(channels, emb_dim, out_channels, c.dropout, c.use_scale_shift_norm, up=up, down=down)

    def _attention(self, channels: int, level: int | None) -> nn.Module:
        """The attention layer at one level (``level=None`` for the middle block)."""
        c = self.config
        heads, dim_head = heads_and_dim(channels, c.num_heads, c.head_dim)
        if not c.use_spatial_transformer:
            return AttentionBlock(channels, heads, legacy_order=not c.use_new_attention_order)
        if level is None:
            disable_self_attn = c.disable_middle_self_attn
        else:
            disable_self_attn = bool(c.disable_self_attentions and c.disable_self_attentions[level])
        return SpatialTransformer(
            channels,
            heads,
            dim_head,
            depth=c.depth_at(level),
            context_dim=c.context_dim,
            dropout=c.dropout,
            use_linear=c.use_linear_in_transformer,
            disable_self_attn=disable_self_attn,
        )

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, C_in, H, W) noisy latent (with any concat channels); t: (B,) timesteps;
        context: (B, N, context_dim) conditioning tokens; y: (B,) class ids or (B, adm_in) vectors."""
        if (y is not None) != (self.config.num_classes is not None):
            raise ValueError("pass y exactly when the UNet is class-conditional (num_classes is set)")
        t_emb = timestep_embedding(t, self.config.model_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(t_emb)
        if y is not None:
            emb = emb + self.label_emb(y)
        h = x.type(self.time_embed[0].weight.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h).type(x.dtype)
