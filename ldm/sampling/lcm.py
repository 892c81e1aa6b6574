"""Latent consistency sampling (Luo et al. 2023, "Latent Consistency Models", algorithm 1) as a plain
function over a denoiser in sigma space, with the consistency models' boundary condition as a
denoiser wrapper and LCM's own timestep grid.

Symbols, code name -> paper:
    denoised -> f_theta(x, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t), the consistency function
    x0_hat   -> the network's x0 estimate D(x; sigma) (``SigmaDenoiser``)
    x_t      -> the DDPM state sqrt(abar) x0 + sqrt(1 - abar) eps = x / sqrt(sigma^2 + 1)
    c_skip   -> sigma_data^2 / ((10 t)^2 + sigma_data^2), sigma_data = 0.5
    c_out    -> 10 t / sqrt((10 t)^2 + sigma_data^2)   (t the network's timestep, scaled by 10)

Each step replaces the state by f_theta and, but on the last step, noises it again to the next
level: x = f + sigma_next z (the paper's sqrt(abar_prev) f + sqrt(1 - abar_prev) z, divided by
sqrt(abar_prev)).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ldm.sampling.k_samplers import Model, denoise_step, noise_like, state
from ldm.sampling.noise import Generators
from ldm.sampling.steps import BeforeStep, Callback, StepInfo

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0
ORIGINAL_STEPS = 50  # the distillation's grid: t = 19, 39, ..., 999 for T = 1000


class ConsistencyBoundary:
    """A sigma-space denoiser with the consistency boundary condition applied:
    D'(x; sigma) = c_skip(t) x / sqrt(sigma^2 + 1) + c_out(t) D(x; sigma), t = the model's timestep of sigma."""

    def __init__(self, model, timestep: Callable[[float], float]):
        self.model, self.timestep = model, timestep

    def __call__(self, x: torch.Tensor, sigma: float, **extra) -> torch.Tensor:
        scaled = self.timestep(sigma) * TIMESTEP_SCALING
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
        return c_skip * x / (sigma**2 + 1) ** 0.5 + c_out * self.model(x, sigma, **extra)


def lcm_timesteps(T: int, steps: int, original_steps: int = ORIGINAL_STEPS) -> list[int]:
    """LCM's grid (diffusers' ``LCMScheduler``): of the distillation's timesteps k - 1, 2k - 1, ..., T - 1
    (k = T // original_steps), from the top, those at indices floor(linspace(0, original_steps, steps,
    endpoint=False)). 4 steps of T = 1000: 999, 759, 499, 259."""
    if not 1 <= steps <= original_steps:
        raise ValueError(f"LCM's own schedule has 1 to {original_steps} steps, got {steps}; pick another schedule "
                         "for more")
    k = T // original_steps
    grid = [k * j - 1 for j in range(original_steps, 0, -1)]
    return [grid[int(i)] for i in np.floor(np.linspace(0, original_steps, steps, endpoint=False))]


def lcm(model: Model, x: torch.Tensor, sigmas: Sequence[float], *, generator: Generators,
        extra_args: dict | None = None, callback: Callback | None = None,
        should_stop: Callable[[], bool] | None = None, before_step: BeforeStep | None = None) -> torch.Tensor:
    """Multistep consistency sampling over ``model`` (a ``ConsistencyBoundary``). n denoiser calls."""
    x, total = state(x), len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, denoised = denoise_step(model, x, sigma, i, total, extra_args=extra_args, should_stop=should_stop,
                                   before_step=before_step)
        x = denoised
        if sigma_next > 0:
            x = x + noise_like(x, generator) * sigma_next
        if callback is not None:
            callback(StepInfo(i, total, sigma, x, denoised))
    return x
