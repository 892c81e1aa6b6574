"""The PNG parameters text (AUTOMATIC1111's format) and atomic PNG writing."""

from __future__ import annotations

from PIL import Image

from ldm.tasks.parameters import format_parameters, parse_parameters, read_png_parameters, save_png

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
