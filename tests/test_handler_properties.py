"""Property-based tests of the studio's generate handlers: whatever values reach them (the browser's
widgets bound most, but a script or a tampered request can send anything: None, NaN, infinities,
text, huge numbers, 10,000-character prompts, odd images), each call either saves its images or
ends with a clear message, never an unexplained failure, a crash or a hang.

The handlers run for real on the embedded default model, except each sampler's loop, replaced by one
denoiser call (the request has been validated and encoded by then): a valid request for 1,000 steps
must not make the test take minutes. Sides are drawn small or invalid for the same reason."""

from __future__ import annotations

import time
from dataclasses import replace
from types import SimpleNamespace
from typing import NamedTuple

import gradio as gr
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import app
from ldm.sampling.samplers import SAMPLERS
from ldm.sampling.sigmas import SCHEDULES
from ui.errors import message_for
from ui.studio import build_app

UNEXPECTED = message_for(RuntimeError())[: message_for(RuntimeError()).index("(")]  # "Generation failed "
SLOW = 30.0  # seconds: a call slower than this counts as a hang

anything = st.one_of(st.none(), st.booleans(), st.text(max_size=8), st.integers(-10**12, 10**12),
                     st.floats(allow_nan=True, allow_infinity=True))
texts = st.one_of(st.text(max_size=80), st.text(min_size=1, max_size=20).map(lambda t: (t * 10_000)[:10_000]),
                  st.sampled_from(["a red circle 🟥 in the top left", "\u202e\u0000\ufeff", "红色的圆", "   "]), st.none())
modes = st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "1", "F"])


@st.composite
def pictures(draw, max_side: int = 96):
    w, h = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    seed = draw(st.integers(0, 2**16))
    array = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(array).convert(draw(modes))


