"""Image to image (SDEdit, Meng et al. 2022; the paper's guided synthesis): the picture is encoded,
noised part-way down the sampler's schedule by the denoising strength, and denoised from there
under the prompt, so it keeps the picture's composition and colours and takes the prompt's content.

The step arithmetic of the strength is ``ldm.sampling.strength`` (diffusers' by default, AUTOMATIC1111's
"do exactly N steps" on request). The picture is fitted to the requested size by one of
AUTOMATIC1111's resize modes; a size beyond the model's training size takes the tiled path of any
large canvas. A sketch (colour strokes with their alpha) is laid over the picture before encoding.
The image's latent is the autoencoder's mean (not a draw), so the seed decides only the noise.
Native inpainting models take the whole picture as their mask, as for text to image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from ldm.checkpoints.loaded import LoadedModel
from ldm.models.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from ldm.sampling.steps import Callback
from ldm.sampling.strength import STEP_MODES, check_step_mode, check_strength, lowest_exact_strength, part_way_steps
from ldm.tasks.generate import decode, default_concat, sample, tokenizer_notices
from ldm.tasks.images import as_rgb, from_pil, to_pil
from ldm.tasks.parameters import canvas_fields, parameters_text
from ldm.tasks.planning import canvas_notices, first_stage_tile
from ldm.tasks.request import MAX_SIDE, GenerationRequest, check_model, resolve_request
from ldm.tasks.result import GenerationResult
from ldm.tasks.txt2img import serves as serves_text

NAME = "img2img"
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill")  # AUTOMATIC1111's names
MIN_DEFAULT_SIDE = 64  # a smaller picture's default size is scaled up to this shorter side
MAX_PIXELS = 20000  # a picture with a longer side than this is refused before it is read into memory twice


@dataclass(frozen=True)
class Img2ImgOptions:
    """``strength``: 0 keeps the picture, 1 redraws it (from noise on the schedule's top, still seeded
    by the picture); ``resize_mode``: how the picture meets the requested size; ``step_mode``: which
    step arithmetic (``ldm.sampling.strength.STEP_MODES``)."""

    strength: float = 0.75
    resize_mode: str = RESIZE_MODES[0]
    step_mode: str = STEP_MODES[0]

    def check(self) -> "Img2ImgOptions":
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize mode {self.resize_mode!r} is not known; use one of {', '.join(RESIZE_MODES)}")
        check_step_mode(self.step_mode)
        return replace(self, strength=check_strength(self.strength))


def serves(config: LatentDiffusionConfig) -> str | None:
    """The text-to-image models (native inpainting ones included); not an upscaler, a segmentation or
    a layout-only model."""
    if config.concat_input == "low_res_image":
        return "is a super-resolution model: use it to upscale, not for image to image"
    return serves_text(config)


def check_picture(image: Image.Image, what: str = "the image") -> None:
    """Refuse a picture with no pixels or one too large to work on, by its size."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"{what} has no pixels ({width}x{height})")
    if max(width, height) > MAX_PIXELS:
        raise ValueError(f"{what} is {width}x{height} px; pictures up to {MAX_PIXELS} px a side are taken (and are "
                         f"worked on at up to {MAX_SIDE} px): scale it down first")


def default_size(image: Image.Image) -> tuple[tuple[int, int], list[str]]:
    """The size a picture is worked at when none is asked for: its own, scaled down to fit
    ``MAX_SIDE`` or up to a shorter side of ``MIN_DEFAULT_SIDE``, with a notice when scaled."""
    check_picture(image)
    width, height = image.size
    fit = MAX_SIDE / max(width, height)
    scale = fit if fit < 1 else min(max(1.0, MIN_DEFAULT_SIDE / min(width, height)), fit)
    if scale == 1.0:
        return (width, height), []
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return size, [f"the image is {width}x{height} px; it is worked at {size[0]}x{size[1]} (give a width and height "
                  "to choose)"]


def picture_size(image: Image.Image, width: int = 0, height: int = 0) -> tuple[tuple[int, int], list[str]]:
    """The size a picture is worked at: ``width`` and ``height`` when both are given; one alone (the
    other 0) with the other following the picture's shape; neither its ``default_size``."""
    if width and height:
        return (width, height), []
    if not width and not height:
        return default_size(image)
    if width:
        return (width, max(1, min(MAX_SIDE, round(width * image.height / image.width)))), []
    return (max(1, min(MAX_SIDE, round(height * image.width / image.height))), height), []


