"""Perceptual autoencoders of latent diffusion (the first stage): KL-regularised and VQ-regularised.

The module tree is the checkpoint contract of CompVis ``ldm/modules/diffusionmodules/model.py``:
``encoder.{conv_in, down.I.{block.J, attn.J, downsample.conv}, mid.{block_1, attn_1, block_2}, norm_out, conv_out}``,
``decoder.{conv_in, mid.*, up.I.{block.J, attn.J, upsample.conv}, norm_out, conv_out}``,
``quant_conv``, ``post_quant_conv`` and, for VQ, ``quantize.embedding``.
``decoder.up`` is indexed by resolution level, so ``up.0`` runs last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ldm.kernels.cpu_attention import attention
from ldm.kernels.winograd import Conv3x3


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = Conv3x3(in_channels, out_channels)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv3x3(out_channels, out_channels)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-convolution projections."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.bf16_kernel = False  # set by ldm.kernels.cpu_attention.set_attention_kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C), made contiguous: with a strided last dimension the CPU
        # kernel falls back to materialising the HW x HW matrix (2.3 GB at a 128x128 latent)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3).contiguous() for t in (self.q(n), self.k(n), self.v(n)))
        out = attention(q, k, v, bf16_kernel=self.bf16_kernel)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


def make_attn(channels: int, use_attention: bool, groups: int = 32) -> nn.Module:
    return AttnBlock(channels, groups) if use_attention else nn.Identity()


class Downsample(nn.Module):
    """Stride-2 3x3 convolution after asymmetric padding (one pixel right and bottom)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@dataclass(frozen=True)
class AutoencoderConfig:
    """``kind`` is "kl" (diagonal Gaussian posterior) or "vq" (vector-quantised, ``n_embed`` codes)."""

    kind: str
    embed_dim: int
    z_channels: int
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    mid_attention: bool = True
    n_embed: int | None = None
    norm_groups: int = 32  # GroupNorm groups; not stored in checkpoints (every original model uses 32)

    def __post_init__(self):
        if self.kind not in ("kl", "vq"):
            raise ValueError(f"autoencoder kind {self.kind!r} is not known; use 'kl' or 'vq'")
        if self.kind == "vq" and not self.n_embed:
            raise ValueError("a VQ autoencoder needs n_embed (the codebook size)")
        if any(self.ch * m % self.norm_groups for m in self.ch_mult):
            raise ValueError(f"norm_groups {self.norm_groups} must divide every level's channels (ch {self.ch} x ch_mult {self.ch_mult})")

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class Stage(nn.Module):
    """One resolution level: ResnetBlocks, each followed by self-attention at the listed resolutions,
    then the resampler, registered as ``downsample`` (encoder) or ``upsample`` (decoder)."""

    def __init__(self, channels_in: int, channels_out: int, blocks: int, attention: bool, dropout: float, groups: int = 32):
        super().__init__()
        self.block, self.attn = nn.ModuleList(), nn.ModuleList()
        for _ in range(blocks):
            self.block.append(ResnetBlock(channels_in, channels_out, dropout, groups))
            channels_in = channels_out
            if attention:
                self.attn.append(AttnBlock(channels_out, groups))
        self.resample: str | None = None

    def add_resampler(self, name: str, module: nn.Module) -> None:
        self.add_module(name, module)
        self.resample = name

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h if self.resample is None else getattr(self, self.resample)(h)


class Encoder(nn.Module):
    def __init__(self, c: AutoencoderConfig, double_z: bool):
        super().__init__()
        self.conv_in = Conv3x3(c.in_channels, c.ch)
        self.down = nn.ModuleList()
        channels_in = c.ch
        res = c.resolution
        for level, mult in enumerate(c.ch_mult):
            stage = Stage(channels_in, c.ch * mult, c.num_res_blocks, res in c.attn_resolutions, c.dropout, c.norm_groups)
            channels_in = c.ch * mult
            if level != len(c.ch_mult) - 1:
                stage.add_resampler("downsample", Downsample(channels_in))
                res //= 2
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(channels_in, channels_in, c.dropout, c.norm_groups)
        self.mid.attn_1 = make_attn(channels_in, c.mid_attention, c.norm_groups)
        self.mid.block_2 = ResnetBlock(channels_in, channels_in, c.dropout, c.norm_groups)
        self.norm_out = group_norm(channels_in, c.norm_groups)
        self.conv_out = Conv3x3(channels_in, 2 * c.z_channels if double_z else c.z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = stage(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        channels_in = c.ch * c.ch_mult[-1]
        res = c.resolution // c.downsampling_factor
        self.conv_in = Conv3x3(c.z_channels, channels_in)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(channels_in, channels_in, c.dropout, c.norm_groups)
        self.mid.attn_1 = make_attn(channels_in, c.mid_attention, c.norm_groups)
        self.mid.block_2 = ResnetBlock(channels_in, channels_in, c.dropout, c.norm_groups)
        stages = []
        for level in reversed(range(len(c.ch_mult))):
            channels_out = c.ch * c.ch_mult[level]
            stage = Stage(channels_in, channels_out, c.num_res_blocks + 1, res in c.attn_resolutions, c.dropout, c.norm_groups)
            channels_in = channels_out
            if level != 0:
                stage.add_resampler("upsample", Upsample(channels_in))
                res *= 2
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = group_norm(channels_in, c.norm_groups)
        self.conv_out = Conv3x3(channels_in, c.out_ch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for stage in reversed(self.up):
            h = stage(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian(NamedTuple):
    """The KL autoencoder's posterior q(z|x) = N(mean, exp(logvar))."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(-30.0, 20.0))

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None) -> torch.Tensor:
        """A draw from the posterior; ``generator=None`` returns the mode (the mean)."""
        if generator is None:
            return self.mean
        noise = torch.randn(self.mean.shape, generator=generator, device=generator.device, dtype=torch.float32)
        return self.mean + self.std * noise.to(self.mean)

    def kl(self) -> torch.Tensor:
        """KL divergence to N(0, I), summed over all but the batch dimension."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation (taming ``VectorQuantizer2``); ``embedding`` is the codebook."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # (BHW, C)
        codebook = self.embedding.weight.to(flat)
        distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None]
        quantised = codebook[distances.argmin(dim=1)]
        return quantised.reshape(b, h, w, c).permute(0, 3, 1, 2)


class Autoencoder(nn.Module):
    """KL or VQ autoencoder. ``encode`` returns the posterior (KL) or the pre-quantisation latent (VQ);
    ``decode`` quantises a VQ latent first, as the original ``VQModelInterface`` does."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        c = config
        kl = c.kind == "kl"
        self.encoder = Encoder(c, double_z=kl)
        self.decoder = Decoder(c)
        if kl:
            self.quant_conv = nn.Conv2d(2 * c.z_channels, 2 * c.embed_dim, 1)
        else:
            self.quant_conv = nn.Conv2d(c.z_channels, c.embed_dim, 1)
            self.quantize = VectorQuantizer(c.n_embed, c.embed_dim)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian | torch.Tensor:
        h = self.quant_conv(self.encoder(x))
        return DiagonalGaussian.from_moments(h) if self.config.kind == "kl" else h

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.config.kind == "vq":
            z = self.quantize(z)
        return self.decoder(self.post_quant_conv(z))
