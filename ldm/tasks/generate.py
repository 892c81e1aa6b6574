"""One generation run of a resolved request: its conditioning, the denoiser it samples with
(classifier-free guidance, tiles, region prompts), the sampler it names, and the decode.

``sample`` is what every task calls: noise from each image's seed, the plan (``ldm.tasks.planning``)
asked once, the denoiser assembled, and the request's sampler run from ``ldm.sampling.samplers``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ldm.addons.embeddings import embedding_notices, prompt_vectors
from ldm.addons.library import prompt_loras
from ldm.addons.lora import merged_loras
from ldm.devices import free_memory_mb, reusing_freed_memory
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.models.sdxl_conditioner import SizeConditioning
from ldm.sampling.blending import LatentBlend
from ldm.sampling.guidance import ClassifierFreeGuidance
from ldm.sampling.noise import randn, seeded_generators
from ldm.sampling.regions import Region, RegionFusion, box_weight, context_window
from ldm.sampling.samplers import get_sampler
from ldm.sampling.scheduled import ScheduledConditioning, ScheduledExtra
from ldm.sampling.steps import Callback
from ldm.sampling.tiling import TiledDenoiser, Window
from ldm.tasks import planning
from ldm.tasks.planning import CanvasPlan, first_stage_tile
from ldm.tasks.request import GenerationRequest, RegionPrompt, TilingOptions
from ldm.text.prompt_syntax import has_emphasis, parse_emphasis, prompt_schedule, strip_syntax, text_at_step


@dataclass(frozen=True)
class Blend:
    """Inpainting by latent blending: ``keep`` (1 = keep) and the known latent ``x0``."""

    keep: torch.Tensor
    x0: torch.Tensor


def size_conditionings(request: GenerationRequest, negative: list[bool]) -> list[SizeConditioning]:
    """SDXL's size numbers of each prompt from the request's options: a size not given is the image's,
    and a negative prompt takes the negative aesthetic score (as AUTOMATIC1111)."""
    options, image = request.size_conditioning, (request.height, request.width)
    return [SizeConditioning(original_size=options.original_size or image, target_size=options.target_size or image,
                             crop_coords_top_left=options.crop_top_left,
                             aesthetic_score=options.negative_aesthetic_score if is_negative else options.aesthetic_score)
            for is_negative in negative]


def _context(model: LatentDiffusion, request: GenerationRequest, keys: list[tuple[str, str]]) -> dict:
    """The encoded conditioning (``context``, and SDXL's vector ``y``) of each distinct (role, text),
    "negative" or "positive", encoded in one batch so that long prompts all get the same number of
    chunks; the layout boxes go with the positive texts only. The textual-inversion embeddings in
    ``request.embedding_dirs`` that fit the model's text encoder stand for their names."""
    layouts = [list(request.boxes) if role == "positive" else [] for role, _ in keys] if request.boxes else None
    embeddings = prompt_vectors(model, request.embedding_dirs) if request.embedding_dirs else None
    negative = [role == "negative" for role, _ in keys]
    sizes = size_conditionings(request, negative) if model.takes_adm_vector else None
    encoded = model.encode_conditioning([text for _, text in keys], negative=negative, sizes=sizes, layouts=layouts,
                                        emphasis=request.emphasis, embeddings=embeddings)
    return {key: {name: value[i : i + 1] for name, value in encoded.items()} for i, key in enumerate(keys)}


def _batched(conditioning: dict[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
    return {name: value.expand(batch, *value.shape[1:]) for name, value in conditioning.items()}


def conditioning_schedule(model: LatentDiffusion, request: GenerationRequest,
                          concat: torch.Tensor | None) -> list[ScheduledExtra]:
    """The (cond, uncond) denoiser arguments over the steps: a new entry wherever the prompt or the
    negative prompt changes (prompt editing, alternation), each distinct text encoded once. The
    negative prompt is the unconditional branch. Concat channels and layout boxes are the same for
    both branches (the layout only conditions the positive one)."""
    batch = request.batch_size
    extra = {} if concat is None else {"concat": concat.expand(batch, -1, -1, -1)}
    if not model.encodes_tokens:
        return [ScheduledExtra(request.steps, {"cond": extra, "uncond": None})]
    positive = prompt_schedule(request.prompt, request.steps)
    negative = prompt_schedule(request.negative_prompt, request.steps)
    ends = sorted({entry.until_step for entry in positive + negative})
    pairs = [(end, ("negative", text_at_step(negative, end)), ("positive", text_at_step(positive, end))) for end in ends]
    keys = list(dict.fromkeys([n for _, n, _ in pairs] + [p for _, _, p in pairs]))  # [negative, prompt] when fixed
    context = _context(model, request, keys)
    return [ScheduledExtra(end, {"cond": {**_batched(context[p], batch), **extra},
                                 "uncond": {**_batched(context[n], batch), **extra}})
            for end, n, p in pairs]


def conditioning(model: LatentDiffusion, request: GenerationRequest, concat: torch.Tensor | None) -> tuple[dict, dict | None]:
    """(cond, uncond) denoiser arguments of the first step."""
    first = conditioning_schedule(model, request, concat)[0].extra
    return first["cond"], first["uncond"]


def tokenizer_notices(model: LatentDiffusion, request: GenerationRequest) -> list[str]:
    """What the model's tokenizer does not take of the prompts (LDM BERT cuts a prompt to 77 tokens; a
    layout-only model reads no prompt), for the user to see, from its ``notices`` where it has one;
    and what of the prompt syntax is not used (``prompt_notices``)."""
    prompts = [p for p in (request.prompt, request.negative_prompt, *(q for r in request.regions
                                                                      for q in (r.prompt, r.negative_prompt)))
               if isinstance(p, str)]  # anything else is refused with its message when the request is resolved
    notices = getattr(getattr(model.cond_stage_model, "tokenizer", None), "notices", None)
    plain = prompts if model.reads_emphasis else [strip_syntax(p) for p in prompts]
    return ([] if notices is None else notices(plain)) + prompt_notices(model, request, prompts)


def prompt_notices(model: LatentDiffusion, request: GenerationRequest, prompts: list[str]) -> list[str]:
    """Emphasis on a model whose encoder reads none; prompt editing in a request with region prompts;
    embeddings the prompts name that the model cannot take (another width, SDXL, a bad file)."""
    if not model.encodes_tokens:
        return []
    notices = []
    # called before the request is resolved: a step count that is not one is refused there, with its message
    steps = request.steps if isinstance(request.steps, int) and not isinstance(request.steps, bool) and request.steps > 0 else 1
    texts = [entry.text for p in prompts for entry in prompt_schedule(p, steps)]
    if not model.reads_emphasis and any(has_emphasis(parse_emphasis(t)) for t in texts):
        notices.append("this model's text encoder reads no emphasis: the brackets and BREAK are removed from the "
                       "prompt and its weights are ignored")
    if request.regions and any(len(prompt_schedule(p, steps)) > 1 for p in prompts):
        notices.append("prompt editing and alternation ([a:b:when], [a|b]) are not applied with region prompts: "
                       "each prompt is used as it reads at the first step")
    if request.embedding_dirs:
        notices += embedding_notices(model, prompts, steps, request.embedding_dirs)
    return notices


def default_concat(model: LatentDiffusion, height: int, width: int, options: TilingOptions) -> torch.Tensor | None:
    """What a hybrid inpainting model gets for plain generation: "no mask" (fill everything); the
    blank image is encoded in tiles on the same terms as any other."""
    if not model.inpaints_natively:
        return None
    blank = torch.zeros(1, 3, height, width, device=model.device)
    tile = first_stage_tile(model, options, 1, height, width)
    return model.inpainting_concat(blank, torch.ones(1, 1, height, width, device=model.device), tile=tile)


def guided_denoiser(model: LatentDiffusion, scale: float, plan: CanvasPlan):
    denoiser = ClassifierFreeGuidance(model.denoiser(), scale)
    if not plan.tiled:
        return denoiser
    return TiledDenoiser(denoiser, plan.tile, plan.overlap, model.config.unet.downsampling_factor, plan.batch_windows)


def latent_box(box: tuple[float, float, float, float], height: int, width: int) -> Window:
    """A normalised box on a latent canvas, at least one latent pixel a side."""
    x0, y0, x1, y1 = box
    top, left = min(height - 1, int(y0 * height)), min(width - 1, int(x0 * width))
    bottom, right = max(top + 1, round(y1 * height)), max(left + 1, round(x1 * width))
    return Window(top, left, bottom - top, right - left)


def region_fusion(model: LatentDiffusion, denoiser, background: dict, regions: list[tuple[RegionPrompt, dict]],
                  height: int, width: int, plan: CanvasPlan) -> RegionFusion:
    """Fuse the global conditioning with each (region prompt, its conditioning) on the canvas."""
    grid = model.config.unet.downsampling_factor
    margin = max(plan.overlap, model.config.latent_size // 8)
    built = []
    for prompt, extra in regions:
        box = latent_box(prompt.box, height, width)
        window = context_window(box, height, width, margin, model.config.latent_size, grid)
        feather = max(1, min(box.height, box.width) // 4)
        built.append(Region(window, box_weight(box, window, height, width, prompt.strength, feather), extra))
    return RegionFusion(denoiser, background, built)


def replace_prompts(request: GenerationRequest, prompt: RegionPrompt) -> GenerationRequest:
    """The request as a region sees it: its prompt, and its negative prompt or the global one."""
    return replace(request, prompt=prompt.prompt, negative_prompt=prompt.negative_prompt or request.negative_prompt, boxes=())


def build_denoiser(model: LatentDiffusion, request: GenerationRequest, plan: CanvasPlan, concat: torch.Tensor | None,
                   label: int | None, height: int, width: int) -> tuple[Callable[..., torch.Tensor], dict]:
    """The guided (tiled, region-fused) denoiser of a request on a ``height`` x ``width`` latent canvas,
    and the keyword arguments the sampler passes it at every step."""
    denoiser = guided_denoiser(model, request.scale, plan)
    schedule = conditioning_schedule(model, request, concat)
    if label is not None:
        y = torch.full((request.batch_size,), label, dtype=torch.long, device=model.device)
        schedule = [ScheduledExtra(end, {"cond": {**e["cond"], "y": y}, "uncond": None if e["uncond"] is None
                                         else {**e["uncond"], "y": y}}) for end, e in schedule]
    extra_args = schedule[0].extra
    if not request.regions:
        if len(schedule) > 1:
            return ScheduledConditioning(denoiser, schedule), {}
        return denoiser, extra_args
    regions = [(r, dict(zip(("cond", "uncond"), conditioning(model, replace_prompts(request, r), concat))))
               for r in request.regions]
    return region_fusion(model, denoiser, extra_args, regions, height, width, plan), {}


def without_tags(request: GenerationRequest, prompts: list[str]) -> GenerationRequest:
    """The request with its prompts replaced, in ``GenerationRequest.prompts`` order."""
    regions = tuple(replace(r, prompt=prompts[2 + 2 * i], negative_prompt=prompts[3 + 2 * i])
                    for i, r in enumerate(request.regions))
    return replace(request, prompt=prompts[0], negative_prompt=prompts[1], regions=regions)


def sample(
    model: LatentDiffusion,
    request: GenerationRequest,
    *,
    concat: torch.Tensor | Callable[[list[torch.Generator]], torch.Tensor] | None = None,
    label: int | None = None,
    blend: Blend | None = None,
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
    x_T: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    skip: int = 0,
) -> torch.Tensor:
    """Latents for a resolved request: noise from seeds request.seed + i (or the given ``x_T``, e.g.
    a window of a larger canvas's noise), then the request's sampler, on its schedule, over the guided
    denoiser. Image to image: ``init`` is the image's latent (one, or one per image), noised with that
    noise to the schedule's level after ``skip`` of its ``request.steps`` steps, from where the
    sampler runs the rest (``ldm.sampling.samplers``); the canvas is the latent's.
    ``concat`` may be a function of the seeds' generators, drawn from after the initial noise (a
    noise-augmented low-resolution image); ``label`` is a class label ``y`` given to both guidance
    branches (the noise level); ``blend`` inpaints by latent blending, its noise from the same
    generators.
    The prompts' ``<lora:NAME:WEIGHT>`` tags are taken out, and those LoRAs (looked up in
    ``request.lora_dirs``) are merged into the weights for the sampling only: the weights are
    restored when it ends, stopped or failed included."""
    prompts = request.prompts()
    if not any("<lora:" in p for p in prompts):
        return _sample(model, request, concat, label, blend, callback, should_stop, x_T, init, skip)
    loras = prompt_loras(model, prompts, list(request.lora_dirs))
    with merged_loras(loras.applied):
        return _sample(model, without_tags(request, loras.prompts), concat, label, blend, callback, should_stop, x_T,
                       init, skip)


def _sample(model, request, concat, label, blend, callback, should_stop, x_T, init, skip) -> torch.Tensor:
    config = model.config
    generators = seeded_generators([request.seed + i for i in range(request.batch_size)])
    f = config.downsampling_factor
    shape = (request.batch_size, config.latent_channels, request.height // f, request.width // f)
    if init is not None:
        shape = (request.batch_size, *init.shape[1:])
        init = init.to(model.device, model.dtype).expand(shape)
    with torch.inference_mode():
        if x_T is None:
            x_T = randn(shape, generators, device=model.device, dtype=model.dtype)
        height, width = x_T.shape[-2:]
        chosen = planning.plan(model, request, height, width, free_memory_mb(model.device))
        if callable(concat):
            concat = concat(generators)
        # prompt editing counts the steps that run: [a:b:0.5] is halfway through a part-way run too
        conditioned = request if not skip else replace(request, steps=max(1, request.steps - skip))
        denoiser, extra_args = build_denoiser(model, conditioned, chosen, concat, label, height, width)
        before_step = None if blend is None else LatentBlend(blend.keep, blend.x0, generators)
        if isinstance(denoiser, ScheduledConditioning):
            callback = denoiser.callback(callback)
        with reusing_freed_memory():  # the steps' activations are reused, and handed back at the end
            return get_sampler(request.sampler).run(
                denoiser, x_T, model.alphas_cumprod, request.steps, eta=request.eta, generator=generators,
                extra_args=extra_args, callback=callback, should_stop=should_stop, before_step=before_step,
                schedule=request.schedule, s_noise=request.s_noise, init=init, skip=skip)


def decode(model: LatentDiffusion, latents: torch.Tensor, options: TilingOptions) -> torch.Tensor:
    """Latents to images in about [-1, 1], the autoencoder tiled as ``planning.first_stage_tile`` says."""
    f = model.config.downsampling_factor
    h, w = latents.shape[-2] * f, latents.shape[-1] * f
    return model.decode_first_stage(latents, tile=first_stage_tile(model, options, latents.shape[0], h, w))
