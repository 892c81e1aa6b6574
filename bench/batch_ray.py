"""Images/s of a batch of the embedded default model (64x64, its preset's 20 DDIM steps) rendered in
this process (--ray none) and over a local Ray cluster of this machine (--ray local): a figure, not a test.

    .venv/bin/python bench/batch_ray.py [--count 200] [--steps N] [--workers N] [--cpus-per-worker N]

Each backend renders the same jobs into a fresh folder. "render" counts from the first job handed to
the backend to the last picture written (model loads included); "wall" adds starting and stopping the
cluster (and, for Ray, its actors). The "1 thread" row is --ray none with torch on one thread, as each
Ray actor runs by default: on a busy machine torch's threads of one process wait on each other.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.batch.jobs import expand, grid_from_values, model_facts  # noqa: E402
from ldm.batch.render import LoadOptions  # noqa: E402
from ldm.batch.run import in_process, run_batch  # noqa: E402

PROMPTS = ["a red circle in the top left and a small blue square at the bottom", "a green triangle on a grey floor",
           "two yellow squares side by side", "a blue circle above a red square"]


def jobs(count: int, steps: int | None) -> list:
    seeds = f"0-{(count + len(PROMPTS) - 1) // len(PROMPTS) - 1}"
    grid = grid_from_values({"prompts": PROMPTS, "seeds": seeds, **({"steps": steps} if steps else {})})
    return expand(grid, {"default": model_facts("default")})[:count]


def timed(label: str, batch: list, backend, cluster=None) -> None:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as out:
        if cluster is None:
            report = run_batch(batch, out, backend)
        else:
            with cluster:
                report = run_batch(batch, out, backend)
    wall = time.perf_counter() - start
    assert len(report.rendered) == len(batch) and not report.failed, report.failed
    print(f"{label:<12} {len(batch):>6} {report.seconds:>9.1f} {report.images_per_second:>13.2f} {wall:>8.1f} "
          f"{len(batch) / wall:>11.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="images in the batch (default 200)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the model preset's, 20)")
    parser.add_argument("--workers", type=int, help="Ray renderer actors (default: one per CPU of the cluster)")
    parser.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs (torch threads) of each actor (default 1)")
    args = parser.parse_args()
    batch = jobs(args.count, args.steps)
    options = LoadOptions(device="cpu", dtype="fp32")
    print(f"{len(batch)} images of the default model, {batch[0].steps} {batch[0].sampler} steps, "
          f"{batch[0].width}x{batch[0].height}; {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads in process)")
    print(f"{'backend':<12} {'images':>6} {'render s':>9} {'render img/s':>13} {'wall s':>8} {'wall img/s':>11}")
    timed("--ray none", batch, in_process(options))
    if torch.get_num_threads() > 1:  # one thread per renderer, as each Ray actor of --cpus-per-worker 1 runs
        timed("  1 thread", batch, in_process(replace(options, threads=1)))
    from ldm.distributed.batch import ray_backend
    from ldm.distributed.cluster import connected

    backend = ray_backend(options, workers=args.workers, cpus_per_worker=args.cpus_per_worker)
    timed("--ray local", batch, backend, cluster=connected("local"))


if __name__ == "__main__":
    main()