@st.composite
def editor_values(draw):
    background = draw(st.one_of(st.none(), pictures()))
    if background is None:
        return draw(st.sampled_from([None, {}, {"background": None, "layers": []}]))
    layers = []
    for _ in range(draw(st.integers(0, 2))):
        alpha = draw(st.sampled_from(["empty", "full", "corner", "other size"]))
        size = (7, 5) if alpha == "other size" else background.size
        layer = Image.new("RGBA", size, (255, 255, 255, 0 if alpha == "empty" else 255))
        if alpha == "corner":
            layer.paste((255, 255, 255, 0), (0, 0, size[0] // 2, size[1]))
        layers.append(layer)
    return {"background": background, "layers": layers, "composite": background}


@st.composite
def canvases(draw, valid: bool):
    """The layout canvas. Valid: up to 4 boxes inside the picture with known labels; otherwise boxes
    anywhere (outside the picture, of zero area, inverted, NaN), too many, unknown or no labels."""
    side = draw(st.sampled_from([64, 128]))
    picture = np.zeros((side, side, 3), np.uint8)
    if valid:
        corner = st.floats(0, side)
        box = st.fixed_dictionaries({"xmin": corner, "ymin": corner, "xmax": corner, "ymax": corner,
                                     "label": st.sampled_from(["red circle", "blue square"])})
        boxes = draw(st.lists(box, min_size=1, max_size=4).filter(
            lambda bs: all(abs(b["xmax"] - b["xmin"]) > 2 and abs(b["ymax"] - b["ymin"]) > 2 for b in bs)))
        return {"image": picture, "boxes": boxes}
    coordinate = st.one_of(st.floats(-50, side + 50), st.sampled_from([0, side, float("nan")]))
    box = st.fixed_dictionaries({"xmin": coordinate, "ymin": coordinate, "xmax": coordinate, "ymax": coordinate,
                                 "label": st.sampled_from(["red circle", "7", "", "a dragon", None])})
    boxes = draw(st.one_of(st.lists(box, max_size=4), st.lists(box, min_size=40, max_size=40)))
    return draw(st.sampled_from([{"image": picture, "boxes": boxes}, None, {"boxes": "x"}, "x"]))


@st.composite
def masked_pictures(draw):
    """The inpainting editor's value with an image and some paint."""
    value = draw(editor_values())
    while not (value and value.get("background") is not None and value.get("layers")):
        value = draw(editor_values())
    return value


@st.composite
def pictures_to_redraw(draw):
    """The image-to-image editor's value with a picture (strokes or none)."""
    value = draw(editor_values())
    while not (value and value.get("background") is not None):
        value = draw(editor_values())
    return value


IMG2IMG_EDITOR = "Image (draw colour strokes on it in sketch mode)"

# What a browser can send for an input (by its label), and what else may arrive.
VALID = {
    "Prompt": st.text(max_size=80), "Negative prompt": st.text(max_size=40), "Global prompt (optional)": st.text(max_size=40),
    "Steps": st.integers(1, 1000), "Guidance scale (CFG)": st.floats(0, 50), "Eta": st.floats(0, 1),
    "Sampler": st.sampled_from(list(SAMPLERS)), "Schedule type": st.sampled_from(list(SCHEDULES)),
    "Sigma noise": st.floats(0, 2),
    "Seed": st.integers(-1, 2**32 - 1), "Width": st.integers(16, 160), "Height": st.integers(16, 160),
    "Batch count": st.integers(1, 2), "Batch size": st.integers(1, 2), "Tiling": st.sampled_from(["auto", "always", "off"]),
    "Tile size (px)": st.just(0), "Tile overlap (px)": st.integers(0, 16), "Memory budget (MB)": st.integers(1, 8192),
    "Image and mask: paint over what to replace": masked_pictures(),
    "Image to upscale (up to 1024 px a side)": pictures(40),
    "Tile size (input px)": st.sampled_from([0, 16, 32]), "Tile overlap (input px)": st.integers(0, 8),
    "Noise level": st.integers(0, 350), "Feather mask edge (px)": st.integers(0, 64),
    "Padding around the mask (px)": st.integers(0, 256), "Inpaint only the masked area": st.booleans(),
    IMG2IMG_EDITOR: pictures_to_redraw(), "Sketch": st.booleans(), "Denoising strength": st.floats(0, 1),
    "Resize mode": st.sampled_from(["Just resize", "Crop and resize", "Resize and fill"]),
    "Img2img steps": st.sampled_from(["Strength x steps", "Exact steps"]),
}
JUNK = {
    "Prompt": texts, "Negative prompt": texts, "Global prompt (optional)": texts,
    "Steps": st.one_of(st.sampled_from([0, -1, 10_000]), anything),
    "Width": st.one_of(st.sampled_from([0, 1, 10_000]), anything), "Height": st.one_of(st.sampled_from([0, 1, 10_000]), anything),
    "Image and mask: paint over what to replace": editor_values(),
    "Image to upscale (up to 1024 px a side)": st.one_of(st.none(), pictures(40), st.just(Image.new("RGB", (2000, 8)))),
    IMG2IMG_EDITOR: editor_values(),
}


class Handlers(NamedTuple):
    studio: object
    found: dict

    def __repr__(self) -> str:  # hypothesis prints the fixture with each failing example
        return f"Handlers({', '.join(self.found)})"


@pytest.fixture(scope="module")
def handlers(tmp_path_factory):
    args = app.parse_args(["--outputs", str(tmp_path_factory.mktemp("outputs"))])
    studio = app.make_studio(args)
    blocks = build_app(studio)
    found = {f.api_name: f for f in blocks.fns.values() if f.api_name and f.api_name.endswith("_generate")}
    return Handlers(studio, found)


@pytest.fixture(autouse=True)
def one_step_sampler(monkeypatch):
    def one_denoiser_call(denoiser, x_T, alphas_cumprod, steps, **kwargs):
        t = torch.full((x_T.shape[0],), len(alphas_cumprod) - 1, device=x_T.device)
        denoiser(x_T, t, **(kwargs.get("extra_args") or {}))
        return x_T

    for name, sampler in list(SAMPLERS.items()):  # each keeps its name, eta key and defaults
        monkeypatch.setitem(SAMPLERS, name, replace(sampler, run=one_denoiser_call))


def run(handler, data: dict) -> str:
    """The handler's last status line, or the message it ended with."""
    status = ""
    try:
        for update in handler.fn(data, SimpleNamespace(session_hash="hypothesis"), progress=lambda *a, **k: None):
            status = next((str(v) for k, v in update.items() if str(getattr(k, "elem_id", "")).endswith("-status")), status)
    except gr.Error as error:
        return str(error.message)
    return status


def check(handler, data: dict) -> str:
    start = time.monotonic()
    outcome = run(handler, data)
    assert time.monotonic() - start < SLOW, f"took {time.monotonic() - start:.0f} s"
    assert outcome, "neither a status nor a message"
    assert not outcome.startswith(UNEXPECTED), f"an unexplained failure: {outcome}"
    return outcome


def draw_inputs(draw, handler, studio, tab: str) -> dict:
    """Valid values for every input but at most two, which get anything."""
    labelled = [c for c in handler.inputs if not isinstance(c, gr.State)]
    spoiled = set(draw(st.lists(st.sampled_from(labelled), max_size=2)))
    data = {}
    for component in handler.inputs:
        label = getattr(component, "label", None)
        if isinstance(component, gr.State):
            data[component] = draw(st.sampled_from([[], None]))
        elif type(component).__name__ == "image_annotator":
            data[component] = draw(canvases(valid=component not in spoiled))
        elif label == "Model":
            choices = [studio.default_for(tab)] + ([None, "", "/nonexistent.safetensors"] if component in spoiled else [])
            data[component] = draw(st.sampled_from(choices))
        elif component in spoiled:
            data[component] = draw(JUNK.get(label, anything))
        else:
            data[component] = draw(VALID.get(label, st.just(component.value)))
    return data


PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.mark.slow  # a hundred examples a tab
@pytest.mark.parametrize("tab", ["txt2img", "img2img", "inpaint", "upscale", "layout", "semantic"])
def test_any_values_save_images_or_end_with_a_clear_message(handlers, tab):
    studio, found = handlers
    handler = found[f"{tab}_generate"]
    saved = []

    @PROPERTY
    @given(data=st.data())
    def any_values(data):
        if check(handler, draw_inputs(data.draw, handler, studio, tab)).startswith("saved "):
            saved.append(1)

    any_values()
    if tab != "semantic":  # no semantic model is installed: every example ends with the message saying so
        assert len(saved) >= 5, f"only {len(saved)} examples of the {tab} tab saved images: the valid ones must generate"


@pytest.mark.parametrize("junk", [None, float("nan"), float("inf"), "x", -(10**12)], ids=["None", "nan", "inf", "text", "huge"])
@pytest.mark.parametrize("tab", ["txt2img", "img2img", "inpaint", "upscale", "layout"])
def test_each_input_spoiled_alone_ends_with_a_clear_message_or_is_ignored(handlers, tab, junk):
    """Every input in turn (the others valid, as the page starts them) gets each junk value: a
    deterministic sweep beside the random examples above."""
    handler = handlers.found[f"{tab}_generate"]
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    valid = {"Image and mask: paint over what to replace": {
                 "background": image, "layers": [Image.new("RGBA", (32, 32), (255, 255, 255, 255))], "composite": image},
             "Image to upscale (up to 1024 px a side)": image, IMG2IMG_EDITOR: {"background": image, "layers": [], "composite": image}}
    for component in handler.inputs:
        if isinstance(component, gr.State) or getattr(component, "label", None) == "Model":
            continue
        data = page_defaults(handlers, tab, [], **valid)
        data[component] = junk
        check(handler, data)


def page_defaults(handlers, tab: str, states, **by_label) -> dict:
    """A handler's inputs as the page starts them (empty text boxes ""), the default model, 2 steps,
    the given values by label and ``states`` for the session's state."""
    handler = handlers.found[f"{tab}_generate"]
    by_label = {"Model": handlers.studio.default_for(tab), "Steps": 2, **by_label}
    data = {}
    for component in handler.inputs:
        if isinstance(component, gr.State):
            data[component] = states
            continue
        data[component] = by_label.get(component.label, component.value)
        if isinstance(component, gr.Textbox) and data[component] is None:
            data[component] = ""
    return data


def test_the_gallery_keeps_the_newest_images_up_to_its_limit(handlers, tmp_path):
    from ui.generation import MAX_GALLERY

    earlier = [str(tmp_path / f"old-{i}.png") for i in range(MAX_GALLERY)]
    gallery = None
    for update in handlers.found["txt2img_generate"].fn(page_defaults(handlers, "txt2img", earlier),
                                                        SimpleNamespace(session_hash="gallery"), progress=lambda *a, **k: None):
        gallery = next((v for k, v in update.items() if str(getattr(k, "elem_id", "")).endswith("-gallery")), gallery)
    assert len(gallery) == MAX_GALLERY
    assert gallery[1:] == earlier[:-1] and gallery[0] not in earlier


@pytest.mark.parametrize("side", [1, 10_000])
@pytest.mark.parametrize("tab", ["inpaint", "upscale"])
def test_a_one_pixel_image_is_worked_and_a_10000_pixel_one_refused_by_its_size(handlers, tab, side):
    image = Image.new("RGB", (side, side), (200, 30, 30))
    if tab == "inpaint":
        value = {"background": image, "layers": [Image.new("RGBA", (side, side), (255, 255, 255, 255))], "composite": image}
        label = "Image and mask: paint over what to replace"
    else:
        value, label = image, "Image to upscale (up to 1024 px a side)"
    outcome = check(handlers.found[f"{tab}_generate"], page_defaults(handlers, tab, [], **{label: value}))
    if side == 1:
        assert outcome.startswith("saved "), outcome
    else:
        assert "10000" in outcome and ("4096" in outcome or "1024" in outcome), outcome
