"""The studio's sampler controls without a browser: every generating tab has the Sampler and Schedule
type menus, eta and s_noise are enabled where the sampler takes them and a sampler picked by hand
brings its default eta, presets and a model's defaults set sampler and schedule, a finished image's
parameters carry them, and a dropped PNG (the studio's, AUTOMATIC1111 1.9+'s or an older fused name)
sets the menus back."""

from __future__ import annotations

import types

import gradio as gr
import pytest
from PIL import Image

from ldm.sampling.samplers import SAMPLERS
from ldm.sampling.sigmas import SCHEDULES
from ldm.tasks.parameters import parse_parameters, save_png
from ui.controls import picked_sampler
from ui.generation import model_changed
from ui.outputs import Restore
from ui.tabs import txt2img as txt2img_tab
from ui.tabs import upscale as upscale_tab

TITLES = {"img2img": "Image to image", "inpaint": "Inpainting", "upscale": "Upscaling", "layout": "Layout"}


@pytest.fixture(scope="module")
def tab(studio):
    with gr.Blocks():
        return txt2img_tab.build(studio, TITLES)


def run(generate, data: dict) -> list[dict]:
    return list(generate(data, types.SimpleNamespace(session_hash="s"), progress=lambda *a, **k: None))


def page_values(tab, **by_label) -> dict:
    """Every input of the tab's generate event as the page starts it, some set by label."""
    components = [tab.model.dropdown, tab.prompt, tab.negative, tab.size.width, tab.size.height, tab.batch_count,
                  tab.batch_size, *tab.tiling.components, *tab.sampling.components, *tab.hires.components]
    data = {c: by_label.get(c.label, "" if isinstance(c, gr.Textbox) and c.value is None else c.value) for c in components}
    data[tab.output.images] = []
    return data


def test_every_generating_tab_offers_every_sampler_and_schedule(studio):
    from ui.studio import TABS

    for name, module in TABS.items():
        with gr.Blocks():
            built = module.build(studio, {n: m.TITLE for n, m in TABS.items()})
        sampling = built.sampling
        assert [c[0] for c in sampling.sampler.choices] == list(SAMPLERS), name
        assert [c[0] for c in sampling.schedule.choices] == list(SCHEDULES), name
        assert (sampling.sampler.value, sampling.schedule.value, sampling.s_noise.value) == ("DDIM", "Automatic", 1.0)
        assert sampling.sampler.elem_id == f"{name}-sampler" and sampling.preset.elem_id == f"{name}-sampler-preset"


def test_eta_and_s_noise_are_enabled_where_the_sampler_takes_them(tab):
    for name, sampler in SAMPLERS.items():
        updates = tab.sampling.noise_controls(name)
        assert updates[tab.sampling.eta]["interactive"] == (sampler.eta_field is not None), name
        assert updates[tab.sampling.s_noise]["interactive"] == sampler.s_noise, name
    assert "not used by DPM++ 2M" in tab.sampling.noise_controls("DPM++ 2M")[tab.sampling.eta]["info"]
    assert [picked_sampler(name) for name in ("DDIM", "Euler a", "DPM++ 2M SDE", "DPM++ SDE")] == [0.0, 1.0, 1.0, 1.0]


def test_presets_and_a_models_defaults_set_sampler_and_schedule(studio, tab):
    by_name = {p.name: p for p in studio.sampler_presets}
    chosen = by_name["DPM++ 2M Karras 20"]
    updates = tab.sampling.defaults(chosen.sampler, chosen.schedule, chosen.steps, chosen.eta, chosen.scale)
    assert (updates[tab.sampling.sampler], updates[tab.sampling.schedule], updates[tab.sampling.steps]) == ("DPM++ 2M", "Karras", 20)
    path = studio.default_for("txt2img")
    updates = model_changed(studio, tab.sampling, tab.size)(path, "Model default")
    assert (updates[tab.sampling.sampler], updates[tab.sampling.schedule]) == ("DDIM", "Automatic")
    assert tab.sampling.sampler not in model_changed(studio, tab.sampling, tab.size)(path, "Euler a 20")


