"""The samplers a request can name, each a plain function over a denoiser.

A sampler runs ``steps`` steps of a denoiser ``denoiser(x, t, **extra_args) -> epsilon`` from
``x_T`` under the model's ``alphas_cumprod``, drawing any noise from ``generator`` and calling the
shared hooks of ``ldm.sampling.steps``. Adding one is one module with its function and one line in
``SAMPLERS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ldm.sampling.ddim import ddim_sample
from ldm.sampling.schedules import ddim_schedule


@dataclass(frozen=True)
class Sampler:
    name: str  # as the parameters text names it (AUTOMATIC1111's names)
    # run(denoiser, x_T, alphas_cumprod, steps, *, eta, generator, extra_args, callback, should_stop, before_step)
    run: Callable[..., torch.Tensor]
    eta_field: str  # the parameters text's key for its eta


def run_ddim(denoiser, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int, **options) -> torch.Tensor:
    """DDIM over the original's uniform discretisation of ``steps`` timesteps."""
    return ddim_sample(denoiser, x_T, ddim_schedule(alphas_cumprod, steps), **options)


SAMPLERS = {sampler.name: sampler for sampler in (
    Sampler("DDIM", run_ddim, "Eta DDIM"),
)}


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is not known; use one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
