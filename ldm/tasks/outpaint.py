"""Outpainting: extend a picture by some pixels on each side and let the model draw the new border.

The canvas is grown around the picture and its new border pre-filled by one of AUTOMATIC1111's
"masked content" modes (``FILL_MODES``):

    "fill"            blurred copies of the picture's own pixels, from wide (radius 256) to sharp,
                      laid over each other, so the border starts in the picture's colours;
    "original"        the picture's edge pixels stretched outwards;
    "latent noise"    the border's latent replaced by seeded noise;
    "latent nothing"  the border's latent set to zero.

The mask is white on the border and reaches ``mask_blur`` pixels into the picture on each extended
side, fading out there (the soft seam): the model redraws that band too, so the border continues the
picture's edge instead of butting against it. The pre-filled canvas is encoded and denoised from the
denoising strength (1.0, the default, redraws the border entirely; image to image's step arithmetic,
``ldm.sampling.strength``) under the prompt: a native inpainting model reads the mask and the masked
canvas (``LatentDiffusion.inpainting_concat``), any other text model fills by latent blending (the
picture's latent is put back before every step). Finally the picture's own pixels are pasted back,
exactly. A canvas beyond the model's training size is sampled and encoded in tiles as any large
canvas is (``ldm.tasks.planning``), so a picture can be extended step by step into a panorama.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from ldm.checkpoints.loaded import LoadedModel
from ldm.sampling.steps import Callback
from ldm.sampling.strength import check_strength
from ldm.tasks.generate import tokenizer_notices
from ldm.tasks.images import as_rgb
from ldm.tasks.img2img import check_picture
from ldm.tasks.inpaint import serves, without_text
from ldm.tasks.masked import FILL_MODES, check_fill, prefill, redraw_masked
from ldm.tasks.parameters import canvas_fields, parameters_text
from ldm.tasks.request import MAX_SIDE, GenerationRequest, check_model
from ldm.tasks.result import GenerationResult

NAME = "outpaint"
SIDES = ("left", "right", "top", "bottom")
MAX_MASK_BLUR = 64
MIN_PICTURE = 8  # pixels a side: a smaller picture gives the model nothing to continue
_EXTENSIONS = re.compile(r"\s*(left|right|top|bottom)\s+(\d+)\s*")


@dataclass(frozen=True)
class OutpaintOptions:
    """``left``, ``right``, ``top``, ``bottom``: pixels added on each side; ``fill``: what the new
    border starts from (``FILL_MODES``); ``mask_blur``: how far (pixels) the soft seam reaches into
    the picture; ``strength``: the denoising strength of the border (1 redraws it from noise)."""

    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0
    fill: str = FILL_MODES[0]
    mask_blur: int = 8
    strength: float = 1.0

    def check(self, size: tuple[int, int]) -> OutpaintOptions:
        """The options, validated for a picture of ``size``; the extended canvas must fit ``MAX_SIDE``."""
        for side in SIDES:
            value = getattr(self, side)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"the {side} extension must be a whole number of pixels, 0 or more, got {value!r}")
        if not any(getattr(self, side) for side in SIDES):
            raise ValueError("nothing to outpaint: extend the picture by some pixels on at least one side "
                             "(left, right, top or bottom)")
        check_fill(self.fill)
        if isinstance(self.mask_blur, bool) or not isinstance(self.mask_blur, int) or not 0 <= self.mask_blur <= MAX_MASK_BLUR:
            raise ValueError(f"mask blur must be a whole number of pixels from 0 to {MAX_MASK_BLUR}, got {self.mask_blur!r}")
        width, height = self.canvas_size(size)
        if max(width, height) > MAX_SIDE:
            raise ValueError(f"extending the {size[0]}x{size[1]} picture by {self.extensions()} gives a {width}x{height} "
                             f"canvas; the limit is {MAX_SIDE} px a side: extend it by less")
        return replace(self, strength=check_strength(self.strength))

    def canvas_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return size[0] + self.left + self.right, size[1] + self.top + self.bottom

    def extensions(self) -> str:
        """The studio's "Outpaint" field: ``left 64, right 64, top 0, bottom 0``."""
        return ", ".join(f"{side} {getattr(self, side)}" for side in SIDES)


def read_extensions(text: str) -> dict[str, int]:
    """The extensions of an "Outpaint" field (``OutpaintOptions.extensions``), by side."""
    found = {}
    for part in text.split(","):
        match = _EXTENSIONS.fullmatch(part)
        if not match:
            raise ValueError(f"cannot read the outpaint extensions {text!r}; expected e.g. 'left 64, right 64, top 0, bottom 0'")
        found[match.group(1)] = int(match.group(2))
    return found


