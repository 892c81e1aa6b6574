"""Inpainting by latent blending, for any model and any sampler: before each step, the region to keep
is replaced by the known latent noised to that step's level, so the model only ever fills the rest."""

from __future__ import annotations

import torch

from ldm.sampling.noise import Generators, randn


class LatentBlend:
    """A ``before_step`` hook (``ldm.sampling.steps.BeforeStep``): where ``keep`` is 1 the state becomes
    ``signal * x0 + noise * epsilon``, with epsilon drawn from each image's generator at every step;
    where it is 0 the state is left as the sampler made it."""

    def __init__(self, keep: torch.Tensor, x0: torch.Tensor, generator: Generators):
        self.keep, self.x0, self.generator = keep, x0, generator

    def __call__(self, x: torch.Tensor, signal: float, noise: float) -> torch.Tensor:
        epsilon = randn(x.shape, self.generator, device=x.device, dtype=x.dtype)
        return (signal * self.x0 + noise * epsilon) * self.keep + (1 - self.keep) * x
