"""Classifier-free guidance as a denoiser wrapper: eps = eps_u + s * (eps_c - eps_u).

The conditional and unconditional branches run as one batch ``[uncond, cond]``; at ``s == 1`` (or
with no unconditional conditioning) only the conditional branch runs. A negative prompt is simply
the unconditional conditioning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

Denoiser = Callable[..., torch.Tensor]


def _batch_conditioning(uncond: Mapping[str, torch.Tensor | None], cond: Mapping[str, torch.Tensor | None]) -> dict:
    if uncond.keys() != cond.keys():
        raise ValueError(f"conditional keys {sorted(cond)} and unconditional keys {sorted(uncond)} differ")
    batched = {}
    for key, c in cond.items():
        u = uncond[key]
        if (u is None) != (c is None):
            raise ValueError(f"conditioning {key!r} is given for one branch of guidance only")
        batched[key] = None if c is None else torch.cat([u, c])
    return batched


class ClassifierFreeGuidance:
    def __init__(self, denoiser: Denoiser, scale: float):
        self.denoiser = denoiser
        self.scale = float(scale)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *, cond: Mapping, uncond: Mapping | None = None) -> torch.Tensor:
        if uncond is None or self.scale == 1.0:
            return self.denoiser(x, t, **cond)
        both = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), **_batch_conditioning(uncond, cond))
        eps_uncond, eps_cond = both.chunk(2)
        return eps_uncond + self.scale * (eps_cond - eps_uncond)
