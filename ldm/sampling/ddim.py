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

import torch

from ldm.sampling.noise import Generators, randn
from ldm.sampling.schedules import DDIMSchedule
from ldm.sampling.steps import BeforeStep, Callback, StepInfo, check_stop


def ddim_sample(
    denoiser: Callable[..., torch.Tensor],
    x_T: torch.Tensor,
    schedule: DDIMSchedule,
    *,
    eta: float = 0.0,
    generator: Generators,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
    before_step: BeforeStep | None = None,
) -> torch.Tensor:
    """Run DDIM from ``x_T`` down the schedule and return x_0.

    ``denoiser(x, t, **extra_args)`` returns epsilon. ``before_step(x, sqrt(abar_t), sqrt(1 - abar_t))``
    may change the state before each step (inpainting by blending: ``ldm.sampling.blending``).
    """
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be between 0 (deterministic DDIM) and 1 (DDPM-like), got {eta}")
    extra_args = extra_args or {}
    x = x_T
    total = len(schedule)
    for i in range(total):
        check_stop(should_stop, i, total)
        index = total - 1 - i
        t = schedule.timesteps[index].item()
        a_t = float(schedule.alphas[index])
        a_prev = float(schedule.alphas_prev[index])
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5

        if before_step is not None:
            x = before_step(x, a_t**0.5, (1 - a_t) ** 0.5)

        eps = denoiser(x, torch.full((x.shape[0],), t, device=x.device, dtype=schedule.timesteps.dtype), **extra_args)
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