def test_a_finished_image_carries_its_sampler_and_schedule_and_restores_them(tab, studio):
    data = page_values(tab, **{"Prompt": "a red circle", "Steps": 3, "Seed": 4, "Width": 64, "Height": 64,
                               "Sampler": "DPM++ 2M SDE", "Schedule type": "Karras", "Eta": 0.6, "Sigma noise": 0.9})
    updates = run(txt2img_tab.handler(studio, tab), data)
    text = updates[-1][tab.output.parameters]
    fields = parse_parameters(text)
    assert (fields["Sampler"], fields["Schedule type"], fields["Eta"], fields["Sigma noise"]) == ("DPM++ 2M SDE", "Karras",
                                                                                                  "0.6", "0.9")
    (saved, *_) = updates[-1][tab.output.gallery]
    restored, _ = Restore(tab.prompt, tab.negative, tab.sampling, tab.size.width, tab.size.height).updates(saved)
    sampling = tab.sampling
    assert (restored[sampling.sampler], restored[sampling.schedule], restored[sampling.eta], restored[sampling.s_noise],
            restored[sampling.steps], restored[sampling.seed]) == ("DPM++ 2M SDE", "Karras", 0.6, 0.9, 3, 4)


def png_with(tmp_path, text: str) -> str:
    return str(save_png(Image.new("RGB", (8, 8)), tmp_path / "a1111.png", text))


@pytest.mark.parametrize("last_line, expected", [
    ("Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 8x8",
     ("DPM++ 2M", "Karras", None)),
    ("Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 8x8", ("DPM++ 2M", "Automatic", None)),
    ("Steps: 20, Sampler: DPM++ 2M SDE Karras, CFG scale: 7, Seed: 1, Size: 8x8", ("DPM++ 2M SDE", "Karras", 1.0)),
    ("Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 8x8, Eta: 0.7",
     ("Euler a", "Automatic", 0.7)),
    ("Steps: 20, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 8x8, Eta DDIM: 0.3", ("DDIM", "Automatic", 0.3)),
])
def test_a_dropped_png_sets_the_sampler_menus(tab, tmp_path, last_line, expected):
    restore = Restore(tab.prompt, tab.negative, tab.sampling, tab.size.width, tab.size.height)
    updates, _ = restore.updates(png_with(tmp_path, f"a cat\n{last_line}"))
    sampling = tab.sampling
    assert (updates[sampling.sampler], updates[sampling.schedule], updates.get(sampling.eta)) == expected
    assert updates[tab.prompt] == "a cat" and updates[sampling.steps] == 20
    assert set(updates) <= set(restore.components)


def test_a_png_of_an_unknown_sampler_restores_the_rest_and_warns_with_the_known_ones(tab, tmp_path):
    restore = Restore(tab.prompt, tab.negative, tab.sampling, tab.size.width, tab.size.height)
    path = png_with(tmp_path, "a cat\nSteps: 30, Sampler: DPM2 a Karras, CFG scale: 7, Seed: 9, Size: 8x8")
    with pytest.warns(UserWarning, match="sampler 'DPM2 a Karras' is not known; use one of DDIM, Euler, Euler a"):
        updates, _ = restore.updates(path)
    assert tab.sampling.sampler not in updates and tab.sampling.schedule not in updates
    assert (updates[tab.prompt], updates[tab.sampling.steps], updates[tab.sampling.seed]) == ("a cat", 30, 9)


def test_the_upscale_tab_samples_with_the_chosen_sampler(studio):
    from tests.helpers import picture

    with gr.Blocks():
        tab = upscale_tab.build(studio, TITLES)
    s = tab.sampling
    data = {tab.model.dropdown: studio.default_for("upscale"), tab.image: picture(16, 3), s.steps: 2, s.seed: 2,
            s.scale: 1.0, s.eta: 1.0, s.sampler: "Euler a", s.schedule: "Automatic", s.s_noise: 1.0, s.emphasis: "Original", tab.prompt: "",
            tab.negative: "", tab.noise_level: 20, tab.tile: 0, tab.overlap: 0, tab.output.images: []}
    fields = parse_parameters(run(upscale_tab.handler(studio, tab), data)[-1][tab.output.parameters])
    assert (fields["Sampler"], fields["Schedule type"], fields["Eta"]) == ("Euler a", "Uniform", "1.0")
