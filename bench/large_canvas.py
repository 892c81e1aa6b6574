"""Large canvases: peak memory and time of text-to-image at growing sizes, and seam scores (figures,
not a test).

    .venv/bin/python bench/large_canvas.py --model default --sides 512 1024 2048 [--steps 2] [--budget 1024]
    .venv/bin/python bench/large_canvas.py --model sd-v1 --sides 1024 2048 --steps 1 [--dtype bf16]
    .venv/bin/python bench/large_canvas.py --seams

Each size runs in a fresh process, so its peak resident memory (ru_maxrss) is its own; the figure
includes the weights. ``sd-v1`` is the full Stable Diffusion v1 architecture with random weights
and a random text context (no tokenizer is needed: prompt encoding is negligible at these sizes).
Sampling time is given per DDIM step (a step at 2048 px with SD v1 takes minutes on 2 cores).

Seam score: the mean absolute horizontal and vertical differences across tile borders divided by
the mean elsewhere (1.0: borders are like any other place), on
- a smooth test image through the tiled autoencoder round trip (and, for comparison, through
  tiles decoded one by one with their own GroupNorm statistics, the usual way);
- images sampled in tiles by the default model, across the windows' interior edges.
"""

from __future__ import annotations

import argparse
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.checkpoints.loader import build_model, load_model  # noqa: E402
from ldm.checkpoints.presets import default_model_path, find_preset  # noqa: E402
from ldm.sampling.ddim import ddim_sample  # noqa: E402
from ldm.sampling.noise import randn, seeded_generators  # noqa: E402
from ldm.sampling.schedules import ddim_schedule  # noqa: E402
from ldm.sampling.tiling import plan_windows  # noqa: E402
from ldm.tasks.generate import decode, guided_denoiser  # noqa: E402
from ldm.tasks.planning import canvas_plan, first_stage_tile, plan_canvas  # noqa: E402
from ldm.tasks.request import GenerationRequest, TilingOptions  # noqa: E402
from ldm.tasks.txt2img import txt2img  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_default(side: int, steps: int, options: TilingOptions) -> None:
    loaded = load_model(default_model_path("default-txt2img"))
    request = GenerationRequest("a red circle in the top left and a blue square on the right", steps=steps, scale=4.0,
                                seed=1, width=side, height=side, tiling=options)
    plan = canvas_plan(loaded.model, request, side // 4, side // 4)
    start = time.perf_counter()
    steps_done = []
    sampling_peak = []
    txt2img(loaded, request, callback=lambda info: (steps_done.append(time.perf_counter()), sampling_peak.append(peak_mb())))
    total = time.perf_counter() - start
    per_step = (steps_done[-1] - start) / steps
    report("default", side, plan, per_step, total - (steps_done[-1] - start), total,
           first_stage_tile(loaded.model, options, 1, side, side), sampling_peak[-1])


def run_sd(side: int, steps: int, options: TilingOptions, dtype: torch.dtype) -> None:
    preset = find_preset("v1-inference")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype, so that the peak is not that of a float32 copy
    try:
        model = build_model(preset.model, device="cpu").eval()
    finally:
        torch.set_default_dtype(default)
    f = model.config.downsampling_factor
    h = w = side // f
    generators = seeded_generators([1])
    x_T = randn((1, 4, h, w), generators, device=torch.device("cpu"), dtype=dtype)
    context = torch.randn(2, 77, model.config.unet.context_dim, generator=torch.Generator().manual_seed(2)).to(dtype)
    plan = plan_canvas(model, options, 2, h, w)
    with torch.inference_mode():
        start = time.perf_counter()
        latents = ddim_sample(guided_denoiser(model, 7.5, plan), x_T, ddim_schedule(model.alphas_cumprod, steps), eta=0.0,
                              generator=generators, extra_args={"cond": {"context": context[1:]}, "uncond": {"context": context[:1]}})
        sampled, sampling_peak = time.perf_counter(), peak_mb()
        image = decode(model, latents, options)
        done = time.perf_counter()
    assert image.shape[-1] == side and torch.isfinite(image.float()).all()
    report(f"sd-v1 {str(dtype).removeprefix('torch.')}", side, plan, (sampled - start) / steps, done - sampled, done - start,
           first_stage_tile(model, options, 1, side, side), sampling_peak)


def report(name: str, side: int, plan, per_step: float, decode_s: float, total: float, ae_tile: int, sampling_peak: float) -> None:
    how = f"tiles of {plan.tile} latent px, {plan.batch_windows} a call" if plan.tiled else "whole canvas"
    ae = f"tiled decode ({ae_tile} px tiles)" if ae_tile else "whole decode"
    print(f"{name} {side}x{side}: peak RSS {peak_mb():,.0f} MB ({sampling_peak:,.0f} MB while sampling); {per_step:.2f} s a step ({how}; whole-canvas estimate "
          f"{plan.estimate_mb:,.0f} MB), decode {decode_s:.1f} s ({ae}), total {total:.1f} s", flush=True)


# --- seams ---------------------------------------------------------------------------------------------


def seam_score(image: np.ndarray, rows: list[int], cols: list[int]) -> float:
    """Mean |difference| across the given borders (between index i - 1 and i) over the mean elsewhere."""
    x = image.astype(np.float64)
    dx = np.abs(np.diff(x, axis=1)).mean(axis=(0, 2))  # (W - 1,): between column j and j + 1
    dy = np.abs(np.diff(x, axis=0)).mean(axis=(1, 2))
    col_border = np.zeros_like(dx, dtype=bool)
    row_border = np.zeros_like(dy, dtype=bool)
    col_border[[c - 1 for c in cols if 0 < c < len(dx) + 1]] = True
    row_border[[r - 1 for r in rows if 0 < r < len(dy) + 1]] = True
    across = np.concatenate([dx[col_border], dy[row_border]])
    elsewhere = np.concatenate([dx[~col_border], dy[~row_border]])
    return float(across.mean() / elsewhere.mean())


def smooth_image(side: int) -> torch.Tensor:
    """A smooth test picture: two colour gradients and a slow ripple, in [-1, 1], (1, 3, side, side)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    r = 0.8 * x - 0.4
    g = 0.6 * y - 0.2 + 0.2 * torch.sin(6 * math.pi * x * y)
    b = 0.5 * torch.cos(3 * math.pi * (x + y) / 2)
    return torch.stack([r, g, b])[None]


def naive_tiles_decode(model, latents: torch.Tensor, tile: int) -> torch.Tensor:
    """Each latent tile decoded alone (its own GroupNorm statistics, zero padding at its edges)."""
    f = model.config.downsampling_factor
    out = torch.zeros(latents.shape[0], 3, latents.shape[-2] * f, latents.shape[-1] * f)
    for top in range(0, latents.shape[-2], tile):
        for left in range(0, latents.shape[-1], tile):
            part = model.decode_first_stage(latents[..., top : top + tile, left : left + tile])
            out[..., top * f : top * f + part.shape[-2], left * f : left * f + part.shape[-1]] = part
    return out


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def seams() -> None:
    loaded = load_model(default_model_path("default-txt2img"))
    model = loaded.model
    f = model.config.downsampling_factor
    side, tile = 512, 64
    image = smooth_image(side)
    with torch.inference_mode():
        latents = model.encode_first_stage(image, tile=tile)
        tiled = to_uint8(model.decode_first_stage(latents, tile=tile))
        whole = to_uint8(model.decode_first_stage(model.encode_first_stage(image)))
        naive = to_uint8(naive_tiles_decode(model, latents, tile // f))
    borders = list(range(tile, side, tile))
    print(f"autoencoder round trip of a smooth {side}x{side} image, tiles of {tile} px: seam score {seam_score(tiled, borders, borders):.3f} "
          f"(whole image {seam_score(whole, borders, borders):.3f}; tiles decoded alone {seam_score(naive, borders, borders):.3f}); "
          f"max |tiled - whole| {np.abs(tiled.astype(int) - whole.astype(int)).max()} levels", flush=True)
    scores = []
    for seed in range(4):
        request = GenerationRequest("a yellow star on the left and a blue ring on the right", steps=20, scale=4.0, seed=seed,
                                    width=256, height=256, tiling=TilingOptions(mode="always"))
        picture = np.asarray(txt2img(loaded, request).images[0])
        plan = canvas_plan(model, request, 64, 64)
        windows = plan_windows(64, 64, plan.tile, plan.overlap, model.config.unet.downsampling_factor)
        edges = sorted({e * f for w in windows for e in (w.top, w.top + w.height) if 0 < e < 64})
        scores.append(seam_score(picture, edges, edges))
    print(f"tiled sampling, default model, 256x256 in windows of {plan.tile * f} px overlapping by {plan.overlap * f} px: "
          f"seam score {np.mean(scores):.3f} (seeds 0-3: {', '.join(f'{s:.3f}' for s in scores)})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("default", "sd-v1"), default="default")
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--budget", type=int, default=TilingOptions().budget_mb, help="memory budget (MB)")
    parser.add_argument("--mode", default="auto", choices=("auto", "always", "off"))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--seams", action="store_true", help="measure seam scores instead")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.seams:
        seams()
        return
    options = TilingOptions(mode=args.mode, budget_mb=args.budget)
    if args.one:
        if args.model == "default":
            run_default(args.one, args.steps, options)
        else:
            run_sd(args.one, args.steps, options, DTYPES[args.dtype])
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, memory budget {args.budget} MB, mode {args.mode}", flush=True)
    for side in args.sides:
        subprocess.run([sys.executable, __file__, "--one", str(side), "--model", args.model, "--steps", str(args.steps),
                        "--budget", str(args.budget), "--mode", args.mode, "--dtype", args.dtype], check=True)


if __name__ == "__main__":
    main()
