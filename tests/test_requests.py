"""Request validation: clear messages that name the field, the value and what is allowed."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ldm.tasks.request import GenerationRequest, resolve_request


@pytest.mark.parametrize(
    "change, words",
    [
        ({"steps": 0}, ["steps", "between 1 and 1000", "0"]),
        ({"steps": 10000}, ["steps", "10000"]),
        ({"steps": 2.5}, ["steps", "whole number"]),
        ({"scale": -1.0}, ["guidance scale", "-1"]),
        ({"scale": math.nan}, ["guidance scale", "finite"]),
        ({"eta": math.inf}, ["eta", "finite"]),
        ({"eta": 1.5}, ["eta", "between 0 and 1"]),
        ({"width": 0}, ["width", "between 1 and 4096"]),
        ({"height": 100000}, ["height", "100000"]),
        ({"batch_size": 0}, ["batch size"]),
        ({"seed": -5}, ["seed"]),
        ({"steps": "20"}, ["steps", "number"]),
        ({"sampler": "DPM++ 2M Karras"}, ["sampler 'DPM++ 2M Karras' is not known", "DDIM, Euler, Euler a, Heun, DPM++ 2M"]),
        ({"sampler": None}, ["sampler None is not known", "LCM"]),
        ({"schedule": "karras"}, ["schedule 'karras' is not known", "Automatic, Uniform, Karras, Exponential, SGM Uniform, Simple, Normal, KL Optimal, Align Your Steps, Beta"]),
        ({"sampler": "LCM", "steps": 51}, ["LCM's own schedule has 1 to 50 steps", "51", "another schedule"]),
        ({"s_noise": -0.1}, ["s_noise", "between 0 and 2"]),
        ({"s_noise": math.nan}, ["s_noise", "finite"]),
    ],
)
def test_bad_values_get_a_message_naming_them(change, words):
    request = GenerationRequest("a cat", **change)
    with pytest.raises(ValueError) as error:
        resolve_request(request, 8)
    for word in words:
        assert word in str(error.value)


def test_every_sampler_and_schedule_is_accepted_and_lcm_on_another_schedule_takes_more_steps():
    from ldm.sampling.samplers import SAMPLERS
    from ldm.sampling.sigmas import SCHEDULES

    for sampler in SAMPLERS:
        for schedule in SCHEDULES:
            resolved, _ = resolve_request(GenerationRequest("a cat", sampler=sampler, schedule=schedule, s_noise=0.5), 8)
            assert (resolved.sampler, resolved.schedule, resolved.s_noise) == (sampler, schedule, 0.5)
    assert resolve_request(GenerationRequest("a cat", sampler="LCM", schedule="Karras", steps=100), 8)[0].steps == 100


def test_a_good_request_is_resolved_with_a_seed_and_rounded_sides():
    resolved, notices = resolve_request(GenerationRequest("a cat", width=500, height=512, seed=-1), 64)
    assert (resolved.width, resolved.height) == (512, 512)
    assert 0 <= resolved.seed < 2**32
    assert notices == ["width 500 is not a multiple of 64; using 512"]


anything = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.integers(-10**12, 10**12),
                     st.floats(allow_nan=True, allow_infinity=True))


@settings(max_examples=300, deadline=None)
@given(steps=anything, scale=anything, eta=anything, seed=anything, width=anything, height=anything, batch=anything,
       prompt=st.text(max_size=200))
def test_any_input_is_either_resolved_to_a_valid_request_or_refused_with_a_message(
    steps, scale, eta, seed, width, height, batch, prompt
):
    request = GenerationRequest(prompt, "", steps=steps, scale=scale, eta=eta, seed=seed, width=width, height=height,
                                batch_size=batch)
    try:
        resolved, _ = resolve_request(request, 64)
    except ValueError as error:
        assert str(error)
        return
    assert 1 <= resolved.steps <= 1000 and isinstance(resolved.steps, int)
    assert 0 <= resolved.scale <= 50 and 0 <= resolved.eta <= 1
    assert resolved.width % 64 == 0 and resolved.height % 64 == 0 and 64 <= resolved.width <= 4096
    assert 0 <= resolved.seed < 2**32 and 1 <= resolved.batch_size <= 16


def test_a_whole_number_beyond_a_floats_range_is_refused_by_its_size():
    """A JSON seed of 10^400 (hypothesis found it through the API) is a message, not an OverflowError."""
    from ldm.tasks.request import checked_number

    with pytest.raises(ValueError, match=r"seed must be between -1 and .*, got a number of about 10\^400"):
        checked_number("seed", 10**400, -1, 2**32 - 1, integer=True)
