"""Region prompts (MultiDiffusion's region-based generation) as a denoiser wrapper.

Each region is a rectangle of the latent canvas with its own conditioning (a prompt, a negative
prompt, guidance inside) and a weight map: ``strength`` inside its box, falling smoothly to 0 over
``feather`` latent pixels towards the box's edges (not along the canvas's own edges). The global
conditioning covers the rest: its weight is ``1 - min(1, sum of the region weights)``. At every step
each region is denoised on a window around its box (the box plus some context, so the model sees
the surroundings) and the predictions are averaged pixel by pixel with these weights.

One region that covers the whole canvas with strength 1 leaves the global conditioning no weight,
and the result is exactly the region's own guided prediction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ldm.sampling.tiling import Window, per_window, taper

Denoiser = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Region:
    """A latent window, the weight map over it (h, w), and the denoiser's keyword arguments there
    (spatial conditioning is given for the whole canvas and cropped to the window)."""

    window: Window
    weight: torch.Tensor
    extra: dict


def box_weight(box: Window, window: Window, height: int, width: int, strength: float, feather: int) -> torch.Tensor:
    """(window.height, window.width) weights: ``strength`` on ``box`` with feathered inner edges, 0 elsewhere."""
    rows = taper(box.height, feather, box.top > 0, box.top + box.height < height)
    cols = taper(box.width, feather, box.left > 0, box.left + box.width < width)
    weight = torch.zeros(window.height, window.width)
    top, left = box.top - window.top, box.left - window.left
    weight[top : top + box.height, left : left + box.width] = strength * (rows[:, None] * cols[None, :]).float()
    return weight


def context_window(box: Window, height: int, width: int, margin: int, minimum: int, grid: int = 1) -> Window:
    """The box grown by ``margin`` on each side and to at least ``minimum`` a side where the canvas
    allows, its corners on multiples of ``grid``, inside the canvas."""

    def span(start: int, length: int, canvas: int) -> tuple[int, int]:
        lo, hi = start - margin, start + length + margin
        grow = max(0, min(minimum, canvas) - (hi - lo))
        lo, hi = lo - grow // 2, hi + grow - grow // 2
        lo, hi = max(0, lo), min(canvas, hi)
        lo, hi = lo // grid * grid, min(canvas, -(-hi // grid) * grid)
        want = min(max(minimum, hi - lo), canvas)
        if hi - lo < want:  # pushed against one edge of the canvas: extend on the other side
            lo, hi = (0, want) if lo == 0 else (canvas - want, canvas)
        return lo, hi - lo

    top, h = span(box.top, box.height, height)
    left, w = span(box.left, box.width, width)
    return Window(top, left, h, w)


class RegionFusion:
    """Fuses ``denoiser``'s predictions for the global conditioning (``background``, on the whole
    canvas) and each region. Keyword arguments given to the call itself are ignored: every branch
    carries its own."""

    def __init__(self, denoiser: Denoiser, background: dict, regions: list[Region]):
        self.denoiser = denoiser
        self.background = background
        self.regions = regions
        self._weights: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def weights(self, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(the background's weight, the sum of all weights) on the canvas; the same at every step."""
        key = (height, width, device)
        if key not in self._weights:
            total = torch.zeros(1, 1, height, width, dtype=torch.float32, device=device)
            for region in self.regions:
                region.window.crop(total).add_(region.weight.to(device))
            background = (1 - total).clamp(min=0)
            self._weights[key] = (background, total + background)
        return self._weights[key]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **_ignored) -> torch.Tensor:
        background, total = self.weights(*x.shape[-2:], x.device)
        fused = torch.zeros_like(x, dtype=torch.float32)
        if background.max() > 0:
            fused.add_(self.denoiser(x, t, **self.background).float() * background)
        for region in self.regions:
            eps = self.denoiser(region.window.crop(x), t, **per_window(region.extra, [region.window]))
            region.window.crop(fused).add_(eps.float() * region.weight.to(x.device))
        return (fused / total).to(x.dtype)
