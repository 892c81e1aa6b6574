"""Text (and layout) to image: prompt -> latent noise -> the request's sampler with classifier-free
guidance -> decode.

Base then refiner (SDXL, as AUTOMATIC1111's "Refiner"): with ``refiner`` and ``refiner_switch`` s, the
base runs the first k = int(steps * s) steps of the schedule and its state at that noise level goes
on, unchanged, through the refiner for the remaining steps of the same schedule, with the refiner's own
conditioning (its text encoder, the aesthetic scores); a multistep sampler's history and an
ancestral one's noise start again at the switch, as in A1111. The latent state is in sigma space (x0 + sigma
eps) for every sampler but DDIM, whose state is not: DDIM is refused. ``<lora:...>`` tags apply to the
base only (a LoRA is made for one UNet)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from ldm.checkpoints.loaded import LoadedModel
from ldm.models.latent_diffusion import LatentDiffusionConfig
from ldm.sampling.steps import Callback
from ldm.addons.tags import extract_lora_tags
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


class _Switched(Exception):
    """Raised from the base's step callback at the switch step: the state is handed to the refiner."""

    def __init__(self, x: torch.Tensor):
        super().__init__("switch to the refiner")
        self.x = x


def switch_step(steps: int, switch: float) -> int:
    """The steps the base runs of ``steps``: int(steps * switch) (A1111's), at least 1."""
    if not 0.0 < switch <= 1.0:
        raise ValueError(f"the refiner switch is a fraction of the steps, above 0 and at most 1, got {switch}")
    return max(1, int(steps * switch))


def check_refiner(loaded: LoadedModel, refiner: LoadedModel, request: GenerationRequest) -> None:
    if not (loaded.model.takes_adm_vector and refiner.model.takes_adm_vector):
        raise ValueError(f"base then refiner is for SDXL models; {loaded.name} and {refiner.name} are not both SDXL")
    if request.sampler == "DDIM":
        raise ValueError("the refiner takes over the base's state in sigma space, which DDIM's is not; choose another "
                         "sampler (Euler, Euler a, DPM++ 2M, ...)")
    base, other = loaded.model.config, refiner.model.config
    if (base.latent_channels, base.downsampling_factor, base.schedule) != (other.latent_channels, other.downsampling_factor,
                                                                          other.schedule):
        raise ValueError(f"{refiner.name} has another latent space or noise schedule than {loaded.name}")


def refined_latents(
    loaded: LoadedModel,
    refiner: LoadedModel,
    request: GenerationRequest,
    switch: float,
    *,
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """The base's first ``switch_step`` steps, then the refiner's rest from the base's state (see the module)."""
    check_refiner(loaded, refiner, request)
    k = switch_step(request.steps, switch)

    def at_switch(info):
        if callback is not None:
            callback(info)
        if info.step == k - 1 and k < request.steps:
            raise _Switched(info.x.detach().clone())

    try:
        return sample_latents(loaded, request, callback=at_switch, should_stop=should_stop)
    except _Switched as switched:
        state = switched.x
    plain = replace(request, prompt=extract_lora_tags(request.prompt).text,
                    negative_prompt=extract_lora_tags(request.negative_prompt).text,
                    regions=tuple(replace(r, prompt=extract_lora_tags(r.prompt).text,
                                          negative_prompt=extract_lora_tags(r.negative_prompt).text) for r in request.regions))

    def offset(info):  # the refiner's steps counted on from the base's
        if callback is not None:
            callback(info._replace(step=info.step + k, total=request.steps))

    model = refiner.model
    with torch.inference_mode():
        concat = default_concat(model, request.height, request.width, request.tiling)
        zeros = torch.zeros_like(state, dtype=model.dtype, device=model.device)
    # from the state itself: noised with zero noise to the switch level, it is the state
    return sample(model, plain, concat=concat, callback=offset, should_stop=should_stop, x_T=zeros,
                  init=state.to(model.device, model.dtype), skip=k)


def txt2img(
    loaded: LoadedModel,
    request: GenerationRequest,
    *,
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
    refiner: LoadedModel | None = None,
    refiner_switch: float = 0.8,
) -> GenerationResult:
    """Generate ``request.batch_size`` images. Image i uses seed ``request.seed + i`` for every noise draw,
    so each image is reproducible alone. With ``refiner``, the base hands over to it at ``refiner_switch``
    of the steps (see the module). Raises ValueError for bad requests (and models this task does not
    serve) and ``SamplingCancelled`` when ``should_stop`` turns true."""
    check_model(serves, loaded)
    if refiner is not None:
        check_model(serves, refiner)
    return generate_from_prompts(loaded, request, callback=callback, should_stop=should_stop, refiner=refiner,
                                 refiner_switch=refiner_switch)


def generate_from_prompts(
    loaded: LoadedModel,
    request: GenerationRequest,
    *,
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
    refiner: LoadedModel | None = None,
    refiner_switch: float = 0.8,
) -> GenerationResult:
    """``txt2img`` on any model that encodes prompts or layouts (the layout task runs it too): a
    request's boxes are layout tokens where the model takes them, region prompts elsewhere."""
    request, notices = resolve_request(request, loaded.model.config.size_multiple)
    request, more = boxes_as_regions(loaded, request)
    notices += more + tokenizer_notices(loaded.model, request) + canvas_notices(loaded.model, request)
    fields = canvas_fields(request)
    if refiner is None:
        latents = sample_latents(loaded, request, callback=callback, should_stop=should_stop)
    else:
        latents = refined_latents(loaded, refiner, request, refiner_switch, callback=callback, should_stop=should_stop)
        fields = {**fields, "Refiner": refiner.name, "Refiner switch at": refiner_switch}
    with torch.inference_mode():
        images = to_pil(decode(loaded.model, latents, request.tiling))
    seeds = [request.seed + i for i in range(request.batch_size)]
    return GenerationResult(images, seeds, [parameters_text(request, s, loaded, fields) for s in seeds], notices)
