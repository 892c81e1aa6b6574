"""Text (and layout) to image: prompt -> latent noise -> the request's sampler with classifier-free
guidance -> decode."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from ldm.checkpoints.loaded import LoadedModel
from ldm.models.latent_diffusion import LatentDiffusionConfig
from ldm.sampling.steps import Callback
from ldm.tasks.generate import decode, default_concat, sample, tokenizer_notices
from ldm.tasks.images import to_pil
from ldm.tasks.parameters import canvas_fields, parameters_text
from ldm.tasks.planning import canvas_notices
from ldm.tasks.request import GenerationRequest, check_model, regions_from_boxes, resolve_request
from ldm.tasks.result import GenerationResult

NAME = "txt2img"


def serves(config: LatentDiffusionConfig) -> str | None:
    """None for a model that generates from a text prompt: one with a text stage, unless its concat
    channels need an image (an upscaler, text-guided or not, cannot generate from a prompt alone);
    otherwise why not."""
    if config.concat_input == "low_res_image":
        return "is a super-resolution model: it needs a low-resolution image, not only a prompt"
    if config.concat_input == "segmentation":
        return "generates from a segmentation map, not from a text prompt"
    cond = config.cond_stage
    concat_ok = config.concat_input in ("none", "mask_and_masked_latent")
    if cond is None or config.conditioning not in ("crossattn", "hybrid") or not concat_ok:
        return "has no text conditioning stage: it cannot generate from a prompt"
    if not getattr(cond, "takes_text", True):
        return "reads no text: its conditioning stage takes layout boxes only"
    return None


def boxes_as_regions(loaded: LoadedModel, request: GenerationRequest) -> tuple[GenerationRequest, list[str]]:
    """On a text model without native layout conditioning, layout boxes become region prompts
    (each label the prompt of its box)."""
    if not request.boxes or loaded.model.takes_layout or loaded.model.cond_stage_model is None:
        return request, []
    regions = regions_from_boxes(request.boxes)
    notice = f"{loaded.name} has no layout conditioning: each box's label is used as a region prompt"
    return replace(request, boxes=(), regions=request.regions + regions), [notice]


def sample_latents(
    loaded: LoadedModel,
    request: GenerationRequest,
    *,
    callback: Callback | None = None,
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
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Generate ``request.batch_size`` images. Image i uses seed ``request.seed + i`` for every noise draw,
    so each image is reproducible alone. Raises ValueError for bad requests (and models this task
    does not serve) and ``SamplingCancelled`` when ``should_stop`` turns true."""
    check_model(serves, loaded)
    return generate_from_prompts(loaded, request, callback=callback, should_stop=should_stop)


def generate_from_prompts(
    loaded: LoadedModel,
    request: GenerationRequest,
    *,
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """``txt2img`` on any model that encodes prompts or layouts (the layout task runs it too): a
    request's boxes are layout tokens where the model takes them, region prompts elsewhere."""
    request, notices = resolve_request(request, loaded.model.config.size_multiple)
    request, more = boxes_as_regions(loaded, request)
    notices += more + tokenizer_notices(loaded.model, request) + canvas_notices(loaded.model, request)
    latents = sample_latents(loaded, request, callback=callback, should_stop=should_stop)
    with torch.inference_mode():
        images = to_pil(decode(loaded.model, latents, request.tiling))
    seeds = [request.seed + i for i in range(request.batch_size)]
    return GenerationResult(images, seeds, [parameters_text(request, s, loaded, canvas_fields(request)) for s in seeds],
                            notices)
