"""A discrete-time model's noise levels in sigma space, and the schedules a sampler can walk them by.

The DDPM forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, divided by sqrt(abar_t), is the
variance-exploding state x = x0 + sigma_t eps with

    sigma_t = sqrt((1 - abar_t) / abar_t)            (ascending in t; SD: 0.0292 .. 14.6146)

A noise level between two table entries is interpolated linearly in log-sigma (k-diffusion's
``DiscreteSchedule`` with ``quantize=False``, AUTOMATIC1111's default), in both directions:

    t(sigma) = low + w,   w = (log sigma_low - log sigma) / (log sigma_low - log sigma_high)
    sigma(t) = exp((1 - frac t) log sigma_floor(t) + frac t log sigma_ceil(t))

so fractional timesteps reach the network. ``alpha_bar`` at a fractional t is 1 / (1 + sigma(t)^2), the
value consistent with that interpolation, and exactly the table's at an integer t.

Schedules (``SCHEDULES``, by AUTOMATIC1111's 1.9+ "Schedule type" names) give a run's decreasing noise
levels sigma_0 > ... > sigma_{n-1} and a final 0, n = steps:

    Uniform      t = linspace(T - 1, 0, n), sigma(t)                    (k-diffusion get_sigmas)
    Karras       (smax^(1/7) + i/(n-1) (smin^(1/7) - smax^(1/7)))^7  (Karras et al. 2022, rho 7)
    Exponential  exp(linspace(log smax, log smin, n))
    SGM Uniform  t = linspace(t(smax), t(smin), n + 1)[:-1], sigma(t)    (999, 949.05, ..., 49.95 at n 20)
    Simple       the table's sigma at t = T - 1 - int(i T / n)           (999, 949, ..., 49 at n 20)
    Normal       t = linspace(t(smax), t(smin), n), sigma(t)           (A1111's; Uniform on SD's tables)
    KL Optimal   tan(u atan(smin) + (1 - u) atan(smax)), u = i/(n-1)    (Sabour et al. 2024; as ComfyUI:
                 A1111 takes u = i/n for i up to n and ends at smin instead of 0)
    Align Your Steps  the published 10-step SD 1.5 list, log-linearly interpolated for other n
    Beta         smin + q_i (smax - smin), q_i the Beta(0.6, 0.6) quantile of 1 - i/(n-1)  (A1111's,
                 linear in sigma; ComfyUI's looks timesteps up instead)

smin and smax are the model's sigma_0 and sigma_{T-1}. "Automatic" is no schedule of its own: each
sampler resolves it to its default (``ldm.sampling.samplers``), as AUTOMATIC1111 does.

Timestep spacings (``SPACINGS``) are the integer grids of diffusers' multistep schedulers
(``DPMSolverMultistepScheduler``, ``UniPCMultistepScheduler``), for samplers that work on timesteps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


class DiscreteSigmas:
    """The sigma table of a model's ``alphas_cumprod`` (float64, on the CPU) and the conversions
    between noise levels and (fractional) timesteps."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        abar = alphas_cumprod.detach().to(device="cpu", dtype=torch.float64)
        self.sigmas = ((1 - abar) / abar).sqrt()  # (T,) ascending
        self.log_sigmas = self.sigmas.log()

    def __len__(self) -> int:
        return len(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma: float) -> float:
        """The fractional timestep of a noise level, by log-sigma interpolation, clamped to [0, T - 1]."""
        log_sigma = torch.tensor(sigma, dtype=torch.float64).log()
        low = int((self.log_sigmas <= log_sigma).sum().clamp(min=1, max=len(self) - 1)) - 1
        log_low, log_high = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((log_low - log_sigma) / (log_low - log_high)).clamp(0, 1)
        return low + float(w)

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """sigma at (fractional) timesteps, by log-sigma interpolation: the inverse of ``timestep``."""
        return self.log_sigma(torch.as_tensor(t, dtype=torch.float64)).exp()

    def log_sigma(self, t: torch.Tensor) -> torch.Tensor:
        table = self.log_sigmas.to(t.device)
        low = t.floor().long().clamp(0, len(self) - 1)
        high = (low + 1).clamp(max=len(self) - 1)
        frac = t.double() - low
        return (1 - frac) * table[low] + frac * table[high]


