"""4x super-resolution with a latent diffusion model that concatenates the low-resolution image
(LDM-BSR style: the latent of the output has the input's size, the first stage decodes it 4x)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from PIL import Image

from ldm.checkpoints.loader import LoadedModel
from ldm.sampling.ddim import StepInfo
from ldm.tasks.common import GenerationResult, from_pil, sample, to_pil
from ldm.tasks.parameters import format_parameters
from ldm.tasks.request import GenerationRequest, resolve_request

MAX_INPUT_SIDE = 1024


def check_upscaler(loaded: LoadedModel) -> None:
    config = loaded.model.config
    if config.conditioning != "concat" or config.unet.in_channels != config.latent_channels + 3:
        raise ValueError(f"{loaded.name} is not a super-resolution model (it does not take a low-resolution image)")


def upscale(
    loaded: LoadedModel,
    image: Image.Image,
    request: GenerationRequest,
    *,
    callback: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """The image at ``downsampling_factor`` times its size. Uses request.steps, eta and seed; the input
    is padded (by reflection) to the UNet's grid and the output cropped back."""
    check_upscaler(loaded)
    model = loaded.model
    image = image.convert("RGB")
    if max(image.size) > MAX_INPUT_SIDE:
        raise ValueError(f"the image is {image.width}x{image.height}; upscaling takes at most {MAX_INPUT_SIDE} px a side")
    f = model.config.downsampling_factor
    grid = model.config.unet.downsampling_factor
    pad_w, pad_h = -image.width % grid, -image.height % grid
    low = from_pil(image).to(model.device)
    if pad_w or pad_h:
        low = F.pad(low, (0, pad_w, 0, pad_h), mode="reflect" if min(image.size) > max(pad_w, pad_h) else "replicate")
    h, w = low.shape[-2:]
    request, notices = resolve_request(replace(request, width=w * f, height=h * f, prompt="", negative_prompt=""), f * grid)
    with torch.inference_mode():
        latents = sample(model, request, concat=low.to(model.dtype), callback=callback, should_stop=should_stop)
        out = model.decode_first_stage(latents)[..., : image.height * f, : image.width * f]
    seeds = [request.seed + i for i in range(request.batch_size)]
    fields = {"Steps": request.steps, "Sampler": "DDIM", "Seed": request.seed, "Size": f"{image.width * f}x{image.height * f}",
              "Model hash": loaded.short_hash, "Model": loaded.name, "Eta DDIM": request.eta, "Upscale": f"{f}x"}
    return GenerationResult(to_pil(out), seeds, [format_parameters("", "", {**fields, "Seed": s}) for s in seeds], notices)
