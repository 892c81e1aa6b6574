"""Schedules, the DDIM sampler, guidance and parameterisation, checked against closed forms, analytic
denoisers (a delta and a Gaussian data distribution, whose exact epsilon is known), pinned golden
values and diffusers' DDIMScheduler as an independent implementation."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

from ldm.sampling.blending import LatentBlend
from ldm.sampling.ddim import ddim_sample
from ldm.sampling.denoiser import EpsDenoiser, check_parameterization, output_to_eps
from ldm.sampling.guidance import ClassifierFreeGuidance
from ldm.sampling.noise import randn, seeded_generators
from ldm.sampling.schedules import ScheduleConfig, ddim_schedule, make_alphas_cumprod, make_betas
from ldm.sampling.steps import SamplingCancelled, StepInfo

T = 1000
SD = ScheduleConfig(kind="linear", timesteps=T, linear_start=0.00085, linear_end=0.012)
AC = make_alphas_cumprod(SD)  # SD's alpha-bar, float64

# ---------------------------------------------------------------- analytic denoisers


def _abar(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return AC[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def delta_denoiser(mu: torch.Tensor):
    """Exact epsilon when the data is the single point mu: eps*(x, t) = (x - sqrt(abar) mu) / sqrt(1 - abar)."""

    def denoiser(x, t):
        a = _abar(t, x)
        return (x - a.sqrt() * mu.to(x)) / (1 - a).sqrt()

    return denoiser


def gaussian_denoiser(std: list[float]):
    """Exact epsilon for data N(0, s_c^2) per channel c: eps*(x, t) = x sqrt(1 - abar) / (abar s^2 + 1 - abar)."""
    s2 = torch.tensor(std, dtype=torch.float64) ** 2

    def denoiser(x, t):
        a = _abar(t, x)
        var = s2.to(x).view(1, -1, *([1] * (x.ndim - 2)))
        return x * (1 - a).sqrt() / (a * var + 1 - a)

    return denoiser


def counting(denoiser):
    calls = []

    def wrapped(x, t, **kwargs):
        calls.append(t.clone())
        return denoiser(x, t, **kwargs)

    wrapped.calls = calls
    return wrapped


# ---------------------------------------------------------------- schedules


def test_sd_linear_schedule_endpoints():
    betas = make_betas(SD)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    assert betas[0].item() == pytest.approx(0.00085, abs=1e-12)
    assert betas[-1].item() == pytest.approx(0.012, abs=1e-12)
    assert AC[-1].item() == pytest.approx(0.004660, abs=1e-6)
    assert AC[0].item() == pytest.approx(1 - 0.00085, abs=1e-12)
    assert torch.all(AC[1:] < AC[:-1])


def test_sd_linear_schedule_equals_diffusers_scaled_linear():
    scheduler = DDIMScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(AC, scheduler.alphas_cumprod.double(), rtol=0, atol=1e-6)


def test_sqrt_linear_is_the_plain_linspace():
    betas = make_betas(ScheduleConfig(kind="sqrt_linear", linear_start=0.00085, linear_end=0.012))
    torch.testing.assert_close(betas, torch.linspace(0.00085, 0.012, T, dtype=torch.float64))


def test_cosine_schedule_matches_nichol_dhariwal_closed_form():
    s = 8e-3
    config = ScheduleConfig(kind="cosine", timesteps=T, cosine_s=s)
    betas, abar = make_betas(config), make_alphas_cumprod(config)

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    # alphas_cumprod[t] is the product over betas 0..t, i.e. f(t + 1) / f(0) where no beta is clipped.
    for t in (0, 1, 250, 500, 900, 990):
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert betas.max().item() == pytest.approx(0.999, abs=1e-12)
    assert betas[-1].item() == pytest.approx(0.999, abs=1e-12)  # 1 - f(T)/f(T-1) = 1 is clipped
    assert torch.all(betas >= 0)
    assert torch.all(abar[1:] < abar[:-1])


def test_unknown_schedule_kind_lists_the_known_ones():
    with pytest.raises(ValueError, match="quadratic") as info:
        ScheduleConfig(kind="quadratic")
    for kind in ("linear", "cosine", "sqrt_linear", "sqrt"):
        assert kind in str(info.value)


# ---------------------------------------------------------------- DDIM discretisation


def test_ddim_50_steps_visit_1_to_981():
    schedule = ddim_schedule(AC, 50)
    assert schedule.timesteps.tolist() == list(range(1, 1000, 20))
    assert schedule.timesteps[0] == 1 and schedule.timesteps[-1] == 981 and len(schedule) == 50
    torch.testing.assert_close(schedule.alphas, AC[schedule.timesteps], rtol=0, atol=0)


def test_ddim_30_steps_give_31_as_the_original():
    schedule = ddim_schedule(AC, 30)
    assert len(schedule) == 31
    assert schedule.timesteps.tolist() == list(range(1, 1000, 33))


def test_ddim_alphas_prev_end_at_index_0_not_1():
    schedule = ddim_schedule(AC, 50)
    assert schedule.alphas_prev[0].item() == AC[0].item() == pytest.approx(0.99915, abs=1e-12)
    assert schedule.alphas_prev[0].item() != 1.0
    assert torch.equal(schedule.alphas_prev[1:], schedule.alphas[:-1])


def test_ddim_schedule_for_every_step_count():
    for steps in range(1, T + 1):
        schedule = ddim_schedule(AC, steps)
        ts = schedule.timesteps
        assert ts.tolist() == list(range(1, T, T // steps)), steps
        assert torch.equal(schedule.alphas, AC[ts])
        assert torch.equal(schedule.alphas_prev, torch.cat([AC[:1], AC[ts[:-1]]]))
        if T % steps == 0 and steps < T:
            assert len(schedule) == steps


@pytest.mark.parametrize("steps", [0, -1, T + 1])
def test_ddim_schedule_rejects_bad_step_counts(steps):
    with pytest.raises(ValueError, match=str(steps)):
        ddim_schedule(AC, steps)


@pytest.mark.parametrize("steps", [10, 25, 50])
def test_ddim_timesteps_equal_diffusers_leading_spacing(steps):
    scheduler = DDIMScheduler(
        num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading", set_alpha_to_one=False,
    )
    scheduler.set_timesteps(steps)
    schedule = ddim_schedule(AC, steps)
    assert schedule.timesteps.tolist() == scheduler.timesteps.flip(0).tolist()
    # diffusers' final_alpha_cumprod (set_alpha_to_one=False) is our last alphas_prev.
    assert schedule.alphas_prev[0].item() == pytest.approx(scheduler.final_alpha_cumprod.item(), abs=1e-6)


# ---------------------------------------------------------------- DDIM on a delta distribution


def test_ddim_eta0_on_a_point_mass_follows_the_closed_form():
    gen = torch.Generator().manual_seed(3)
    mu = torch.randn(2, 3, 4, 4, generator=gen)
    x_T = torch.randn(2, 3, 4, 4, generator=gen)
    schedule = ddim_schedule(AC, 25)
    steps: list[StepInfo] = []
    denoiser = counting(delta_denoiser(mu))
    out = ddim_sample(denoiser, x_T, schedule, eta=0.0, generator=torch.Generator().manual_seed(0),
                      callback=steps.append)

    # eps stays (x_T - sqrt(abar_last) mu) / sqrt(1 - abar_last) and pred_x0 stays mu all the way down.
    a_last, a_0 = AC[schedule.timesteps[-1]].item(), AC[0].item()
    eps = (x_T - a_last**0.5 * mu) / (1 - a_last) ** 0.5
    expected = a_0**0.5 * mu + (1 - a_0) ** 0.5 * eps
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert out.dtype == torch.float32

    assert len(steps) == len(denoiser.calls) == 25
    assert [info.step for info in steps] == list(range(25))
    assert all(info.total == 25 for info in steps)
    assert [info.t for info in steps] == schedule.timesteps.flip(0).tolist()
    assert all(a > b for a, b in zip([s.t for s in steps], [s.t for s in steps[1:]]))
    for info, t in zip(steps, denoiser.calls):
        assert t.dtype == torch.long and t.tolist() == [info.t, info.t]
        torch.testing.assert_close(info.denoised, mu, rtol=0, atol=1e-5)
    assert torch.equal(steps[-1].x, out)


def test_callback_x_is_the_intermediate_sample():
    mu = torch.full((1, 1, 2, 2), 0.7)
    x_T = torch.linspace(-1, 1, 4).view(1, 1, 2, 2)
    schedule = ddim_schedule(AC, 10)
    steps: list[StepInfo] = []
    ddim_sample(delta_denoiser(mu), x_T, schedule, generator=torch.Generator(), callback=steps.append)
    eps = (x_T - AC[schedule.timesteps[-1]].sqrt().item() * mu) / (1 - AC[schedule.timesteps[-1]]).sqrt().item()
    for info in steps:
        index = schedule.timesteps.tolist().index(info.t)
        a_prev = schedule.alphas_prev[index].item()  # x after the step sits at the next timestep down
        torch.testing.assert_close(info.x, a_prev**0.5 * mu + (1 - a_prev) ** 0.5 * eps, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- golden values (Gaussian data)

GAUSS_STD = [0.5, 1.0, 2.0]
GOLDEN_X_T = torch.tensor([[[-1.5, -0.25, 0.75, 2.0]] * 3], dtype=torch.float64)  # (1, 3, 4)
# 20 steps, eta 0, SD linear schedule; computed once with this code and checked against the
# closed-form product of per-step factors below.
GOLDEN_OUT = torch.tensor(
    [[
        [-0.6734414779, -0.1122402463, 0.3367207389, 0.8979219705],
        [-1.4052883245, -0.2342147207, 0.7026441622, 1.8737177660],
        [-2.8150267543, -0.4691711257, 1.4075133771, 3.7533690057],
    ]],
    dtype=torch.float64,
)


def _gaussian_ddim_gain(schedule, s: float) -> float:
    """With eps linear in x, each eta-0 step multiplies x by
    (sqrt(a_prev a) s^2 + sqrt((1 - a_prev)(1 - a))) / (a s^2 + 1 - a)."""
    gain = 1.0
    for a, a_prev in zip(schedule.alphas.tolist(), schedule.alphas_prev.tolist()):
        gain *= (math.sqrt(a_prev * a) * s**2 + math.sqrt((1 - a_prev) * (1 - a))) / (a * s**2 + 1 - a)
    return gain


def test_ddim_gaussian_golden_values():
    schedule = ddim_schedule(AC, 20)
    out = ddim_sample(gaussian_denoiser(GAUSS_STD), GOLDEN_X_T, schedule, eta=0.0, generator=torch.Generator())
    torch.testing.assert_close(out, GOLDEN_OUT, rtol=0, atol=1e-6)
    gains = torch.tensor([_gaussian_ddim_gain(schedule, s) for s in GAUSS_STD], dtype=torch.float64)
    torch.testing.assert_close(out, GOLDEN_X_T * gains.view(1, 3, 1), rtol=0, atol=1e-9)


def test_ddim_gaussian_output_variance_is_plausible():
    # small enough (< 32768 elements) that torch does not spread the ops over threads
    x_T = torch.randn(1, 3, 4000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    denoiser = gaussian_denoiser(GAUSS_STD)
    s2 = torch.tensor(GAUSS_STD, dtype=torch.float64) ** 2

    def variance(steps):  # per channel, for x_T of unit variance (eta 0 is linear in x_T)
        out = ddim_sample(denoiser, x_T, ddim_schedule(AC, steps), generator=torch.Generator())
        return (out.var(dim=2) / x_T.var(dim=2))[0]

    coarse, fine = variance(20), variance(250)
    # first-order DDIM shrinks a little at 20 steps and converges to the data variance with more steps
    assert torch.all((coarse / s2 - 1).abs() < 0.25), coarse
    assert torch.all((fine / s2 - 1).abs() < 0.04), fine
    assert torch.all((fine / s2 - 1).abs() < (coarse / s2 - 1).abs())


# ---------------------------------------------------------------- eta and generators


def _eta_run(generator, x_T=None, eta=0.5, steps=10):
    if x_T is None:
        x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(11))
    return ddim_sample(gaussian_denoiser(GAUSS_STD), x_T, ddim_schedule(AC, steps), eta=eta, generator=generator)


def test_eta_same_seed_reproduces_and_other_seed_differs():
    a = _eta_run(torch.Generator().manual_seed(5))
    b = _eta_run(torch.Generator().manual_seed(5))
    c = _eta_run(torch.Generator().manual_seed(6))
    deterministic = _eta_run(torch.Generator().manual_seed(5), eta=0.0)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2
    assert (a - deterministic).abs().max() > 1e-2


def test_eta0_never_draws_from_the_generator():
    gen = torch.Generator().manual_seed(7)
    before = gen.get_state()
    _eta_run(gen, eta=0.0)
    assert torch.equal(gen.get_state(), before)
    gens = seeded_generators([1, 2])
    befores = [g.get_state() for g in gens]
    _eta_run(gens, eta=0.0)
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, befores))
    # and the comparison can fail: eta > 0 does draw
    _eta_run(gen, eta=0.5)
    assert not torch.equal(gen.get_state(), before)


def test_generator_list_gives_each_row_its_own_noise():
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(11))
    batched = _eta_run(seeded_generators([1, 2]), x_T=x_T, eta=1.0)
    row0 = _eta_run(seeded_generators([1]), x_T=x_T[:1], eta=1.0)
    row1 = _eta_run(seeded_generators([2]), x_T=x_T[1:], eta=1.0)
    assert torch.equal(batched, torch.cat([row0, row1]))
    swapped = _eta_run(seeded_generators([2]), x_T=x_T[:1], eta=1.0)
    assert not torch.equal(row0, swapped)


def test_generator_list_of_wrong_length_is_refused():
    with pytest.raises(ValueError, match="3 generators"):
        randn((2, 4), seeded_generators([1, 2, 3]), device=torch.device("cpu"), dtype=torch.float32)


def test_noise_is_drawn_in_float32_whatever_the_dtype():
    a = randn((2, 5), torch.Generator().manual_seed(0), device=torch.device("cpu"), dtype=torch.float64)
    b = torch.randn(2, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float32).double()
    assert a.dtype == torch.float64 and torch.equal(a, b)


def test_eta1_matches_a_reference_loop_from_the_paper():
    """Song et al. eq. 12 in float64 with the noise replayed from a twin generator."""
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    denoiser = gaussian_denoiser(GAUSS_STD)
    schedule = ddim_schedule(AC, 8)
    out = ddim_sample(denoiser, x_T, schedule, eta=1.0, generator=torch.Generator().manual_seed(9))

    replay = torch.Generator().manual_seed(9)
    ts = schedule.timesteps.tolist()
    x = x_T
    for t, t_next in zip(reversed(ts), list(reversed(ts))[1:] + [0]):
        a, a_prev = AC[t].item(), AC[t_next].item()
        eps = denoiser(x, torch.tensor([t, t]))
        x0_hat = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        sigma = math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)  # DDPM posterior std
        z = torch.randn(x.shape, generator=replay, dtype=torch.float32).double()
        x = math.sqrt(a_prev) * x0_hat + math.sqrt(1 - a_prev - sigma**2) * eps + sigma * z
    torch.testing.assert_close(out, x, rtol=0, atol=1e-9)


def test_negative_eta_is_refused():
    with pytest.raises(ValueError, match="eta"):
        _eta_run(torch.Generator(), eta=-0.1)


def test_eta_above_one_is_refused():
    # above 1, sigma^2 can exceed 1 - a_prev and the DDIM direction term has no real square root
    with pytest.raises(ValueError, match="eta must be between 0"):
        _eta_run(torch.Generator().manual_seed(5), eta=1.5)


# ---------------------------------------------------------------- mask blending


def test_the_before_step_hook_sees_each_steps_noise_level_before_the_denoiser():
    x = torch.zeros(1, 1, 2, 2)
    schedule = ddim_schedule(AC, 5)
    events = []

    def hook(state, signal, noise):
        events.append(("hook", signal, noise))
        return state + 1.0

    def denoiser(state, t):
        events.append(("denoiser", int(t[0]), float(state.mean())))
        return torch.zeros_like(state)

    ddim_sample(denoiser, x, schedule, generator=torch.Generator(), before_step=hook)
    a = schedule.alphas.flip(0)
    assert [e[0] for e in events] == ["hook", "denoiser"] * 5
    for i, (signal, noise) in enumerate((e[1], e[2]) for e in events[::2]):
        assert signal == float(a[i]) ** 0.5 and noise == (1 - float(a[i])) ** 0.5
    assert [e[1] for e in events[1::2]] == schedule.timesteps.flip(0).tolist()
    assert events[1][2] == 1.0  # the denoiser got the hooked state


def blended_ddim(denoiser, x_T, schedule, keep, x0, seed: int = 4):
    """DDIM with inpainting by blending, its blend and eta noise from one generator, as the tasks run it."""
    generator = torch.Generator().manual_seed(seed)
    return ddim_sample(denoiser, x_T, schedule, generator=generator, before_step=LatentBlend(keep, x0, generator))


def _masked_setup():
    gen = torch.Generator().manual_seed(21)
    x0 = torch.randn(1, 2, 4, 4, generator=gen)
    x_T_a = torch.randn(1, 2, 4, 4, generator=gen)
    x_T_b = torch.randn(1, 2, 4, 4, generator=gen) * 3
    return x0, x_T_a, x_T_b


def test_mask_one_keeps_x0_and_forgets_x_T():
    x0, x_T_a, x_T_b = _masked_setup()
    schedule = ddim_schedule(AC, 10)
    mask = torch.ones_like(x0)
    denoiser = delta_denoiser(x0)
    a = blended_ddim(denoiser, x_T_a, schedule, mask, x0)
    b = blended_ddim(denoiser, x_T_b, schedule, mask, x0)
    assert torch.equal(a, b)

    # before each step x is x0 noised with a fresh draw n; the exact eps is then n, so the result is
    # x0 noised to abar_0 with the last of the 10 draws (the last step is not re-blended).
    replay = torch.Generator().manual_seed(4)
    draws = [torch.randn(x0.shape, generator=replay) for _ in range(len(schedule))]
    expected = AC[0].sqrt().item() * x0 + (1 - AC[0]).sqrt().item() * draws[-1]
    torch.testing.assert_close(a, expected, rtol=0, atol=1e-5)


def test_mask_zero_equals_the_unmasked_run():
    x0, x_T, _ = _masked_setup()
    schedule = ddim_schedule(AC, 10)
    denoiser = gaussian_denoiser([0.5, 2.0])
    plain = ddim_sample(denoiser, x_T, schedule, generator=torch.Generator().manual_seed(4))
    masked = blended_ddim(denoiser, x_T, schedule, torch.zeros_like(x0), x0)
    assert torch.equal(plain, masked)


def test_partial_mask_keeps_where_one_and_samples_where_zero():
    x0, x_T, _ = _masked_setup()
    mu = torch.full_like(x0, -0.4)
    mu[..., :2] = x0[..., :2]  # the point mass agrees with x0 on the kept half
    mask = torch.zeros_like(x0)
    mask[..., :2] = 1.0
    schedule = ddim_schedule(AC, 10)
    denoiser = delta_denoiser(mu)  # elementwise, so the halves do not interact
    masked = blended_ddim(denoiser, x_T, schedule, mask, x0)
    plain = ddim_sample(denoiser, x_T, schedule, generator=torch.Generator().manual_seed(4))
    assert torch.equal(masked[..., 2:], plain[..., 2:])
    replay = torch.Generator().manual_seed(4)
    last = [torch.randn(x0.shape, generator=replay) for _ in range(len(schedule))][-1]
    kept = AC[0].sqrt().item() * x0 + (1 - AC[0]).sqrt().item() * last
    torch.testing.assert_close(masked[..., :2], kept[..., :2], rtol=0, atol=1e-5)
    assert (masked[..., :2] - plain[..., :2]).abs().max() > 1e-2


# ---------------------------------------------------------------- cancellation


def test_should_stop_cancels_between_steps():
    asked = []

    def should_stop():
        asked.append(True)
        return len(asked) == 4

    denoiser = counting(delta_denoiser(torch.zeros(1, 1, 2, 2)))
    steps: list[StepInfo] = []
    with pytest.raises(SamplingCancelled) as info:
        ddim_sample(denoiser, torch.ones(1, 1, 2, 2), ddim_schedule(AC, 10), generator=torch.Generator(),
                    should_stop=should_stop, callback=steps.append)
    assert info.value.step == 3 and info.value.total == 10
    assert len(denoiser.calls) == 3 and len(steps) == 3 and len(asked) == 4


# ---------------------------------------------------------------- parameterisation


def _forward_process():
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([10, 500, 990])
    a = AC[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    return x0, eps, t, x_t, v


def test_output_to_eps_inverts_each_parameterisation():
    x0, eps, t, x_t, v = _forward_process()
    alpha_bar = AC[t]
    torch.testing.assert_close(output_to_eps(eps, x_t, alpha_bar, "eps"), eps, rtol=0, atol=1e-6)
    torch.testing.assert_close(output_to_eps(v, x_t, alpha_bar, "v"), eps, rtol=0, atol=1e-6)
    torch.testing.assert_close(output_to_eps(x0, x_t, alpha_bar, "x0"), eps, rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: check_parameterization("epsilon"),
    lambda: output_to_eps(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), "epsilon"),
    lambda: EpsDenoiser(nn.Identity(), AC, "epsilon"),
])
def test_unknown_parameterisation_lists_the_known_ones(make):
    with pytest.raises(ValueError, match="epsilon") as info:
        make()
    assert all(kind in str(info.value) for kind in ("eps", "v", "x0"))


class RecordingUNet(nn.Module):
    def __init__(self, output: torch.Tensor | None = None):
        super().__init__()
        self.output = output
        self.calls: list[dict] = []

    def forward(self, x, t, context=None, y=None):
        self.calls.append({"x": x, "t": t, "context": context, "y": y})
        return self.output if self.output is not None else x[:, :4] * 2


def test_eps_denoiser_converts_v_with_each_samples_alpha_bar():
    _, eps, t, x_t, v = _forward_process()
    unet = RecordingUNet(output=v)
    out = EpsDenoiser(unet, AC, "v")(x_t, t)
    torch.testing.assert_close(out, eps, rtol=0, atol=1e-6)
    assert torch.equal(unet.calls[0]["t"], t)


def test_eps_denoiser_concatenates_after_x_and_passes_conditioning():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 4, 3, 3, generator=gen)
    concat = torch.randn(2, 5, 3, 3, generator=gen, dtype=torch.float64)
    context = torch.randn(2, 7, 16, generator=gen)
    y = torch.randn(2, 12, generator=gen)
    t = torch.tensor([1, 981])
    unet = RecordingUNet()
    out = EpsDenoiser(unet, AC, "eps")(x, t, context=context, concat=concat, y=y)
    (call,) = unet.calls
    assert call["x"].shape == (2, 9, 3, 3) and call["x"].dtype == torch.float32
    assert torch.equal(call["x"][:, :4], x)
    assert torch.equal(call["x"][:, 4:], concat.float())
    assert call["context"] is context and call["y"] is y and torch.equal(call["t"], t)
    assert torch.equal(out, x * 2)

    unet.calls.clear()
    EpsDenoiser(unet, AC, "eps")(x, t)
    assert unet.calls[0]["x"] is x and unet.calls[0]["context"] is None and unet.calls[0]["y"] is None


# ---------------------------------------------------------------- classifier-free guidance


class RecordingDenoiser:
    """eps depends on x, t and the conditioning, so mixing branches up changes the answer."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, x, t, context=None, y=None):
        self.calls.append({"x": x, "t": t, "context": context, "y": y})
        out = x * 0.5 + t.view(-1, 1, 1, 1) * 1e-3 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        if y is not None:
            out = out + y.sum(dim=1).view(-1, 1, 1, 1)
        return out


