"""Pieces shared by the tasks: images to and from tensors, prompt conditioning, results."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ldm.models.latent_diffusion import LatentDiffusion


@dataclass(frozen=True)
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    parameters: list[str]  # the parameters text of each image
    notices: list[str] = field(default_factory=list)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB PIL images."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]


def from_pil(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> (1, 3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def prompt_conditioning(model: LatentDiffusion, prompt: str, negative: str, batch: int) -> tuple[dict, dict]:
    """(cond, uncond) for classifier-free guidance; the negative prompt is the unconditional branch.
    Both are encoded together so that long prompts give both the same number of chunks."""
    context = model.encode_prompts([negative, prompt])
    uncond, cond = context[:1].expand(batch, -1, -1), context[1:].expand(batch, -1, -1)
    return {"context": cond}, {"context": uncond}
