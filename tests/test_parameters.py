"""The PNG parameters text (AUTOMATIC1111's format) and atomic PNG writing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image

from ldm.sampling.samplers import SAMPLERS
from ldm.sampling.sigmas import SCHEDULES
from ldm.tasks.parameters import (
    SamplerSettings,
    format_parameters,
    parameters_text,
    parse_parameters,
    read_png_parameters,
    read_sampler,
    save_png,
)
from ldm.tasks.request import GenerationRequest

FIELDS = {"Steps": 20, "Sampler": "DDIM", "CFG scale": 7.5, "Seed": 42, "Size": "512x512", "Model hash": "0123456789", "Model": "v1-5", "Eta DDIM": 0.0}


def test_the_text_has_automatic1111s_shape():
    text = format_parameters("a red cat", "blurry", FIELDS)
    assert text.split("\n") == [
        "a red cat",
        "Negative prompt: blurry",
        "Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 0123456789, Model: v1-5, Eta DDIM: 0.0",
    ]


def test_no_negative_line_without_a_negative_prompt():
    assert format_parameters("a cat", "", {"Steps": 5}) == "a cat\nSteps: 5"


def test_round_trip_with_multiline_prompts_and_commas_in_values():
    fields = dict(FIELDS, Model="my, model: v2")
    text = format_parameters("a cat,\non a mat", "ugly,\nblurry", fields)
    parsed = parse_parameters(text)
    assert parsed["Prompt"] == "a cat,\non a mat"
    assert parsed["Negative prompt"] == "ugly,\nblurry"
    assert parsed["Model"] == "my, model: v2"
    assert parsed["Seed"] == "42" and parsed["CFG scale"] == "7.5"


def test_a_png_carries_the_text_and_is_written_atomically(tmp_path):
    path = tmp_path / "out" / "image.png"
    text = format_parameters("a cat", "", FIELDS)
    save_png(Image.new("RGB", (8, 8), "red"), path, text, extra={"mask": {"feather": 4}})
    assert read_png_parameters(path)["Steps"] == "20"
    with Image.open(path) as image:
        assert image.text["parameters"] == text
        assert '"feather": 4' in image.text["ldm_studio"]
    assert [p.name for p in path.parent.iterdir()] == ["image.png"]


def test_a_failed_write_leaves_no_partial_file(tmp_path):
    class Broken(Image.Image):
        def save(self, *args, **kwargs):
            raise OSError("disk full")

    target = tmp_path / "image.png"
    try:
        save_png(Broken(), target, "x")
    except OSError:
        pass
    assert list(tmp_path.iterdir()) == []


# --- the sampler and its schedule, as AUTOMATIC1111 1.9+ writes them --------------------------------------

LOADED = SimpleNamespace(name="v1-5", short_hash="0123456789")


def written(**fields) -> str:
    request = GenerationRequest("a cat", steps=20, seed=42, **fields)
    return parameters_text(request, 42, LOADED).split("\n")[-1]


def test_the_sampler_and_its_resolved_schedule_are_written_as_automatic1111_1_9_does():
    assert written(sampler="DPM++ 2M") == ("Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, "
                                           "Size: 512x512, Model hash: 0123456789, Model: v1-5")
    assert written(sampler="Euler a", eta=1.0) == ("Steps: 20, Sampler: Euler a, Schedule type: Uniform, CFG scale: 7.5, "
                                                   "Seed: 42, Size: 512x512, Model hash: 0123456789, Model: v1-5, Eta: 1.0")
    assert "Schedule type: Exponential" in written(sampler="DPM++ 2M SDE")
    assert "Sampler: DPM++ 2M SDE, Schedule type: Karras," in written(sampler="DPM++ 2M SDE", schedule="Karras")
    assert "Sampler: Euler, Schedule type: SGM Uniform," in written(sampler="Euler", schedule="SGM Uniform")


def test_ddim_is_written_as_before_and_schedules_of_their_own_timesteps_are_left_out():
    assert written() == ("Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 0123456789, "
                         "Model: v1-5, Eta DDIM: 0.0")
    for sampler in ("UniPC", "LCM"):
        assert f"Sampler: {sampler}, CFG scale" in written(sampler=sampler)
    assert "Sampler: DDIM, Schedule type: Karras," in written(schedule="Karras")


def test_eta_is_written_under_its_samplers_key_and_sigma_noise_where_taken_and_not_1():
    assert "Eta DDIM: 0.3" in written(eta=0.3) and "Sigma noise" not in written(eta=0.3, s_noise=0.5)
    text = written(sampler="DPM++ SDE", eta=0.5, s_noise=0.8)
    assert text.endswith("Eta: 0.5, Sigma noise: 0.8") and "Eta DDIM" not in text
    assert "Sigma noise" not in written(sampler="Euler a", s_noise=1.0)
    for sampler in ("Euler", "Heun", "DPM++ 2M", "UniPC", "LCM"):
        assert "Eta" not in written(sampler=sampler, eta=0.4, s_noise=0.5), sampler
        assert "Sigma noise" not in written(sampler=sampler, s_noise=0.5), sampler


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_what_is_written_reads_back_as_the_same_run(sampler, schedule):
    eta = 0.4 if SAMPLERS[sampler].eta_field else 0.0
    s_noise = 0.9 if SAMPLERS[sampler].s_noise else 1.0
    read = read_sampler(parse_parameters(written(sampler=sampler, schedule=schedule, eta=eta, s_noise=s_noise)))
    expected = schedule if schedule != "Automatic" else "Automatic" if SAMPLERS[sampler].automatic is None \
        else SAMPLERS[sampler].automatic  # Automatic is written resolved, and runs the same sigmas
    assert read == SamplerSettings(sampler, expected, eta if SAMPLERS[sampler].eta_field else None, s_noise)


@pytest.mark.parametrize("label, schedule", [
    ("DPM++ 2M Karras", ("DPM++ 2M", "Automatic")),  # the fused schedule is the sampler's default
    ("DPM++ 2M", ("DPM++ 2M", "Uniform")),  # up to 1.8 a bare name ran k-diffusion's default sigmas
    ("Euler a", ("Euler a", "Automatic")),
    ("DPM++ 2M SDE Karras", ("DPM++ 2M SDE", "Karras")),
    ("DPM++ 2M SDE Exponential", ("DPM++ 2M SDE", "Automatic")),
    ("DPM++ SDE Karras", ("DPM++ SDE", "Automatic")),
    ("Euler Karras", ("Euler", "Karras")),
    ("DDIM", ("DDIM", "Automatic")),
    ("UniPC", ("UniPC", "Automatic")),
])
def test_the_fused_names_of_automatic1111_up_to_1_8_are_read(label, schedule):
    read = read_sampler({"Sampler": label})
    assert (read.sampler, read.schedule) == schedule


def test_a_missing_eta_is_the_samplers_default_as_automatic1111_leaves_it_out():
    assert read_sampler({"Sampler": "Euler a"}).eta == 1.0
    assert read_sampler({"Sampler": "DDIM"}).eta == 0.0
    assert read_sampler({"Sampler": "DPM++ 2M SDE", "Eta": "0.6", "Sigma noise": "0.95"})[2:] == (0.6, 0.95)
    assert read_sampler({"Sampler": "DPM++ 2M"}).eta is None
    assert read_sampler({"Prompt": "a cat", "Steps": "20"}) is None


def test_an_unknown_sampler_or_schedule_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="sampler 'DPM2 a Karras' is not known; use one of DDIM, Euler, Euler a, Heun"):
        read_sampler({"Sampler": "DPM2 a Karras"})
    with pytest.raises(ValueError, match="schedule 'Polyexponential' is not known; use one of Automatic, Uniform"):
        read_sampler({"Sampler": "Euler", "Schedule type": "Polyexponential"})


def test_a_model_file_is_hashed_once_as_it_is_and_again_when_it_changes(tmp_path, monkeypatch):
    import hashlib
    import os

    import ldm.checkpoints.loaded as loaded

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights" * 1000)
    reads = []
    real_open = open
    monkeypatch.setattr(loaded, "open", lambda p, mode="r", *a, **k: reads.append(p) or real_open(p, mode, *a, **k),
                        raising=False)
    first = loaded.model_hash(path)
    assert first == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert loaded.model_hash(tmp_path / "." / "model.safetensors") == first and len(reads) == 1  # read once
    path.write_bytes(b"other weights" * 1000)
    os.utime(path, ns=(1, 2))  # a changed file, whatever the clock's resolution
    assert loaded.model_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:10] != first
    assert len(reads) == 2