def extend_to(size: tuple[int, int], width: int | None = None, height: int | None = None, *,
              aspect: float | None = None) -> dict[str, int]:
    """Extensions (by side) that centre a picture of ``size`` on a ``width`` x ``height`` canvas (a
    side not given keeps the picture's), or on the smallest canvas of ``aspect`` (width / height)
    that holds it. The odd pixel goes right or bottom."""
    w, h = size
    if aspect is not None:
        if width is not None or height is not None:
            raise ValueError("give a target size or an aspect ratio, not both")
        if not aspect > 0:
            raise ValueError(f"the aspect ratio must be above 0, got {aspect!r}")
        width, height = (max(w, round(h * aspect)), h) if aspect >= w / h else (w, max(h, round(w / aspect)))
    width, height = w if width is None else width, h if height is None else height
    if width < w or height < h:
        raise ValueError(f"the target canvas {width}x{height} is smaller than the {w}x{h} picture: outpainting "
                         "only extends (crop the picture first)")
    return {"left": (width - w) // 2, "right": width - w - (width - w) // 2,
            "top": (height - h) // 2, "bottom": height - h - (height - h) // 2}


# --- the canvas and its mask -------------------------------------------------------------------------


def prefilled_canvas(image: Image.Image, options: OutpaintOptions) -> Image.Image:
    """The extended canvas before the model works on it: the picture in place, its new border as
    ``options.fill`` starts it ("fill": blurred copies of the picture; "original": its edge pixels
    stretched; the latent modes: mid grey, their border being set in the latent)."""
    picture = np.asarray(as_rgb(image))
    o = options
    pad = ((o.top, o.bottom), (o.left, o.right), (0, 0))
    known = np.pad(np.ones(picture.shape[:2], dtype=bool), pad[:2])
    return prefill(np.pad(picture, pad, mode="edge" if o.fill == "original" else "constant"), known, o.fill)


def seam_mask(size: tuple[int, int], options: OutpaintOptions) -> np.ndarray:
    """(H, W) float mask of the canvas for a picture of ``size``: 1 on the new border, falling from 1
    at the picture's extended edges to 0 at ``mask_blur`` pixels inside it (the soft seam), 0 on the
    rest of the picture. Sides that are not extended keep the picture to its edge."""
    w, h = size
    width, height = options.canvas_size(size)
    xs, ys = np.arange(width) - options.left, np.arange(height) - options.top
    depth = np.full((height, width), np.inf)
    for side, distance in (("left", xs[None, :]), ("right", w - 1 - xs[None, :]),
                           ("top", ys[:, None]), ("bottom", h - 1 - ys[:, None])):
        if getattr(options, side):
            depth = np.minimum(depth, np.broadcast_to(distance, depth.shape))
    outside = (xs[None, :] < 0) | (xs[None, :] >= w) | (ys[:, None] < 0) | (ys[:, None] >= h)
    blur = options.mask_blur
    seam = np.clip(1 - (depth + 1) / (blur + 1), 0, 1) if blur else np.zeros_like(depth)
    return np.where(outside, 1.0, seam).astype(np.float32)


def outpaint_preview(image: Image.Image, options: OutpaintOptions) -> Image.Image:
    """What the studio shows before generating: the pre-filled canvas, with the seam band (where
    the model also redraws the picture's edge) tinted. For "latent noise" the border shows pixel
    noise as a stand-in: the real noise is drawn in the latent, from each image's seed."""
    options = options.check(image.size)
    canvas = np.asarray(prefilled_canvas(image, options)).astype(np.float32)
    if options.fill == "latent noise":
        noise = np.random.default_rng(0).integers(0, 256, canvas.shape).astype(np.float32)
        border = seam_mask(image.size, options)[..., None] >= 1
        canvas = np.where(border, noise, canvas)
    band = seam_mask(image.size, options)
    band = ((band > 0) & (band < 1))[..., None] * 0.35
    canvas = canvas * (1 - band) + np.array([255.0, 64.0, 160.0]) * band
    return Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))


# --- the task ----------------------------------------------------------------------------------------


def outpaint_fields(options: OutpaintOptions) -> dict[str, object]:
    """AUTOMATIC1111's "Denoising strength", "Mask blur" and "Masked content" (left out for "original",
    its default), and the studio's "Outpaint" extensions."""
    return {"Denoising strength": options.strength, "Mask blur": options.mask_blur,
            "Masked content": None if options.fill == "original" else options.fill, "Outpaint": options.extensions()}


def outpaint(
    loaded: LoadedModel,
    request: GenerationRequest,
    image: Image.Image,
    *,
    options: OutpaintOptions,
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Extend ``image`` as ``options`` say and draw the new border under the request's prompt,
    ``request.batch_size`` images from seeds ``request.seed + i`` (the request's size is the
    canvas's). Inside the picture's area every pixel is the input's, exactly. Raises ValueError for
    bad input, ``SamplingCancelled`` when stopped."""
    check_picture(image)
    if min(image.size) < MIN_PICTURE:
        raise ValueError(f"the picture is {image.width}x{image.height} px; outpainting continues a picture of at "
                         f"least {MIN_PICTURE} px a side")
    options = options.check(image.size)
    check_model(serves, loaded)
    request, text_notices = without_text(loaded, request)
    text_notices += tokenizer_notices(loaded.model, request)
    picture = as_rgb(image)
    canvas = prefilled_canvas(picture, options)
    generated, request, notices = redraw_masked(loaded, request, canvas, seam_mask(picture.size, options),
                                                options.strength, options.fill, callback, should_stop)
    images = []
    for result in generated:
        result.paste(picture, (options.left, options.top))
        images.append(result)
    seeds = [request.seed + i for i in range(request.batch_size)]
    fields_ = {**outpaint_fields(options), **canvas_fields(request)}
    size = f"{canvas.width}x{canvas.height}"
    texts = [parameters_text(request, s, loaded, fields_, size=size) for s in seeds]
    return GenerationResult(images, seeds, texts, text_notices + notices)


def options_from_fields(fields_: dict[str, str]) -> dict[str, object]:
    """The outpaint settings a parameters text records (``outpaint_fields``), by option name; what it
    does not record is left out. "Masked content" missing is AUTOMATIC1111's "original"."""
    found: dict[str, object] = {}
    if "Outpaint" in fields_:
        found.update(read_extensions(fields_["Outpaint"]))
        found["fill"] = fields_.get("Masked content", "original")
    for key, name, kind in (("Mask blur", "mask_blur", int), ("Denoising strength", "strength", float)):
        try:
            found[name] = kind(float(fields_[key])) if kind is int else kind(fields_[key])
        except (KeyError, ValueError):
            pass
    return found

