"""What every sampler shares: the report of a finished step, stopping between steps, and the hook
called before each step.

A sampler is a plain function over a denoiser (``ddim_sample`` is one). It calls, at every step and
in this order: ``check_stop``, ``before_step`` (when given), the denoiser (twice in a second-order
step), then ``callback`` with a ``StepInfo``. Keeping that order keeps each image's noise draws in
the same order whatever the hook.

DDIM's state is the DDPM one, x = sqrt(abar) x0 + sqrt(1 - abar) eps; the samplers in sigma space
(``ldm.sampling.k_samplers``, ``unipc``, ``lcm``) keep x = x0 + sigma eps, so their hook gets
signal 1 and noise sigma, and their ``StepInfo.t`` is the sigma just denoised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch


class StepInfo(NamedTuple):
    step: int  # 0-based index of the finished step
    total: int
    t: float  # the noise level just denoised (DDIM: its timestep; samplers in sigma space: its sigma)
    x: torch.Tensor  # the state after the step
    denoised: torch.Tensor  # predicted x0 at this step


class SamplingCancelled(Exception):
    """Raised between steps when ``should_stop`` says so."""

    def __init__(self, step: int, total: int):
        super().__init__(f"sampling stopped after {step} of {total} steps")
        self.step, self.total = step, total


Callback = Callable[[StepInfo], None]
# before_step(x, signal, noise) -> x, called before the denoiser at every step with the state x at
# the noise level x = signal * x0 + noise * epsilon of that step (DDIM: sqrt(abar_t), sqrt(1 - abar_t);
# samplers in sigma space: 1, sigma).
BeforeStep = Callable[[torch.Tensor, float, float], torch.Tensor]


def check_stop(should_stop: Callable[[], bool] | None, step: int, total: int) -> None:
    """Raise ``SamplingCancelled`` before step ``step`` (0-based) of ``total`` when ``should_stop()``."""
    if should_stop is not None and should_stop():
        raise SamplingCancelled(step, total)
