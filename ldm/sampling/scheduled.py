"""Conditioning that changes with the step (prompt editing ``[a:b:when]`` and alternation ``[a|b]``)
as a denoiser wrapper: the sampler stays a plain function and passes its arguments as it always does.

``ScheduledConditioning(denoiser, entries)`` calls ``denoiser(x, t, **extra)`` with the ``extra`` of
the current step: the first entry whose ``until_step`` (1-based) is at or after it. It learns the
step from the sampler's callback (``step_done``), so every denoiser call within one step (both of a
second-order step) sees the same conditioning. Step ``i`` (0-based, as ``StepInfo.step``) is step
``i + 1`` of the schedule; AUTOMATIC1111 compares its 0-based counter to the same 1-based bounds, so
there each prompt but the last lasts one step longer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from ldm.sampling.steps import Callback, StepInfo


class ScheduledExtra(NamedTuple):
    until_step: int  # the last step (1-based) these arguments are used for
    extra: dict  # the denoiser's keyword arguments


class ScheduledConditioning:
    def __init__(self, denoiser: Callable[..., torch.Tensor], entries: list[ScheduledExtra]):
        if not entries:
            raise ValueError("a conditioning schedule needs at least one entry")
        self.denoiser = denoiser
        self.entries = entries
        self.step = 1  # the 1-based step being sampled; one object serves one sampling run

    def extra_at(self, step: int) -> dict:
        for entry in self.entries:
            if step <= entry.until_step:
                return entry.extra
        return self.entries[-1].extra

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **_ignored) -> torch.Tensor:
        return self.denoiser(x, t, **self.extra_at(self.step))

    def step_done(self, info: StepInfo) -> None:
        self.step = info.step + 2  # the next step, 1-based

    def callback(self, then: Callback | None) -> Callback:
        """The sampler's callback: advance the step, then call ``then``."""
        def done(info: StepInfo) -> None:
            self.step_done(info)
            if then is not None:
                then(info)
        return done
