"""Every sampler of ``ldm.sampling.samplers`` through every task, end to end on the tiny models: the
request's sampler, schedule, eta and s_noise reach it by the one path (``ldm.tasks.generate.sample``)
with text guidance, inpainting by blending and native, the x4 and LDM SR concat, region prompts,
layout tokens, tiled canvases, semantic maps, batches, bf16 weights, live previews and stopping. A
seed reproduces an image bit for bit; image i of a batch is the seed alone."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoints.presets import PRESET_DIR, list_presets, preset_from_dict

from ldm.sampling.samplers import SAMPLERS
from ldm.sampling.sigmas import SCHEDULES
from ldm.sampling.steps import SamplingCancelled, StepInfo
from ldm.tasks.inpaint import inpaint
from ldm.tasks.layout import layout
from ldm.tasks.parameters import parse_parameters
from ldm.tasks.request import GenerationRequest, RegionPrompt, TilingOptions
from ldm.tasks.semantic import semantic
from ldm.tasks.txt2img import txt2img
from ldm.tasks.upscale import InputTiles, upscale
from tests.builders.semantic import label_map
from tests.helpers import picture, square_mask
from ui.jobs import Done, previewer, stream

REQUEST = GenerationRequest("a red circle", "a blue square", steps=4, scale=3.0, seed=11, width=32, height=32)


def ask(**fields) -> GenerationRequest:
    return replace(REQUEST, **fields)


def pixels(result, i: int = 0) -> np.ndarray:
    return np.asarray(result.images[i]).astype(int)


def with_sampler(sampler: str, schedule: str = "Automatic", **fields) -> GenerationRequest:
    return ask(**{"sampler": sampler, "schedule": schedule, "eta": SAMPLERS[sampler].eta_default, **fields})


# Each task as a function of (the conftest fixtures' models by name, a request) -> GenerationResult.
TASKS = {
    "txt2img-eps": ("loaded_sd_v1", lambda m, r: txt2img(m, r)),
    "txt2img-v": ("loaded_sd2_v", lambda m, r: txt2img(m, r)),
    "inpaint-blend": ("loaded_sd_v1", lambda m, r: inpaint(m, r, picture(32, 1), square_mask(32))),
    "inpaint-native-sd2": ("loaded_sd2_inpainting", lambda m, r: inpaint(m, r, picture(32, 2), square_mask(32))),
    "inpaint-native-default": ("loaded_default_hybrid", lambda m, r: inpaint(m, r, picture(32, 3), square_mask(32))),
    "upscale-x4": ("loaded_x4", lambda m, r: upscale(m, picture(8, 4), r, noise_level=30)),
    "upscale-ldm-sr-tiled": ("loaded_default_upscale", lambda m, r: upscale(m, picture(24, 5), replace(r, scale=1.0),
                                                                             tiles=InputTiles(16, 4))),
    "layout-tokens": ("loaded_default_hybrid", lambda m, r: layout(m, replace(r, boxes=(("red circle", 0.1, 0.1, 0.6, 0.7),)))),
    "layout-regions": ("loaded_sd_v1", lambda m, r: txt2img(m, replace(r, width=48, regions=(
        RegionPrompt("a cat", (0.0, 0.0, 0.5, 1.0)), RegionPrompt("a dog", (0.4, 0.2, 1.0, 0.8), "a bird", 0.7))))),
    "tiled-canvas": ("loaded_sd_v1", lambda m, r: txt2img(m, replace(r, width=64, height=48,
                                                                   tiling=TilingOptions("always", 32, 8)))),
    "semantic": ("loaded_semantic", lambda m, r: semantic(m, label_map((32, 32)), r)),
}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_artist_samplers_run_every_task_reproducibly_and_say_so(task, request):
    """DPM++ 2M Karras twice (the same seed, the same pixels) and Euler a once (another image)."""
    fixture, run = TASKS[task]
    loaded = request.getfixturevalue(fixture)
    first = run(loaded, with_sampler("DPM++ 2M", "Karras"))
    again = run(loaded, with_sampler("DPM++ 2M", "Karras"))
    assert np.array_equal(pixels(first), pixels(again)) and pixels(first).std() > 0
    ancestral = run(loaded, with_sampler("Euler a"))
    assert not np.array_equal(pixels(first), pixels(ancestral)), "the sampler reaches the task"
    fields = parse_parameters(first.parameters[0])
    assert (fields["Sampler"], fields["Schedule type"]) == ("DPM++ 2M", "Karras")
    assert "Eta" not in fields and "Eta DDIM" not in fields
    fields = parse_parameters(ancestral.parameters[0])
    assert (fields["Sampler"], fields["Schedule type"], fields["Eta"]) == ("Euler a", "Uniform", "1.0")


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("fixture", ["loaded_sd_v1", "loaded_sd2_v"])  # eps and v prediction
def test_every_sampler_makes_an_image_on_eps_and_v_models(fixture, sampler, request):
    result = txt2img(request.getfixturevalue(fixture), with_sampler(sampler, steps=3))
    assert result.images[0].size == (32, 32) and pixels(result).std() > 0
    assert parse_parameters(result.parameters[0])["Sampler"] == sampler


@pytest.mark.parametrize("task, sampler, schedule", [
    ("txt2img-eps", "Euler a", "Automatic"), ("txt2img-eps", "DPM++ 2M SDE", "Exponential"),
    ("txt2img-eps", "DPM++ SDE", "Karras"), ("inpaint-blend", "DPM++ SDE", "Karras"), ("upscale-x4", "Euler a", "Automatic"),
])
def test_image_i_of_a_batch_is_its_seed_alone(task, sampler, schedule, request):
    fixture, run = TASKS[task]
    loaded = request.getfixturevalue(fixture)
    batch = run(loaded, with_sampler(sampler, schedule, batch_size=3))
    assert batch.seeds == [11, 12, 13]
    alone = run(loaded, with_sampler(sampler, schedule, seed=13))
    assert np.abs(pixels(batch, 2) - pixels(alone)).max() <= 1
    assert "Seed: 13," in batch.parameters[2] and f"Sampler: {sampler}," in batch.parameters[2]


def test_automatic_is_the_samplers_own_schedule_and_another_schedule_changes_the_image(loaded_sd_v1):
    karras = pixels(txt2img(loaded_sd_v1, with_sampler("DPM++ 2M", "Karras")))
    assert np.array_equal(karras, pixels(txt2img(loaded_sd_v1, with_sampler("DPM++ 2M", "Automatic"))))
    for schedule in ("Uniform", "Exponential", "SGM Uniform", "Simple", "KL Optimal", "Align Your Steps", "Beta"):
        assert not np.array_equal(karras, pixels(txt2img(loaded_sd_v1, with_sampler("DPM++ 2M", schedule)))), schedule


def test_eta_and_s_noise_reach_the_samplers_that_take_them(loaded_sd_v1):
    euler = pixels(txt2img(loaded_sd_v1, with_sampler("Euler")))
    assert np.array_equal(euler, pixels(txt2img(loaded_sd_v1, ask(sampler="Euler a", eta=0.0))))  # eta 0: Euler
    ancestral = pixels(txt2img(loaded_sd_v1, with_sampler("Euler a")))
    quieter = txt2img(loaded_sd_v1, with_sampler("Euler a", s_noise=0.5))
    assert not np.array_equal(ancestral, pixels(quieter)) and "Sigma noise: 0.5" in quieter.parameters[0]
    # a sampler that takes neither ignores both, and its text names neither
    plain = txt2img(loaded_sd_v1, with_sampler("DPM++ 2M"))
    ignored = txt2img(loaded_sd_v1, with_sampler("DPM++ 2M", eta=0.7, s_noise=0.5))
    assert np.array_equal(pixels(plain), pixels(ignored))
    assert "Eta" not in ignored.parameters[0] and "Sigma noise" not in ignored.parameters[0]


def test_blend_inpainting_keeps_the_unmasked_pixels_with_every_sampler(loaded_sd_v1):
    image, mask = picture(32, 1), square_mask(32)
    keep = np.asarray(mask) < 128
    for sampler in SAMPLERS:
        out = np.asarray(inpaint(loaded_sd_v1, with_sampler(sampler, steps=3), image, mask).images[0])
        assert np.array_equal(out[keep], np.asarray(image)[keep]), sampler
        assert not np.array_equal(out[~keep], np.asarray(image)[~keep]), sampler


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "Euler a", "DPM++ SDE"])
def test_bf16_weights_sample_in_a_float32_state(tiny_sd_v1, loaded_sd_v1, sampler):
    half = tiny_sd_v1.load(dtype=torch.bfloat16)
    request = with_sampler(sampler)
    a, b = (pixels(txt2img(m, request)).astype(float) for m in (loaded_sd_v1, half))
    psnr = 10 * np.log10(255**2 / max(((a - b) ** 2).mean(), 1e-9))
    assert psnr > 25, psnr
    blended = inpaint(half, request, picture(32, 1), square_mask(32))  # the blend's known latent is bf16
    assert blended.images[0].size == (32, 32)


@pytest.mark.parametrize("sampler", ["DPM++ 2M SDE", "Heun", "UniPC", "DDIM"])
def test_live_previews_come_from_every_step_of_every_sampler(loaded_sd_v1, sampler):
    seen: list[StepInfo] = []
    preview = previewer(loaded_sd_v1.model)

    def work(callback, should_stop):
        def both(info):
            seen.append(info)
            callback(info)

        return txt2img(loaded_sd_v1, with_sampler(sampler, steps=3), callback=both, should_stop=should_stop)

    events = list(stream(work, threading.Event(), preview))
    assert isinstance(events[-1], Done)
    assert [(i.step, i.total) for i in seen] == [(0, 3), (1, 3), (2, 3)]  # one report a step, Heun's included
    levels = [float(i.t) for i in seen]
    assert levels == sorted(levels, reverse=True)  # sigmas (or DDIM's timesteps), decreasing
    assert all(event.preview is not None and event.preview.size == (32, 32) for event in events[:-1])


def test_stop_cancels_a_sigma_space_sampler_between_steps(loaded_sd_v1):
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(SamplingCancelled) as cancelled:
        txt2img(loaded_sd_v1, with_sampler("DPM++ 2M SDE", steps=5), should_stop=should_stop)
    assert (cancelled.value.step, cancelled.value.total) == (2, 5)


def test_unknown_names_are_refused_before_sampling(loaded_sd_v1):
    with pytest.raises(ValueError, match="sampler 'DPM\\+\\+ 2M Karras' is not known; use one of DDIM, Euler"):
        txt2img(loaded_sd_v1, ask(sampler="DPM++ 2M Karras"))
    with pytest.raises(ValueError, match=f"schedule 'Polyexponential' is not known; use one of {', '.join(SCHEDULES)}"):
        txt2img(loaded_sd_v1, ask(sampler="Euler", schedule="Polyexponential"))


def test_the_original_models_keep_ddim_and_a_preset_names_a_known_sampler():
    """The LDM and SD 1/2 models were published with DDIM; SDXL's demo samples with Euler (EulerEDMSampler);
    the Turbo models with one step of Euler a on the trailing grid (Simple)."""
    samplers = {p.name: (p.sampler.sampler, p.sampler.schedule) for p in list_presets()}
    sdxl, turbo = {"sd_xl_base", "sd_xl_refiner"}, {"sd_turbo", "sd_xl_turbo"}
    assert {samplers[n] for n in sdxl} == {("Euler", "Automatic")}
    assert {samplers[n] for n in turbo} == {("Euler a", "Simple")}
    assert {v for n, v in samplers.items() if n not in sdxl | turbo} == {("DDIM", "Automatic")}
    raw = OmegaConf.to_container(OmegaConf.load(PRESET_DIR / "v1-inference.yaml"))
    raw["sampler"].update(sampler="DPM++ 2M", schedule="Karras")
    assert preset_from_dict(raw, Path("ok.yaml")).sampler.sampler == "DPM++ 2M"
    for key, value, message in (("sampler", "DPM++ 2M Karras", "sampler 'DPM\\+\\+ 2M Karras' is not known; use one of DDIM"),
                                ("schedule", "karras", "schedule 'karras' is not known; use one of Automatic")):
        bad = {**raw, "sampler": {**raw["sampler"], key: value}}
        with pytest.raises(ValueError, match=f"bad.yaml sampler: {message}"):
            preset_from_dict(bad, Path("bad.yaml"))
