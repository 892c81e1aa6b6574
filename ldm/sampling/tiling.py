"""Tiled denoising (MultiDiffusion, Bar-Tal et al. 2023) as a denoiser wrapper.

At every step the wrapped denoiser runs on overlapping windows of the latent canvas, several
windows to a batch, and the predictions are fused by a per-pixel weighted average. A window's
weight is 1 except across the overlaps with its neighbours, where it falls smoothly (a raised
cosine) towards its edge, so no border shows; on the canvas's own edges it stays 1. A canvas that
fits one window is therefore denoised exactly as without tiling.

Whatever guidance the wrapped denoiser does happens inside each window. Spatial conditioning (the
``concat`` channels of inpainting and super-resolution models) is cropped to each window; other
conditioning (text context, class labels) is repeated for each window of a batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

Denoiser = Callable[..., torch.Tensor]
SPATIAL_KEYS = ("concat",)


@dataclass(frozen=True)
class Window:
    """A rectangle of the latent canvas: rows top..top+height, columns left..left+width."""

    top: int
    left: int
    height: int
    width: int

    def crop(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[..., self.top : self.top + self.height, self.left : self.left + self.width]


def window_starts(length: int, tile: int, overlap: int, grid: int = 1) -> list[int]:
    """Starts of windows of ``tile`` covering ``length``, overlapping by at least ``overlap``, each a
    multiple of ``grid``, the last flush with the end."""
    if length <= tile:
        return [0]
    stride = max(grid, (tile - overlap) // grid * grid)
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def plan_windows(height: int, width: int, tile: int, overlap: int, grid: int = 1) -> list[Window]:
    """Windows of at most ``tile`` x ``tile`` covering a ``height`` x ``width`` canvas, row by row."""
    if tile < grid or overlap < 0 or overlap >= tile:
        raise ValueError(f"a tile of {tile} with an overlap of {overlap} cannot cover the canvas (the overlap must be smaller than the tile)")
    th, tw = min(tile, height), min(tile, width)
    return [
        Window(top, left, th, tw)
        for top in window_starts(height, tile, overlap, grid)
        for left in window_starts(width, tile, overlap, grid)
    ]


def taper(length: int, overlap: int, fall_start: bool, fall_end: bool) -> torch.Tensor:
    """1-D weights: 1, except over ``overlap`` samples at a falling end, where a raised cosine goes
    from near 0 at the edge to 1 (never 0, so every pixel has weight)."""
    weights = torch.ones(length, dtype=torch.float64)
    ramp_length = min(overlap, length // 2)
    if ramp_length > 0:
        ramp = torch.tensor([0.5 - 0.5 * math.cos(math.pi * (i + 1) / (ramp_length + 1)) for i in range(ramp_length)],
                            dtype=torch.float64)
        if fall_start:
            weights[:ramp_length] = ramp
        if fall_end:
            weights[length - ramp_length :] = ramp.flip(0)
    return weights


@functools.lru_cache(maxsize=1024)
def window_weight(window: Window, height: int, width: int, overlap: int) -> torch.Tensor:
    """(h, w) fusion weight of a window on a ``height`` x ``width`` canvas: it falls only on sides
    that lie inside the canvas, where a neighbour takes over. Cached: the same at every step (read only)."""
    rows = taper(window.height, overlap, window.top > 0, window.top + window.height < height)
    cols = taper(window.width, overlap, window.left > 0, window.left + window.width < width)
    return (rows[:, None] * cols[None, :]).float()


def per_window(value, windows: list[Window], key: str | None = None):
    """Conditioning for a batch of windows: spatial tensors cropped, others repeated (window-major)."""
    if isinstance(value, Mapping):
        return {k: per_window(v, windows, k) for k, v in value.items()}
    if not isinstance(value, torch.Tensor):
        return value
    if key in SPATIAL_KEYS:
        return torch.cat([w.crop(value) for w in windows])
    return torch.cat([value] * len(windows))


class TiledDenoiser:
    """``denoiser`` applied to windows of ``tile`` x ``tile`` latent pixels overlapping by ``overlap``
    (starts on multiples of ``grid``), ``batch_windows`` windows a call. The windows are planned from
    each input's size, so one tiled denoiser serves canvases of any size."""

    def __init__(self, denoiser: Denoiser, tile: int, overlap: int, grid: int = 1, batch_windows: int = 4):
        if batch_windows < 1:
            raise ValueError(f"batch_windows must be at least 1, got {batch_windows}")
        plan_windows(tile, tile, tile, overlap, grid)  # checks tile and overlap
        self.denoiser = denoiser
        self.tile, self.overlap, self.grid = tile, overlap, grid
        self.batch_windows = batch_windows

    def windows(self, height: int, width: int) -> list[Window]:
        return plan_windows(height, width, self.tile, self.overlap, self.grid)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **extra) -> torch.Tensor:
        b, _, height, width = x.shape
        windows = self.windows(height, width)
        fused = torch.zeros_like(x, dtype=torch.float32)
        total = torch.zeros(1, 1, height, width, dtype=torch.float32, device=x.device)
        for first in range(0, len(windows), self.batch_windows):
            group = windows[first : first + self.batch_windows]
            xs = torch.cat([w.crop(x) for w in group])  # (len(group) * B, C, h, w), window-major
            eps = self.denoiser(xs, torch.cat([t] * len(group)), **per_window(extra, group))
            for w, part in zip(group, eps.split(b)):
                weight = window_weight(w, height, width, self.overlap).to(x.device)
                w.crop(fused).add_(part.float() * weight)
                w.crop(total).add_(weight)
        return (fused / total).to(x.dtype)
