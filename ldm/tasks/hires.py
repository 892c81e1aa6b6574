"""Hires fix: text to image in two passes, as AUTOMATIC1111's txt2img "Hires. fix" makes it.

The first pass is plain text to image at the request's size. Its result is upscaled to the target
(the first pass's size times ``scale``, or a target size), then a second, image-to-image pass
redraws it there at the denoising ``strength``, from new noise of the new shape drawn from the same
seeds (image i from seed ``request.seed + i`` in both passes, so each image of a batch is the one
its seed gives alone). The second pass always runs its steps exactly (AUTOMATIC1111 passes them to
its img2img sampler, so its "do exactly the steps" arithmetic applies whatever the setting is).

The upscalers, by AUTOMATIC1111's names:
  "Latent" (bilinear), "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
  "Latent (nearest)", "Latent (nearest-exact)": the first pass's latents are interpolated;
  "Lanczos": they are decoded, the pictures resized with Lanczos and encoded again;
  a super-resolution model (LDM's SR, Stable Diffusion's x4 upscaler): the decoded pictures are
  upscaled by the upscaling task (``ldm.tasks.upscale``), resized to the target with Lanczos where its
  factor is not the target's, and encoded again.

A target size with another aspect ratio than the first pass is covered (the aspect kept) and the
latent cropped to it, centred, as AUTOMATIC1111 does. A target beyond the model's training size
takes the tiled path of any large canvas (``ldm.tasks.planning``) when its memory asks for it.

Progress and stopping cover the passes as one run: the callback counts the steps of every pass in
one total, and ``SamplingCancelled`` says how many of them were done.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from PIL import Image

from ldm.addons.tags import extract_lora_tags
from ldm.checkpoints.loaded import LoadedModel
from ldm.sampling.steps import Callback, SamplingCancelled, StepInfo
from ldm.sampling.strength import STEP_MODES, check_strength, part_way_steps
from ldm.tasks.generate import decode, tokenizer_notices
from ldm.tasks.images import to_pil
from ldm.tasks.img2img import Img2ImgOptions, denoise_latent, encode_picture, strength_notices
from ldm.tasks.parameters import canvas_fields, parameters_text
from ldm.tasks.planning import canvas_notices
from ldm.tasks.request import MAX_SIDE, MAX_STEPS, GenerationRequest, check_model, check_sampler, checked_number, resolve_request
from ldm.tasks.result import GenerationResult
from ldm.tasks.txt2img import boxes_as_regions, sample_latents, serves
from ldm.tasks.upscale import MAX_INPUT_SIDE, upscale
from ldm.tasks.upscale import serves as serves_upscale

# AUTOMATIC1111's latent upscale modes: name -> (F.interpolate mode, antialias)
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
LANCZOS = "Lanczos"
UPSCALERS = (*LATENT_UPSCALERS, LANCZOS)  # the built-in ones; a super-resolution model is named by its file
MAX_HIRES_SCALE = 4.0
HIRES_STEP_MODE = STEP_MODES[1]  # "Exact steps"


@dataclass(frozen=True)
class HiresOptions:
    """``scale``: the target is the first pass's size times this (1 to 4), unless ``width`` or
    ``height`` is given (AUTOMATIC1111's "Hires resize"; 0 for one of them keeps the first pass's
    aspect ratio); ``upscaler``: one of ``UPSCALERS``, or the name of the super-resolution model
    given beside the options; ``steps``: of the second pass (0: the first pass's); ``strength``: its
    denoising strength."""

    scale: float = 2.0
    width: int = 0
    height: int = 0
    upscaler: str = "Latent"
    steps: int = 0
    strength: float = 0.7

    @property
    def resizes(self) -> bool:
        """Whether a target size is given (instead of the factor)."""
        return bool(self.width or self.height)

    def check(self, upscaler_model: LoadedModel | None = None) -> HiresOptions:
        """The options checked, as numbers of their kinds; a ValueError naming the field otherwise.
        A name outside ``UPSCALERS`` needs ``upscaler_model``."""
        scale = checked_number("hires upscale factor", self.scale, 1.0, MAX_HIRES_SCALE)
        width = checked_number("hires width", self.width, 0, MAX_SIDE, integer=True)
        height = checked_number("hires height", self.height, 0, MAX_SIDE, integer=True)
        steps = checked_number("hires steps", self.steps, 0, MAX_STEPS, integer=True)
        strength = check_strength(self.strength)
        if not isinstance(self.upscaler, str) or (self.upscaler not in UPSCALERS and upscaler_model is None):
            raise ValueError(f"hires upscaler {self.upscaler!r} is not known; use one of {', '.join(UPSCALERS)}, or a "
                             "super-resolution model (an upscaler checkpoint)")
        return replace(self, scale=scale, width=width, height=height, steps=steps, strength=strength)


@dataclass(frozen=True)
class HiresSize:
    """Where the second pass runs: the size the first pass is upscaled to (``cover``, its aspect
    ratio kept where a target size is given) and the ``target`` it is cropped to, centred."""

    cover: tuple[int, int]
    target: tuple[int, int]


def _rounded(name: str, value: int, multiple: int, notices: list[str]) -> int:
    rounded = max(multiple, round(value / multiple) * multiple)
    if rounded > MAX_SIDE:
        raise ValueError(f"the hires {name} would be {value} px; at most {MAX_SIDE} px are allowed: use a smaller "
                         "factor or size")
    if rounded != value:
        notices.append(f"hires {name} {value} is not a multiple of {multiple}; using {rounded}")
    return rounded


def hires_size(width: int, height: int, options: HiresOptions, multiple: int) -> tuple[HiresSize, list[str]]:
    """The second pass's size for a first pass of ``width`` x ``height`` (AUTOMATIC1111's
    ``calculate_target_resolution``): the factor's, or the target size, covered with the first pass's
    aspect ratio; sides rounded to the model's ``multiple``, with notices."""
    if not options.resizes:
        target = (int(width * options.scale), int(height * options.scale))
        cover = target
    elif not options.height:
        target = cover = (options.width, options.width * height // width)
    elif not options.width:
        target = cover = (options.height * width // height, options.height)
    else:
        target = (options.width, options.height)
        if width / height < options.width / options.height:
            cover = (options.width, options.width * height // width)
        else:
            cover = (options.height * width // height, options.height)
    notices: list[str] = []
    target = (_rounded("width", target[0], multiple, notices), _rounded("height", target[1], multiple, notices))
    cover = (max(target[0], _rounded("width", cover[0], multiple, [])),
             max(target[1], _rounded("height", cover[1], multiple, [])))
    return HiresSize(cover, target), notices


def crop_latent(latents: torch.Tensor, size: HiresSize, f: int) -> torch.Tensor:
    """The centre of the covering latents at the target size (AUTOMATIC1111's truncation)."""
    cut_x, cut_y = (size.cover[0] - size.target[0]) // f, (size.cover[1] - size.target[1]) // f
    h, w = latents.shape[-2:]
    return latents[..., cut_y // 2 : h - (cut_y + 1) // 2, cut_x // 2 : w - (cut_x + 1) // 2]


def upscale_latent(latents: torch.Tensor, name: str, height: int, width: int) -> torch.Tensor:
    """(B, C, h, w) latents interpolated to ``height`` x ``width`` latent pixels by a latent upscaler."""
    mode, antialias = LATENT_UPSCALERS[name]
    return F.interpolate(latents.float(), size=(height, width), mode=mode, antialias=antialias).to(latents.dtype)


class PassCounter:
    """One step count over the passes: each pass's steps follow the ones before in a shared total."""

    def __init__(self, callback: Callback | None, totals: list[int]):
        self.callback, self.totals, self.total = callback, totals, sum(totals)

    def run(self, index: int, work: Callable[[Callback | None], object], preview: torch.Tensor | None = None,
            within: int = 0):
        """``work(callback)``, its steps reported after the earlier passes' (and ``within`` steps of its own
        pass: a pass run once per image). ``preview``: the predicted x0 shown instead of the pass's own,
        for a pass in another model's latent space."""
        offset = sum(self.totals[:index]) + within

        def report(info: StepInfo) -> None:
            shown = info.denoised if preview is None else preview
            self.callback(StepInfo(offset + info.step, self.total, info.t, info.x, shown))

        try:
            return work(None if self.callback is None else report)
        except SamplingCancelled as stopped:
            raise SamplingCancelled(offset + stopped.step, self.total) from None


def upscaled_pictures(images: list[Image.Image], size: tuple[int, int], upscaler: LoadedModel | None,
                      request: GenerationRequest, seeds: list[int], counter: PassCounter,
                      should_stop: Callable[[], bool] | None, first: torch.Tensor) -> list[Image.Image]:
    """The decoded first pass at ``size`` (width, height): by Lanczos, or by the super-resolution
    model (each image from its own seed, the request's prompts and steps), then Lanczos to the size."""
    if upscaler is None:
        return [image.resize(size, Image.Resampling.LANCZOS) for image in images]

    # The upscaler reads the prompts without their LoRA tags and embeddings: those are the generating model's.
    prompt, negative = (extract_lora_tags(p).text for p in (request.prompt, request.negative_prompt))

    def one(i: int, callback: Callback | None) -> Image.Image:
        single = replace(request, prompt=prompt, negative_prompt=negative, seed=seeds[i], batch_size=1, boxes=(),
                         regions=(), lora_dirs=(), embedding_dirs=())
        return upscale(upscaler, images[i], single, callback=callback, should_stop=should_stop).images[0]

    big = [counter.run(1, lambda cb, i=i: one(i, cb), preview=first[i : i + 1], within=i * request.steps)
           for i in range(len(images))]
    return [image if image.size == size else image.resize(size, Image.Resampling.LANCZOS) for image in big]


def hires_fields(options: HiresOptions) -> dict[str, object]:
    """AUTOMATIC1111's fields of a hires fix: "Denoising strength", "Hires upscale" (the factor) or
    "Hires resize" (the target as given, WxH), "Hires steps" (when not 0), "Hires upscaler"."""
    return {"Denoising strength": options.strength,
            "Hires upscale": None if options.resizes else f"{options.scale:g}",
            "Hires resize": f"{options.width}x{options.height}" if options.resizes else None,
            "Hires steps": options.steps or None,
            "Hires upscaler": options.upscaler}


def read_hires(fields: dict[str, str]) -> HiresOptions | None:
    """The hires fix of parsed parameters (``ldm.tasks.parameters.parse_parameters``), or None when they
    have none. What is missing or unreadable takes AUTOMATIC1111's defaults (0 steps: the first pass's)."""
    resize = re.fullmatch(r"\s*(\d+)x(\d+)\s*", fields.get("Hires resize", ""))
    if "Hires upscale" not in fields and not resize:
        return None
    defaults = HiresOptions()

    def number(key: str, default, kind=float):
        try:
            value = kind(float(fields[key]))
        except (KeyError, ValueError, OverflowError):
            return default
        return value if math.isfinite(value) else default

    width, height = (int(resize.group(1)), int(resize.group(2))) if resize else (0, 0)
    return HiresOptions(scale=number("Hires upscale", defaults.scale), width=width, height=height,
                        upscaler=fields.get("Hires upscaler", "").strip() or defaults.upscaler,
                        steps=number("Hires steps", 0, int), strength=number("Denoising strength", defaults.strength))


def hires_fix(
    loaded: LoadedModel,
    request: GenerationRequest,
    options: HiresOptions = HiresOptions(),
    *,
    upscaler: LoadedModel | None = None,
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Text to image at the request's size, then upscaled and redrawn at the hires size (see the module
    docstring); ``upscaler``: the super-resolution model ``options.upscaler`` names, when it names one.
    ``request.batch_size`` images from seeds ``request.seed + i``; each PNG text has the first pass's
    size and steps and the hires fields. Raises ValueError for bad input, ``SamplingCancelled`` when stopped."""
    check_model(serves, loaded)
    model = loaded.model
    upscaler = hires_upscaler(options, upscaler)
    options = options.check(upscaler)
    request, notices = resolve_request(request, model.config.size_multiple)
    request, more = boxes_as_regions(loaded, request)
    size, size_notices = hires_size(request.width, request.height, options, model.config.size_multiple)
    second = replace(request, width=size.target[0], height=size.target[1], steps=options.steps or request.steps)
    img2img = Img2ImgOptions(options.strength, step_mode=HIRES_STEP_MODE)
    part = part_way_steps(second.steps, options.strength, HIRES_STEP_MODE)
    check_sampler(second.sampler, second.schedule, part.total)
    if upscaler is not None and max(request.width, request.height) > MAX_INPUT_SIDE:
        raise ValueError(f"a super-resolution upscaler takes a first pass of at most {MAX_INPUT_SIDE} px a side, got "
                         f"{request.width}x{request.height}")
    notices += (more + tokenizer_notices(model, request) + size_notices + canvas_notices(model, second)
                + strength_notices(second, img2img))
    seeds = [request.seed + i for i in range(request.batch_size)]
    counter = PassCounter(callback, [request.steps, len(seeds) * second.steps if upscaler else 0, part.run])
    first = counter.run(0, lambda cb: sample_latents(loaded, request, callback=cb, should_stop=should_stop))
    f = model.config.downsampling_factor
    with torch.inference_mode():
        if options.upscaler in LATENT_UPSCALERS:
            init = upscale_latent(first, options.upscaler, size.cover[1] // f, size.cover[0] // f)
        else:
            pictures = to_pil(decode(model, first, request.tiling))
            pictures = upscaled_pictures(pictures, size.cover, upscaler, second, seeds, counter, should_stop, first)
            covered = replace(second, width=size.cover[0], height=size.cover[1])
            init = torch.cat([encode_picture(model, p, covered) for p in pictures])
    init = crop_latent(init, size, f)
    latents = counter.run(2, lambda cb: denoise_latent(loaded, second, init, img2img, callback=cb, should_stop=should_stop))
    with torch.inference_mode():
        images = to_pil(decode(model, latents, second.tiling))
    fields = {**hires_fields(options), **canvas_fields(request)}
    return GenerationResult(images, seeds, [parameters_text(request, s, loaded, fields) for s in seeds], notices)


def hires_upscaler(options: HiresOptions, upscaler: LoadedModel | None) -> LoadedModel | None:
    """The super-resolution model to use: the one given, checked to be one; none for a built-in name."""
    if getattr(options, "upscaler", None) in UPSCALERS:
        return None
    if upscaler is not None:
        reason = serves_upscale(upscaler.model.config)
        if reason is not None:
            raise ValueError(f"hires upscaler {upscaler.name} {reason}; use one of {', '.join(UPSCALERS)}, or an "
                             "upscaling model")
    return upscaler
