"""4x super-resolution with a latent diffusion model that concatenates the low-resolution image
(LDM-BSR style: the latent of the output has the input's size, the first stage decodes it 4x).

Large inputs are denoised in overlapping tiles fused at every step (``ldm.sampling.tiling``), each
tile seeing its window of the low-resolution image, and decoded with whole-image normalisation when
the decoder would exceed the memory budget (``ldm.models.autoencoder_tiling``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from PIL import Image

from ldm.checkpoints.loader import LoadedModel
from ldm.sampling.ddim import StepInfo
from ldm.tasks.canvas import decode
from ldm.tasks.common import GenerationResult, from_pil, sample, to_pil
from ldm.tasks.parameters import format_parameters
from ldm.tasks.request import GenerationRequest, TilingOptions, resolve_request

MAX_INPUT_SIDE = 1024
MAX_TILE = 1024


@dataclass(frozen=True)
class TileOptions:
    """Tiles of the low-resolution input: ``tile`` pixels a side (0: the whole image at once),
    overlapping by ``overlap`` pixels."""

    tile: int = 128
    overlap: int = 16

    def check(self, grid: int) -> None:
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or not (self.tile == 0 or 2 * grid <= self.tile <= MAX_TILE):
            raise ValueError(f"tile size must be 0 (no tiling) or from {2 * grid} to {MAX_TILE} pixels, got {self.tile!r}")
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, int) or not 0 <= self.overlap <= max(0, self.tile // 2):
            raise ValueError(f"tile overlap must be from 0 to half the tile size ({self.tile // 2}) pixels, got {self.overlap!r}")


def check_upscaler(loaded: LoadedModel) -> None:
    config = loaded.model.config
    if config.conditioning != "concat" or config.unet.in_channels != config.latent_channels + 3:
        raise ValueError(f"{loaded.name} is not a super-resolution model (it does not take a low-resolution image)")


def upscale(
    loaded: LoadedModel,
    image: Image.Image,
    request: GenerationRequest,
    *,
    tiles: TileOptions = TileOptions(),
    callback: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """The image at ``downsampling_factor`` times its size. Uses request.steps, eta and seed (one image
    per seed of the batch); the input is padded (by reflection) to the UNet's grid, the output
    cropped back."""
    check_upscaler(loaded)
    model = loaded.model
    image = image.convert("RGB")
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
    request, notices = resolve_request(replace(request, width=w * f, height=h * f, prompt="", negative_prompt=""), f * grid)
    # Tiles are fused at every step (MultiDiffusion): the canvas is one sample, with no seams.
    mode = "always" if tiles.tile else "off"
    request = replace(request, tiling=TilingOptions(mode, tiles.tile * f, tiles.overlap * f, request.tiling.budget_mb))
    seeds = [request.seed + i for i in range(request.batch_size)]
    with torch.inference_mode():
        latents = sample(model, request, concat=low.to(model.dtype), callback=callback, should_stop=should_stop)
        out = decode(model, latents, replace(request.tiling, mode="auto")).float()[..., : image.height * f, : image.width * f]
    fields = {"Steps": request.steps, "Sampler": "DDIM", "Seed": request.seed, "Size": f"{image.width * f}x{image.height * f}",
              "Model hash": loaded.short_hash, "Model": loaded.name, "Eta DDIM": request.eta, "Upscale": f"{f}x",
              "Tile size": tiles.tile or None, "Tile overlap": tiles.overlap if tiles.tile else None}
    return GenerationResult(to_pil(out), seeds, [format_parameters("", "", {**fields, "Seed": s}) for s in seeds], notices)