def _guidance_inputs():
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 4, 3, 3, generator=gen)
    t = torch.tensor([101, 901])
    cond = {"context": torch.randn(2, 5, 8, generator=gen), "y": None}
    uncond = {"context": torch.randn(2, 5, 8, generator=gen), "y": None}
    return x, t, cond, uncond


def test_guidance_batches_uncond_first_and_mixes():
    x, t, cond, uncond = _guidance_inputs()
    fake = RecordingDenoiser()
    out = ClassifierFreeGuidance(fake, 7.5)(x, t, cond=cond, uncond=uncond)
    (call,) = fake.calls
    assert call["x"].shape[0] == 4 and torch.equal(call["x"], torch.cat([x, x]))
    assert torch.equal(call["t"], torch.cat([t, t]))
    assert torch.equal(call["context"], torch.cat([uncond["context"], cond["context"]]))
    assert call["y"] is None

    reference = RecordingDenoiser()
    e_u, e_c = reference(x, t, **uncond), reference(x, t, **cond)
    torch.testing.assert_close(out, e_u + 7.5 * (e_c - e_u))
    assert (out - e_c).abs().max() > 1e-2


def test_guidance_with_several_keys():
    x, t, cond, uncond = _guidance_inputs()
    cond["y"], uncond["y"] = torch.ones(2, 3), torch.zeros(2, 3)
    fake = RecordingDenoiser()
    out = ClassifierFreeGuidance(fake, 3.0)(x, t, cond=cond, uncond=uncond)
    assert torch.equal(fake.calls[0]["y"], torch.cat([uncond["y"], cond["y"]]))
    reference = RecordingDenoiser()
    e_u, e_c = reference(x, t, **uncond), reference(x, t, **cond)
    torch.testing.assert_close(out, e_u + 3.0 * (e_c - e_u))


