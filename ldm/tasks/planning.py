"""Planning a request's run: whether and how its canvas is tiled, how the autoencoder runs, and
whether the estimated memory fits.

A canvas is denoised whole (convolutionally, as the paper does beyond the training size) while the
UNet's estimated peak memory for it fits the memory budget, and in overlapping windows of the
training size (``ldm.sampling.tiling``) beyond it, so that memory stays flat as the canvas grows.
The sampling call asks ``plan`` once; the tasks ask ``canvas_notices`` what to tell the user.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.models.latent_diffusion import LatentDiffusion
from ldm.tasks.request import TILING_MODES, GenerationRequest, TilingOptions


def unet_bytes_per_latent_pixel(model: LatentDiffusion) -> float:
    """Estimated peak bytes of one UNet evaluation, per sample and latent pixel, in inference: the
    skip connections it keeps (every input block's output) plus the largest working set of one level
    (a transformer level: its projections and the GEGLU's 8x-wide hidden layer, about 20 channel
    widths; a convolution-only level about 6), plus GroupNorm's float32 copies when the weights are
    narrower. Calibrated against the growth of peak RSS over one guided call of SD v1 and of the
    default model, in float32 and bfloat16."""
    unet = model.config.unet
    size = torch.finfo(model.dtype).bits // 8
    skips = unet.model_channels  # the input convolution
    working = 0.0
    for level, mult in enumerate(unet.channel_mult):
        blocks = unet.num_res_blocks + (level < len(unet.channel_mult) - 1)
        channels = unet.model_channels * mult / 4**level
        skips += blocks * channels
        attends = unet.use_spatial_transformer and 2**level in unet.attention_resolutions
        working = max(working, channels * (20 if attends else 6))
    float_norms = 0 if size >= 4 else 2 * unet.model_channels * unet.channel_mult[0] * 4
    return size * (skips + working) + float_norms


def estimate_unet_bytes(model: LatentDiffusion, batch: int, height: int, width: int) -> int:
    """Estimated peak bytes of one guided UNet call (``batch`` rows) on a latent of ``height`` x ``width``."""
    return int(batch * height * width * unet_bytes_per_latent_pixel(model))


# Small windows gain from large calls (fewer, fuller UNet calls a step); the memory budget bounds the rest.
MAX_BATCH_WINDOWS = 16


@dataclass(frozen=True)
class CanvasPlan:
    tile: int  # latent pixels; 0: the whole canvas at once
    overlap: int
    estimate_mb: float  # the whole canvas's estimated peak
    batch_windows: int = 1  # windows denoised in one UNet call, as many as the budget holds (at most 16)

    @property
    def tiled(self) -> bool:
        return self.tile > 0


def plan_canvas(model: LatentDiffusion, options: TilingOptions, batch: int, height: int, width: int) -> CanvasPlan:
    """Whether and how to tile a ``height`` x ``width`` latent canvas for ``batch`` guided rows."""
    if options.mode not in TILING_MODES:
        raise ValueError(f"tiling mode must be one of {', '.join(TILING_MODES)}, got {options.mode!r}")
    f, grid = model.config.downsampling_factor, model.config.unet.downsampling_factor
    tile = max(grid, (options.tile // f or model.config.latent_size) // grid * grid)
    overlap = options.overlap // f if options.overlap >= 0 else tile // 4
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be from 0 to less than the tile ({tile * f} px), got {options.overlap} px")
    estimate = estimate_unet_bytes(model, batch, height, width) / 2**20
    larger = height > tile or width > tile
    wanted = options.mode == "always" or (options.mode == "auto" and estimate > options.budget_mb)
    window_mb = estimate_unet_bytes(model, batch, tile, tile) / 2**20
    batch_windows = int(max(1, min(MAX_BATCH_WINDOWS, options.budget_mb // max(window_mb, 1e-9))))
    return CanvasPlan(tile if larger and wanted else 0, overlap, estimate, batch_windows)


def describe(plan: CanvasPlan, f: int) -> str | None:
    """A notice for the user when the canvas is tiled."""
    if not plan.tiled:
        return None
    return (f"the canvas is sampled in tiles of {plan.tile * f} px overlapping by {plan.overlap * f} px "
            f"(the whole canvas would need about {plan.estimate_mb:,.0f} MB)")


FIRST_STAGE_TILE = 256


def estimate_first_stage_bytes(model: LatentDiffusion, batch: int, height: int, width: int) -> int:
    """Estimated peak bytes of decoding (or encoding) a ``height`` x ``width`` pixel image whole: at
    full resolution the decoder holds about three tensors as wide as its last upsampling's output."""
    c = model.config.first_stage
    size = torch.finfo(model.dtype).bits // 8
    widest = c.ch * c.ch_mult[min(1, len(c.ch_mult) - 1)]
    return int(size * batch * height * width * 3 * widest)


def estimate_tiled_first_stage_bytes(model: LatentDiffusion, batch: int, height: int, width: int) -> int:
    """Estimated peak bytes of the tiled autoencoder (``autoencoder_tiling``): one feature map of its
    top level and one of the next, whole, plus tiles and bands (x1.6, from the decodes of
    ``bench/large_canvas.py``)."""
    c = model.config.first_stage
    size = torch.finfo(model.dtype).bits // 8
    second = c.ch_mult[min(1, len(c.ch_mult) - 1)]
    return int(1.6 * size * batch * height * width * c.ch * (c.ch_mult[0] + second / 4))


def first_stage_tile(model: LatentDiffusion, options: TilingOptions, batch: int, height: int, width: int) -> int:
    """The tile (pixels at each level) to run the autoencoder with on a ``height`` x ``width`` pixel
    image, 0 for the whole image at once; tiled on the same terms as sampling."""
    if options.mode == "off" or max(height, width) <= FIRST_STAGE_TILE:
        return 0
    over = estimate_first_stage_bytes(model, batch, height, width) / 2**20 > options.budget_mb
    return FIRST_STAGE_TILE if options.mode == "always" or over else 0


class NotEnoughMemory(ValueError):
    """A request whose estimated peak does not fit the memory that is free: refused before it runs."""


def check_memory(model: LatentDiffusion, plan: CanvasPlan, rows: int, images: int, height: int, width: int,
                 options: TilingOptions, free_mb: float | None) -> float:
    """The estimated peak (MB, beyond the weights) of sampling a ``height`` x ``width`` latent canvas as
    ``plan`` says (``rows`` UNet rows) and running the autoencoder on its ``images``; raises
    ``NotEnoughMemory`` with the numbers when it exceeds 90% of ``free_mb`` (None: unknown, not checked)."""
    if plan.tiled:
        unet = plan.batch_windows * estimate_unet_bytes(model, rows, plan.tile, plan.tile)
    else:
        unet = estimate_unet_bytes(model, rows, height, width)
    f = model.config.downsampling_factor
    pixels_h, pixels_w = height * f, width * f
    if first_stage_tile(model, options, images, pixels_h, pixels_w):
        first_stage = estimate_tiled_first_stage_bytes(model, images, pixels_h, pixels_w)
    else:
        first_stage = estimate_first_stage_bytes(model, images, pixels_h, pixels_w)
    needed = max(unet, first_stage) / 2**20
    if free_mb is not None and needed > 0.9 * free_mb:
        hint = "" if options.mode == "always" else ", or set tiling to 'always'"
        raise NotEnoughMemory(f"this request needs about {needed:,.0f} MB beyond the model's weights, but only "
                              f"{free_mb:,.0f} MB of memory is free; make the image or the batch smaller{hint}")
    return needed


def plan_rows(model: LatentDiffusion, request: GenerationRequest) -> int:
    """Rows of each UNet call: the batch, twice over when guided."""
    guided = request.scale != 1.0 and model.encodes_tokens
    return request.batch_size * (2 if guided else 1)


def canvas_plan(model: LatentDiffusion, request: GenerationRequest, height: int, width: int) -> CanvasPlan:
    """How a resolved request's ``height`` x ``width`` latent canvas is denoised."""
    return plan_canvas(model, request.tiling, plan_rows(model, request), height, width)


def plan(model: LatentDiffusion, request: GenerationRequest, height: int, width: int, free_mb: float | None) -> CanvasPlan:
    """The plan of a resolved request on a ``height`` x ``width`` latent canvas, refused with
    ``NotEnoughMemory`` when its estimated peak does not fit ``free_mb`` (see ``check_memory``)."""
    chosen = canvas_plan(model, request, height, width)
    check_memory(model, chosen, plan_rows(model, request), request.batch_size, height, width, request.tiling, free_mb)
    return chosen


def canvas_notices(model: LatentDiffusion, request: GenerationRequest) -> list[str]:
    """What the user is told of a resolved request's canvas plan (that it is tiled, and why)."""
    f = model.config.downsampling_factor
    notice = describe(canvas_plan(model, request, request.height // f, request.width // f), f)
    return [notice] if notice else []
