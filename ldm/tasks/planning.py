"""Planning a request's run: whether and how its canvas is tiled, how the autoencoder runs, and
whether the estimated memory fits.

A canvas is denoised whole (convolutionally, as the paper does beyond the training size) while the
UNet's estimated peak memory for it fits the memory budget, and in overlapping windows of the
training size (``ldm.sampling.tiling``) beyond it, so that memory stays flat as the canvas grows.
The sampling call asks ``plan`` once; the tasks ask ``canvas_notices`` what to tell the user.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ldm.devices import resident_mb
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.sampling.tiling import plan_windows
from ldm.tasks.request import TILING_MODES, GenerationRequest, TilingOptions

log = logging.getLogger(__name__)

# What a generation adds on top of the weights, against the per-pixel counts below, by bytes per
# element (bf16 2, fp32 4), fitted to the peaks of SD v1 on the CLI's own path (bf16 and fp32 at 512
# and 1024 px whole, bf16 tiled at 2048; bench/large_canvas.py prints them beside the
# estimate). The small default model lands within 0.65-1.5x of its figures. A fixed part (what
# any run adds: oneDNN's primitives and scratch, the image's conversions) and a scale (what the
# counts miss: allocator slack, temporaries beside a level's working set; fp32 also Winograd's
# transform buffers, 4x a layer's input).
SAMPLING = {2: (40, 1.45), 4: (0, 1.82)}  # (fixed MB, scale of unet_bytes_per_latent_pixel)
# (fixed MB, full-resolution maps of the widest level, bytes a pixel whatever the decoder's width:
# the image's float32 conversions, the 3-channel outputs), fitted to the whole decodes of SD v1
# (widest level 256 channels) and the default model (64) at 512-2048 px
WHOLE_FIRST_STAGE = {2: (80, 3.0, 208), 4: (17, 2.49, 385)}
TILED_FIRST_STAGE = {2: (190, 1.0), 4: (0, 1.32)}  # (fixed MB, scale of the two stored maps)
TILE_WORKING_MAPS = 14.2  # a tile's working set, in tile-sized maps of the widest level (recomputed regions, statistics)


def _calibration(table: dict, model: LatentDiffusion) -> tuple[float, float]:
    return table.get(torch.finfo(model.dtype).bits // 8, table[4])


def sampling_fixed_mb(model: LatentDiffusion) -> float:
    return _calibration(SAMPLING, model)[0]


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
    """Estimated peak bytes of one guided UNet call (``batch`` rows) on a latent of ``height`` x ``width``,
    beyond what every run adds (``sampling_fixed_mb``)."""
    return int(_calibration(SAMPLING, model)[1] * batch * height * width * unet_bytes_per_latent_pixel(model))


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
    estimate = sampling_fixed_mb(model) + estimate_unet_bytes(model, batch, height, width) / 2**20
    larger = height > tile or width > tile
    wanted = options.mode == "always" or (options.mode == "auto" and estimate > options.budget_mb)
    if not (larger and wanted):
        return CanvasPlan(0, overlap, estimate)
    window_mb = estimate_unet_bytes(model, batch, tile, tile) / 2**20
    windows = len(plan_windows(height, width, tile, overlap, grid))
    fits = (options.budget_mb - sampling_fixed_mb(model)) // max(window_mb, 1e-9)
    return CanvasPlan(tile, overlap, estimate, int(max(1, min(MAX_BATCH_WINDOWS, windows, fits))))


def describe(plan: CanvasPlan, f: int) -> str | None:
    """A notice for the user when the canvas is tiled."""
    if not plan.tiled:
        return None
    return (f"the canvas is sampled in tiles of {plan.tile * f} px overlapping by {plan.overlap * f} px "
            f"(the whole canvas would need about {plan.estimate_mb:,.0f} MB)")


FIRST_STAGE_TILE = 256


def estimate_first_stage_bytes(model: LatentDiffusion, batch: int, height: int, width: int) -> int:
    """Estimated peak bytes of decoding (or encoding) a ``height`` x ``width`` pixel image whole: at
    full resolution the decoder holds about three tensors as wide as its last upsampling's output
    and a few bytes a pixel that do not depend on its width (``WHOLE_FIRST_STAGE``), plus what every
    run adds."""
    c = model.config.first_stage
    size = torch.finfo(model.dtype).bits // 8
    widest = c.ch * c.ch_mult[min(1, len(c.ch_mult) - 1)]
    fixed, maps, per_pixel = _calibration(WHOLE_FIRST_STAGE, model)
    return int(fixed * 2**20 + batch * height * width * (size * maps * widest + per_pixel))


def estimate_tiled_first_stage_bytes(model: LatentDiffusion, batch: int, height: int, width: int) -> int:
    """Estimated peak bytes of the tiled autoencoder (``autoencoder_tiling``): one feature map of its
    top level and one of the next, whole (``TILED_FIRST_STAGE``), the working set of a tile of
    ``FIRST_STAGE_TILE`` (``TILE_WORKING_MAPS``), plus what every run adds."""
    c = model.config.first_stage
    size = torch.finfo(model.dtype).bits // 8
    second = c.ch_mult[min(1, len(c.ch_mult) - 1)]
    maps = size * batch * height * width * c.ch * (c.ch_mult[0] + second / 4)
    tile = min(FIRST_STAGE_TILE, height) * min(FIRST_STAGE_TILE, width)
    working = TILE_WORKING_MAPS * size * batch * tile * c.ch * second
    fixed, scale = _calibration(TILED_FIRST_STAGE, model)
    return int(fixed * 2**20 + scale * maps + working)


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
    needed = max(estimate_parts(model, plan, rows, images, height, width, options).values())
    if free_mb is not None and needed > 0.9 * free_mb:
        hint = "" if options.mode == "always" else ", or set tiling to 'always'"
        raise NotEnoughMemory(f"this request needs about {needed:,.0f} MB beyond the model's weights, but only "
                              f"{free_mb:,.0f} MB of memory is free; make the image or the batch smaller{hint}")
    return needed


def estimate_parts(model: LatentDiffusion, plan: CanvasPlan, rows: int, images: int, height: int, width: int,
                   options: TilingOptions) -> dict[str, float]:
    """The estimated peaks (MB beyond the weights) of the two stages of a generation on a ``height`` x
    ``width`` latent canvas, as planned: "sampling" (whole, or ``plan.batch_windows`` windows a
    call) and "autoencoder" (whole or in tiles, as ``first_stage_tile`` says)."""
    if plan.tiled:
        unet = sampling_fixed_mb(model) * 2**20 + plan.batch_windows * estimate_unet_bytes(model, rows, plan.tile, plan.tile)
    else:
        unet = sampling_fixed_mb(model) * 2**20 + estimate_unet_bytes(model, rows, height, width)
    f = model.config.downsampling_factor
    pixels_h, pixels_w = height * f, width * f
    if first_stage_tile(model, options, images, pixels_h, pixels_w):
        first_stage = estimate_tiled_first_stage_bytes(model, images, pixels_h, pixels_w)
    else:
        first_stage = estimate_first_stage_bytes(model, images, pixels_h, pixels_w)
    return {"sampling": unet / 2**20, "autoencoder": first_stage / 2**20}


def own_size_estimate_mb(model: LatentDiffusion) -> float:
    """The estimated peak (MB beyond the weights) of one image at the model's own size, guided where the
    model takes prompts: what must stay free beside the weights for the model to be of use."""
    side, f = model.config.latent_size, model.config.downsampling_factor
    rows = 2 if model.encodes_tokens else 1
    sampling = sampling_fixed_mb(model) + estimate_unet_bytes(model, rows, side, side) / 2**20
    return max(sampling, estimate_first_stage_bytes(model, 1, side * f, side * f) / 2**20)


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
    rows = plan_rows(model, request)
    needed = check_memory(model, chosen, rows, request.batch_size, height, width, request.tiling, free_mb)
    if log.isEnabledFor(logging.INFO):
        parts = estimate_parts(model, chosen, rows, request.batch_size, height, width, request.tiling)
        f = model.config.downsampling_factor
        how = {"sampling": f"{chosen.batch_windows} windows a call" if chosen.tiled else "whole",
               "autoencoder": "in tiles" if first_stage_tile(model, request.tiling, request.batch_size, height * f,
                                                             width * f) else "whole"}
        resident, free = resident_mb(), "unknown" if free_mb is None else f"{free_mb:,.0f}"
        log.info("memory: about %s MB on top of %s MB resident (%s); %s MB free", f"{needed:,.0f}",
                 "?" if resident is None else f"{resident:,.0f}",
                 ", ".join(f"{k} {v:,.0f} MB {how[k]}" for k, v in parts.items()), free)
    return chosen


def canvas_notices(model: LatentDiffusion, request: GenerationRequest) -> list[str]:
    """What the user is told of a resolved request's canvas plan (that it is tiled, and why)."""
    f = model.config.downsampling_factor
    notice = describe(canvas_plan(model, request, request.height // f, request.width // f), f)
    return [notice] if notice else []
