"""Tensor batches of rendered scenes. Training seeds count up from 0; held-out scenes (evaluation)
use seeds from ``HELD_OUT_SEED`` on, which training never reaches."""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from ldm.data.world import MAX_OBJECTS, Scene, render_batch

HELD_OUT_SEED = 2**40


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def scene_batch(first_seed: int, count: int, size: int, max_objects: int = MAX_OBJECTS) -> tuple[torch.Tensor, list[Scene]]:
    images, scenes = render_batch(range(first_seed, first_seed + count), size, max_objects)
    return images_to_tensor(images), scenes


def scene_batches(jobs: Iterable[tuple[int, int, int, int]], workers: int) -> Iterator[tuple[torch.Tensor, list[Scene]]]:
    """``scene_batch(*job)`` for each job, in order. With ``workers`` > 0 the batches are rendered that
    many processes ahead of the consumer (a GPU outruns one process drawing scenes); each batch is the
    same as inline, since a scene depends only on its seed. At most two batches a worker wait ready."""
    jobs = iter(jobs)
    if workers <= 0:
        yield from itertools.starmap(scene_batch, jobs)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=torch.set_num_threads, initargs=(1,))
    try:
        pending = deque(pool.submit(scene_batch, *job) for job in itertools.islice(jobs, 2 * workers))
        while pending:
            batch = pending.popleft().result()
            pending.extend(pool.submit(scene_batch, *job) for job in itertools.islice(jobs, 1))
            yield batch
    finally:
        pool.shutdown(cancel_futures=True)


def default_workers(device: torch.device) -> int:
    """Scene-drawing processes for training on ``device``: none on a CPU, whose cores the training
    step already uses; on a GPU all cores but two (the training loop's and the driver's), up to 12."""
    return 0 if device.type == "cpu" else max(1, min(12, (os.cpu_count() or 3) - 2))


def held_out_batch(index: int, count: int, size: int) -> tuple[torch.Tensor, list[Scene]]:
    return scene_batch(HELD_OUT_SEED + index * count, count, size)


def random_crop(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random ``size`` x ``size`` window of each image (the images themselves when they are that size)."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    tops = torch.randint(0, h - size + 1, (len(images),), generator=generator).tolist()
    lefts = torch.randint(0, w - size + 1, (len(images),), generator=generator).tolist()
    return torch.stack([im[:, t : t + size, l : l + size] for im, t, l in zip(images, tops, lefts)])
