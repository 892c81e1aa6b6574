"""UniPC (Zhao et al. 2023, "UniPC: a unified predictor-corrector framework"), data prediction
(predict x0), as a plain function over a denoiser in sigma space ``model(x, sigma, **extra) -> D``.

Written in the variance-exploding state x = x0 + sigma eps; the paper's and diffusers' DDPM-state
formulas divided by alpha_t are these (their alpha_t factors cancel).

Symbols, code name -> paper:
    lam             -> lambda = -log sigma, the half log-SNR
    h               -> lambda_t - lambda_{s0}, the step in lambda
    hh              -> -h (data prediction integrates in -lambda)
    h_phi_1         -> h phi_1(h) = e^{hh} - 1
    B_h             -> B(h): hh (variant "bh1") or e^{hh} - 1 ("bh2")
    m               -> the model's x0 estimates D at the points visited, newest last
    r_k             -> (lambda_{s_k} - lambda_{s0}) / h, of the k-th older point
    D1_k            -> (m_k - m_0) / r_k
    R, b            -> the order conditions R rho = b, R_jk = r_k^(j-1), b_j = phi_{j+1}(hh) j! / B(h)
    rhos_p, rhos_c  -> the predictor's (UniP) and corrector's (UniC) coefficients

Step i, at the state x_i of noise level sigma_i:
    1. the model's estimate m_i = D(x_i; sigma_i)
    2. UniC (i > 0): x_i <- x_{i-1} advanced again to sigma_i, now with m_i (no extra model call)
    3. UniP: x_{i+1} = (sigma_{i+1} / sigma_i) x_i - h_phi_1 m_i - B_h sum_k rhos_p[k] D1_k
The order is min(order, steps - i, i + 1): it warms up and lowers on the last step
(diffusers' ``lower_order_final``), whose step to sigma 0 returns m_{n-1}.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ldm.sampling.k_samplers import Model, denoise_step, state
from ldm.sampling.steps import BeforeStep, Callback, StepInfo

VARIANTS = ("bh1", "bh2")


def order_conditions(rks: list[float], hh: float, variant: str) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(R, b, h_phi_1, B_h) for the points r_1..r_{p-1} and r_p = 1, in float64."""
    h_phi_1 = math.expm1(hh)
    B_h = hh if variant == "bh1" else math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    rows, b = [], []
    for j in range(1, len(rks) + 1):
        rows.append([r ** (j - 1) for r in rks])
        b.append(h_phi_k * factorial / B_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.tensor(rows, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), h_phi_1, B_h


def differences(ms: list[torch.Tensor], lams: list[float], h: float,
                count: int) -> tuple[list[float], list[torch.Tensor]]:
    """r_k and D1_k of the ``count`` points before the newest of ``ms``/``lams``."""
    rks, d1s = [], []
    for k in range(1, count + 1):
        rk = (lams[-1 - k] - lams[-1]) / h
        rks.append(rk)
        d1s.append((ms[-1 - k] - ms[-1]) / rk)
    return rks, d1s


def predictor(x: torch.Tensor, ms: list[torch.Tensor], lams: list[float], sigma: float, sigma_next: float,
              order: int, variant: str) -> torch.Tensor:
    """UniP-p from the newest point of ``ms`` (at ``sigma``) to ``sigma_next``."""
    if sigma_next == 0:
        return ms[-1]  # the limit of order 1 to sigma 0 (h_phi_1 = -1, sigma_next / sigma = 0), for bh1 too
    h = -math.log(sigma_next) - lams[-1]
    rks, d1s = differences(ms, lams, h, order - 1)
    R, b, h_phi_1, B_h = order_conditions(rks + [1.0], -h, variant)
    x_next = (sigma_next / sigma) * x - h_phi_1 * ms[-1]
    if d1s:
        rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        x_next = x_next - B_h * sum(rho * d1 for rho, d1 in zip(rhos, d1s))
    return x_next


def corrector(x_prev: torch.Tensor, ms: list[torch.Tensor], lams: list[float], sigma_prev: float, sigma: float,
              denoised: torch.Tensor, order: int, variant: str) -> torch.Tensor:
    """UniC-p: the step from the newest point of ``ms`` (x_prev at ``sigma_prev``) to ``sigma`` again,
    with the model's estimate ``denoised`` there."""
    h = -math.log(sigma) - lams[-1]
    rks, d1s = differences(ms, lams, h, order - 1)
    R, b, h_phi_1, B_h = order_conditions(rks + [1.0], -h, variant)
    rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
    correction = rhos[-1] * (denoised - ms[-1])
    for rho, d1 in zip(rhos[:-1], d1s):
        correction = correction + rho * d1
    return (sigma / sigma_prev) * x_prev - h_phi_1 * ms[-1] - B_h * correction


def unipc(model: Model, x: torch.Tensor, sigmas: Sequence[float], *, order: int = 2, variant: str = "bh2",
          extra_args: dict | None = None, callback: Callback | None = None,
          should_stop: Callable[[], bool] | None = None, before_step: BeforeStep | None = None) -> torch.Tensor:
    """UniPC with the corrector at every step but after the last (diffusers' ``UniPCMultistepScheduler``
    with predict_x0, ``lower_order_final`` and no ``disable_corrector``). n denoiser calls."""
    if variant not in VARIANTS:
        raise ValueError(f"UniPC variant {variant!r} is not known; use one of {', '.join(VARIANTS)}")
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    x, total = state(x), len(sigmas) - 1
    ms: list[torch.Tensor] = []
    lams: list[float] = []
    x_prev, last_order = None, None
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, denoised = denoise_step(model, x, sigma, i, total, extra_args=extra_args, should_stop=should_stop,
                                   before_step=before_step)
        if x_prev is not None:
            x = corrector(x_prev, ms, lams, sigmas[i - 1], sigma, denoised, last_order, variant)
        ms, lams = (ms + [denoised])[-order:], (lams + [-math.log(sigma)])[-order:]
        last_order = min(order, total - i, i + 1)
        x_prev = x
        x = predictor(x, ms, lams, sigma, sigma_next, last_order, variant)
        if callback is not None:
            callback(StepInfo(i, total, sigma, x, denoised))
    return x