def alpha_bar_at(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """alpha-bar at each sample's timestep (B,): the table's entry at an integer t (of any dtype), and
    1 / (1 + sigma(t)^2) with log-sigma interpolation between entries at a fractional t."""
    table = alphas_cumprod.to(t.device)
    if not t.is_floating_point():
        return table[t.long()]
    index = t.floor().long().clamp(0, len(table) - 1)
    frac = t.double() - index
    upper = (index + 1).clamp(max=len(table) - 1)
    log_sigmas = 0.5 * ((1 - table.double()) / table.double()).log()
    log_sigma = (1 - frac) * log_sigmas[index] + frac * log_sigmas[upper]
    interpolated = torch.sigmoid(-2 * log_sigma).to(table.dtype)  # 1 / (1 + sigma^2)
    return torch.where(frac == 0, table[index], interpolated)


# ---------------------------------------------------------------- schedules


def uniform_sigmas(table: DiscreteSigmas, steps: int) -> list[float]:
    t = torch.linspace(len(table) - 1, 0, steps, dtype=torch.float64)
    return table.sigma(t).tolist() + [0.0]


def karras_sigmas(table: DiscreteSigmas, steps: int, rho: float = 7.0) -> list[float]:
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    min_inv_rho, max_inv_rho = table.sigma_min ** (1 / rho), table.sigma_max ** (1 / rho)
    return ((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho).tolist() + [0.0]


def exponential_sigmas(table: DiscreteSigmas, steps: int) -> list[float]:
    log_sigmas = torch.linspace(math.log(table.sigma_max), math.log(table.sigma_min), steps, dtype=torch.float64)
    return log_sigmas.exp().tolist() + [0.0]


def sgm_uniform_sigmas(table: DiscreteSigmas, steps: int) -> list[float]:
    t = torch.linspace(table.timestep(table.sigma_max), table.timestep(table.sigma_min), steps + 1, dtype=torch.float64)
    return table.sigma(t[:-1]).tolist() + [0.0]


def simple_sigmas(table: DiscreteSigmas, steps: int) -> list[float]:
    T = len(table)
    return [float(table.sigmas[T - 1 - int(i * T / steps)]) for i in range(steps)] + [0.0]


def normal_sigmas(table: DiscreteSigmas, steps: int) -> list[float]:
    t = torch.linspace(table.timestep(table.sigma_max), table.timestep(table.sigma_min), steps, dtype=torch.float64)
    return table.sigma(t).tolist() + [0.0]


def kl_optimal_sigmas(table: DiscreteSigmas, steps: int) -> list[float]:
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    angles = ramp * math.atan(table.sigma_min) + (1 - ramp) * math.atan(table.sigma_max)
    return angles.tan().tolist() + [0.0]


# Sabour et al. 2024's noise levels for SD 1.5 at 10 steps (AUTOMATIC1111 uses them for SD 2 too)
ALIGN_YOUR_STEPS_SD1 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)


# the table the published list was found on: SD's scaled-linear betas, 0.00085 to 0.012 over 1000 steps
_SD_ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)


def align_your_steps_sigmas(table: DiscreteSigmas, steps: int) -> list[float]:
    """The published list, interpolated linearly in log sigma for another number of steps. On SD's
    own noise table the levels are the list's, as AUTOMATIC1111 and ComfyUI use them; on another
    table (LDM's, the default model's, the x4 upscaler's) each level is carried over by its place in
    time: its fractional timestep on SD's table, scaled to the other table's length, is looked up
    there, so the run starts at that table's sigma_max and ends at its sigma_min, as on SD."""
    levels = np.log(ALIGN_YOUR_STEPS_SD1)  # decreasing; one step starts at the first
    known, wanted = np.linspace(0, 1, len(levels)), np.linspace(0, 1, steps)
    sigmas = np.exp(np.interp(wanted, known, levels)).tolist()
    sd = DiscreteSigmas(_SD_ALPHAS_CUMPROD)
    if len(table) == len(sd) and torch.allclose(table.sigmas, sd.sigmas, rtol=1e-4):
        return sigmas + [0.0]
    scale = (len(table) - 1) / (len(sd) - 1)
    times = torch.tensor([sd.timestep(s) * scale for s in sigmas], dtype=torch.float64)
    return table.sigma(times).tolist() + [0.0]


BETA_SHAPE = 0.6  # AUTOMATIC1111's Beta schedule alpha and beta


