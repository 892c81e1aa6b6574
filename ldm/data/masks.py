"""Random inpainting masks for training: brush strokes and boxes. 1 marks pixels to fill."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw


def brush_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """One to three strokes of a round brush along random walks, as a person paints a mask."""
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(1, 4)):
        width = rng.uniform(0.06, 0.2) * size
        x, y = rng.uniform(0, size, 2)
        angle = rng.uniform(0, 2 * math.pi)
        points = [(x, y)]
        for _ in range(rng.integers(2, 7)):
            angle += rng.normal(0, 0.8)
            step = rng.uniform(0.08, 0.25) * size
            x, y = np.clip(x + step * math.cos(angle), 0, size), np.clip(y + step * math.sin(angle), 0, size)
            points.append((x, y))
        draw.line(points, fill=255, width=max(1, round(width)), joint="curve")
        for px, py in points:
            draw.ellipse([px - width / 2, py - width / 2, px + width / 2, py + width / 2], fill=255)
    return np.asarray(image, dtype=np.float32) / 255.0 > 0.5


def box_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    w, h = rng.uniform(0.2, 0.6, 2) * size
    x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
    mask = np.zeros((size, size), dtype=bool)
    mask[int(y0) : int(math.ceil(y0 + h)), int(x0) : int(math.ceil(x0 + w))] = True
    return mask


def training_mask(rng: np.random.Generator, size: int, p_none: float = 0.5) -> np.ndarray:
    """"No mask" (all ones: generate everything) with probability ``p_none``, else a brush or box mask."""
    u = rng.uniform()
    if u < p_none:
        return np.ones((size, size), dtype=bool)
    return brush_mask(rng, size) if u < p_none + (1 - p_none) / 2 else box_mask(rng, size)
