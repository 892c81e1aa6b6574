"""The samplers in sigma space (Euler, Euler a, Heun, DPM++ 2M, DPM++ 2M SDE, DPM++ SDE, UniPC, LCM),
their schedules and the registry, checked against diffusers' schedulers as an independent
implementation (fp32, the same tiny network on both sides, the same noise from the same per-image
generators), against closed forms, and for the seams every sampler shares: hooks, stopping, batches."""

from __future__ import annotations

import itertools
import math
import sys
import types

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)
from torch import nn

from ldm.sampling import k_samplers
from ldm.sampling.blending import LatentBlend
from ldm.sampling.ddim import ddim_sample
from ldm.sampling.denoiser import EpsDenoiser, SigmaDenoiser, output_to_eps
from ldm.sampling.lcm import lcm_timesteps
from ldm.sampling.noise import randn, seeded_generators
from ldm.sampling.samplers import (
    SAMPLERS,
    get_sampler,
    resolve_schedule,
    split_sampler_name,
)
from ldm.sampling.schedules import ddim_schedule
from ldm.sampling.sigmas import (
    ALIGN_YOUR_STEPS_SD1,
    SCHEDULES,
    DiscreteSigmas,
    alpha_bar_at,
    beta_quantile,
    get_schedule,
    incomplete_beta,
    schedule_sigmas,
    spaced_timesteps,
)
from ldm.sampling.steps import SamplingCancelled
from ldm.sampling.unipc import unipc
from tests.helpers import TOL, max_error

BASE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
# diffusers' own float32 alpha-bar, so that both sides sample the same model
AC = EulerDiscreteScheduler(**BASE).alphas_cumprod.double()
TABLE = DiscreteSigmas(AC)
SHAPE = (2, 4, 8, 8)
SEEDS = [3, 4]
KINDS = {"epsilon": "eps", "v_prediction": "v"}
CPU = torch.device("cpu")


class TinyNet(nn.Module):
    """A smooth network of (x_t, t) standing for a UNet: nonlinear, mixing channels, depending on t
    (fractional t too), read as eps or as v by ``EpsDenoiser``."""

    def __init__(self):
        super().__init__()
        self.mix = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.5
        self.calls: list[torch.Tensor] = []

    def forward(self, x, t, context=None, y=None):
        self.calls.append(t)
        t = t.float().view(-1, 1, 1, 1)
        mixed = torch.einsum("oc,bchw->bohw", self.mix, x)
        return 0.9 * x * torch.cos(t / 700) + 0.3 * torch.tanh(mixed + torch.sin(t / 90))


NET = TinyNet()


def noise(seeds=SEEDS, shape=SHAPE):
    """Initial noise and the generators after drawing it, as the tasks draw it."""
    generators = seeded_generators(seeds)
    return randn((len(seeds), *shape[1:]), generators, device=CPU, dtype=torch.float32), generators


def ours(name: str, kind: str, steps: int, seeds=SEEDS, net=NET, **options) -> torch.Tensor:
    x_T, generators = noise(seeds)
    denoiser = EpsDenoiser(net, AC, kind)
    options.setdefault("eta", get_sampler(name).eta_default)
    return get_sampler(name).run(denoiser, x_T, AC, steps, generator=generators, **options)


def diffusers_loop(scheduler, start: torch.Tensor, generators=None, timestep=None) -> torch.Tensor:
    """A diffusers pipeline's denoising loop around ``TinyNet``; ``timestep(i, t)`` replaces the
    timestep the network is given."""
    latents = start * scheduler.init_noise_sigma
    options = {} if generators is None else {"generator": generators}
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(latents, t)
        t_net = float(t) if timestep is None else timestep(i, t)
        output = NET(model_input, torch.full((start.shape[0],), t_net, dtype=torch.float64))
        latents = scheduler.step(output, t, latents, **options).prev_sample
    return latents


def reference(scheduler, steps: int, stochastic: bool, start_scale: float = 1.0, timestep=None) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    x_T, generators = noise()
    return diffusers_loop(scheduler, x_T * start_scale, generators if stochastic else None, timestep)


