"""The UNet as a denoiser: ``denoiser(x_t, t, **conditioning) -> epsilon``, and the same denoiser in
sigma space, ``denoiser(x, sigma, **conditioning) -> denoised``, for the k-diffusion samplers.

This is the one place where a network's output is converted from its parameterisation:

- ``eps``: the network predicts the noise epsilon;
- ``v``:   v = sqrt(abar_t) * eps - sqrt(1 - abar_t) * x0, so eps = sqrt(abar_t) * v + sqrt(1 - abar_t) * x_t;
- ``x0``:  the network predicts the clean latent, so eps = (x_t - sqrt(abar_t) * x0) / sqrt(1 - abar_t).

All three are linear in the network output at fixed x_t, so guidance on epsilon equals guidance on
the raw output, as in the original samplers. A fractional t (from a sigma between two table entries)
converts with alpha-bar at that t as ``ldm.sampling.sigmas.alpha_bar_at`` interpolates it, which is
1 / (1 + sigma^2) for the sigma the sampler asked for, and the table's own value at an integer t.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.sampling.sigmas import DiscreteSigmas, alpha_bar_at

PARAMETERIZATIONS = ("eps", "v", "x0")


def check_parameterization(kind: str) -> str:
    if kind not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {kind!r}; known: {', '.join(PARAMETERIZATIONS)}")
    return kind


def output_to_eps(output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, kind: str) -> torch.Tensor:
    """Epsilon from a network output; ``alpha_bar`` is (B,) alpha-bar at each sample's timestep."""
    a = alpha_bar.to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
    if kind == "eps":
        return output
    if kind == "v":
        return a.sqrt() * output + (1 - a).sqrt() * x_t
    if kind == "x0":
        return (x_t - a.sqrt() * output) / (1 - a).sqrt()
    raise ValueError(f"unknown parameterization {kind!r}; known: {', '.join(PARAMETERIZATIONS)}")


def training_target(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor, kind: str) -> torch.Tensor:
    """What a network of parameterisation ``kind`` should output for x_t = sqrt(abar) x0 + sqrt(1 - abar) eps."""
    a = alpha_bar.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    if kind == "eps":
        return eps
    if kind == "v":
        return a.sqrt() * eps - (1 - a).sqrt() * x0
    if kind == "x0":
        return x0
    raise ValueError(f"unknown parameterization {kind!r}; known: {', '.join(PARAMETERIZATIONS)}")


class EpsDenoiser:
    """Wraps a UNet. ``concat`` channels are appended after x_t (x first, as the original does),
    ``context`` goes to cross-attention, ``y`` to the class/ADM embedding."""

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, parameterization: str):
        self.unet = unet
        self.alphas_cumprod = alphas_cumprod
        self.parameterization = check_parameterization(parameterization)

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        context: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        output = self.network_output(x, t, context=context, concat=concat, y=y)
        alpha_bar = alpha_bar_at(self.alphas_cumprod, t)
        return output_to_eps(output, x, alpha_bar, self.parameterization)

    def network_output(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        context: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The UNet's raw output, in its own parameterisation (what training compares to its target)."""
        inputs = x if concat is None else torch.cat([x, concat.to(x)], dim=1)
        return self.unet(inputs, t, context=context, y=y)


class SigmaDenoiser:
    """An epsilon denoiser ``(x_t, t, **extra) -> eps`` seen in sigma space (k-diffusion's
    ``CompVisDenoiser``): ``denoiser(x, sigma, **extra) -> D``, the estimate of x0 from the state
    x = x0 + sigma * eps at noise level ``sigma`` (a float, the same for the whole batch).

    The network sees x * c_in, c_in = 1 / sqrt(sigma^2 + 1) = sqrt(abar) (the DDPM state), at the
    fractional timestep t(sigma) of log-sigma interpolation (no quantisation, as AUTOMATIC1111 by
    default), as a float64 (B,) tensor; then D = x - sigma * eps. For a v model this is
    c_skip x + c_out v with c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1).
    """

    def __init__(self, denoiser, table: DiscreteSigmas):
        self.denoiser = denoiser
        self.table = table

    def timestep(self, sigma: float) -> float:
        return self.table.timestep(sigma)

    def __call__(self, x: torch.Tensor, sigma: float, **extra) -> torch.Tensor:
        c_in = 1 / (sigma**2 + 1) ** 0.5
        t = torch.full((x.shape[0],), self.timestep(sigma), dtype=torch.float64, device=x.device)
        eps = self.denoiser(x * c_in, t, **extra)
        return x - sigma * eps.to(x.dtype)
