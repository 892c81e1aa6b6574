"""The autoencoder run tile by tile, with whole-image GroupNorm statistics: no seams, no colour shift.

Tools that tile a VAE usually normalise each tile with its own GroupNorm statistics, so tiles come
out in slightly different colours. Here the network is evaluated as a graph of lazy nodes, each of
which computes any rectangle of its output on demand (``region``) from the rectangles of its inputs
that it needs (a 3x3 convolution asks for one more pixel on each side). A GroupNorm node first
gathers the mean and variance of its whole input, tile by tile, then normalises each requested
rectangle with them, exactly as the whole-image layer would. Outside the image every node's output
is 0, which is the zero padding the next convolution expects.

Resnet block outputs are stored (one tensor at that level's resolution) so that recomputation stays
bounded; a block whose input is such a stored tensor of the same width writes its output over it,
band by band, behind its reads, so a level holds one full tensor and a band, not two. The upsampling
convolutions are not stored, so the largest tensor of the decoder (the last upsampling's output)
never exists whole. The self-attention blocks attend over the whole image and
run on their whole input, which is at the latent's resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.kernels.winograd import Conv3x3
from ldm.models.autoencoder import AttnBlock, Autoencoder, DiagonalGaussian, Downsample, ResnetBlock, Stage, Upsample


def _zero_outside(t: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """Zero the part of a region (starting at ``top``, ``left``) that lies outside a ``height`` x ``width`` image."""
    h, w = t.shape[-2:]
    if top >= 0 and left >= 0 and top + h <= height and left + w <= width:
        return t
    rows = (torch.arange(top, top + h, device=t.device) >= 0) & (torch.arange(top, top + h, device=t.device) < height)
    cols = (torch.arange(left, left + w, device=t.device) >= 0) & (torch.arange(left, left + w, device=t.device) < width)
    return t * (rows[:, None] & cols[None, :]).to(t.dtype)


class Node:
    """A lazily computed (B, C, H, W) tensor; ``region`` gives rows top..bottom, columns left..right,
    with zeros outside the image."""

    batch: int
    height: int
    width: int

    def region(self, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
        raise NotImplementedError

    def tiles(self, tile: int):
        for top in range(0, self.height, tile):
            for left in range(0, self.width, tile):
                yield top, min(top + tile, self.height), left, min(left + tile, self.width)


class Stored(Node):
    """A computed tensor; ``owned`` when it was made here, so that it may be overwritten."""

    def __init__(self, tensor: torch.Tensor, owned: bool = False):
        self.tensor, self.owned = tensor, owned
        self.batch, _, self.height, self.width = tensor.shape

    def region(self, top, bottom, left, right):
        t = self.tensor[..., max(0, top) : max(0, bottom), max(0, left) : max(0, right)]
        pad = (max(0, -left), max(0, right - self.width), max(0, -top), max(0, bottom - self.height))
        return F.pad(t, pad) if any(pad) else t


def store(node: Node, tile: int) -> Stored:
    """Compute a node whole, tile by tile."""
    out = None
    for top, bottom, left, right in node.tiles(tile):
        part = node.region(top, bottom, left, right)
        if out is None:
            out = part.new_empty(node.batch, part.shape[1], node.height, node.width)
        out[..., top:bottom, left:right] = part
    return Stored(out, owned=True)


def store_over(node: Node, source: Stored, tile: int, halo: int) -> Stored:
    """Compute ``node`` whole into the tensor of ``source``, which it reads at most ``halo`` rows
    beyond the rows it computes. Bands of ``tile`` rows are computed top to bottom into one band
    buffer; all but a band's last ``halo`` rows are written at once (no later band reads them), and
    those last rows once the next band is computed."""
    assert source.owned and halo <= tile and (node.batch, node.height, node.width) == (source.batch, source.height, source.width)
    out, band, pending = source.tensor, None, None
    for top in range(0, node.height, tile):
        bottom = min(top + tile, node.height)
        for left in range(0, node.width, tile):
            part = node.region(top, bottom, left, min(left + tile, node.width))
            if band is None:
                band = part.new_empty(node.batch, part.shape[1], tile, node.width)
            band[..., : bottom - top, left : left + part.shape[-1]] = part
            del part
        if pending is not None:
            out[..., pending[0] : pending[0] + pending[1].shape[-2], :] = pending[1]
        keep = max(top, bottom - halo)
        out[..., top:keep, :] = band[..., : keep - top, :]
        pending = (keep, band[..., keep - top : bottom - top, :].clone())
    out[..., pending[0] :, :] = pending[1]
    return source


class Conv(Node):
    """A stride-1 convolution with "same" zero padding (1x1 or 3x3)."""

    def __init__(self, source: Node, conv: nn.Conv2d):
        self.source, self.conv = source, conv
        self.batch, self.height, self.width = source.batch, source.height, source.width
        self.halo = conv.kernel_size[0] // 2

    def region(self, top, bottom, left, right):
        h = self.halo
        x = self.source.region(top - h, bottom + h, left - h, right + h)
        x = x.to(self.conv.weight.dtype)
        out = self.conv.unpadded(x) if isinstance(self.conv, Conv3x3) else F.conv2d(x, self.conv.weight, self.conv.bias)
        return _zero_outside(out, top, left, self.height, self.width)


class Strided(Node):
    """``Downsample``: one zero row and column at the bottom and right, then a stride-2 3x3 convolution."""

    def __init__(self, source: Node, conv: nn.Conv2d):
        self.source, self.conv = source, conv
        self.batch = source.batch
        self.height, self.width = (source.height - 2) // 2 + 1, (source.width - 2) // 2 + 1

    def region(self, top, bottom, left, right):
        x = self.source.region(2 * top, 2 * bottom + 1, 2 * left, 2 * right + 1)
        x = _zero_outside(x, 2 * top, 2 * left, self.source.height + 1, self.source.width + 1)
        out = F.conv2d(x.to(self.conv.weight.dtype), self.conv.weight, self.conv.bias, stride=2)
        return _zero_outside(out, top, left, self.height, self.width)


class Nearest2x(Node):
    def __init__(self, source: Node):
        self.source = source
        self.batch, self.height, self.width = source.batch, 2 * source.height, 2 * source.width

    def region(self, top, bottom, left, right):
        t0, l0 = top // 2, left // 2
        x = self.source.region(t0, -(-bottom // 2), l0, -(-right // 2))
        b, c, h, w = x.shape
        x = x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)  # one copy
        return x[..., top - 2 * t0 : top - 2 * t0 + bottom - top, left - 2 * l0 : left - 2 * l0 + right - left]


class Add(Node):
    def __init__(self, a: Node, b: Node):
        self.a, self.b = a, b
        self.batch, self.height, self.width = a.batch, a.height, a.width

    def region(self, top, bottom, left, right):
        return self.a.region(top, bottom, left, right) + self.b.region(top, bottom, left, right)


class NormSiLU(Node):
    """GroupNorm with the statistics of its whole input, then SiLU."""

    def __init__(self, source: Node, norm: nn.GroupNorm, tile: int):
        self.source, self.norm = source, norm
        self.batch, self.height, self.width = source.batch, source.height, source.width
        self.mean, self.rstd = self._statistics(tile)

    def _statistics(self, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
        groups = self.norm.num_groups
        total = square = None
        for top, bottom, left, right in self.source.tiles(tile):
            x = self.source.region(top, bottom, left, right).double()
            x = x.reshape(x.shape[0], groups, -1)
            s, q = x.sum(dim=-1), (x * x).sum(dim=-1)
            total, square = (s, q) if total is None else (total + s, square + q)
        count = self.height * self.width * self.norm.num_channels // groups
        mean = total / count
        var = (square / count - mean * mean).clamp(min=0)
        return mean, (var + self.norm.eps).rsqrt()

    def region(self, top, bottom, left, right):
        x = self.source.region(top, bottom, left, right)
        b, c, h, w = x.shape
        g = self.norm.num_groups
        mean, rstd = self.mean.float()[..., None], self.rstd.float()[..., None]
        # in place on one float32 copy of the region: a tile's working set is its few widest maps
        y = x.to(torch.float32, copy=True).reshape(b, g, -1).sub_(mean).mul_(rstd).reshape(b, c, h, w)
        y = y.mul_(self.norm.weight.float().view(1, -1, 1, 1)).add_(self.norm.bias.float().view(1, -1, 1, 1))
        return _zero_outside(F.silu(y, inplace=True).to(x.dtype), top, left, self.height, self.width)


def resnet_block(x: Node, block: ResnetBlock, tile: int) -> Node:
    h = Conv(NormSiLU(x, block.norm1, tile), block.conv1)
    h = Conv(NormSiLU(h, block.norm2, tile), block.conv2)
    skip = Conv(x, block.nin_shortcut) if hasattr(block, "nin_shortcut") else x
    if isinstance(x, Stored) and x.owned and skip is x:  # same width: overwrite the input (two 3x3 convs read 2 rows out)
        return store_over(Add(skip, h), x, tile, halo=2)
    return store(Add(skip, h), tile)


def attention(x: Node, block: AttnBlock, tile: int) -> Node:
    return Stored(block(store(x, tile).tensor), owned=True)


def stage(x: Node, module: Stage, tile: int) -> Node:
    for i, block in enumerate(module.block):
        x = resnet_block(x, block, tile)
        if len(module.attn):
            x = attention(x, module.attn[i], tile)
    resampler = getattr(module, module.resample) if module.resample else None
    if isinstance(resampler, Downsample):
        return store(Strided(x, resampler.conv), tile)
    if isinstance(resampler, Upsample):
        return Conv(Nearest2x(x), resampler.conv)
    return x


def middle(x: Node, mid: nn.Module, tile: int) -> Node:
    x = resnet_block(x, mid.block_1, tile)
    if isinstance(mid.attn_1, AttnBlock):
        x = attention(x, mid.attn_1, tile)
    return resnet_block(x, mid.block_2, tile)


@torch.no_grad()
def tiled_decode(autoencoder: Autoencoder, z: torch.Tensor, tile: int = 256) -> torch.Tensor:
    """``autoencoder.decode(z)`` computed in tiles of at most ``tile`` x ``tile`` at each level."""
    if autoencoder.config.kind == "vq":
        z = autoencoder.quantize(z)
    d = autoencoder.decoder
    x = Conv(Conv(Stored(z), autoencoder.post_quant_conv), d.conv_in)
    x = middle(store(x, tile), d.mid, tile)
    for level in reversed(d.up):
        x = stage(x, level, tile)
    return store(Conv(NormSiLU(x, d.norm_out, tile), d.conv_out), tile).tensor


@torch.no_grad()
def tiled_encode(autoencoder: Autoencoder, images: torch.Tensor, tile: int = 256) -> DiagonalGaussian | torch.Tensor:
    """``autoencoder.encode(images)`` computed in tiles of at most ``tile`` x ``tile`` at each level."""
    e = autoencoder.encoder
    x = store(Conv(Stored(images), e.conv_in), tile)
    for level in e.down:
        x = stage(x, level, tile)
    x = middle(x, e.mid, tile)
    h = store(Conv(Conv(NormSiLU(x, e.norm_out, tile), e.conv_out), autoencoder.quant_conv), tile).tensor
    return DiagonalGaussian.from_moments(h) if autoencoder.config.kind == "kl" else h
