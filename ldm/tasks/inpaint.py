"""Inpainting: fill the masked part of an image from a prompt (and layout), keep the rest exactly.

A dedicated inpainting model is used natively: SD's (hybrid: [x, mask, masked-image latent]) or
LDM's inpainting_big (concat: [x, masked-image latent, mask], no text stage, so the prompt and the
guidance scale are not used and a notice says so). Any other text model inpaints by latent blending
(the kept region is replaced each step by the image's latent noised to that step). Either way the
unmasked pixels are pasted back from the input, unchanged: for inpainting_big this is its script's
final ``(1 - mask) * image + mask * decoded``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.checkpoints.loaded import LoadedModel
from ldm.models.latent_diffusion import LatentDiffusionConfig
from ldm.sampling.steps import Callback
from ldm.tasks.generate import Blend, decode, sample, tokenizer_notices
from ldm.tasks.images import as_rgb, from_pil, to_pil
from ldm.tasks.masked import check_masked, prefill, redraw_masked
from ldm.tasks.parameters import canvas_fields, parameters_text
from ldm.tasks.planning import canvas_notices, first_stage_tile
from ldm.tasks.request import GenerationRequest, check_model, resolve_request
from ldm.tasks.result import GenerationResult
from ldm.tasks.txt2img import serves as serves_text

NAME = "inpaint"
NATIVE_INPUTS = ("mask_and_masked_latent", "masked_latent_and_mask")
MAX_FEATHER = 256
MAX_PADDING = 1024


@dataclass(frozen=True)
class InpaintOptions:
    """How the fill meets the image. ``feather``: the fill fades in over this many pixels inside the
    mask's edge (the unmasked pixels stay exact either way). ``only_masked``: work on a crop around
    the mask, ``padding`` pixels wider on each side, resized to the model's own resolution, and
    stitch the result back; small fills in large images get the model's full detail. ``strength``
    and ``fill`` (AUTOMATIC1111's denoising strength and "masked content"): by default the masked part
    is drawn from noise; below strength 1, or from another masked content, it is redrawn from what
    the mode puts there (``ldm.tasks.masked``), so 0.4 from "original" retouches it."""

    feather: int = 0
    only_masked: bool = False
    padding: int = 32
    strength: float = 1.0
    fill: str = "latent noise"

    def check(self) -> None:
        for name, value, high in (("mask feather", self.feather, MAX_FEATHER), ("masked area padding", self.padding, MAX_PADDING)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
                raise ValueError(f"{name} must be a whole number of pixels from 0 to {high}, got {value!r}")
        check_masked(self.strength, self.fill)

    @property
    def from_noise(self) -> bool:
        """Whether the masked part is drawn from noise alone, as text to image draws (strength 1 from
        latent noise, the default); otherwise it is redrawn from its masked content (``ldm.tasks.masked``)."""
        return self.strength == 1.0 and self.fill == "latent noise"


def mask_array(mask: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """A mask image (white = fill) as a boolean (H, W) array at ``size``; validated."""
    array = np.asarray(mask.convert("L").resize(size, Image.Resampling.NEAREST)) >= 128
    if not array.any():
        raise ValueError("the mask is empty: paint over the part of the image to fill")
    return array


def feather_alpha(mask: np.ndarray, feather: int) -> np.ndarray:
    """(H, W) float weights of the fill: 0 outside the mask, rising to 1 over about ``feather`` pixels
    inside its edge (the mask eroded by half the feather, then box-blurred by as much)."""
    alpha = torch.from_numpy(mask.astype(np.float32))[None, None]
    if feather > 0:
        r = (feather + 1) // 2
        eroded = -F.max_pool2d(-F.pad(alpha, (r,) * 4, mode="replicate"), 2 * r + 1, stride=1)
        alpha = F.avg_pool2d(F.pad(eroded, (r,) * 4, mode="replicate"), 2 * r + 1, stride=1) * alpha
    return alpha[0, 0].numpy()


def mask_region(mask: np.ndarray, padding: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the mask's bounding box widened by ``padding``, inside the image."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return (max(0, cols[0] - padding), max(0, rows[0] - padding), min(w, cols[-1] + 1 + padding), min(h, rows[-1] + 1 + padding))


def working_size(width: int, height: int, native: int) -> tuple[int, int]:
    """A crop's size scaled so that its longer side is the model's native side."""
    scale = native / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def serves(config: LatentDiffusionConfig) -> str | None:
    """None for a native inpainting model or a text model (which inpaints by latent blending); an
    upscaler, a segmentation model or a layout-only model does not inpaint."""
    if config.concat_input in NATIVE_INPUTS or serves_text(config) is None:
        return None
    if config.concat_input != "none":
        return (f"cannot inpaint: its UNet also reads a {config.concat_input.replace('_', ' ')}; "
                "use an inpainting model or a text-to-image model")
    return "cannot inpaint: it reads no text prompt; use an inpainting model or a text-to-image model"


def without_text(loaded: LoadedModel, request: GenerationRequest) -> tuple[GenerationRequest, list[str]]:
    """A model with no text stage (LDM inpainting_big) samples unguided: the prompts and the guidance
    scale are dropped from the request, with a notice when they were given."""
    if loaded.model.encodes_tokens:
        return request, []
    unused = [name for name, given in (("prompt", request.prompt or request.negative_prompt), ("guidance scale", request.scale != 1.0))
              if given]
    notices = [f"{loaded.name} has no text stage: the {' and the '.join(unused)} {'are' if len(unused) > 1 else 'is'} not used; "
               "the fill follows the image around the mask"] if unused else []
    return replace(request, prompt="", negative_prompt="", scale=1.0), notices


def fill(
    loaded: LoadedModel,
    request: GenerationRequest,
    image: Image.Image,
    mask: Image.Image,
    callback: Callback | None,
    should_stop: Callable[[], bool] | None,
) -> tuple[list[Image.Image], GenerationRequest, list[str]]:
    """Generated images at the size of ``image`` (the whole picture, not yet pasted back), the
    resolved request, and its notices."""
    model = loaded.model
    request, notices = resolve_request(replace(request, width=image.width, height=image.height), model.config.size_multiple)
    notices += canvas_notices(model, request)
    work_image = from_pil(image.resize((request.width, request.height), Image.Resampling.LANCZOS)).to(model.device)
    work_mask = torch.from_numpy(mask_array(mask, (request.width, request.height)))[None, None].float().to(model.device)
    tile = first_stage_tile(model, request.tiling, 1, request.height, request.width)
    with torch.inference_mode():
        if model.inpaints_natively:
            latents = sample(model, request, concat=model.inpainting_concat(work_image, work_mask, tile),
                             callback=callback, should_stop=should_stop)
        else:
            keep = 1 - F.max_pool2d(work_mask, model.config.downsampling_factor)
            blend = Blend(keep.to(model.dtype), model.encode_first_stage(work_image, tile=tile))
            latents = sample(model, request, blend=blend, callback=callback, should_stop=should_stop)
        generated = to_pil(decode(model, latents, request.tiling))
    return [g.resize(image.size, Image.Resampling.LANCZOS) for g in generated], request, notices


def inpaint(
    loaded: LoadedModel,
    request: GenerationRequest,
    image: Image.Image,
    mask: Image.Image,
    *,
    options: InpaintOptions = InpaintOptions(),
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Fill the white part of ``mask`` in ``image`` from the request's prompt (and boxes). The result
    has the image's size; outside the mask every pixel is the input's, exactly."""
    options.check()
    check_model(serves, loaded)
    request, text_notices = without_text(loaded, request)
    text_notices += tokenizer_notices(loaded.model, request)  # e.g. a prompt cut to LDM BERT's 77 tokens
    image = as_rgb(image)
    masked = mask_array(mask, image.size)
    left, top, right, bottom = mask_region(masked, options.padding) if options.only_masked else (0, 0, *image.size)
    crop = image.crop((left, top, right, bottom))
    crop_mask = Image.fromarray(masked[top:bottom, left:right].astype(np.uint8) * 255)
    if options.only_masked:
        config = loaded.model.config
        size = working_size(crop.width, crop.height, config.latent_size * config.downsampling_factor)
        crop, crop_mask = crop.resize(size, Image.Resampling.LANCZOS), crop_mask.resize(size, Image.Resampling.NEAREST)
    if options.from_noise:
        generated, request, notices = fill(loaded, request, crop, crop_mask, callback, should_stop)
    else:
        known = np.asarray(crop_mask) < 128
        canvas = prefill(np.asarray(crop), known, options.fill)
        generated, request, notices = redraw_masked(loaded, request, canvas, (~known).astype(np.float32), options.strength,
                                                    options.fill, callback, should_stop)
    original = np.asarray(image).astype(np.float32)
    alpha = feather_alpha(masked, options.feather)[..., None]
    images = []
    for picture in generated:
        filled = original.copy()
        filled[top:bottom, left:right] = np.asarray(picture.resize((right - left, bottom - top), Image.Resampling.LANCZOS))
        blended = np.where(alpha > 0, original * (1 - alpha) + filled * alpha, original)
        images.append(Image.fromarray(blended.round().clip(0, 255).astype(np.uint8)))
    seeds = [request.seed + i for i in range(request.batch_size)]
    fields = {**canvas_fields(request), **mask_fields(options)}
    texts = [parameters_text(request, s, loaded, fields, size=f"{image.width}x{image.height}") for s in seeds]
    return GenerationResult(images, seeds, texts, text_notices + notices)


def mask_fields(options: InpaintOptions) -> dict[str, object]:
    """The inpainting settings in the field names AUTOMATIC1111 uses."""
    return {"Denoising strength": options.strength, "Mask blur": options.feather,
            "Masked content": None if options.fill == "original" else options.fill,  # AUTOMATIC1111 leaves "original" out
            "Inpaint area": "Only masked" if options.only_masked else "Whole picture",
            "Masked area padding": options.padding if options.only_masked else None}
