"""4x super-resolution with a latent diffusion model that concatenates the low-resolution image
(LDM-BSR style: the latent of the output has the input's size, the first stage decodes it 4x).

Large inputs are denoised in overlapping tiles fused at every step (``ldm.sampling.tiling``), each
tile seeing its window of the low-resolution image, and decoded with whole-image normalisation when
the decoder would exceed the memory budget (``ldm.models.autoencoder_tiling``).

LDM's bsr_sr (VQ-f4, no text stage) takes this path as it is: its low-resolution image in [-1, 1] is
concatenated to the latent unchanged (the original's Identity conditioning stage), and its VQ first
stage quantises the final latent to the nearest codebook entries before decoding.

A model with noise augmentation (Stable Diffusion's x4 upscaler) is also guided by the prompt: its
low-resolution image is first diffused to the requested noise level under the augmentation schedule,
with noise from the request's seeds, and the level is the UNet's class label. Both branches of
guidance keep the noised image and the level; only the text differs, as in Stability's script."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from PIL import Image

from ldm.checkpoints.loaded import LoadedModel
from ldm.models.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from ldm.sampling.noise import randn
from ldm.sampling.steps import Callback
from ldm.tasks.generate import decode, sample
from ldm.tasks.images import as_rgb, from_pil, to_pil
from ldm.tasks.parameters import parameters_text
from ldm.tasks.request import GenerationRequest, TilingOptions, check_model, resolve_request
from ldm.tasks.result import GenerationResult

NAME = "upscale"
MAX_INPUT_SIDE = 1024
MAX_TILE = 1024
DEFAULT_NOISE_LEVEL = 20  # Stability's scripts/gradio/superresolution.py


@dataclass(frozen=True)
class InputTiles:
    """Tiles of the low-resolution input: ``tile`` pixels a side (0: the whole image at once),
    overlapping by ``overlap`` pixels."""

    tile: int = 128
    overlap: int = 16

    def check(self, grid: int) -> None:
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or not (self.tile == 0 or 2 * grid <= self.tile <= MAX_TILE):
            raise ValueError(f"tile size must be 0 (no tiling) or from {2 * grid} to {MAX_TILE} pixels, got {self.tile!r}")
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, int) or not 0 <= self.overlap <= max(0, self.tile // 2):
            raise ValueError(f"tile overlap must be from 0 to half the tile size ({self.tile // 2}) pixels, got {self.overlap!r}")


def serves(config: LatentDiffusionConfig) -> str | None:
    """None for a super-resolution model (one that concatenates a low-resolution image)."""
    if config.concat_input != "low_res_image":
        return "is not a super-resolution model (it does not take a low-resolution image)"
    return None


def check_noise_level(model: LatentDiffusion, noise_level) -> int:
    """The noise level of the low-resolution image: a whole number from 0 to the model's
    max_noise_level. Models without noise augmentation ignore it."""
    augmentation = model.config.noise_augmentation
    if augmentation is None:
        return 0
    top = augmentation.max_noise_level
    if isinstance(noise_level, bool) or not isinstance(noise_level, (int, float)) or noise_level != int(noise_level) \
            or not 0 <= noise_level <= top:
        raise ValueError(f"noise level must be a whole number from 0 to {top} (the default is {DEFAULT_NOISE_LEVEL}), "
                         f"got {noise_level!r}")
    return int(noise_level)


def noised_low_res(model: LatentDiffusion, low: torch.Tensor, noise_level: int, batch: int):
    """The concat of a noise-augmented upscaler as ``sample`` takes it: a function of the seeds'
    generators, which draw the low-resolution image's (1, 3, h, w in [-1, 1]) noise after the latent
    noise, so each image of a batch is reproducible from its own seed."""

    def concat(generators: list[torch.Generator]) -> torch.Tensor:
        noise = randn((batch, *low.shape[1:]), generators, device=model.device, dtype=model.dtype)
        return model.augment_low_res(low.expand(batch, -1, -1, -1).to(model.dtype), noise_level, noise)

    return concat


def upscale(
    loaded: LoadedModel,
    image: Image.Image,
    request: GenerationRequest,
    *,
    tiles: InputTiles = InputTiles(),
    noise_level: int = DEFAULT_NOISE_LEVEL,
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """The image at ``downsampling_factor`` times its size. Uses request.steps, eta and seed (one image
    per seed of the batch); the input is padded (by reflection) to the UNet's grid, the output
    cropped back. A text-guided upscaler also uses the prompts, scale and ``noise_level``."""
    check_model(serves, loaded)
    model = loaded.model
    noise_level = check_noise_level(model, noise_level)
    augmented = model.config.noise_augmentation is not None
    image = as_rgb(image)
    if max(image.size) > MAX_INPUT_SIDE:
        raise ValueError(f"the image is {image.width}x{image.height}; upscaling takes at most {MAX_INPUT_SIDE} px a side")
    f = model.config.downsampling_factor
    grid = model.config.unet.downsampling_factor
    tiles.check(grid)
    pad_w, pad_h = -image.width % grid, -image.height % grid
    low = from_pil(image).to(model.device)
    if pad_w or pad_h:
        low = F.pad(low, (0, pad_w, 0, pad_h), mode="reflect" if min(image.size) > max(pad_w, pad_h) else "replicate")
    h, w = low.shape[-2:]
    unused_prompt = model.cond_stage_model is None and bool(request.prompt or request.negative_prompt)
    if model.cond_stage_model is None:
        request = replace(request, prompt="", negative_prompt="")
    request, notices = resolve_request(replace(request, width=w * f, height=h * f), f * grid)
    if unused_prompt:
        notices.insert(0, f"{loaded.name} has no text stage: the prompt is not used")
    # Tiles are fused at every step (MultiDiffusion): the canvas is one sample, with no seams.
    mode = "always" if tiles.tile else "off"
    request = replace(request, tiling=TilingOptions(mode, tiles.tile * f, tiles.overlap * f, request.tiling.budget_mb))
    seeds = [request.seed + i for i in range(request.batch_size)]
    with torch.inference_mode():
        if augmented:
            latents = sample(model, request, concat=noised_low_res(model, low, noise_level, request.batch_size),
                             label=noise_level, callback=callback, should_stop=should_stop)
        else:
            latents = sample(model, request, concat=low.to(model.dtype), callback=callback, should_stop=should_stop)
        out = decode(model, latents, replace(request.tiling, mode="auto")).float()[..., : image.height * f, : image.width * f]
    fields = {"Upscale": f"{f}x", "Tile size": tiles.tile or None, "Tile overlap": tiles.overlap if tiles.tile else None,
              "CFG scale": request.scale if augmented else None, "Noise level": noise_level if augmented else None}
    size = f"{image.width * f}x{image.height * f}"
    texts = [parameters_text(request, s, loaded, fields, guided=False, size=size) for s in seeds]
    return GenerationResult(to_pil(out), seeds, texts, notices)
