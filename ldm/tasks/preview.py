"""A cheap picture of a step's predicted x0, for live previews: a real decode while the latent is
small, otherwise a linear map of Stable Diffusion's 4-channel latents to RGB (no preview for others)."""

from __future__ import annotations

import torch
from PIL import Image

from ldm.models.latent_diffusion import LatentDiffusion
from ldm.tasks.images import to_pil

# RGB of each channel of an SD KL-f8 latent at its own scale (0.18215), good enough for a preview of
# models whose first stage is too costly to run at every step.
SD_LATENT_RGB = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]])
SD_SCALE_FACTOR = 0.18215
DECODE_MAX_PIXELS = 32 * 32  # latent pixels up to which the preview is a real decode


def preview_image(model: LatentDiffusion, denoised: torch.Tensor) -> Image.Image | None:
    """The first image of ``denoised`` (B, C, h, w scaled latents) as a picture, or None."""
    x0 = denoised[:1]
    if x0.shape[-2] * x0.shape[-1] <= DECODE_MAX_PIXELS:
        return to_pil(model.decode_first_stage(x0))[0]
    if x0.shape[1] != SD_LATENT_RGB.shape[0]:
        return None
    rgb = torch.einsum("bchw,cr->brhw", x0.float().cpu() / model.config.scale_factor * SD_SCALE_FACTOR, SD_LATENT_RGB)
    return to_pil(rgb)[0]
