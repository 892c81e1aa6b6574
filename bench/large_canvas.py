"""Memory on the path users run: peak resident memory of ``python -m ldm txt2img`` at growing sizes,
the memory guard's estimate beside it, and diffusers' StableDiffusionPipeline on the same weights
(figures, not a test); and seam scores of tiled sampling and decoding.

    .venv/bin/python bench/large_canvas.py [--model sd-v1|sd-v2|default|FILE] [--sides 512 1024 2048]
        [--dtype auto|fp32|bf16] [--steps 1] [--no-diffusers] [-- MORE CLI OPTIONS]
    .venv/bin/python bench/large_canvas.py --seams

Each run is a fresh process: ours is the command line itself (``python -m ldm -v txt2img`` with its
defaults, guidance on, 1 step), whose planning logs the resident memory before sampling and the
guard's estimate of what the generation adds on top (``ldm.tasks.planning``); its peak is the
child's ``ru_maxrss``. "added" is peak minus that resident memory, the figure the estimate must
match. diffusers' pipeline is built in its own process from the same file through its single-file
converters into models built empty and given the converted tensors in the same dtype (as its
``from_single_file(torch_dtype=...)`` does), with the same CLIP tokenizer, DDIM and guidance 7.5.

``sd-v1`` and ``sd-v2`` are the full Stable Diffusion architectures with random weights, written
once in their original key layout as fp16 safetensors under ``~/.cache/ldm-studio/bench`` (2.1 and
2.6 GB); ``default`` is the embedded default model (no diffusers counterpart).

Seam score: the mean absolute horizontal and vertical differences across tile borders divided by
the mean elsewhere (1.0: borders are like any other place), on
- a smooth test image through the tiled autoencoder round trip (and, for comparison, through
  tiles decoded one by one with their own GroupNorm statistics, the usual way);
- images sampled in tiles by the default model, across the windows' interior edges.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sd_files import RANDOM_MODELS, diffusers_pipeline, random_model_file  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk"
PLANNED = re.compile(r"memory: about ([\d,]+) MB on top of ([\d,]+) MB resident")


def run_child(command: list[str]) -> tuple[float, str, float]:
    """(peak resident MB, stderr, seconds) of a command run in a fresh process."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
        err.seek(0)
        text = err.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{text[-3000:]}")
    return usage.ru_maxrss / 1024, text, time.perf_counter() - start


def ours(model: str, side: int, dtype: str, steps: int, extra: list[str], out: Path) -> dict:
    command = [sys.executable, "-m", "ldm", "-v", "txt2img", "--prompt", PROMPT, "--steps", str(steps), "--seed", "1",
               "--width", str(side), "--height", str(side), "--dtype", dtype, "--out", str(out), *extra]
    if model != "default":
        command += ["--model", model]
    peak, log, seconds = run_child(command)
    planned = PLANNED.search(log)
    if planned is None:
        raise SystemExit(f"the CLI logged no memory plan:\n{log[-2000:]}")
    estimate, resident = (float(g.replace(",", "")) for g in planned.groups())
    tiled = "sampled in tiles" in log
    return {"peak": peak, "resident": resident, "estimate": estimate, "seconds": seconds, "tiled": tiled}


def theirs(model: str, side: int, dtype: str, steps: int, out: Path) -> dict:
    peak, log, seconds = run_child([sys.executable, __file__, "--diffusers-child", model, str(side), dtype, str(steps),
                                    str(out)])
    resident = float(re.search(r"resident after building: ([\d.]+) MB", log).group(1))
    return {"peak": peak, "resident": resident, "seconds": seconds}


def diffusers_child(model: str, side: int, dtype_name: str, steps: int, out: str) -> None:
    """diffusers' StableDiffusionPipeline from ``model`` (an original-layout file) with DDIM, run once."""
    import torch

    from ldm.devices import choose_dtype, resident_mb

    pipe = diffusers_pipeline(model, choose_dtype(None if dtype_name == "auto" else dtype_name, torch.device("cpu")))
    print(f"resident after building: {resident_mb():.0f} MB", file=sys.stderr, flush=True)
    with torch.inference_mode():
        image = pipe(PROMPT, height=side, width=side, num_inference_steps=steps, guidance_scale=7.5,
                     generator=torch.Generator().manual_seed(1)).images[0]
    image.save(out)


