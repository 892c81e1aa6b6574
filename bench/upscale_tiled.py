"""Time and peak memory of the default 4x upscaler on inputs of growing size, in tiles (figures, not a test).

    .venv/bin/python bench/upscale_tiled.py [--sides 64 256 1024] [--steps 20] [--tile 128] [--overlap 16]

Each size runs in a fresh process, so the peak resident memory (ru_maxrss) is that size's own.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one(side: int, steps: int, tile: int, overlap: int) -> None:
    from ldm.checkpoints.loader import load_model
    from ldm.checkpoints.presets import default_model_path
    from ldm.data.world import render, scene_from_seed
    from ldm.tasks.request import GenerationRequest
    from ldm.tasks.upscale import InputTiles, upscale

    loaded = load_model(default_model_path("default-upscale"))
    image = render(scene_from_seed(1), side)
    start = time.perf_counter()
    result = upscale(loaded, image, GenerationRequest("", steps=steps, seed=1), tiles=InputTiles(tile, overlap))
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = result.images[0]
    print(f"{side}x{side} -> {out.width}x{out.height}: {seconds:.1f} s, peak RSS {peak_mb:.0f} MB "
          f"({steps} steps, tile {tile}, overlap {overlap})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sides", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.one, args.steps, args.tile, args.overlap)
        return
    for side in args.sides:
        subprocess.run([sys.executable, __file__, "--one", str(side), "--steps", str(args.steps), "--tile", str(args.tile),
                        "--overlap", str(args.overlap)], check=True)


if __name__ == "__main__":
    main()