def resize_picture(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """``image`` at ``width`` x ``height``, as AUTOMATIC1111's resize modes do it:
    "Just resize" stretches it; "Crop and resize" scales it to cover the size and crops the centre;
    "Resize and fill" scales it to fit inside and fills the rest by stretching its edge pixels."""
    if image.size == (width, height):
        return image
    lanczos = Image.Resampling.LANCZOS
    if mode == "Just resize":
        return image.resize((width, height), lanczos)
    if mode == "Crop and resize":
        scale = max(width / image.width, height / image.height)
        w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
        left, top = (w - width) // 2, (h - height) // 2
        return image.resize((w, h), lanczos).crop((left, top, left + width, top + height))
    if mode != "Resize and fill":
        raise ValueError(f"resize mode {mode!r} is not known; use one of {', '.join(RESIZE_MODES)}")
    scale = min(width / image.width, height / image.height)
    w, h = max(1, min(width, round(image.width * scale))), max(1, min(height, round(image.height * scale)))
    left, top = (width - w) // 2, (height - h) // 2
    inner = np.asarray(image.resize((w, h), lanczos))
    padded = np.pad(inner, ((top, height - h - top), (left, width - w - left), (0, 0)), mode="edge")
    return Image.fromarray(padded)


def apply_sketch(image: Image.Image, sketch: Image.Image) -> Image.Image:
    """Colour strokes (an RGBA layer, transparent where nothing is drawn, at any size: it is fitted to
    the picture) laid over ``image``. A layer with no stroke is refused: nothing would change."""
    strokes = sketch.convert("RGBA")
    if strokes.size != image.size:
        strokes = strokes.resize(image.size, Image.Resampling.LANCZOS)
    if strokes.getchannel("A").getextrema()[1] == 0:
        raise ValueError("the sketch has no strokes: draw on the picture with the brush, or turn sketch mode off")
    return Image.alpha_composite(image.convert("RGBA"), strokes).convert("RGB")


def encode_picture(model: LatentDiffusion, image: Image.Image, request: GenerationRequest) -> torch.Tensor:
    """The (1, C, h, w) latent of an RGB picture already at the request's size: the autoencoder's
    mean, encoded in tiles where the canvas asks for them."""
    tile = first_stage_tile(model, request.tiling, 1, request.height, request.width)
    with torch.inference_mode():
        return model.encode_first_stage(from_pil(image).to(model.device), tile=tile)


def strength_notices(request: GenerationRequest, options: Img2ImgOptions) -> list[str]:
    part = part_way_steps(request.steps, options.strength, options.step_mode)
    if part.run == 0:
        return [f"denoising strength {options.strength:g} with {request.steps} steps runs no step: the picture only "
                "goes through the autoencoder"]
    lowest = lowest_exact_strength(request.steps)
    if options.step_mode == STEP_MODES[1] and 0 < options.strength < lowest:
        return [f"with {request.steps} exact steps the lowest denoising strength is {lowest:.3g}; "
                f"{options.strength:g} runs as {lowest:.3g}"]
    return []


def denoise_latent(
    loaded: LoadedModel,
    request: GenerationRequest,
    init: torch.Tensor,
    options: Img2ImgOptions,
    *,
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Latents denoised from the resolved request's ``init`` latent at ``options.strength``: the
    schedule of ``part_way_steps``, its skipped steps left out. What img2img, outpainting and the
    hires fix's second pass share."""
    model = loaded.model
    part = part_way_steps(request.steps, options.strength, options.step_mode)
    f = model.config.downsampling_factor
    height, width = init.shape[-2] * f, init.shape[-1] * f
    with torch.inference_mode():
        concat = default_concat(model, height, width, request.tiling)
    return sample(model, replace(request, steps=part.total, height=height, width=width), concat=concat, init=init,
                  skip=part.skip, callback=callback, should_stop=should_stop)


def img2img_fields(options: Img2ImgOptions) -> dict[str, object]:
    """AUTOMATIC1111's "Denoising strength", and the studio's resize and step modes where not the defaults."""
    return {"Denoising strength": options.strength,
            "Resize mode": None if options.resize_mode == RESIZE_MODES[0] else options.resize_mode,
            "Img2img steps": None if options.step_mode == STEP_MODES[0] else options.step_mode}


def img2img(
    loaded: LoadedModel,
    request: GenerationRequest,
    image: Image.Image,
    *,
    options: Img2ImgOptions = Img2ImgOptions(),
    sketch: Image.Image | None = None,
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Re-draw ``image`` (any mode; ``sketch`` strokes laid over it first) at the request's size under
    its prompt, ``request.batch_size`` images from seeds ``request.seed + i``. Raises ValueError for
    bad input, ``SamplingCancelled`` when stopped."""
    options = options.check()
    check_model(serves, loaded)
    check_picture(image)
    picture = as_rgb(image)
    if sketch is not None:
        picture = apply_sketch(picture, sketch)
    model = loaded.model
    request, notices = resolve_request(request, model.config.size_multiple)
    notices = tokenizer_notices(model, request) + notices + canvas_notices(model, request) + strength_notices(request, options)
    init = encode_picture(model, resize_picture(picture, request.width, request.height, options.resize_mode), request)
    latents = denoise_latent(loaded, request, init, options, callback=callback, should_stop=should_stop)
    with torch.inference_mode():
        images = to_pil(decode(model, latents, request.tiling))
    seeds = [request.seed + i for i in range(request.batch_size)]
    fields = {**img2img_fields(options), **canvas_fields(request)}
    return GenerationResult(images, seeds, [parameters_text(request, s, loaded, fields) for s in seeds], notices)
