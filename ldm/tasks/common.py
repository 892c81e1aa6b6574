"""Pieces shared by the tasks: images to and from tensors, conditioning, one guided DDIM run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ldm.devices import free_memory_mb
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.sampling.ddim import StepInfo, ddim_sample
from ldm.sampling.noise import randn, seeded_generators
from ldm.sampling.schedules import ddim_schedule
from ldm.tasks.canvas import CanvasPlan, check_memory, describe, first_stage_tile, guided_denoiser, plan_canvas, region_fusion, replace_prompts
from ldm.tasks.images import as_rgb
from ldm.tasks.request import GenerationRequest, TilingOptions


@dataclass(frozen=True)
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    parameters: list[str]  # the parameters text of each image
    notices: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Blend:
    """Inpainting by latent blending: ``keep`` (1 = keep) and the known latent ``x0``."""

    keep: torch.Tensor
    x0: torch.Tensor


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB PIL images."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]


def from_pil(image: Image.Image) -> torch.Tensor:
    """A PIL image of any mode (``as_rgb``) -> (1, 3, H, W) in [-1, 1]."""
    array = np.asarray(as_rgb(image), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def conditioning(model: LatentDiffusion, request: GenerationRequest, concat: torch.Tensor | None) -> tuple[dict, dict | None]:
    """(cond, uncond) denoiser arguments. The negative prompt is the unconditional branch; both are
    encoded together so that long prompts give both the same number of chunks. Concat channels and
    layout boxes are the same for both branches (the layout only conditions the positive one)."""
    batch = request.batch_size
    extra = {} if concat is None else {"concat": concat.expand(batch, -1, -1, -1)}
    if not model.encodes_tokens:
        return extra, None
    layouts = [[], list(request.boxes)] if request.boxes else None
    context = model.encode_prompts([request.negative_prompt, request.prompt], layouts=layouts)
    uncond = {"context": context[:1].expand(batch, -1, -1), **extra}
    cond = {"context": context[1:].expand(batch, -1, -1), **extra}
    return cond, uncond


def default_concat(model: LatentDiffusion, height: int, width: int, options: TilingOptions) -> torch.Tensor | None:
    """What a hybrid inpainting model gets for plain generation: "no mask" (fill everything); the
    blank image is encoded in tiles on the same terms as any other."""
    if not model.inpaints_natively:
        return None
    blank = torch.zeros(1, 3, height, width, device=model.device)
    tile = first_stage_tile(model, options, 1, height, width)
    return model.inpainting_concat(blank, torch.ones(1, 1, height, width, device=model.device), tile=tile)


def sample(
    model: LatentDiffusion,
    request: GenerationRequest,
    *,
    concat: torch.Tensor | Callable[[list[torch.Generator]], torch.Tensor] | None = None,
    label: int | None = None,
    blend: Blend | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    x_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Latents for a resolved request: noise from seeds request.seed + i (or the given ``x_T``, e.g.
    a window of a larger canvas's noise), then guided DDIM. ``concat`` may be a function of the seeds'
    generators, drawn from after the initial noise (a noise-augmented low-resolution image);
    ``label`` is a class label ``y`` given to both guidance branches (the noise level)."""
    config = model.config
    generators = seeded_generators([request.seed + i for i in range(request.batch_size)])
    f = config.downsampling_factor
    shape = (request.batch_size, config.latent_channels, request.height // f, request.width // f)
    with torch.inference_mode():
        if x_T is None:
            x_T = randn(shape, generators, device=model.device, dtype=model.dtype)
        plan = canvas_plan(model, request, *x_T.shape[-2:])
        check_memory(model, plan, plan_rows(model, request), request.batch_size, *x_T.shape[-2:], request.tiling,
                     free_memory_mb(model.device))
        denoiser = guided_denoiser(model, request.scale, plan)
        if callable(concat):
            concat = concat(generators)
        cond, uncond = conditioning(model, request, concat)
        if label is not None:
            y = torch.full((request.batch_size,), label, dtype=torch.long, device=model.device)
            cond, uncond = {**cond, "y": y}, None if uncond is None else {**uncond, "y": y}
        extra_args = {"cond": cond, "uncond": uncond}
        if request.regions:
            regions = [(r, dict(zip(("cond", "uncond"), conditioning(model, replace_prompts(request, r), concat))))
                       for r in request.regions]
            denoiser = region_fusion(model, denoiser, extra_args, regions, *x_T.shape[-2:], plan)
            extra_args = {}
        return ddim_sample(
            denoiser,
            x_T,
            ddim_schedule(model.alphas_cumprod, request.steps),
            eta=request.eta,
            generator=generators,
            extra_args=extra_args,
            callback=callback,
            should_stop=should_stop,
            mask=None if blend is None else blend.keep,
            x0=None if blend is None else blend.x0,
        )


def plan_rows(model: LatentDiffusion, request: GenerationRequest) -> int:
    """Rows of each UNet call: the batch, twice over when guided."""
    guided = request.scale != 1.0 and model.encodes_tokens
    return request.batch_size * (2 if guided else 1)


def canvas_plan(model: LatentDiffusion, request: GenerationRequest, height: int, width: int) -> CanvasPlan:
    """How a resolved request's ``height`` x ``width`` latent canvas is denoised (see ``ldm.tasks.canvas``)."""
    return plan_canvas(model, request.tiling, plan_rows(model, request), height, width)


def canvas_notices(model: LatentDiffusion, request: GenerationRequest) -> list[str]:
    f = model.config.downsampling_factor
    notice = describe(canvas_plan(model, request, request.height // f, request.width // f), f)
    return [notice] if notice else []