def test_guidance_scale_one_makes_one_conditional_pass():
    x, t, cond, uncond = _guidance_inputs()
    fake = RecordingDenoiser()
    out = ClassifierFreeGuidance(fake, 1.0)(x, t, cond=cond, uncond=uncond)
    (call,) = fake.calls
    assert call["x"].shape[0] == 2 and call["context"] is cond["context"]
    assert torch.equal(out, RecordingDenoiser()(x, t, **cond))


def test_guidance_without_uncond_makes_one_pass():
    x, t, cond, _ = _guidance_inputs()
    fake = RecordingDenoiser()
    out = ClassifierFreeGuidance(fake, 7.5)(x, t, cond=cond, uncond=None)
    (call,) = fake.calls
    assert call["x"] is x and call["context"] is cond["context"]
    assert torch.equal(out, RecordingDenoiser()(x, t, **cond))


def test_guidance_refuses_mismatched_conditioning():
    x, t, cond, uncond = _guidance_inputs()
    fake = RecordingDenoiser()
    with pytest.raises(ValueError, match="keys"):
        ClassifierFreeGuidance(fake, 7.5)(x, t, cond=cond, uncond={"context": uncond["context"]})
    with pytest.raises(ValueError, match="'y'"):
        ClassifierFreeGuidance(fake, 7.5)(x, t, cond={**cond, "y": torch.ones(2, 3)}, uncond=uncond)
    assert fake.calls == []


def test_guidance_inside_ddim_matches_manual_mix():
    """The wrapper is just a denoiser: DDIM with CFG equals DDIM over the hand-mixed epsilon."""
    x, _, cond, uncond = _guidance_inputs()
    schedule = ddim_schedule(AC, 5)
    guided = ddim_sample(ClassifierFreeGuidance(RecordingDenoiser(), 4.0), x, schedule,
                         generator=torch.Generator(), extra_args={"cond": cond, "uncond": uncond})
    ref = RecordingDenoiser()

    def mixed(x, t):
        e_u, e_c = ref(x, t, **uncond), ref(x, t, **cond)
        return e_u + 4.0 * (e_c - e_u)

    torch.testing.assert_close(guided, ddim_sample(mixed, x, schedule, generator=torch.Generator()))
