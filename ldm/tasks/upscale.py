"""4x super-resolution with a latent diffusion model that concatenates the low-resolution image
(LDM-BSR style: the latent of the output has the input's size, the first stage decodes it 4x).

Large inputs are done in overlapping tiles: the starting noise is drawn once for the whole canvas
from the seed and each tile takes its window of it, and the decoded tiles are blended with linear
ramps across the overlaps, so the result does not depend on where tile borders fall for the
noise, and borders do not show as steps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from PIL import Image

from ldm.checkpoints.loader import LoadedModel
from ldm.sampling.ddim import StepInfo
from ldm.sampling.noise import randn, seeded_generators
from ldm.tasks.common import GenerationResult, from_pil, sample, to_pil
from ldm.tasks.parameters import format_parameters
from ldm.tasks.request import GenerationRequest, resolve_request

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


def tile_starts(length: int, tile: int, overlap: int, grid: int) -> list[int]:
    """Window starts covering ``length``, each a multiple of ``grid``, the last flush with the end."""
    if length <= tile:
        return [0]
    stride = max(grid, (tile - overlap) // grid * grid)
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def ramp(length: int, overlap: int) -> torch.Tensor:
    """1 in the middle, falling linearly towards both ends over ``overlap`` samples (never to 0)."""
    i = torch.arange(length, dtype=torch.float32)
    edge = torch.minimum(i + 1, length - i) / (overlap + 1)
    return edge.clamp(max=1.0)


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
    tile = (tiles.tile // grid * grid) or max(h, w)
    # Eta noise of window k comes from seed + 1000003 (k + 1): never the seeds of the starting noise.
    windows = [(y, x) for y in tile_starts(h, tile, tiles.overlap, grid) for x in tile_starts(w, tile, tiles.overlap, grid)]
    seeds = [request.seed + i for i in range(request.batch_size)]
    with torch.inference_mode():
        noise = randn((len(seeds), model.config.latent_channels, h, w), seeded_generators(seeds), device=model.device,
                      dtype=model.dtype)
        out = torch.zeros(len(seeds), 3, h * f, w * f, device=model.device)
        weight = torch.zeros(1, 1, h * f, w * f, device=model.device)
        for k, (y, x) in enumerate(windows):
            th, tw = min(tile, h), min(tile, w)
            progress = None if callback is None else _tile_progress(callback, k, len(windows))
            latents = sample(model, replace(request, seed=(request.seed + 1_000_003 * (k + 1)) % 2**32, height=th * f, width=tw * f),
                             concat=low[..., y : y + th, x : x + tw].to(model.dtype), x_T=noise[..., y : y + th, x : x + tw],
                             callback=progress, should_stop=should_stop)
            pixels = model.decode_first_stage(latents).float()
            mask = (ramp(th * f, tiles.overlap * f)[:, None] * ramp(tw * f, tiles.overlap * f)[None, :])[None, None].to(out.device)
            out[..., y * f : (y + th) * f, x * f : (x + tw) * f] += pixels * mask
            weight[..., y * f : (y + th) * f, x * f : (x + tw) * f] += mask
        out = (out / weight)[..., : image.height * f, : image.width * f]
    fields = {"Steps": request.steps, "Sampler": "DDIM", "Seed": request.seed, "Size": f"{image.width * f}x{image.height * f}",
              "Model hash": loaded.short_hash, "Model": loaded.name, "Eta DDIM": request.eta, "Upscale": f"{f}x",
              "Tile size": tiles.tile or None, "Tile overlap": tiles.overlap if tiles.tile else None}
    return GenerationResult(to_pil(out), seeds, [format_parameters("", "", {**fields, "Seed": s}) for s in seeds], notices)


def _tile_progress(callback: Callable[[StepInfo], None], index: int, count: int) -> Callable[[StepInfo], None]:
    """Report a tile's steps as steps of the whole job."""
    return lambda info: callback(info._replace(step=index * info.total + info.step, total=count * info.total))
