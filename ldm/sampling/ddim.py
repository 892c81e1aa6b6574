"""DDIM sampling (Song et al. 2021, eq. 12) as a plain function over a denoiser.

Symbols, code name -> paper:
    alpha_t    -> alpha-bar_t (the cumulative product; the paper's alpha_t)
    alpha_prev -> alpha-bar_{t-1} (of the next timestep the run visits)
    eps        -> epsilon_theta(x_t, t)
    pred_x0    -> the "predicted x0" of eq. 12
    sigma      -> sigma_t(eta) = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from ldm.sampling.noise import Generators, randn
from ldm.sampling.schedules import DDIMSchedule


class StepInfo(NamedTuple):
    step: int  # 0-based index of the finished step
    total: int
    t: int  # the timestep just denoised
    x: torch.Tensor  # x_{t-1}
    denoised: torch.Tensor  # predicted x0 at this step


class SamplingCancelled(Exception):
    """Raised between steps when ``should_stop`` says so."""

    def __init__(self, step: int, total: int):
        super().__init__(f"sampling stopped after {step} of {total} steps")
        self.step, self.total = step, total


def ddim_sample(
    denoiser: Callable[..., torch.Tensor],
    x_T: torch.Tensor,
    schedule: DDIMSchedule,
    *,
    eta: float = 0.0,
    generator: Generators,
    extra_args: dict | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    mask: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run DDIM from ``x_T`` down the schedule and return x_0.

    ``denoiser(x, t, **extra_args)`` returns epsilon. With ``mask`` (1 = keep) and ``x0``, the kept
    region is replaced before each step by x0 noised to the current timestep, so any model inpaints.
    """
    if (mask is None) != (x0 is None):
        raise ValueError("mask and x0 go together: give both to inpaint by blending, or neither")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be between 0 (deterministic DDIM) and 1 (DDPM-like), got {eta}")
    extra_args = extra_args or {}
    x = x_T
    total = len(schedule)
    for i in range(total):
        if should_stop is not None and should_stop():
            raise SamplingCancelled(i, total)
        index = total - 1 - i
        t = int(schedule.timesteps[index])
        a_t = float(schedule.alphas[index])
        a_prev = float(schedule.alphas_prev[index])
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5

        if mask is not None:
            noise = randn(x.shape, generator, device=x.device, dtype=x.dtype)
            x = (a_t**0.5 * x0 + (1 - a_t) ** 0.5 * noise) * mask + (1 - mask) * x

        eps = denoiser(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long), **extra_args)
        # 1. predicted x0
        pred_x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        # 2. direction pointing to x_t
        direction = (1 - a_prev - sigma**2) ** 0.5 * eps
        # 3. random noise
        x = a_prev**0.5 * pred_x0 + direction
        if eta > 0:
            x = x + sigma * randn(x.shape, generator, device=x.device, dtype=x.dtype)

        if callback is not None:
            callback(StepInfo(i, total, t, x, pred_x0))
    return x
