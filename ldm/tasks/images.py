"""Pictures as the tasks take and give them: any input as 8-bit RGB (one frame, whatever the file
was), and tensors in [-1, 1] to and from PIL images.

Pillow's own ``convert("RGB")`` clips 16-bit greys to white and drops transparency to whatever
colour lies under it (often black); an artist's 16-bit scan or transparent PNG would come out ruined.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

WIDE_GREYS = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
TRANSPARENT = ("RGBA", "LA", "PA", "RGBa", "La")


def _wide_grey_to_l(image: Image.Image) -> Image.Image:
    """16- and 32-bit integer or float greys scaled to 8 bits: 16-bit ranges by 257, floats in [0, 1]
    by 255, anything else by its own maximum."""
    array = np.asarray(image, dtype=np.float64)
    top = float(array.max()) if array.size else 0.0
    if image.mode == "F" and top <= 1.0:
        scale = 255.0
    elif top <= 255:
        scale = 1.0
    elif image.mode.startswith("I;16") or top <= 65535:
        scale = 1 / 257
    else:
        scale = 255.0 / top
    return Image.fromarray(np.clip(np.round(array * scale), 0, 255).astype(np.uint8), mode="L")


def as_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL image as 8-bit RGB: the first frame of an animation, wide greys scaled (not clipped),
    transparency composited over ``background``."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    if image.mode == "RGB":
        return image
    if image.mode in WIDE_GREYS:
        return _wide_grey_to_l(image).convert("RGB")
    if image.mode in TRANSPARENT or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(flat, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError):
        raise ValueError(f"images in mode {image.mode} cannot be used; save it as an RGB PNG or JPEG") from None


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB PIL images."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]


def from_pil(image: Image.Image) -> torch.Tensor:
    """A PIL image of any mode (``as_rgb``) -> (1, 3, H, W) in [-1, 1]."""
    array = np.asarray(as_rgb(image), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]