def log_sigma_timestep(scheduler):
    """diffusers' own sigma -> t (log-sigma interpolation), unrounded, for each step of ``scheduler``."""
    log_sigmas = np.log(((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).numpy() ** 0.5)
    return lambda i, t: float(scheduler._sigma_to_t(np.array(float(scheduler.sigmas[i])), log_sigmas))


def vp_to_ve(scheduler) -> float:
    """diffusers' multistep schedulers start from the DDPM state x_T (init_noise_sigma 1); the k-samplers
    from sigma_0 x_T, which is the DDPM state sigma_0 / sqrt(1 + sigma_0^2) x_T."""
    sigma = float(scheduler.sigmas[0])
    return sigma / (1 + sigma**2) ** 0.5


# ---------------------------------------------------------------- the sigma table


def test_sigma_table_ends_and_round_trips():
    assert TABLE.sigma_min == pytest.approx(0.029167, abs=1e-5)
    assert TABLE.sigma_max == pytest.approx(14.6146, abs=1e-3)
    for t in (0, 1, 17, 500, 998, 999):
        assert TABLE.timestep(float(TABLE.sigmas[t])) == t  # exact at table entries
    for t in (0.25, 17.5, 500.125, 998.9):
        sigma = float(TABLE.sigma(t))
        assert TABLE.timestep(sigma) == pytest.approx(t, abs=1e-9)
        assert float(TABLE.sigmas[math.floor(t)]) < sigma < float(TABLE.sigmas[math.ceil(t)])
    assert TABLE.timestep(100.0) == 999 and TABLE.timestep(1e-4) == 0  # clamped


def test_alpha_bar_is_the_tables_at_integer_t_and_consistent_with_sigma_between():
    t_int = torch.tensor([0, 1, 500, 999])
    assert torch.equal(alpha_bar_at(AC, t_int), AC[t_int])
    assert torch.equal(alpha_bar_at(AC, t_int.double()), AC[t_int])  # integral floats take the table too
    t = torch.tensor([0.5, 250.25, 998.75], dtype=torch.float64)
    torch.testing.assert_close(alpha_bar_at(AC, t), 1 / (1 + TABLE.sigma(t) ** 2), rtol=1e-12, atol=0)


def test_v_model_at_fractional_t_converts_with_that_ts_alpha_bar():
    """A v model's output converted at t = 250.25 gives the epsilon of x_t at sigma(250.25), not at t 250."""
    gen = torch.Generator().manual_seed(2)
    x0, eps = (torch.randn(1, 4, 4, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([250.25], dtype=torch.float64)
    a = float(1 / (1 + TABLE.sigma(t) ** 2))
    x_t, v = a**0.5 * x0 + (1 - a) ** 0.5 * eps, a**0.5 * eps - (1 - a) ** 0.5 * x0

    class Constant(nn.Module):
        def forward(self, x, t, context=None, y=None):
            return v

    got = EpsDenoiser(Constant(), AC, "v")(x_t, t)
    torch.testing.assert_close(got, eps, rtol=0, atol=1e-10)
    assert max_error(output_to_eps(v, x_t, AC[250:251], "v"), eps) > 1e-4  # the old integer lookup missed


def test_sigma_denoiser_scales_the_input_and_returns_x_minus_sigma_eps():
    seen = {}

    def eps_denoiser(x, t, **extra):
        seen.update(x=x, t=t, extra=extra)
        return torch.full_like(x, 0.5)

    x = torch.full((2, 1, 2, 2), 3.0)
    sigma = float(TABLE.sigma(400.5))
    denoised = SigmaDenoiser(eps_denoiser, TABLE)(x, sigma, context="c")
    torch.testing.assert_close(seen["x"], x / (sigma**2 + 1) ** 0.5)
    assert seen["t"].dtype == torch.float64 and seen["t"].tolist() == pytest.approx([400.5, 400.5], abs=1e-9)
    assert seen["extra"] == {"context": "c"}
    torch.testing.assert_close(denoised, x - sigma * 0.5)


# ---------------------------------------------------------------- schedules and names


def test_schedules_give_the_reference_sd_numbers():
    karras, uniform = schedule_sigmas("Karras", TABLE, 20), schedule_sigmas("Uniform", TABLE, 20)
    assert len(karras) == len(uniform) == 21 and karras[-1] == uniform[-1] == 0.0
    assert karras[:5] == pytest.approx([14.6146, 11.7254, 9.3402, 7.3836, 5.7894], abs=1e-4)
    assert karras[-4:-1] == pytest.approx([0.0779, 0.0485, 0.0292], abs=1e-4)
    assert uniform[:5] == pytest.approx([14.6146, 10.7468, 8.0815, 6.2049, 4.8557], abs=1e-4)
    assert uniform[-4:-1] == pytest.approx([0.3555, 0.2322, 0.0292], abs=1e-4)
    exponential = schedule_sigmas("Exponential", TABLE, 20)[:-1]
    assert np.diff(np.log(exponential)) == pytest.approx([math.log(TABLE.sigma_min / TABLE.sigma_max) / 19] * 19)
    sgm = [TABLE.timestep(s) for s in schedule_sigmas("SGM Uniform", TABLE, 20)[:-1]]
    assert sgm == pytest.approx([999 - 999 * i / 20 for i in range(20)], abs=1e-6)  # 999, 949.05, ..., 49.95
    simple = [TABLE.timestep(s) for s in schedule_sigmas("Simple", TABLE, 20)[:-1]]
    assert simple == [999 - 50 * i for i in range(20)]  # 999, 949, ..., 49


def test_a1111_schedules_follow_their_formulas():
    normal, uniform = schedule_sigmas("Normal", TABLE, 20), schedule_sigmas("Uniform", TABLE, 20)
    assert normal == pytest.approx(uniform, rel=1e-9)  # t(smax) = 999 and t(smin) = 0 on SD's table
    kl = schedule_sigmas("KL Optimal", TABLE, 10)[:-1]
    assert np.diff(np.arctan(kl)) == pytest.approx([(math.atan(TABLE.sigma_min) - math.atan(TABLE.sigma_max)) / 9] * 9)
    assert kl[-1] == pytest.approx(TABLE.sigma_min)
    assert schedule_sigmas("Align Your Steps", TABLE, 11) == pytest.approx([*ALIGN_YOUR_STEPS_SD1, 0.0])
    five = schedule_sigmas("Align Your Steps", TABLE, 6)[:-1]  # every second of the 11 published levels
    assert five == pytest.approx(ALIGN_YOUR_STEPS_SD1[::2])
    beta = schedule_sigmas("Beta", TABLE, 21)
    # Beta(0.6, 0.6) is symmetric: the middle step is halfway in sigma, and the steps mirror each other
    assert beta[10] == pytest.approx((TABLE.sigma_min + TABLE.sigma_max) / 2, rel=1e-9)
    assert beta[3] - TABLE.sigma_min == pytest.approx(TABLE.sigma_max - beta[17], rel=1e-9)


@pytest.mark.parametrize("start, end, length", [(0.0015, 0.0195, 1000), (1e-4, 2e-2, 1000), (1e-4, 2e-2, 350)])
def test_align_your_steps_spans_another_table_by_timestep(start, end, length):
    """Off SD's table (LDM's betas, the default model's, a shorter schedule) the published levels are
    carried over by their timesteps: from that table's sigma_max to its sigma_min, still decreasing,
    with the same timesteps (scaled to the table's length) as on SD's."""
    betas = torch.linspace(start**0.5, end**0.5, length, dtype=torch.float64) ** 2
    other = DiscreteSigmas(torch.cumprod(1 - betas, 0))
    sigmas = schedule_sigmas("Align Your Steps", other, 10)
    assert sigmas[0] == pytest.approx(other.sigma_max, rel=1e-9) and sigmas[-2] == pytest.approx(other.sigma_min, rel=1e-9)
    assert all(a > b for a, b in itertools.pairwise(sigmas))
    on_sd = [TABLE.timestep(s) / 999 for s in schedule_sigmas("Align Your Steps", TABLE, 10)[:-1]]
    assert [other.timestep(s) / (length - 1) for s in sigmas[:-1]] == pytest.approx(on_sd, abs=1e-6)


def test_the_beta_quantile_inverts_known_distributions():
    assert incomplete_beta(0.3, 2, 3) == pytest.approx(0.3483, abs=1e-12)  # the binomial sum of I_x(2, 3)
    assert beta_quantile(0.3, 1, 1) == pytest.approx(0.3, abs=1e-10)  # uniform
    assert beta_quantile(0.25, 2, 1) == pytest.approx(0.5, abs=1e-10)  # I_x(2, 1) = x^2
    assert beta_quantile(0.9, 1, 3) == pytest.approx(1 - 0.1 ** (1 / 3), abs=1e-10)  # I_x(1, 3) = 1 - (1 - x)^3
    for p in (0.01, 0.2, 0.5, 0.77, 0.99):
        assert incomplete_beta(beta_quantile(p, 0.6, 0.6), 0.6, 0.6) == pytest.approx(p, abs=1e-9)


@pytest.mark.parametrize("name", [n for n in SCHEDULES if n != "Automatic"])
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_every_schedule_decreases_from_sigma_max_to_zero(name, steps):
    sigmas = schedule_sigmas(name, TABLE, steps)
    assert len(sigmas) == steps + 1 and sigmas[-1] == 0.0
    start = ALIGN_YOUR_STEPS_SD1[0] if name == "Align Your Steps" else TABLE.sigma_max  # the published list's
    assert sigmas[0] == pytest.approx(start, rel=1e-9)
    assert all(a > b for a, b in itertools.pairwise(sigmas))


def test_karras_equals_diffusers_karras_sigmas():
    scheduler = EulerDiscreteScheduler(**BASE, timestep_spacing="linspace", use_karras_sigmas=True)
    scheduler.set_timesteps(15)
    assert max_error(torch.tensor(schedule_sigmas("Karras", TABLE, 15)), scheduler.sigmas) < 1e-5


def test_spacings_equal_diffusers_multistep_grids():
    for spacing in ("linspace", "leading", "trailing"):
        for steps in (1, 4, 10, 25, 33):
            scheduler = UniPCMultistepScheduler(**BASE, timestep_spacing=spacing, steps_offset=1)
            scheduler.set_timesteps(steps)
            offset = 1 if spacing == "leading" else 0
            assert spaced_timesteps(1000, steps, spacing, offset) == scheduler.timesteps.tolist(), (spacing, steps)
    assert spaced_timesteps(1000, 10, "linspace") == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    assert len(spaced_timesteps(1000, 999, "linspace")) == len(spaced_timesteps(1000, 999, "leading")) == 999
    for spacing in ("linspace", "leading"):  # 1000 steps of a 1000-step model would repeat a timestep
        with pytest.raises(ValueError, match=f"1000 steps of the '{spacing}' timestep spacing repeat a timestep"):
            spaced_timesteps(1000, 1000, spacing)


def test_lcm_grid_equals_diffusers():
    assert lcm_timesteps(1000, 4) == [999, 759, 499, 259]
    assert lcm_timesteps(1000, 8) == [999, 879, 759, 639, 499, 379, 259, 139]
    for steps in (1, 2, 3, 6, 7, 13, 50):
        scheduler = LCMScheduler(**BASE)
        scheduler.set_timesteps(steps)
        assert lcm_timesteps(1000, steps) == scheduler.timesteps.tolist(), steps
    with pytest.raises(ValueError, match="1 to 50 steps"):
        lcm_timesteps(1000, 51)


def test_unknown_names_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="'DPM\\+\\+ 3M'") as info:
        get_sampler("DPM++ 3M")
    assert all(name in str(info.value) for name in SAMPLERS)
    with pytest.raises(ValueError, match="'Polyexponential'") as info:
        get_schedule("Polyexponential")
    assert all(name in str(info.value) for name in SCHEDULES)
    with pytest.raises(ValueError, match="'Polyexponential'"):
        ours("Euler", "eps", 3, schedule="Polyexponential")
    with pytest.raises(ValueError, match="'uniform'.*leading, linspace, trailing"):
        spaced_timesteps(1000, 10, "uniform")
    with pytest.raises(ValueError, match="steps"):
        ours("Euler", "eps", 0)


def test_registry_names_keys_and_defaults():
    assert list(SAMPLERS) == ["DDIM", "Euler", "Euler a", "Heun", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE", "UniPC",
                              "LCM"]
    assert list(SCHEDULES) == ["Automatic", "Uniform", "Karras", "Exponential", "SGM Uniform", "Simple", "Normal",
                               "KL Optimal", "Align Your Steps", "Beta"]
    fields = {name: (s.eta_field, s.eta_default) for name, s in SAMPLERS.items() if s.eta_field}
    assert fields == {"DDIM": ("Eta DDIM", 0.0), "Euler a": ("Eta", 1.0), "DPM++ 2M SDE": ("Eta", 1.0),
                      "DPM++ SDE": ("Eta", 1.0)}
    assert [resolve_schedule(name, "Automatic") for name in SAMPLERS] == [
        "Automatic", "Uniform", "Uniform", "Uniform", "Karras", "Exponential", "Karras", "Automatic", "Automatic"]
    assert resolve_schedule("DPM++ 2M", "Exponential") == "Exponential"


def test_fused_names_of_old_parameters_texts_split():
    assert split_sampler_name("DPM++ 2M Karras") == ("DPM++ 2M", "Karras")
    assert split_sampler_name("DPM++ 2M SDE Exponential") == ("DPM++ 2M SDE", "Exponential")
    assert split_sampler_name("DPM++ SDE Karras") == ("DPM++ SDE", "Karras")
    assert split_sampler_name("Euler a") == ("Euler a", None)
    assert split_sampler_name("DPM++ 2M SDE") == ("DPM++ 2M SDE", None)
    with pytest.raises(ValueError, match="'LMS Karras'"):
        split_sampler_name("LMS Karras")


# ---------------------------------------------------------------- parity with diffusers


@pytest.mark.parametrize("prediction", KINDS)
@pytest.mark.parametrize("case", ["Euler", "Euler Karras", "Euler a", "Heun"])
def test_euler_family_matches_diffusers(prediction, case):
    """A1111's Euler, Euler a and Heun: diffusers' schedulers with "linspace" spacing (the same t grid)."""
    config = dict(BASE, prediction_type=prediction, timestep_spacing="linspace")
    name, schedule = {"Euler": ("Euler", "Automatic"), "Euler Karras": ("Euler", "Karras"),
                      "Euler a": ("Euler a", "Automatic"), "Heun": ("Heun", "Automatic")}[case]
    scheduler = {"Euler": EulerDiscreteScheduler(**config),
                 "Euler Karras": EulerDiscreteScheduler(**config, use_karras_sigmas=True),
                 "Euler a": EulerAncestralDiscreteScheduler(**config), "Heun": HeunDiscreteScheduler(**config)}[case]
    expected = reference(scheduler, 12, stochastic=name == "Euler a")
    got = ours(name, KINDS[prediction], 12, schedule=schedule)
    assert expected.abs().mean() > 0.1
    assert max_error(got, expected) < TOL


def test_uniform_departs_from_diffusers_linear_sigma_interpolation():
    """diffusers' Euler-family schedulers interpolate sigma linearly between table entries at the
    "linspace" timesteps; k-diffusion and we interpolate log-sigma. The timesteps are the same; the
    sigmas agree at integer t and differ by at most 2e-5 relatively between (20 steps)."""
    scheduler = EulerDiscreteScheduler(**BASE, timestep_spacing="linspace")
    scheduler.set_timesteps(20)
    ours_ = torch.tensor(schedule_sigmas("Uniform", TABLE, 20)[:-1])
    theirs = scheduler.sigmas[:-1].double()
    relative = ((ours_ - theirs) / theirs).abs()
    assert relative[0] < 1e-6 and relative[-1] < 1e-6  # t = 999 and 0
    assert 1e-6 < relative.max() < 2e-5
    assert [TABLE.timestep(s) for s in ours_.tolist()] == pytest.approx(scheduler.timesteps.tolist(), abs=1e-3)


@pytest.mark.parametrize("prediction", KINDS)
@pytest.mark.parametrize("name", ["DPM++ 2M", "DPM++ 2M SDE"])
def test_dpmpp_2m_karras_matches_diffusers(prediction, name):
    """DPM++ 2M (SDE) Karras: DPMSolverMultistepScheduler with Karras sigmas and a final sigma of 0.
    Two documented differences are bridged by the reference: diffusers starts from the DDPM state x_T
    (we, as A1111, from sigma_0 x_T), and it rounds the Karras timesteps (we, as A1111 by default, give
    the network the fractional t; ``test_diffusers_rounds_karras_timesteps``)."""
    algorithm = "dpmsolver++" if name == "DPM++ 2M" else "sde-dpmsolver++"
    scheduler = DPMSolverMultistepScheduler(**BASE, prediction_type=prediction, algorithm_type=algorithm,
                                            solver_order=2, solver_type="midpoint", use_karras_sigmas=True,
                                            final_sigmas_type="zero", lower_order_final=True, euler_at_final=False)
    scheduler.set_timesteps(12)
    expected = reference(scheduler, 12, stochastic=name != "DPM++ 2M", start_scale=vp_to_ve(scheduler),
                         timestep=log_sigma_timestep(scheduler))
    got = ours(name, KINDS[prediction], 12, schedule="Karras")
    assert expected.abs().mean() > 0.1
    assert max_error(got, expected) < TOL


def test_diffusers_rounds_karras_timesteps():
    scheduler = DPMSolverMultistepScheduler(**BASE, use_karras_sigmas=True, final_sigmas_type="zero")
    scheduler.set_timesteps(12)
    fractional = [TABLE.timestep(s) for s in schedule_sigmas("Karras", TABLE, 12)[:-1]]
    assert scheduler.timesteps.tolist() == [round(t) for t in fractional]
    assert max(abs(t - round(t)) for t in fractional) > 0.1
    # and it matters: with the rounded timesteps the result is further from ours than the tolerance
    rounded = reference(scheduler, 12, stochastic=False, start_scale=vp_to_ve(scheduler))
    assert max_error(ours("DPM++ 2M", "eps", 12, schedule="Karras"), rounded) > 10 * TOL


@pytest.mark.parametrize("prediction", KINDS)
def test_dpmpp_2m_on_diffusers_integer_grid_matches(prediction):
    """The solver alone on diffusers' default grid (integer "linspace" timesteps of the multistep
    schedulers), from the same DDPM state."""
    scheduler = DPMSolverMultistepScheduler(**BASE, prediction_type=prediction, final_sigmas_type="zero")
    expected = reference(scheduler, 10, stochastic=False)
    sigmas = scheduler.sigmas.double().tolist()
    x_T, _ = noise()
    model = SigmaDenoiser(EpsDenoiser(NET, AC, KINDS[prediction]), TABLE)
    got = k_samplers.dpmpp_2m(model, x_T * (1 + sigmas[0] ** 2) ** 0.5, sigmas)
    assert max_error(got, expected) < TOL


@pytest.mark.parametrize("prediction", KINDS)
@pytest.mark.parametrize("steps", [1, 2, 5, 12])
def test_unipc_matches_diffusers_defaults(prediction, steps):
    scheduler = UniPCMultistepScheduler(**BASE, prediction_type=prediction)  # bh2, order 2, predict x0, "linspace"
    expected = reference(scheduler, steps, stochastic=False)
    assert max_error(ours("UniPC", KINDS[prediction], steps), expected) < TOL


@pytest.mark.parametrize("prediction", KINDS)
def test_unipc_bh1_order_3_matches_diffusers(prediction):
    """AUTOMATIC1111's UniPC variant and order. diffusers' bh1 gives NaN on a last step to sigma 0
    (B(h) = h is infinite there, times a zero correction), so this runs to its "sigma_min" instead;
    ours returns the step's x0 estimate there, the limit."""
    scheduler = UniPCMultistepScheduler(**BASE, prediction_type=prediction, solver_type="bh1", solver_order=3,
                                        final_sigmas_type="sigma_min")
    expected = reference(scheduler, 8, stochastic=False)
    x_T, _ = noise()
    sigmas = scheduler.sigmas.double().tolist()
    model = SigmaDenoiser(EpsDenoiser(NET, AC, KINDS[prediction]), TABLE)
    got = unipc(model, x_T * (1 + sigmas[0] ** 2) ** 0.5, sigmas, order=3, variant="bh1")
    assert max_error(got / (1 + sigmas[-1] ** 2) ** 0.5, expected) < TOL  # diffusers' DDPM state at sigma_min


@pytest.mark.parametrize("prediction", KINDS)
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_lcm_matches_diffusers(prediction, steps):
    scheduler = LCMScheduler(**BASE, prediction_type=prediction)
    expected = reference(scheduler, steps, stochastic=True)
    assert max_error(ours("LCM", KINDS[prediction], steps), expected) < TOL


@pytest.fixture
def dpm_solver_sde(monkeypatch):
    """diffusers' DPMSolverSDEScheduler, imported with a stand-in for torchsde (not installed): its
    Brownian tree is replaced by our noise in each test, so only the solver is compared."""
    monkeypatch.setitem(sys.modules, "torchsde", types.ModuleType("torchsde"))
    monkeypatch.delitem(sys.modules, "diffusers.schedulers.scheduling_dpmsolver_sde", raising=False)
    from diffusers.schedulers.scheduling_dpmsolver_sde import DPMSolverSDEScheduler

    yield DPMSolverSDEScheduler
    sys.modules.pop("diffusers.schedulers.scheduling_dpmsolver_sde", None)


def brownian_replay(generators):
    """Brownian motion in sigma at each step's sigma > sigma_mid > sigma_next from two normals per image
    (drawn in that order), as diffusers' noise sampler: noise(sigma, sigma_to) = (W(sigma_to) - W(sigma))
    / sqrt(sigma - sigma_to), asked for sigma_mid first, then sigma_next."""
    pending = {}

    def noise_sampler(sigma, sigma_to):
        sigma, sigma_to = float(sigma), float(sigma_to)
        if "sigma_mid" not in pending:
            z1 = torch.stack([torch.randn(SHAPE[1:], generator=g) for g in generators])
            pending.update(sigma_mid=sigma_to, w_mid=(sigma - sigma_to) ** 0.5 * z1)
            return z1
        z2 = torch.stack([torch.randn(SHAPE[1:], generator=g) for g in generators])
        w_next = pending["w_mid"] + (pending.pop("sigma_mid") - sigma_to) ** 0.5 * z2
        pending.clear()
        return w_next / (sigma - sigma_to) ** 0.5

    return noise_sampler


@pytest.mark.parametrize("prediction", KINDS)
def test_dpmpp_sde_karras_matches_diffusers(dpm_solver_sde, prediction):
    scheduler = dpm_solver_sde(**BASE, prediction_type=prediction, use_karras_sigmas=True, timestep_spacing="linspace")
    scheduler.set_timesteps(10)
    x_T, generators = noise()
    scheduler.noise_sampler = brownian_replay(generators)
    expected = diffusers_loop(scheduler, x_T)
    got = ours("DPM++ SDE", KINDS[prediction], 10, schedule="Karras")
    assert expected.abs().mean() > 0.1
    assert max_error(got, expected) < TOL


def test_dpmpp_sde_noise_is_brownian():
    """The two increments of a step have unit variance and the correlation of Brownian motion,
    sqrt((sigma - sigma_mid) / (sigma - sigma_next))."""
    x = torch.zeros(1, 1, 200, 200)
    sigma, mid, nxt = 3.0, 1.5, 0.75
    first, second = k_samplers.brownian_increments(x, [torch.Generator().manual_seed(0)], (sigma, mid, nxt))
    assert first.var().item() == pytest.approx(1, abs=0.02) and second.var().item() == pytest.approx(1, abs=0.02)
    corr = (first * second).mean().item()
    assert corr == pytest.approx(((sigma - mid) / (sigma - nxt)) ** 0.5, abs=0.02)


# ---------------------------------------------------------------- closed forms and equivalences


@pytest.mark.parametrize("kind", ["eps", "v"])
def test_ddim_eta0_equals_euler_in_sigma_space(kind):
    """A DDIM step at eta 0 is an Euler step of x / sqrt(abar) (Song et al. 2021, eq. 14)."""
    x_T, _ = noise()
    schedule = ddim_schedule(AC, 20)
    denoiser = EpsDenoiser(NET, AC, kind)
    ddim = ddim_sample(denoiser, x_T, schedule, eta=0.0, generator=torch.Generator())
    sigmas = [float(TABLE.sigmas[t]) for t in schedule.timesteps.flip(0)] + [TABLE.sigma_min]
    euler = k_samplers.euler(SigmaDenoiser(denoiser, TABLE), x_T * (1 + sigmas[0] ** 2) ** 0.5, sigmas)
    assert max_error(ddim, euler / (1 + sigmas[-1] ** 2) ** 0.5) < 1e-5


@pytest.mark.parametrize("schedule", ["Karras", "SGM Uniform"])
def test_ddim_on_a_sigma_schedule_at_eta0_equals_euler(schedule):
    x_T, _ = noise()
    ddim = ours("DDIM", "eps", 10, schedule=schedule, eta=0.0)
    sigmas = schedule_sigmas(schedule, TABLE, 10)
    model = SigmaDenoiser(EpsDenoiser(NET, AC, "eps"), TABLE)
    euler = k_samplers.euler(model, x_T * (1 + sigmas[0] ** 2) ** 0.5, sigmas)
    assert max_error(ddim, euler) < 1e-5


def test_ddim_automatic_is_unchanged_bit_for_bit():
    x_T, generators = noise()
    denoiser = EpsDenoiser(NET, AC, "v")
    direct = ddim_sample(denoiser, x_T, ddim_schedule(AC, 10), eta=0.5, generator=generators)
    assert torch.equal(ours("DDIM", "v", 10, eta=0.5), direct)
    assert all(t.dtype == torch.long for t in NET.calls[-10:])


def run_with(name: str, step_seeds: list[int], **options) -> torch.Tensor:
    """One sampler from the same initial noise, its step noise from the generators of ``step_seeds``."""
    x_T, _ = noise()
    return get_sampler(name).run(EpsDenoiser(NET, AC, "eps"), x_T, AC, 6, generator=seeded_generators(step_seeds),
                                 **options)


def test_ancestral_samplers_at_eta0_are_their_deterministic_solvers():
    assert torch.equal(run_with("Euler a", [1, 2], eta=0.0), run_with("Euler", [1, 2]))
    for name in ("Euler a", "DPM++ 2M SDE", "DPM++ SDE"):
        assert torch.equal(run_with(name, [1, 2], eta=0.0), run_with(name, [7, 8], eta=0.0)), name
        assert max_error(run_with(name, [1, 2], eta=1.0), run_with(name, [7, 8], eta=1.0)) > 1e-2, name


def test_s_noise_scales_the_added_noise():
    """At s_noise 0 an ancestral step only goes down to sigma_down, whatever the noise drawn."""
    for name in ("Euler a", "DPM++ 2M SDE", "DPM++ SDE"):
        quiet = run_with(name, [1, 2], eta=1.0, s_noise=0.0)
        assert torch.equal(quiet, run_with(name, [7, 8], eta=1.0, s_noise=0.0)), name
        assert max_error(quiet, run_with(name, [1, 2], eta=1.0)) > 1e-2, name
        half = run_with(name, [1, 2], eta=1.0, s_noise=0.5)
        assert 1e-3 < max_error(half, quiet) < max_error(run_with(name, [1, 2], eta=1.0), quiet), name


# ---------------------------------------------------------------- what every sampler shares

ALL = list(SAMPLERS)
SIGMA_SPACE = [name for name in SAMPLERS if name != "DDIM"]
STOCHASTIC = ["Euler a", "DPM++ 2M SDE", "DPM++ SDE", "LCM", "DDIM"]
CALLS_PER_STEP = {"Heun": 2, "DPM++ SDE": 2}


@pytest.mark.parametrize("name", ALL)
def test_batch_row_equals_the_seed_alone(name):
    options = {"eta": 0.7} if name in STOCHASTIC else {}
    batch = ours(name, "eps", 6, seeds=[11, 12, 13], **options)
    for i, seed in enumerate([11, 12, 13]):
        assert torch.equal(batch[i : i + 1], ours(name, "eps", 6, seeds=[seed], **options)), (name, i)
    if name in STOCHASTIC:
        assert max_error(batch[:1], ours(name, "eps", 6, seeds=[99], **options)) > 1e-2


@pytest.mark.parametrize("name", ALL)
def test_same_seed_reproduces_and_step_noise_matters(name):
    options = {"eta": 0.5} if name in STOCHASTIC else {}
    a = run_with(name, [1, 2], **options)
    assert torch.equal(a, run_with(name, [1, 2], **options))
    other = run_with(name, [50, 51], **options)
    if name in STOCHASTIC:
        assert max_error(a, other) > 1e-2
    else:
        assert torch.equal(a, other)  # draws nothing


@pytest.mark.parametrize("name", ALL)
def test_should_stop_raises_between_steps(name):
    asked, steps = [], []

    def should_stop():
        asked.append(True)
        return len(asked) == 3

    net = TinyNet()
    with pytest.raises(SamplingCancelled) as info:
        ours(name, "eps", 5, net=net, should_stop=should_stop, callback=steps.append)
    assert (info.value.step, info.value.total) == (2, 5)
    assert len(steps) == 2 and len(asked) == 3
    assert len(net.calls) == 2 * CALLS_PER_STEP.get(name, 1)


@pytest.mark.parametrize("name", SIGMA_SPACE)
def test_each_step_calls_stop_hook_denoiser_callback_in_order(name):
    events = []
    schedule = "Karras"
    sigmas = schedule_sigmas(schedule, TABLE, 5)

    def hook(x, signal, noise_level):
        events.append(("hook", signal, noise_level, x.clone()))
        return x + 0.25

    class Recording(TinyNet):
        def forward(self, x, t, context=None, y=None):
            events.append(("denoiser", float(t[0]), x.clone()))
            return super().forward(x, t)

    def callback(info):
        events.append(("callback", info.step, info.total, info.t))

    ours(name, "eps", 5, net=Recording(), schedule=schedule, before_step=hook, callback=callback,
         should_stop=lambda: events.append(("stop",)) and False)
    per_step = ["stop", "hook"] + ["denoiser"] * CALLS_PER_STEP.get(name, 1) + ["callback"]
    last_step = ["stop", "hook", "denoiser", "callback"]  # the step to sigma 0 is first order
    assert [e[0] for e in events] == per_step * 4 + last_step
    hooks = [e for e in events if e[0] == "hook"]
    assert [(e[1], e[2]) for e in hooks] == [(1.0, s) for s in sigmas[:-1]]
    first = [events[i + 1] for i, e in enumerate(events) if e[0] == "hook"]  # the call after each hook
    for hook_event, call, sigma in zip(hooks, first, sigmas):
        assert call[1] == pytest.approx(TABLE.timestep(sigma), abs=1e-9)
        torch.testing.assert_close(call[2], (hook_event[3] + 0.25) / (sigma**2 + 1) ** 0.5)  # the hooked state
    assert [e[1:] for e in events if e[0] == "callback"] == [(i, 5, s) for i, s in enumerate(sigmas[:-1])]


@pytest.mark.parametrize("name", ALL)
def test_latent_blend_keeps_the_kept_region(name):
    """Inpainting by blending in sigma space: where keep is 1 the state is x0 + sigma eps before every
    step, so the result there comes out near x0 (Gaussian data of std 1, x0 = 6 far from it); where keep
    is 0 (the denoiser acting per element) the result is the unblended run's, bit for bit. The blend
    draws from its own generators here, so the sampler's draws are the same in both runs."""
    x0 = torch.full((2, 1, 4, 4), 6.0)
    keep = torch.zeros_like(x0)
    keep[..., :2] = 1.0

    def gaussian_eps(x, t):  # exact epsilon for data N(0, 1): x sqrt(1 - abar) / (abar + 1 - abar)
        return x * (1 - alpha_bar_at(AC, t).view(-1, 1, 1, 1).to(x)).sqrt()

    def run(before_step):
        x_T, generators = noise(shape=x0.shape)
        options = {"eta": 0.5} if name in STOCHASTIC else {}
        return get_sampler(name).run(gaussian_eps, x_T, AC, 8, generator=generators, schedule="Karras",
                                     before_step=before_step, **options)

    plain = run(None)
    blended = run(LatentBlend(keep, x0, seeded_generators([21, 22])))
    assert (blended[..., :2] - 6.0).abs().max() < 0.15
    assert (plain[..., :2] - 6.0).abs().min() > 2.0
    assert torch.equal(blended[..., 2:], plain[..., 2:])


@pytest.mark.parametrize("kind", ["eps", "v"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", ALL)
def test_every_sampler_runs_every_schedule(name, schedule, kind):
    out = ours(name, kind, 5, schedule=schedule)
    assert out.shape == SHAPE and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().max() < 50


@pytest.mark.parametrize("name", SIGMA_SPACE)
def test_low_precision_noise_keeps_a_float32_state_and_returns_its_dtype(name):
    x_T, generators = noise()
    seen = []

    def denoiser(x, t):
        seen.append(x.dtype)
        return EpsDenoiser(NET, AC, "eps")(x, t)

    out = get_sampler(name).run(denoiser, x_T.bfloat16(), AC, 4, generator=generators,
                                eta=get_sampler(name).eta_default)
    assert out.dtype == torch.bfloat16 and set(seen) == {torch.float32}
    assert max_error(out, ours(name, "eps", 4)) < 0.2


@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2M SDE", "DPM++ SDE"])
def test_bad_eta_and_s_noise_are_refused(name):
    with pytest.raises(ValueError, match="eta"):
        ours(name, "eps", 3, eta=-0.5)
    with pytest.raises(ValueError, match="s_noise"):
        ours(name, "eps", 3, s_noise=float("nan"))




@pytest.fixture(scope="module")
def tiny_unet() -> nn.Module:
    """Our UNet at its smallest (two levels, one transformer), random weights."""
    from ldm.models.unet import UNetConfig, UNetModel

    config = UNetConfig(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1, attention_resolutions=(2,),
                        channel_mult=(1, 2), num_heads=2, use_spatial_transformer=True, context_dim=8)
    unet = UNetModel(config).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(p[0].numel() if p.ndim > 1 else p.numel(), 1) ** 0.5)
    return unet


class Recording(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet, self.timesteps = unet, []

    def forward(self, x, t, **kwargs):
        self.timesteps.append(t)
        return self.unet(x, t, **kwargs)


@torch.no_grad()
@pytest.mark.parametrize("name", ["DPM++ SDE", "LCM"])
def test_guided_real_unet_gets_fractional_timesteps_and_guidance_is_just_a_denoiser(tiny_unet, name):
    from ldm.sampling.guidance import ClassifierFreeGuidance

    unet = Recording(tiny_unet)
    g = torch.Generator().manual_seed(6)
    cond = {"context": torch.randn(2, 3, 8, generator=g)}
    uncond = {"context": torch.randn(2, 3, 8, generator=g)}
    x_T, _ = noise()
    eps = EpsDenoiser(unet, AC, "v")
    sampler = get_sampler(name)
    guided = sampler.run(ClassifierFreeGuidance(eps, 4.0), x_T, AC, 3, schedule="Karras", eta=sampler.eta_default,
                         generator=seeded_generators(SEEDS), extra_args={"cond": cond, "uncond": uncond})
    seen = unet.timesteps[:]

    def mixed(x, t):
        e_u, e_c = eps(x, t, **uncond), eps(x, t, **cond)
        return e_u + 4.0 * (e_c - e_u)

    by_hand = sampler.run(mixed, x_T, AC, 3, schedule="Karras", generator=seeded_generators(SEEDS),
                          eta=sampler.eta_default)
    assert torch.isfinite(guided).all() and guided.abs().mean() > 0.1
    assert max_error(guided, by_hand) < 1e-5
    assert seen[0].dtype == torch.float64 and seen[0].shape == (4,)  # [uncond, cond] of a batch of 2
    assert any(float(t[0]) != round(float(t[0])) for t in seen)
