"""The studio's Image to image tab without a browser, on the embedded default model at 64 px: a
generation saves the result with its "Denoising strength" and the input picture beside it; in sketch
mode the brush strokes reach the picture, with sketch mode off they change nothing; a dropped PNG
restores strength, resize and step modes; every gallery sends here; bad input ends with a message
saying what to do, and pictures of any mode and size are taken."""

from __future__ import annotations

import types

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from ldm.tasks.parameters import parse_parameters, save_png
from ui.outputs import Restore, read_restore
from ui.studio import TABS
from ui.tabs import img2img as img2img_tab

BLUE = (40, 60, 200)


@pytest.fixture(scope="module")
def tab(studio):
    with gr.Blocks():
        return img2img_tab.build(studio, {name: module.TITLE for name, module in TABS.items()})


def editor(picture: Image.Image, *layers: Image.Image) -> dict:
    return {"background": picture, "layers": list(layers), "composite": picture}


def red_stroke(size: tuple[int, int]) -> Image.Image:
    """A layer with a thick red band across the middle, transparent elsewhere."""
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    layer.paste((230, 20, 20, 255), (0, size[1] * 3 // 8, size[0], size[1] * 5 // 8))
    return layer


def values(tab, **by_label) -> dict:
    """Every input of the generate event as the page starts it (2 steps, seed 5), some set by label."""
    components = [tab.model.dropdown, tab.editor, tab.sketch, tab.prompt, tab.negative, tab.strength, tab.resize_mode,
                  tab.step_mode, tab.size.width, tab.size.height, tab.batch_count, tab.batch_size, *tab.sampling.components]
    by_label = {"Steps": 2, "Seed": 5, "Prompt": "a red circle", **by_label}
    data = {c: by_label.get(c.label, "" if isinstance(c, gr.Textbox) and c.value is None else c.value) for c in components}
    data[tab.model.dropdown] = by_label.get("Model", tab.model.dropdown.value)
    data[tab.output.images] = []
    return data


def run(studio, tab, data: dict) -> list[dict]:
    generate = img2img_tab.handler(studio, tab)
    return list(generate(data, types.SimpleNamespace(session_hash="img2img"), progress=lambda *a, **k: None))


def generated(studio, tab, **by_label) -> tuple[Image.Image, str, dict]:
    """The saved image, its parameters text and its studio record."""
    updates = run(studio, tab, values(tab, **by_label))
    path = updates[-1][tab.output.selected]
    assert "saved" in updates[-1][tab.output.status]
    return Image.open(path), path, read_restore(path).extra


def message(studio, tab, **by_label) -> str:
    with pytest.raises(gr.Error) as raised:
        run(studio, tab, values(tab, **by_label))
    return str(raised.value.message)


def test_the_tab_is_registered_after_text_to_image_and_every_gallery_sends_to_it():
    assert list(TABS)[:2] == ["txt2img", "img2img"] and TABS["img2img"].TITLE == "Image to image"
    for name, module in TABS.items():
        assert "img2img" in module.SEND_TO, f"the {name} gallery cannot send to image to image"


def test_a_picture_is_redrawn_at_its_size_and_saved_with_its_strength_and_input(studio, tab):
    picture = Image.new("RGB", (80, 64), BLUE)
    image, path, record = generated(studio, tab, **{"Image (draw colour strokes on it in sketch mode)": editor(picture),
                                                    "Denoising strength": 0.5, "Steps": 4})
    assert image.size == (80, 64)
    fields = parse_parameters(image.text["parameters"])
    assert (fields["Denoising strength"], fields["Size"], fields["Steps"]) == ("0.5", "80x64", "4")
    assert "Resize mode" not in fields and "Img2img steps" not in fields  # the defaults are not written
    assert record["task"] == "img2img" and record["img2img"] == {"sketch": False, "input_size": [80, 64]}
    assert set(record["files"]) == {"input"}
    saved_input = Image.open(f"{path.rsplit('/', 1)[0]}/{record['files']['input']}")
    assert np.array_equal(np.asarray(saved_input), np.asarray(picture))


def test_another_size_another_resize_mode_and_exact_steps_reach_the_image(studio, tab):
    picture = Image.new("RGB", (64, 32), BLUE)
    image, _, _ = generated(studio, tab, **{"Image (draw colour strokes on it in sketch mode)": editor(picture),
                                            "Width": 48, "Height": 48, "Resize mode": "Crop and resize",
                                            "Img2img steps": "Exact steps", "Denoising strength": 0.5})
    fields = parse_parameters(image.text["parameters"])
    assert image.size == (48, 48)
    assert (fields["Resize mode"], fields["Img2img steps"]) == ("Crop and resize", "Exact steps")
    assert img2img_tab.size_asked(picture, 96, 0) == ((96, 48), [])  # one side alone keeps the shape
    assert img2img_tab.size_asked(picture, 0, 64) == ((128, 64), [])


def test_in_sketch_mode_the_strokes_reach_the_picture_and_without_it_they_are_ignored(studio, tab):
    picture = Image.new("RGB", (64, 64), BLUE)
    stroke = red_stroke(picture.size)
    key = "Image (draw colour strokes on it in sketch mode)"
    # strength 0 runs no step: the picture only goes through the autoencoder, so its colours show
    plain, _, _ = generated(studio, tab, **{key: editor(picture), "Denoising strength": 0.0})
    ignored, _, record_off = generated(studio, tab, **{key: editor(picture, stroke), "Denoising strength": 0.0})
    sketched, path, record_on = generated(studio, tab, **{key: editor(picture, stroke), "Sketch": True,
                                                         "Denoising strength": 0.0})
    assert np.array_equal(np.asarray(plain), np.asarray(ignored))
    band = np.asarray(sketched.convert("RGB"), dtype=np.float32)[28:36]
    assert band[..., 0].mean() > 150 and band[..., 2].mean() < 110, "the red stroke is not in the sketched picture"
    assert np.asarray(plain.convert("RGB"), dtype=np.float32)[28:36, :, 0].mean() < 110
    assert record_off["img2img"]["sketch"] is False and record_on["img2img"]["sketch"] is True
    assert set(record_on["files"]) == {"input", "sketch"}
    saved_sketch = Image.open(f"{path.rsplit('/', 1)[0]}/{record_on['files']['sketch']}")
    assert saved_sketch.mode == "RGBA" and saved_sketch.getpixel((5, 32)) == (230, 20, 20, 255)
    assert saved_sketch.getpixel((5, 5))[3] == 0
    # with denoising the strokes still steer the result
    redrawn_plain, _, _ = generated(studio, tab, **{key: editor(picture), "Denoising strength": 0.6, "Steps": 4})
    redrawn_sketch, _, _ = generated(studio, tab, **{key: editor(picture, stroke), "Sketch": True,
                                                    "Denoising strength": 0.6, "Steps": 4})
    assert not np.array_equal(np.asarray(redrawn_plain), np.asarray(redrawn_sketch))


def test_layers_of_another_size_are_fitted_and_stacked():
    picture = Image.new("RGB", (40, 20), BLUE)
    small = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    small.paste((0, 255, 0, 255), (0, 0, 10, 10))  # the left half
    _, strokes = img2img_tab.editor_parts(editor(picture, small, red_stroke((40, 20))), sketch=True)
    assert strokes.size == (40, 20)
    assert strokes.getpixel((5, 2))[:2] == (0, 255) and strokes.getpixel((30, 10)) == (230, 20, 20, 255)
    assert strokes.getpixel((30, 2))[3] == 0
    assert img2img_tab.editor_parts(editor(picture, small), sketch=False)[1] is None


def test_a_dropped_png_restores_strength_resize_and_step_modes(studio, tab, tmp_path):
    picture = Image.new("RGB", (64, 64), BLUE)
    _, path, _ = generated(studio, tab, **{"Image (draw colour strokes on it in sketch mode)": editor(picture),
                                           "Denoising strength": 0.35, "Resize mode": "Resize and fill",
                                           "Img2img steps": "Exact steps", "Seed": 11, "Prompt": "a green square"})
    restore = Restore(tab.prompt, tab.negative, tab.sampling, tab.size.width, tab.size.height)
    updates = img2img_tab.restore_updates(tab, restore, path)
    assert (updates[tab.strength], updates[tab.resize_mode], updates[tab.step_mode]) == (0.35, "Resize and fill", "Exact steps")
    assert (updates[tab.prompt], updates[tab.sampling.seed], updates[tab.size.width]) == ("a green square", 11, 64)
    # AUTOMATIC1111's img2img PNG writes only the strength: the modes go back to their defaults
    a1111 = save_png(Image.new("RGB", (8, 8)), tmp_path / "a1111.png",
                     "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 8x8, Denoising strength: 0.6")
    assert img2img_tab.img2img_updates(tab, read_restore(a1111)) == {
        tab.strength: 0.6, tab.resize_mode: "Just resize", tab.step_mode: "Strength x steps"}
    txt2img = save_png(Image.new("RGB", (8, 8)), tmp_path / "txt2img.png", "a cat\nSteps: 20, Seed: 1, Size: 8x8")
    assert img2img_tab.img2img_updates(tab, read_restore(txt2img)) == {}  # the tab keeps its own
    from_text = img2img_tab.restore_updates(tab, restore, str(txt2img))
    assert from_text[tab.prompt] == "a cat" and from_text[tab.sampling.steps] == 20
    assert tab.size.width not in from_text and tab.strength not in from_text  # the picture's size stays
    odd = save_png(Image.new("RGB", (8, 8)), tmp_path / "odd.png",
                   "a cat\nSteps: 20, Seed: 1, Size: 8x8, Denoising strength: 3, Resize mode: Stretch")
    assert img2img_tab.img2img_updates(tab, read_restore(odd)) == {tab.step_mode: "Strength x steps"}


def test_send_to_puts_the_picture_in_the_editor_and_the_prompt_in_its_box(tab, tmp_path):
    path = save_png(Image.new("RGB", (24, 16), BLUE), tmp_path / "sent.png", "a blue sky\nSteps: 2, Seed: 1, Size: 24x16")
    apply, outputs = img2img_tab.receive(tab)
    updates = apply(str(path), "a blue sky")
    assert set(updates) == set(outputs) == {tab.editor, tab.prompt}
    assert updates[tab.editor]["background"].size == (24, 16) and updates[tab.editor]["layers"] == []
    assert updates[tab.prompt] == "a blue sky"


@pytest.mark.parametrize("by_label, expected", [
    ({"Image (draw colour strokes on it in sketch mode)": None}, "No image: upload or paste one"),
    ({"Image (draw colour strokes on it in sketch mode)": {"background": None, "layers": []}}, "No image"),
    ({"Sketch": True}, "The sketch has no strokes: draw on the picture with the brush, or turn sketch mode off"),
    ({"Denoising strength": 1.5}, "Denoising strength must be from 0 (keep the image) to 1 (redraw it), got 1.5"),
    ({"Denoising strength": -0.1}, "Denoising strength must be from 0"),
    ({"Denoising strength": None}, "Denoising strength must be a number"),
    ({"Resize mode": "Stretch"}, "Resize mode 'Stretch' is not known; use one of Just resize, Crop and resize"),
    ({"Img2img steps": "All"}, "Img2img step mode 'All' is not known; use one of Strength x steps, Exact steps"),
    ({"Width": 5000}, "Width must be"),
    ({"Image (draw colour strokes on it in sketch mode)": {"background": Image.new("L", (25000, 2)), "layers": []}},
     "The image is 25000x2 px; pictures up to 20000 px a side are taken"),
], ids=["none", "no-background", "empty-sketch", "strength-high", "strength-low", "strength-none", "resize-mode",
        "step-mode", "width", "huge"])
def test_bad_input_ends_with_a_message_saying_what_to_do(studio, tab, by_label, expected):
    by_label = {"Image (draw colour strokes on it in sketch mode)": editor(Image.new("RGB", (32, 32), BLUE),
                                                                            Image.new("RGBA", (32, 32))), **by_label}
    assert message(studio, tab, **by_label).startswith(expected)


def wide_grey() -> Image.Image:
    return Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16))


def see_through() -> Image.Image:
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    image.paste((40, 60, 200, 255), (0, 0, 32, 64))
    return image


@pytest.mark.parametrize("picture, width, expected", [
    (wide_grey(), 0, (64, 64)),  # 16-bit grey, scaled to 8 bits
    (see_through(), 0, (64, 64)),  # transparency over white
    (Image.new("RGB", (1, 1), BLUE), 0, (64, 64)),  # a single pixel is worked at 64 px
    (Image.new("RGB", (10000, 10), BLUE), 64, (64, 16)),  # 10,000 px wide, at a width asked for
], ids=["16-bit", "transparent", "1px", "10000px"])
def test_pictures_of_any_mode_and_size_are_taken(studio, tab, picture, width, expected):
    image, _, _ = generated(studio, tab, **{"Image (draw colour strokes on it in sketch mode)": editor(picture),
                                            "Width": width, "Denoising strength": 0.0})
    assert image.size == expected
    if picture.mode == "RGBA":
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        assert pixels[:, 44:].mean() > 180 and pixels[:, :20, 2].mean() > pixels[:, :20, 0].mean() + 60
