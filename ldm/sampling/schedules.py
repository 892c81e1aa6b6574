"""Noise schedules of the DDPM forward process and the DDIM discretisation of the original code.

``alphas_cumprod[t]`` is alpha-bar_t = prod_{s<=t} (1 - beta_s), for t in 0..T-1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ldm.sampling.sigmas import DiscreteSigmas

SCHEDULE_KINDS = ("linear", "cosine", "sqrt_linear", "sqrt")


@dataclass(frozen=True)
class ScheduleConfig:
    """``linear`` is the LDM/SD schedule: linspace(sqrt(start), sqrt(end), T) ** 2."""

    kind: str = "linear"
    timesteps: int = 1000
    linear_start: float = 1e-4
    linear_end: float = 2e-2
    cosine_s: float = 8e-3

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule kind {self.kind!r} is not known; use one of {', '.join(SCHEDULE_KINDS)}")
        if self.timesteps < 1:
            raise ValueError(f"schedule timesteps must be at least 1, got {self.timesteps}")


def make_betas(config: ScheduleConfig) -> torch.Tensor:
    """beta_t for t in 0..T-1, float64 on the CPU (also inside a meta-device build)."""
    T, start, end = config.timesteps, config.linear_start, config.linear_end
    if config.kind == "linear":
        return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64, device="cpu") ** 2
    if config.kind == "sqrt_linear":
        return torch.linspace(start, end, T, dtype=torch.float64, device="cpu")
    if config.kind == "sqrt":
        return torch.linspace(start, end, T, dtype=torch.float64, device="cpu") ** 0.5
    # cosine (Nichol & Dhariwal 2021): alpha-bar(t) = cos((t/T + s) / (1 + s) * pi/2)^2, betas clipped at 0.999
    steps = torch.arange(T + 1, dtype=torch.float64, device="cpu") / T + config.cosine_s
    alpha_bar = torch.cos(steps / (1 + config.cosine_s) * math.pi / 2) ** 2
    alpha_bar = alpha_bar / alpha_bar[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(0, 0.999)


def make_alphas_cumprod(config: ScheduleConfig) -> torch.Tensor:
    """alpha-bar_t for t in 0..T-1, float64."""
    return torch.cumprod(1.0 - make_betas(config), dim=0)


@dataclass(frozen=True)
class DDIMSchedule:
    """The timesteps a DDIM run visits (ascending) with alpha-bar at each and at the step after it."""

    timesteps: torch.Tensor  # (S,) int64, ascending (float64 when made from a sigma schedule)
    alphas: torch.Tensor  # (S,) float64, alpha-bar_t
    alphas_prev: torch.Tensor  # (S,) float64, alpha-bar of the next timestep down

    def __len__(self) -> int:
        return len(self.timesteps)


def ddim_schedule(alphas_cumprod: torch.Tensor, steps: int) -> DDIMSchedule:
    """The original 'uniform' discretisation: every (T // steps)-th timestep plus one, so 50 steps visit
    1, 21, ..., 981. Counts that do not divide T visit range(1, T, T // steps), as the original does
    (30 steps give 31); above T/2 the original would index past T, and those give T - 1 steps here.
    The last step goes to alpha-bar at index 0, not to 1."""
    T = len(alphas_cumprod)
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and {T}, got {steps}")
    timesteps = torch.arange(0, T, T // steps, dtype=torch.long, device="cpu") + 1
    timesteps = timesteps[timesteps < T]
    alphas = alphas_cumprod[timesteps]
    alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[timesteps[:-1]]])
    return DDIMSchedule(timesteps, alphas, alphas_prev)


def ddim_schedule_from_sigmas(table: DiscreteSigmas, sigmas: list[float]) -> DDIMSchedule:
    """DDIM over the noise levels of a sigma schedule (``ldm.sampling.sigmas``, decreasing, ending with 0):
    alpha-bar = 1 / (1 + sigma^2) at each, the fractional timestep t(sigma) of each as float64, and the
    last step going to alpha-bar 1 (sigma 0), where it returns its predicted x0."""
    levels = sigmas[:-1][::-1]  # ascending, as DDIMSchedule holds them
    timesteps = torch.tensor([table.timestep(s) for s in levels], dtype=torch.float64)
    alphas = 1 / (1 + torch.tensor(levels, dtype=torch.float64) ** 2)
    alphas_prev = 1 / (1 + torch.tensor(sigmas[1:][::-1], dtype=torch.float64) ** 2)
    return DDIMSchedule(timesteps, alphas, alphas_prev)
