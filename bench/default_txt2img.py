"""Time the embedded default model's text-to-image: 64x64, 20 DDIM steps, guidance (a figure, not a test).

    .venv/bin/python bench/default_txt2img.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.checkpoints.loader import load_model  # noqa: E402
from ldm.checkpoints.presets import default_model_path  # noqa: E402
from ldm.tasks.request import GenerationRequest  # noqa: E402
from ldm.tasks.txt2img import txt2img  # noqa: E402

MODEL = default_model_path("default-txt2img")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    start = time.perf_counter()
    loaded = load_model(MODEL)
    print(f"load: {time.perf_counter() - start:.2f} s (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    request = GenerationRequest("a red circle in the top left and a small blue square at the bottom",
                                steps=args.steps, scale=4.0, seed=1, width=64, height=64)
    txt2img(loaded, request)  # warm-up
    times = []
    for run in range(args.runs):
        start = time.perf_counter()
        txt2img(loaded, GenerationRequest(**{**request.__dict__, "seed": run}))
        times.append(time.perf_counter() - start)
    print(f"txt2img 64x64, {args.steps} DDIM steps, guidance 4: median {statistics.median(times):.3f} s, "
          f"min {min(times):.3f} s over {args.runs} runs")


if __name__ == "__main__":
    main()
