"""Masked image to image: a picture whose masked part is redrawn under the prompt from a denoising
strength, starting from one of AUTOMATIC1111's "masked content" modes (``FILL_MODES``):

    "fill"            blurred copies of the known pixels, from wide (radius 256) to sharp, laid over
                      each other, so the masked part starts in the picture's colours;
    "original"        the pixels as they are (outpainting: the picture's edge stretched outwards);
    "latent noise"    the masked part's latent replaced by seeded noise;
    "latent nothing"  the masked part's latent set to zero.

The pre-filled canvas is encoded and denoised from the strength (image to image's step arithmetic,
``ldm.sampling.strength``): a native inpainting model reads the mask and the masked canvas
(``LatentDiffusion.inpainting_concat``), any other text model fills by latent blending (the known
latent is put back before every step). What outpainting and inpainting share; each pastes its known
pixels back afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.checkpoints.loaded import LoadedModel
from ldm.sampling.noise import randn, seeded_generators
from ldm.sampling.steps import Callback
from ldm.sampling.strength import check_strength, part_way_steps
from ldm.tasks.generate import Blend, decode, sample
from ldm.tasks.images import from_pil, to_pil
from ldm.tasks.img2img import Img2ImgOptions, encode_picture, strength_notices
from ldm.tasks.planning import canvas_notices, first_stage_tile
from ldm.tasks.request import GenerationRequest, resolve_request

FILL_MODES = ("fill", "original", "latent noise", "latent nothing")  # AUTOMATIC1111's "Masked content" choices
FILL_RADII = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2))  # (blur radius, times laid over) of "fill"; radius 0 is the picture


def check_fill(fill) -> str:
    if fill not in FILL_MODES:
        raise ValueError(f"masked content {fill!r} is not known; use one of {', '.join(FILL_MODES)}")
    return fill


def check_masked(strength, fill) -> tuple[float, str]:
    """A denoising strength from 0 to 1 and a masked-content mode, checked."""
    return check_strength(strength), check_fill(fill)


def _box_blur(array: np.ndarray, radius: int) -> np.ndarray:
    """Sums over a (2r+1)-wide box along both axes, zero outside the array (cumulative sums)."""
    for axis in (0, 1):
        padded = np.concatenate([np.zeros_like(array.take([0], axis=axis)), array], axis=axis).cumsum(axis=axis)
        n = array.shape[axis]
        upper = padded.take(np.minimum(np.arange(n) + radius + 1, n), axis=axis)
        lower = padded.take(np.maximum(np.arange(n) - radius, 0), axis=axis)
        array = upper - lower
    return array


def blurred_fill(pixels: np.ndarray, known: np.ndarray) -> np.ndarray:
    """(H, W, 3) float pixels whose unknown part is filled from the known part: the known pixels'
    mean, then copies of the known pixels blurred over ``FILL_RADII`` (each a blur weighted by where
    the pixels are known, as a Gaussian: three box passes) laid over it with their coverage as alpha;
    the known pixels themselves on top."""
    weight = known.astype(np.float64)
    colour = pixels.astype(np.float64) * weight[..., None]
    result = np.broadcast_to(colour.sum(axis=(0, 1)) / weight.sum(), pixels.shape).copy()
    for radius, times in FILL_RADII:
        spread_colour, spread_weight = colour, weight
        for _ in range(3):
            spread_colour, spread_weight = _box_blur(spread_colour, radius), _box_blur(spread_weight, radius)
        covered = spread_weight > 1e-9
        blurred = np.where(covered[..., None], spread_colour / np.where(covered, spread_weight, 1)[..., None], 0)
        alpha = np.clip(spread_weight / (2 * radius + 1) ** 6, 0, 1)[..., None]  # the box's whole mass = fully known
        for _ in range(times):
            result = blurred * alpha + result * (1 - alpha)
    return np.where(known[..., None], pixels, result)


def prefill(picture: np.ndarray, known: np.ndarray, fill: str) -> Image.Image:
    """The canvas a masked redraw starts from: an (H, W, 3) uint8 picture whose unknown pixels
    (``known`` False) are filled as ``fill`` says: "fill" by ``blurred_fill``, "original" left as
    they are, the latent modes mid grey (their latent is set in ``latent_start``)."""
    if fill == "fill":
        return Image.fromarray(blurred_fill(picture.astype(np.float32), known).round().clip(0, 255).astype(np.uint8))
    if fill == "original":
        return Image.fromarray(picture)
    return Image.fromarray(np.where(known[..., None], picture, 128).astype(np.uint8))


def latent_start(model, request: GenerationRequest, init: torch.Tensor, fill_mask: torch.Tensor, fill: str) -> torch.Tensor:
    """The latent the masked part is denoised from: the canvas's own, or, for the latent modes, with the
    masked part set to zero ("latent nothing") or to noise ("latent noise", each image's next draw
    from its seed's generator after the sampler's starting noise), one per image."""
    if fill not in ("latent noise", "latent nothing"):
        return init
    keep = 1 - fill_mask
    if fill == "latent nothing":
        return init * keep
    generators = seeded_generators([request.seed + i for i in range(request.batch_size)])
    shape = (request.batch_size, *init.shape[1:])
    randn(shape, generators, device=model.device, dtype=init.dtype)  # the sampler's x_T: the noise is the draw after it
    return init * keep + randn(shape, generators, device=model.device, dtype=init.dtype) * fill_mask


def redraw_masked(
    loaded: LoadedModel,
    request: GenerationRequest,
    canvas: Image.Image,
    mask: np.ndarray,
    strength: float,
    fill: str,
    callback: Callback | None,
    should_stop: Callable[[], bool] | None,
) -> tuple[list[Image.Image], GenerationRequest, list[str]]:
    """Generated canvases at the size of ``canvas`` (its known pixels not yet pasted back), the
    resolved request and its notices. ``canvas``: the picture with its masked part pre-filled
    (``prefill``); ``mask``: (H, W) floats, 1 where it is redrawn, fading to 0 at a soft edge (any
    value above 0 is redrawn; the fade is how much of the known latent is put back each step on a
    model that fills by blending); ``strength`` and ``fill`` as ``MaskedOptions``."""
    model = loaded.model
    request, notices = resolve_request(replace(request, width=canvas.width, height=canvas.height), model.config.size_multiple)
    step = Img2ImgOptions(strength=strength)
    notices += canvas_notices(model, request) + strength_notices(request, step)
    work = canvas.resize((request.width, request.height), Image.Resampling.LANCZOS)
    soft = torch.from_numpy(mask)[None, None]
    soft = F.interpolate(soft, (request.height, request.width), mode="bilinear", align_corners=False).to(model.device)
    hard = (soft > 0).float()
    f = model.config.downsampling_factor
    init = encode_picture(model, work, request)
    with torch.inference_mode():
        latent_mask = F.max_pool2d(hard, f).to(init)
        start = latent_start(model, request, init, latent_mask, fill)
        concat, blend = None, None
        if model.inpaints_natively:
            tile = first_stage_tile(model, request.tiling, 1, request.height, request.width)
            concat = model.inpainting_concat(from_pil(work).to(model.device), hard, tile)
        else:
            blend = Blend((1 - F.max_pool2d(soft, f)).to(init), init)
        part = part_way_steps(request.steps, strength)
        latents = sample(model, replace(request, steps=part.total), concat=concat, blend=blend, init=start, skip=part.skip,
                         callback=callback, should_stop=should_stop)
        generated = to_pil(decode(model, latents, request.tiling))
    return [g.resize(canvas.size, Image.Resampling.LANCZOS) for g in generated], request, notices
