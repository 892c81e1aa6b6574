"""Text (and layout) to image: prompt -> latent noise -> DDIM with classifier-free guidance -> decode."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from ldm.checkpoints.loader import LoadedModel
from ldm.sampling.ddim import StepInfo
from ldm.tasks.canvas import decode
from ldm.tasks.common import GenerationResult, canvas_notices, default_concat, sample, to_pil
from ldm.tasks.parameters import format_parameters
from ldm.tasks.request import GenerationRequest, TilingOptions, regions_from_boxes, resolve_request


def parameters_text(request: GenerationRequest, seed: int, loaded: LoadedModel) -> str:
    fields = {
        "Steps": request.steps,
        "Sampler": "DDIM",
        "CFG scale": request.scale,
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": loaded.short_hash,
        "Model": loaded.name,
        "Eta DDIM": request.eta,
        "Layout": "; ".join(f"{b[0]} {b[1]:.3f} {b[2]:.3f} {b[3]:.3f} {b[4]:.3f}" for b in request.boxes) or None,
        "Regions": "; ".join(f"{r.prompt} {r.box[0]:.3f} {r.box[1]:.3f} {r.box[2]:.3f} {r.box[3]:.3f} {r.strength:g}"
                             for r in request.regions) or None,
        "Region negatives": "; ".join(f"{i + 1}: {r.negative_prompt}" for i, r in enumerate(request.regions)
                                      if r.negative_prompt) or None,
        "Tiling": None if request.tiling == TilingOptions() else
                  f"{request.tiling.mode} {request.tiling.tile} {request.tiling.overlap} {request.tiling.budget_mb}",
    }
    return format_parameters(request.prompt, request.negative_prompt, fields)


def boxes_as_regions(loaded: LoadedModel, request: GenerationRequest) -> tuple[GenerationRequest, list[str]]:
    """On a text model without native layout conditioning, layout boxes become region prompts
    (each label the prompt of its box)."""
    if not request.boxes or loaded.model.takes_layout or loaded.model.cond_stage_model is None:
        return request, []
    regions = regions_from_boxes(request.boxes)
    notice = f"{loaded.name} has no layout conditioning: each box's label is used as a region prompt"
    return replace(request, boxes=(), regions=request.regions + regions), [notice]


def tokenizer_notices(loaded: LoadedModel, request: GenerationRequest) -> list[str]:
    """What the model's tokenizer does not take of the prompts (LDM BERT cuts a prompt to 77 tokens; a
    layout-only model reads no prompt), for the user to see, from its ``notices`` where it has one."""
    notices = getattr(getattr(loaded.model.cond_stage_model, "tokenizer", None), "notices", None)
    if notices is None:
        return []
    return notices([request.prompt, request.negative_prompt, *(p for r in request.regions
                                                              for p in (r.prompt, r.negative_prompt))])


def sample_latents(
    loaded: LoadedModel,
    request: GenerationRequest,
    *,
    callback: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """The final latents for a resolved request (sides rounded, seed chosen); see ``txt2img``."""
    model = loaded.model
    with torch.inference_mode():
        concat = default_concat(model, request.height, request.width, request.tiling)
    return sample(model, request, concat=concat, callback=callback, should_stop=should_stop)


def txt2img(
    loaded: LoadedModel,
    request: GenerationRequest,
    *,
    callback: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Generate ``request.batch_size`` images. Image i uses seed ``request.seed + i`` for every noise draw,
    so each image is reproducible alone. Raises ValueError for bad requests and
    ``SamplingCancelled`` when ``should_stop`` turns true."""
    request, notices = resolve_request(request, loaded.model.config.size_multiple)
    request, more = boxes_as_regions(loaded, request)
    notices += more + tokenizer_notices(loaded, request) + canvas_notices(loaded.model, request)
    latents = sample_latents(loaded, request, callback=callback, should_stop=should_stop)
    with torch.inference_mode():
        images = to_pil(decode(loaded.model, latents, request.tiling))
    seeds = [request.seed + i for i in range(request.batch_size)]
    return GenerationResult(images, seeds, [parameters_text(request, s, loaded) for s in seeds], notices)