def memory(args: argparse.Namespace, extra: list[str]) -> None:
    model = str(random_model_file(args.model)) if args.model in RANDOM_MODELS else args.model
    compare = not args.no_diffusers and args.model != "default"
    print(f"{args.model}, dtype {args.dtype}, {args.steps} step(s), guidance 7.5, CLI defaults"
          + (f" + {' '.join(extra)}" if extra else "") + "; MB resident, each run a fresh process", flush=True)
    print(f"{'size':>9s} {'peak':>7s} {'before':>7s} {'added':>7s} {'guard':>7s} {'guard/added':>11s} {'time':>7s}"
          + (f" {'diffusers':>9s} {'ours/theirs':>11s} {'their time':>10s}" if compare else "") + "  plan", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for side in args.sides:
            a = ours(model, side, args.dtype, args.steps, extra, Path(folder) / "ours.png")
            added = a["peak"] - a["resident"]
            line = (f"{side:>4d}x{side:<4d} {a['peak']:7.0f} {a['resident']:7.0f} {added:7.0f} {a['estimate']:7.0f} "
                    f"{a['estimate'] / added:11.2f} {a['seconds']:6.0f}s")
            if compare:
                b = theirs(model, side, args.dtype, args.steps, Path(folder) / "theirs.png")
                line += f" {b['peak']:9.0f} {a['peak'] / b['peak']:11.2f} {b['seconds']:9.0f}s"
            print(line + ("  tiled" if a["tiled"] else "  whole"), flush=True)


# --- seams ---------------------------------------------------------------------------------------------


def seam_score(image, rows: list[int], cols: list[int]) -> float:
    """Mean |difference| across the given borders (between index i - 1 and i) over the mean elsewhere."""
    import numpy as np

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


def smooth_image(side: int):
    """A smooth test picture: two colour gradients and a slow ripple, in [-1, 1], (1, 3, side, side)."""
    import torch

    y, x = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    r = 0.8 * x - 0.4
    g = 0.6 * y - 0.2 + 0.2 * torch.sin(6 * math.pi * x * y)
    b = 0.5 * torch.cos(3 * math.pi * (x + y) / 2)
    return torch.stack([r, g, b])[None]


def naive_tiles_decode(model, latents, tile: int):
    """Each latent tile decoded alone (its own GroupNorm statistics, zero padding at its edges)."""
    import torch

    f = model.config.downsampling_factor
    out = torch.zeros(latents.shape[0], 3, latents.shape[-2] * f, latents.shape[-1] * f)
    for top in range(0, latents.shape[-2], tile):
        for left in range(0, latents.shape[-1], tile):
            part = model.decode_first_stage(latents[..., top : top + tile, left : left + tile])
            out[..., top * f : top * f + part.shape[-2], left * f : left * f + part.shape[-1]] = part
    return out


def to_uint8(images):
    return ((images[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def seams() -> None:
    import numpy as np
    import torch

    from ldm.checkpoints.loader import load_model
    from ldm.checkpoints.presets import default_model_path
    from ldm.sampling.tiling import plan_windows
    from ldm.tasks.planning import canvas_plan
    from ldm.tasks.request import GenerationRequest, TilingOptions
    from ldm.tasks.txt2img import txt2img

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
    if sys.argv[1:2] == ["--diffusers-child"]:
        model, side, dtype, steps, out = sys.argv[2:7]
        diffusers_child(model, int(side), dtype, int(steps), out)
        return
    argv, extra = (sys.argv[1:], []) if "--" not in sys.argv else (sys.argv[1:sys.argv.index("--")],
                                                                   sys.argv[sys.argv.index("--") + 1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd-v1", help="sd-v1, sd-v2 (random weights), default, or a checkpoint file")
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--no-diffusers", action="store_true", help="measure ours only")
    parser.add_argument("--seams", action="store_true", help="measure seam scores instead")
    args = parser.parse_args(argv)
    if args.seams:
        seams()
    else:
        memory(args, extra)


if __name__ == "__main__":
    main()