def beta_sigmas(table: DiscreteSigmas, steps: int) -> list[float]:
    quantiles = [beta_quantile(1 - i / max(steps - 1, 1), BETA_SHAPE, BETA_SHAPE) for i in range(steps)]
    return [table.sigma_min + q * (table.sigma_max - table.sigma_min) for q in quantiles] + [0.0]


def beta_quantile(p: float, a: float, b: float) -> float:
    """The x with I_x(a, b) = p (the Beta(a, b) distribution's quantile), by bisection to 1e-12."""
    low, high = 0.0, 1.0
    if p <= 0 or p >= 1:
        return float(p >= 1)
    while high - low > 1e-12:
        middle = (low + high) / 2
        low, high = (middle, high) if incomplete_beta(middle, a, b) < p else (low, middle)
    return (low + high) / 2


def incomplete_beta(x: float, a: float, b: float) -> float:
    """The regularised incomplete beta function I_x(a, b), by its continued fraction (modified Lentz),
    on the side of x where it converges fast (I_x(a, b) = 1 - I_{1-x}(b, a))."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1 - incomplete_beta(1 - x, b, a)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            numerator = 1.0
        elif i % 2 == 0:
            numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 + numerator * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + numerator / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1 - c * d) < 1e-15:
            break
    return front * (f - 1)


@dataclass(frozen=True)
class Schedule:
    name: str  # AUTOMATIC1111's "Schedule type" label
    sigmas: Callable[[DiscreteSigmas, int], list[float]] | None  # None: "Automatic", the sampler's own


SCHEDULES = {schedule.name: schedule for schedule in (
    Schedule("Automatic", None),
    Schedule("Uniform", uniform_sigmas),
    Schedule("Karras", karras_sigmas),
    Schedule("Exponential", exponential_sigmas),
    Schedule("SGM Uniform", sgm_uniform_sigmas),
    Schedule("Simple", simple_sigmas),
    Schedule("Normal", normal_sigmas),
    Schedule("KL Optimal", kl_optimal_sigmas),
    Schedule("Align Your Steps", align_your_steps_sigmas),
    Schedule("Beta", beta_sigmas),
)}


def get_schedule(name: str) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"schedule {name!r} is not known; use one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def check_steps(steps: int, T: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be a whole number between 1 and {T}, got {steps!r}")
    return steps


def schedule_sigmas(name: str, table: DiscreteSigmas, steps: int) -> list[float]:
    """The noise levels of schedule ``name`` (not "Automatic") for ``steps`` steps, ending with 0."""
    schedule = get_schedule(name)
    if schedule.sigmas is None:
        raise ValueError("'Automatic' stands for a sampler's own schedule; resolve it with the sampler first")
    return schedule.sigmas(table, check_steps(steps, len(table)))


# ---------------------------------------------------------------- timestep spacings

SPACINGS = ("leading", "linspace", "trailing")


def spaced_timesteps(T: int, steps: int, spacing: str, offset: int = 0) -> list[int]:
    """The decreasing integer timesteps of diffusers' multistep schedulers (Lin et al. 2023, table 2),
    numpy's float rounding (half to even) included:

        linspace  round(linspace(0, T - 1, n + 1))[::-1][:-1]          (n 10: 999, 899, ..., 100)
        leading   (arange(n + 1) * (T // (n + 1)))[::-1][:-1] + offset
        trailing  round(arange(T, 0, -T / n)) - 1                       (n 10: 999, 899, ..., 99)
    """
    check_steps(steps, T)
    if spacing == "linspace":
        timesteps = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        timesteps = (np.arange(0, steps + 1) * (T // (steps + 1))).round()[::-1][:-1] + offset
    elif spacing == "trailing":
        timesteps = np.arange(T, 0, -T / steps).round() - 1
    else:
        raise ValueError(f"timestep spacing {spacing!r} is not known; use one of {', '.join(SPACINGS)}")
    timesteps = [int(t) for t in timesteps]
    if len(set(timesteps)) < len(timesteps):  # a step of zero length: the solvers divide by it
        raise ValueError(f"{steps} steps of the {spacing!r} timestep spacing repeat a timestep of a {T}-step model; "
                         "use fewer steps or a sigma schedule")
    return timesteps


def timestep_sigmas(table: DiscreteSigmas, timesteps: list[int]) -> list[float]:
    """The table's noise levels at integer timesteps, and a final 0."""
    return [float(table.sigmas[t]) for t in timesteps] + [0.0]
