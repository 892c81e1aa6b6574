"""Gaussian noise drawn only from explicit generators, one per image when a batch is given several."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator]


def randn(shape: Sequence[int], generator: Generators, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise of ``shape``. With a list of generators, row i of the batch comes from
    generator i, so an image's noise does not depend on the other images in its batch.
    Noise is drawn in float32 on each generator's device, then moved, so a seed gives the same
    noise whatever the model's device and dtype."""
    if isinstance(generator, torch.Generator):
        noise = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    else:
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators given for a batch of {shape[0]}")
        noise = torch.stack(
            [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=torch.float32).cpu() for g in generator]
        )
    return noise.to(device=device, dtype=dtype)


def seeded_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
