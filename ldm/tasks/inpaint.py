"""Inpainting: fill the masked part of an image from a prompt (and layout), keep the rest exactly.

A dedicated inpainting model (hybrid: [x, mask, masked-image latent]) is used natively; any other
model inpaints by latent blending (the kept region is replaced each step by the image's latent
noised to that step). Either way the unmasked pixels are pasted back from the input, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.checkpoints.loader import LoadedModel
from ldm.sampling.ddim import StepInfo
from ldm.tasks.common import Blend, GenerationResult, from_pil, sample, to_pil
from ldm.tasks.request import GenerationRequest, resolve_request
from ldm.tasks.txt2img import parameters_text


def mask_array(mask: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """A mask image (white = fill) as a boolean (H, W) array at ``size``; validated."""
    array = np.asarray(mask.convert("L").resize(size, Image.Resampling.NEAREST)) >= 128
    if not array.any():
        raise ValueError("the mask is empty: paint over the part of the image to fill")
    return array


def inpaint(
    loaded: LoadedModel,
    request: GenerationRequest,
    image: Image.Image,
    mask: Image.Image,
    *,
    callback: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Generate at the image's size (rounded to the model's grid), then paste the generated pixels
    into the masked part of the original image at its own size."""
    model = loaded.model
    image = image.convert("RGB")
    request, notices = resolve_request(replace(request, width=image.width, height=image.height), model.config.size_multiple)
    keep_original = ~mask_array(mask, image.size)
    work_image = from_pil(image.resize((request.width, request.height), Image.Resampling.LANCZOS)).to(model.device)
    work_mask = torch.from_numpy(mask_array(mask, (request.width, request.height)))[None, None].float().to(model.device)
    with torch.inference_mode():
        if model.inpaints_natively:
            latents = sample(model, request, concat=model.inpainting_concat(work_image, work_mask),
                             callback=callback, should_stop=should_stop)
        else:
            keep = 1 - F.max_pool2d(work_mask, model.config.downsampling_factor)
            blend = Blend(keep.to(model.dtype), model.encode_first_stage(work_image))
            latents = sample(model, request, blend=blend, callback=callback, should_stop=should_stop)
        generated = to_pil(model.decode_first_stage(latents))
    original = np.asarray(image)
    images = []
    for picture in generated:
        filled = np.asarray(picture.resize(image.size, Image.Resampling.LANCZOS))
        images.append(Image.fromarray(np.where(keep_original[..., None], original, filled)))
    seeds = [request.seed + i for i in range(request.batch_size)]
    return GenerationResult(images, seeds, [parameters_text(request, s, loaded) for s in seeds], notices)
