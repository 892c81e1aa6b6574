"""The k-diffusion samplers (Karras et al. 2022; Lu et al. 2022, DPM-Solver++) as plain functions
over a denoiser in sigma space, ``model(x, sigma, **extra_args) -> denoised``
(``ldm.sampling.denoiser.SigmaDenoiser``).

Symbols, code name -> paper:
    x                 -> the state x = x0 + sigma * eps (variance exploding)
    sigma, sigma_next -> sigma_i, sigma_{i+1} of the schedule (decreasing, the last one 0)
    denoised          -> D(x; sigma), the denoiser's estimate of x0
    d                 -> dx/dsigma = (x - D) / sigma, the probability-flow ODE (Karras eq. 3 with sigma(t) = t)
    h                 -> lambda_{i+1} - lambda_i with lambda = -log sigma (DPM-Solver's half log-SNR)
    r                 -> h_{i-1} / h_i, the ratio of the last two steps (multistep DPM-Solver++)
    sigma_up          -> the noise an ancestral step adds; sigma_down -> the level it reaches deterministically

Every step calls, in this order: ``check_stop``, ``before_step(x, 1, sigma)``, the denoiser (twice in
Heun's and DPM++ SDE's steps), ``callback(StepInfo(i, n, sigma, x, denoised))``. Noise is drawn only
through ``ldm.sampling.noise.randn`` from the per-image generators, only where a step adds some
(never at eta 0 nor on the last step to sigma 0), so image i of a batch is the same seed alone.
The state is kept in float32 (float64 if given), whatever the model's dtype, as diffusers'
schedulers upcast in their steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ldm.sampling.noise import Generators, randn
from ldm.sampling.steps import BeforeStep, Callback, StepInfo, check_stop

Model = Callable[..., torch.Tensor]


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of a step from sigma to sigma_next: sigma_up^2 + sigma_down^2 = sigma_next^2,
    sigma_up = min(sigma_next, eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2))."""
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def denoise_step(model: Model, x: torch.Tensor, sigma: float, step: int, total: int, *,
                 extra_args: dict | None, should_stop: Callable[[], bool] | None,
                 before_step: BeforeStep | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The start every step shares: stop if asked, the hook, the denoiser. Returns (x, denoised)."""
    check_stop(should_stop, step, total)
    if before_step is not None:
        x = before_step(x, 1.0, sigma)
    return x, model(x, sigma, **(extra_args or {}))


def noise_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    return randn(x.shape, generator, device=x.device, dtype=x.dtype)


def state(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def check_noise(eta: float, s_noise: float) -> None:
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be 0 (no noise) or more, got {eta}")
    if not (math.isfinite(s_noise) and s_noise >= 0):
        raise ValueError(f"s_noise must be 0 or more, got {s_noise}")


def euler(model: Model, x: torch.Tensor, sigmas: Sequence[float], *, extra_args: dict | None = None,
          callback: Callback | None = None, should_stop: Callable[[], bool] | None = None,
          before_step: BeforeStep | None = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. algorithm 1 without churn)."""
    x, total = state(x), len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, denoised = denoise_step(model, x, sigma, i, total, extra_args=extra_args, should_stop=should_stop,
                                   before_step=before_step)
        d = (x - denoised) / sigma
        x = x + d * (sigma_next - sigma)
        if callback is not None:
            callback(StepInfo(i, total, sigma, x, denoised))
    return x


def euler_ancestral(model: Model, x: torch.Tensor, sigmas: Sequence[float], *, generator: Generators,
                    eta: float = 1.0, s_noise: float = 1.0, extra_args: dict | None = None,
                    callback: Callback | None = None, should_stop: Callable[[], bool] | None = None,
                    before_step: BeforeStep | None = None) -> torch.Tensor:
    """An Euler step down to sigma_down, then fresh noise of std s_noise * sigma_up (eta 0: Euler)."""
    check_noise(eta, s_noise)
    x, total = state(x), len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, denoised = denoise_step(model, x, sigma, i, total, extra_args=extra_args, should_stop=should_stop,
                                   before_step=before_step)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        d = (x - denoised) / sigma
        x = x + d * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + noise_like(x, generator) * (s_noise * sigma_up)
        if callback is not None:
            callback(StepInfo(i, total, sigma, x, denoised))
    return x


def heun(model: Model, x: torch.Tensor, sigmas: Sequence[float], *, extra_args: dict | None = None,
         callback: Callback | None = None, should_stop: Callable[[], bool] | None = None,
         before_step: BeforeStep | None = None) -> torch.Tensor:
    """Heun's second-order method (Karras et al. algorithm 1): the slope averaged over both ends of the
    step; the last step, to sigma 0, is Euler's. 2n - 1 denoiser calls."""
    x, total = state(x), len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, denoised = denoise_step(model, x, sigma, i, total, extra_args=extra_args, should_stop=should_stop,
                                   before_step=before_step)
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_euler = x + d * dt
            d_next = (x_euler - model(x_euler, sigma_next, **(extra_args or {}))) / sigma_next
            x = x + (d + d_next) / 2 * dt
        if callback is not None:
            callback(StepInfo(i, total, sigma, x, denoised))
    return x


def dpmpp_2m(model: Model, x: torch.Tensor, sigmas: Sequence[float], *, extra_args: dict | None = None,
             callback: Callback | None = None, should_stop: Callable[[], bool] | None = None,
             before_step: BeforeStep | None = None) -> torch.Tensor:
    """Multistep DPM-Solver++(2M) (Lu et al. 2022, algorithm 2): first order on the first step and on
    the last (to sigma 0); between, D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1} and
    x = (sigma_next / sigma) x - expm1(-h) D'."""
    x, total = state(x), len(sigmas) - 1
    old_denoised, h_last = None, None
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, denoised = denoise_step(model, x, sigma, i, total, extra_args=extra_args, should_stop=should_stop,
                                   before_step=before_step)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            if old_denoised is None:
                d_prime = denoised
            else:
                r = h_last / h
                d_prime = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * d_prime
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback(StepInfo(i, total, sigma, x, denoised))
    return x


def dpmpp_2m_sde(model: Model, x: torch.Tensor, sigmas: Sequence[float], *, generator: Generators,
                 eta: float = 1.0, s_noise: float = 1.0, solver: str = "midpoint", extra_args: dict | None = None,
                 callback: Callback | None = None, should_stop: Callable[[], bool] | None = None,
                 before_step: BeforeStep | None = None) -> torch.Tensor:
    """Multistep SDE DPM-Solver++(2M) (Lu et al. 2022, the SDE solver of section 4; k-diffusion's
    ``sample_dpmpp_2m_sde``), with eh = eta * h:

        phi = 1 - e^{-h-eh}
        x   = (sigma_next / sigma) e^{-eh} x + phi D + c (D - D_prev) / r + sigma_next sqrt(1 - e^{-2 eh}) s_noise z
        c   = phi / 2 (midpoint, the default) or phi / (-h-eh) + 1 (heun)

    The first step has no D_prev term; the last (to sigma 0) returns D. z is a standard normal drawn per
    step from each image's generator (as diffusers' ``sde-dpmsolver++`` does; k-diffusion draws the
    same law from a Brownian tree).
    """
    check_noise(eta, s_noise)
    if solver not in ("midpoint", "heun"):
        raise ValueError(f"DPM++ 2M SDE solver {solver!r} is not known; use one of midpoint, heun")
    x, total = state(x), len(sigmas) - 1
    old_denoised, h_last = None, None
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, denoised = denoise_step(model, x, sigma, i, total, extra_args=extra_args, should_stop=should_stop,
                                   before_step=before_step)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            eh = eta * h
            phi = -math.expm1(-h - eh)  # 1 - e^{-h-eh}
            x = (sigma_next / sigma) * math.exp(-eh) * x + phi * denoised
            if old_denoised is not None:
                r = h_last / h
                c = 0.5 * phi if solver == "midpoint" else phi / (-h - eh) + 1
                x = x + c * (1 / r) * (denoised - old_denoised)
            if eta > 0:
                x = x + noise_like(x, generator) * (sigma_next * (-math.expm1(-2 * eh)) ** 0.5 * s_noise)
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback(StepInfo(i, total, sigma, x, denoised))
    return x


def brownian_increments(x: torch.Tensor, generator: Generators, sigmas: tuple[float, float, float]):
    """Brownian motion W(sigma) sampled at sigma > sigma_mid > sigma_next, from two standard normals z1, z2
    drawn in that order from each image's generator: returns the normalised increments
    (W(sigma_mid) - W(sigma)) / sqrt(sigma - sigma_mid) = z1 and (W(sigma_next) - W(sigma)) / sqrt(sigma - sigma_next)
    = (sqrt(sigma - sigma_mid) z1 + sqrt(sigma_mid - sigma_next) z2) / sqrt(sigma - sigma_next), as a generator
    so that z2 is drawn only when the second increment is asked for."""
    sigma, sigma_mid, sigma_next = sigmas
    z1 = noise_like(x, generator)
    yield z1
    z2 = noise_like(x, generator)
    yield ((sigma - sigma_mid) ** 0.5 * z1 + (sigma_mid - sigma_next) ** 0.5 * z2) / (sigma - sigma_next) ** 0.5


def dpmpp_sde(model: Model, x: torch.Tensor, sigmas: Sequence[float], *, generator: Generators,
              eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5, extra_args: dict | None = None,
              callback: Callback | None = None, should_stop: Callable[[], bool] | None = None,
              before_step: BeforeStep | None = None) -> torch.Tensor:
    """Stochastic DPM-Solver++(2S) (k-diffusion's ``sample_dpmpp_sde``): two ancestral sub-steps per step,
    the first to sigma_mid = sigma^(1-r) sigma_next^r (lambda + r h), the second from sigma with
    D' = (1 - 1/(2r)) D + 1/(2r) D(x_mid; sigma_mid) (r 1/2: D' = D(x_mid)). Each sub-step goes by
    x = (sigma_down / sigma) x + (1 - sigma_down / sigma) D' plus s_noise * sigma_up of Brownian noise;
    the last step (to sigma 0) is Euler's. 2n - 1 denoiser calls.

    The noise: for each step, W is Brownian motion in sigma sampled at sigma, sigma_mid and sigma_next
    (``brownian_increments``), two normals drawn per step and per image from that image's generator, so
    a seed reproduces its image at any batch size and on any device. It has the law of the Brownian
    tree (torchsde) that k-diffusion and AUTOMATIC1111 query at the same points, but not its numbers,
    nor the tree's trait that runs with different step counts share their noise.
    """
    check_noise(eta, s_noise)
    if not 0 < r <= 1:
        raise ValueError(f"DPM++ SDE's r must be in (0, 1], got {r}")
    x, total = state(x), len(sigmas) - 1
    fac = 1 / (2 * r)
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, denoised = denoise_step(model, x, sigma, i, total, extra_args=extra_args, should_stop=should_stop,
                                   before_step=before_step)
        if sigma_next == 0:
            x = denoised
        else:
            sigma_mid = math.exp((1 - r) * math.log(sigma) + r * math.log(sigma_next))
            noise = brownian_increments(x, generator, (sigma, sigma_mid, sigma_next)) if eta > 0 else None
            # 1. the sub-step to sigma_mid
            sigma_down, sigma_up = ancestral_step(sigma, sigma_mid, eta)
            x_mid = (sigma_down / sigma) * x + (1 - sigma_down / sigma) * denoised
            if sigma_up > 0:
                x_mid = x_mid + next(noise) * (s_noise * sigma_up)
            denoised_mid = model(x_mid, sigma_mid, **(extra_args or {}))
            # 2. the step to sigma_next with the midpoint's estimate
            sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
            denoised_d = (1 - fac) * denoised + fac * denoised_mid
            x = (sigma_down / sigma) * x + (1 - sigma_down / sigma) * denoised_d
            if sigma_up > 0:
                x = x + next(noise) * (s_noise * sigma_up)
        if callback is not None:
            callback(StepInfo(i, total, sigma, x, denoised))
    return x
