"""The studio's inpainting and upscale tabs with LDM's inpainting_big and bsr_sr (tiny original-layout
files, detected through tiny presets): each is offered by its own tab only; inpainting_big's prompt
boxes are disabled and a prompt that reaches it anyway is dropped with a notice; both generate."""

from __future__ import annotations

import types
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.checkpoints.presets import list_presets
from tests.builders import ldm_image
from ui.outputs import OutputWriter
from ui.services import ModelCache, Studio
from ui.tabs import inpaint as inpaint_tab
from ui.tabs import upscale as upscale_tab

SIZE = 32
TITLES = {"img2img": "Image to image", "inpaint": "Inpainting", "upscale": "Upscaling", "layout": "Layout"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A model folder of the two, inpainting_big's with the copy of its first stage that its files carry."""
    folder = tmp_path_factory.mktemp("ldm_studio")
    ldm_image.write(folder, kind="inpainting", first_stage_copy=True)
    ldm_image.write(folder, kind="sr")
    return folder


@pytest.fixture
def studio(folder, monkeypatch):
    import ldm.checkpoints.catalog as catalog
    import ldm.checkpoints.loader as loader

    presets = [*list_presets(), ldm_image.make_preset("inpainting"), ldm_image.make_preset("sr")]
    monkeypatch.setattr(catalog, "list_presets", lambda: presets)
    monkeypatch.setattr(loader, "list_presets", lambda: presets)
    monkeypatch.setattr("ui.services.WEIGHTS_DIR", folder / "no-weights-here")
    return Studio([folder], OutputWriter(folder / "outputs"), ModelCache(torch.device("cpu"), torch.float32))


def paths(studio: Studio, task: str) -> list[str]:
    return [e.path.name for e in studio.entries_for(task)]


def picture(seed: int = 0, size: int = SIZE) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def painted_layer() -> Image.Image:
    layer = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    layer[8:20, 10:26] = 255
    return Image.fromarray(layer, "RGBA")


def run(generate, data: dict) -> list[dict]:
    return list(generate(data, types.SimpleNamespace(session_hash="s"), progress=lambda *a, **k: None))


def test_each_model_is_offered_by_its_own_tab(studio):
    assert paths(studio, "inpaint") == ["tiny-ldm-inpainting-copy.safetensors"]
    assert paths(studio, "upscale") == ["tiny-ldm-sr.safetensors"]
    assert paths(studio, "txt2img") == [] and paths(studio, "layout") == []


def test_the_inpainting_tab_takes_no_prompt_for_inpainting_big_and_fills(studio, folder):
    with gr.Blocks():
        tab = inpaint_tab.build(studio, TITLES)
    path = str(folder / "tiny-ldm-inpainting-copy.safetensors")
    assert tab.model.dropdown.value == str(Path(path).resolve())
    assert not tab.prompt.interactive and tab.prompt.placeholder == inpaint_tab.NO_PROMPT and not tab.negative.interactive
    updates = inpaint_tab.prompt_boxes(studio, tab)(path)
    assert updates[tab.prompt]["interactive"] is False and updates[tab.negative]["interactive"] is False
    assert inpaint_tab.prompt_boxes(studio, tab)(None)[tab.prompt]["interactive"] is True
    data = {tab.model.dropdown: path, tab.editor: {"background": picture(), "layers": [painted_layer()]},
            tab.prompt: "a door", tab.negative: "", tab.feather: 0, tab.only_masked: False, tab.padding: 32,
            tab.sampling.steps: 2, tab.sampling.scale: 7.5, tab.sampling.eta: 0.0, tab.sampling.seed: 5, tab.batch_size: 1,
            tab.sampling.sampler: "DDIM", tab.sampling.schedule: "Automatic", tab.sampling.s_noise: 1.0,
            tab.sampling.emphasis: "Original", tab.output.images: []}
    with pytest.warns(UserWarning, match="no text stage: the prompt and the guidance scale are not used"):
        updates = run(inpaint_tab.handler(studio, tab), data)  # the notice reaches the page as a gr.Warning
    (saved,) = updates[-1][tab.output.gallery]
    with Image.open(saved) as image:
        assert image.size == (SIZE, SIZE)
        kept = np.asarray(image.convert("RGB"))[:8]
    assert np.array_equal(kept, np.asarray(picture())[:8])  # above the painted area: the input's pixels
    parameters = updates[-1][tab.output.parameters]
    assert "CFG scale: 1.0" in parameters and "a door" not in parameters


def test_the_upscale_tab_runs_bsr_sr(studio, folder):
    with gr.Blocks():
        tab = upscale_tab.build(studio, TITLES)
    path = str((folder / "tiny-ldm-sr.safetensors").resolve())
    assert tab.model.dropdown.value == path
    data = {tab.model.dropdown: path, tab.image: picture(1, 12), tab.sampling.steps: 2, tab.sampling.eta: 1.0,
            tab.sampling.seed: 2, tab.sampling.scale: 1.0, tab.prompt: "", tab.negative: "", tab.noise_level: 20,
            tab.sampling.sampler: "DDIM", tab.sampling.schedule: "Automatic", tab.sampling.s_noise: 1.0,
            tab.sampling.emphasis: "Original", tab.tile: 0, tab.overlap: 0, tab.output.images: []}
    updates = run(upscale_tab.handler(studio, tab), data)
    (saved,) = updates[-1][tab.output.gallery]
    with Image.open(saved) as image:
        assert image.size == (24, 24)  # the tiny first stage is f2
    assert "Eta DDIM: 1.0" in updates[-1][tab.output.parameters]
