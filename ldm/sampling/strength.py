"""Where image to image starts on a schedule: the step arithmetic of a denoising strength.

A strength s in [0, 1] says how far down the noise schedule the image is sent before it is
denoised again: 0 keeps it, 1 noises it to the schedule's top. Two conventions are in use, and both
are offered (``STEP_MODES``):

    "Strength x steps" (diffusers' StableDiffusionImg2ImgPipeline, the studio's default):
        the schedule of N steps is built, and its last min(int(N s), N) steps run; the image is
        noised to the level of the first of them. About N s steps run, so a low strength is fast.
    "Exact steps" (AUTOMATIC1111's "do exactly the amount of steps the slider specifies", which its
        hires fix always uses, and ComfyUI's KSampler denoise):
        a longer schedule of int(N / min(s, 0.999)) steps is built and its last N run.

Python's float arithmetic is kept as diffusers has it: 0.29 * 100 is 28.999..., so 28 steps.
"""

from __future__ import annotations

import math
from typing import NamedTuple

STEP_MODES = ("Strength x steps", "Exact steps")


class PartWay(NamedTuple):
    """A schedule of ``total`` steps of which the first ``skip`` are left out."""

    total: int
    skip: int

    @property
    def run(self) -> int:
        return self.total - self.skip


def check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ValueError(f"denoising strength must be a number from 0 (keep the image) to 1 (redraw it), got {strength!r}")
    if not 0 <= strength <= 1:
        raise ValueError(f"denoising strength must be from 0 (keep the image) to 1 (redraw it), got {strength:g}")
    return float(strength)


def check_step_mode(mode) -> str:
    if mode not in STEP_MODES:
        raise ValueError(f"img2img step mode {mode!r} is not known; use one of {', '.join(STEP_MODES)}")
    return mode


def part_way_steps(steps: int, strength: float, mode: str = STEP_MODES[0], longest: int = 500) -> PartWay:
    """The schedule length and the steps skipped for ``steps`` at ``strength`` under ``mode``. In
    "Exact steps" the longer schedule is at most ``longest`` steps (or ``steps``, if more): a lower
    strength than that allows runs as that one does (``exact_strength`` says which)."""
    strength = check_strength(strength)
    check_step_mode(mode)
    if mode == STEP_MODES[0]:
        run = min(int(steps * strength), steps)
        return PartWay(steps, steps - run)
    if strength == 0:
        return PartWay(steps, steps)
    # below the lowest exact strength it runs as that one does (and a tiny strength's quotient stays finite)
    strength = max(strength, lowest_exact_strength(steps, longest))
    total = min(int(steps / min(strength, 0.999)), max(steps, longest))
    return PartWay(total, total - steps)


def lowest_exact_strength(steps: int, longest: int = 500) -> float:
    """The lowest strength "Exact steps" gives as asked for ``steps``: below it, the schedule would be
    longer than ``longest``."""
    return min(1.0, steps / max(steps, longest))
