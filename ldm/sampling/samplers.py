"""The samplers a request can name (``SAMPLERS``, by AUTOMATIC1111's 1.9+ names), each a plain
function over a denoiser, and the schedules they can walk (``ldm.sampling.sigmas.SCHEDULES``).

Every sampler has one seam:

    run(denoiser, x_T, alphas_cumprod, steps, *, eta, generator, extra_args=None, callback=None,
        should_stop=None, before_step=None, schedule="Automatic", s_noise=1.0, init=None, skip=0) -> x_0

``denoiser(x_t, t, **extra_args) -> epsilon`` is the (guided, tiled) epsilon denoiser; ``x_T`` is
unit Gaussian noise drawn from ``generator`` (one generator per image), which the sampler draws its
own noise from too; the hooks are those of ``ldm.sampling.steps``. Samplers other than DDIM see the
denoiser through ``ldm.sampling.denoiser.SigmaDenoiser``. ``eta`` is ignored by samplers with no
``eta_field``; ``s_noise`` (the scale of the noise added, 1 by default) is used by those with
``s_noise`` True.

Image to image starts part-way down the schedule: ``init`` is the clean latent of the image and
``skip`` the number of leading steps of the ``steps``-step schedule left out; the run starts from
``init`` noised with ``x_T`` to the level of the first step it takes (``noised``: x0 + sigma x_T in
sigma space, sqrt(abar) x0 + sqrt(1 - abar) x_T for DDIM), as diffusers' ``add_noise`` and
AUTOMATIC1111's img2img do, and runs the remaining ``steps - skip``. ``skip`` equal to ``steps``
runs none and returns ``init``.

    Sampler       Automatic schedule         eta key    eta default  starts from
    DDIM          its own (T // n, + 1)      Eta DDIM   0            x_T (the DDPM state)
    Euler         Uniform                    -          -            sigma_0 x_T
    Euler a       Uniform                    Eta        1            sigma_0 x_T
    Heun          Uniform                    -          -            sigma_0 x_T
    DPM++ 2M      Karras                     -          -            sigma_0 x_T
    DPM++ 2M SDE  Exponential                Eta        1            sigma_0 x_T
    DPM++ SDE     Karras                     Eta        1            sigma_0 x_T
    UniPC         its own ("linspace")       -          -            sqrt(1 + sigma_0^2) x_T
    LCM           its own (LCM's grid)       -          -            sqrt(1 + sigma_0^2) x_T

The k-diffusion samplers start as k-diffusion and AUTOMATIC1111 do, x = sigma_0 x_T (diffusers'
``init_noise_sigma`` for "linspace" and "trailing"; its "leading" spacing, SGM and ComfyUI use
sqrt(1 + sigma_0^2), 0.23 % more at SD's sigma_0 = 14.61). UniPC and LCM start as diffusers'
``UniPCMultistepScheduler`` and ``LCMScheduler`` do, from the DDPM state x_T, which is
sqrt(1 + sigma_0^2) x_T in sigma space, on any schedule. UniPC is diffusers' default (bh2, order 2,
corrector on, "linspace" timesteps), not AUTOMATIC1111's (bh1, order 3, "time_uniform"); ``unipc``
takes both. With another schedule than "Automatic", DDIM runs eq. 12 at alpha-bar = 1 / (1 + sigma^2)
of each level, its last step to alpha-bar 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ldm.sampling import k_samplers
from ldm.sampling.ddim import ddim_sample
from ldm.sampling.denoiser import SigmaDenoiser
from ldm.sampling.lcm import ConsistencyBoundary, lcm, lcm_timesteps
from ldm.sampling.schedules import DDIMSchedule, ddim_schedule, ddim_schedule_from_sigmas
from ldm.sampling.sigmas import (
    SCHEDULES,
    DiscreteSigmas,
    get_schedule,
    schedule_sigmas,
    spaced_timesteps,
    timestep_sigmas,
)
from ldm.sampling.unipc import unipc


@dataclass(frozen=True)
class Sampler:
    name: str  # as the parameters text names it (AUTOMATIC1111's names)
    # run(denoiser, x_T, alphas_cumprod, steps, *, eta, generator, extra_args, callback, should_stop, before_step,
    #     schedule="Automatic", s_noise=1.0)
    run: Callable[..., torch.Tensor]
    eta_field: str | None  # the parameters text's key for its eta; None: it takes no eta
    eta_default: float = 0.0  # AUTOMATIC1111's: 0 for DDIM, 1 for the ancestral and SDE samplers
    automatic: str | None = None  # the schedule "Automatic" stands for; None: the sampler's own timesteps
    s_noise: bool = False  # whether it takes s_noise


def sigma_space(denoiser, alphas_cumprod: torch.Tensor, steps: int, schedule: str,
                automatic: str, skip: int = 0) -> tuple[SigmaDenoiser, list[float]]:
    table = DiscreteSigmas(alphas_cumprod)
    sigmas = schedule_sigmas(automatic if schedule == "Automatic" else schedule, table, steps)
    return SigmaDenoiser(denoiser, table), part_way(sigmas, skip)


def check_skip(skip: int, steps: int) -> None:
    if isinstance(skip, bool) or not isinstance(skip, int) or not 0 <= skip <= steps:
        raise ValueError(f"the steps to skip must be a whole number from 0 to the {steps} steps, got {skip!r}")


def noised(init: torch.Tensor, x_T: torch.Tensor, sigma: float) -> torch.Tensor:
    """The clean latent ``init`` noised with unit noise ``x_T`` to level ``sigma``, in sigma space
    (x0 + sigma eps), in float32 or wider: the forward process at any step of any schedule."""
    return k_samplers.state(init) + k_samplers.state(x_T) * sigma


def part_way(sigmas: list[float], skip: int) -> list[float]:
    """The levels left after ``skip`` steps of a schedule (one step fewer per level dropped)."""
    check_skip(skip, len(sigmas) - 1)
    return sigmas[skip:]


def ve_start(x_T: torch.Tensor, sigmas: list[float], init: torch.Tensor | None = None) -> torch.Tensor:
    """Unit noise scaled to sigma_0 (k-diffusion's start), in float32 or wider; or ``init`` noised to sigma_0."""
    return k_samplers.state(x_T) * sigmas[0] if init is None else noised(init, x_T, sigmas[0])


def vp_start(x_T: torch.Tensor, sigmas: list[float], init: torch.Tensor | None = None) -> torch.Tensor:
    """Unit noise as the DDPM state at sigma_0, in sigma space: sqrt(1 + sigma_0^2) x_T; or ``init``
    noised to sigma_0."""
    return k_samplers.state(x_T) * (1 + sigmas[0] ** 2) ** 0.5 if init is None else noised(init, x_T, sigmas[0])


def finished(init: torch.Tensor, sigmas: list[float]) -> bool:
    """Whether a part-way run has no step left (strength 0): it returns its image's latent."""
    return init is not None and len(sigmas) < 2


def run_ddim(denoiser, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int, *, schedule: str = "Automatic",
             s_noise: float = 1.0, init: torch.Tensor | None = None, skip: int = 0, **options) -> torch.Tensor:
    """DDIM over the original's uniform discretisation of ``steps`` timesteps, or over a sigma schedule;
    part-way, the lowest ``steps - skip`` timesteps run, from ``init`` noised to the first of them."""
    if get_schedule(schedule).sigmas is None:
        full = ddim_schedule(alphas_cumprod, steps)
    else:
        table = DiscreteSigmas(alphas_cumprod)
        full = ddim_schedule_from_sigmas(table, schedule_sigmas(schedule, table, steps))
    if init is None:
        return ddim_sample(denoiser, x_T, full, **options)
    check_skip(skip, steps)
    run = min(len(full), steps - skip)  # the original's grid has a step more where steps do not divide T
    kept = DDIMSchedule(full.timesteps[:run], full.alphas[:run], full.alphas_prev[:run])
    if len(kept) == 0:
        return init
    a = float(kept.alphas[-1])
    start = a**0.5 * k_samplers.state(init) + (1 - a) ** 0.5 * k_samplers.state(x_T)  # the DDPM forward process
    return ddim_sample(denoiser, start.to(x_T.dtype), kept, **options)


def k_diffusion_run(solver, automatic: str, denoiser, x_T, alphas_cumprod, steps, schedule, init, skip, **solver_args):
    """A k-diffusion solver over the sampler's schedule ("Automatic": ``automatic``), from sigma_0 x_T
    or part-way from ``init``."""
    model, sigmas = sigma_space(denoiser, alphas_cumprod, steps, schedule, automatic, skip)
    if finished(init, sigmas):
        return init
    return solver(model, ve_start(x_T, sigmas, init), sigmas, **solver_args).to(x_T.dtype)


def run_euler(denoiser, x_T, alphas_cumprod, steps, *, generator, schedule="Automatic", eta=0.0, s_noise=1.0,
              init=None, skip=0, **hooks):
    return k_diffusion_run(k_samplers.euler, "Uniform", denoiser, x_T, alphas_cumprod, steps, schedule, init, skip,
                           **hooks)


def run_euler_ancestral(denoiser, x_T, alphas_cumprod, steps, *, generator, schedule="Automatic", eta=1.0,
                        s_noise=1.0, init=None, skip=0, **hooks):
    return k_diffusion_run(k_samplers.euler_ancestral, "Uniform", denoiser, x_T, alphas_cumprod, steps, schedule, init,
                           skip, generator=generator, eta=eta, s_noise=s_noise, **hooks)


def run_heun(denoiser, x_T, alphas_cumprod, steps, *, generator, schedule="Automatic", eta=0.0, s_noise=1.0,
             init=None, skip=0, **hooks):
    return k_diffusion_run(k_samplers.heun, "Uniform", denoiser, x_T, alphas_cumprod, steps, schedule, init, skip,
                           **hooks)


def run_dpmpp_2m(denoiser, x_T, alphas_cumprod, steps, *, generator, schedule="Automatic", eta=0.0, s_noise=1.0,
                 init=None, skip=0, **hooks):
    return k_diffusion_run(k_samplers.dpmpp_2m, "Karras", denoiser, x_T, alphas_cumprod, steps, schedule, init, skip,
                           **hooks)


def run_dpmpp_2m_sde(denoiser, x_T, alphas_cumprod, steps, *, generator, schedule="Automatic", eta=1.0, s_noise=1.0,
                     init=None, skip=0, **hooks):
    return k_diffusion_run(k_samplers.dpmpp_2m_sde, "Exponential", denoiser, x_T, alphas_cumprod, steps, schedule, init,
                           skip, generator=generator, eta=eta, s_noise=s_noise, **hooks)


def run_dpmpp_sde(denoiser, x_T, alphas_cumprod, steps, *, generator, schedule="Automatic", eta=1.0, s_noise=1.0,
                  init=None, skip=0, **hooks):
    return k_diffusion_run(k_samplers.dpmpp_sde, "Karras", denoiser, x_T, alphas_cumprod, steps, schedule, init, skip,
                           generator=generator, eta=eta, s_noise=s_noise, **hooks)


def own_or_scheduled(table: DiscreteSigmas, schedule: str, steps: int, skip: int,
                     own_timesteps: Callable[[], list[int]]) -> list[float]:
    """The levels of a sampler with timesteps of its own: those on "Automatic", the schedule's otherwise;
    ``skip`` of them left out."""
    if get_schedule(schedule).sigmas is None:
        return part_way(timestep_sigmas(table, own_timesteps()), skip)
    return part_way(schedule_sigmas(schedule, table, steps), skip)


def run_unipc(denoiser, x_T, alphas_cumprod, steps, *, generator, schedule="Automatic", eta=0.0, s_noise=1.0,
              spacing: str = "linspace", init=None, skip=0, **hooks):
    """UniPC bh2 of order 2 (diffusers' defaults); "Automatic" is the integer grid of ``spacing``."""
    table = DiscreteSigmas(alphas_cumprod)
    sigmas = own_or_scheduled(table, schedule, steps, skip, lambda: spaced_timesteps(len(table), steps, spacing))
    if finished(init, sigmas):
        return init
    return unipc(SigmaDenoiser(denoiser, table), vp_start(x_T, sigmas, init), sigmas, **hooks).to(x_T.dtype)


def run_lcm(denoiser, x_T, alphas_cumprod, steps, *, generator, schedule="Automatic", eta=0.0, s_noise=1.0,
            init=None, skip=0, **hooks):
    """LCM; "Automatic" is LCM's own grid of at most 50 steps."""
    table = DiscreteSigmas(alphas_cumprod)
    sigmas = own_or_scheduled(table, schedule, steps, skip, lambda: lcm_timesteps(len(table), steps))
    if finished(init, sigmas):
        return init
    model = ConsistencyBoundary(SigmaDenoiser(denoiser, table), table.timestep)
    return lcm(model, vp_start(x_T, sigmas, init), sigmas, generator=generator, **hooks).to(x_T.dtype)


SAMPLERS = {sampler.name: sampler for sampler in (
    Sampler("DDIM", run_ddim, "Eta DDIM"),
    Sampler("Euler", run_euler, None, automatic="Uniform"),
    Sampler("Euler a", run_euler_ancestral, "Eta", 1.0, "Uniform", s_noise=True),
    Sampler("Heun", run_heun, None, automatic="Uniform"),
    Sampler("DPM++ 2M", run_dpmpp_2m, None, automatic="Karras"),
    Sampler("DPM++ 2M SDE", run_dpmpp_2m_sde, "Eta", 1.0, "Exponential", s_noise=True),
    Sampler("DPM++ SDE", run_dpmpp_sde, "Eta", 1.0, "Karras", s_noise=True),
    Sampler("UniPC", run_unipc, None),
    Sampler("LCM", run_lcm, None),
)}


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is not known; use one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def resolve_schedule(sampler: str, schedule: str) -> str:
    """The schedule a sampler runs for ``schedule``, as AUTOMATIC1111 writes its "Schedule type":
    "Automatic" becomes the sampler's default, and stays "Automatic" for a sampler with its own timesteps."""
    get_schedule(schedule)
    if schedule != "Automatic":
        return schedule
    return get_sampler(sampler).automatic or "Automatic"


class SamplerName(NamedTuple):
    sampler: str
    schedule: str | None  # None: the label names no schedule


def split_sampler_name(label: str) -> SamplerName:
    """A sampler label of AUTOMATIC1111 up to 1.8, which fused the schedule onto the name:
    "DPM++ 2M Karras" -> ("DPM++ 2M", "Karras"), "Euler a" -> ("Euler a", None). A label with no
    schedule meant k-diffusion's default sigmas there ("Uniform"); from 1.9 the schedule is a field of its
    own ("Schedule type"), and 1.9 reads a fused schedule that equals the sampler's default as "Automatic",
    which runs the same sigmas."""
    if label in SAMPLERS:
        return SamplerName(label, None)
    for schedule in sorted((s for s in SCHEDULES if s != "Automatic"), key=len, reverse=True):
        base = label.removesuffix(" " + schedule)
        if base != label and base in SAMPLERS:
            return SamplerName(base, schedule)
    raise ValueError(f"sampler {label!r} is not known; use one of {', '.join(SAMPLERS)}, optionally followed by "
                     f"one of {', '.join(s for s in SCHEDULES if s != 'Automatic')}")
