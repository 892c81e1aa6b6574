"""Outpainting on tiny models: a native inpainting model (the default layout's hybrid model, SD 2
inpainting) and one that fills by latent blending (SD v1); the canvas, the exact paste-back, the
masked-content modes, the PNG fields, bad input, the command line, and a panorama under the
memory guard on the embedded default model."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from PIL import Image

from ldm.cli import main
from ldm.tasks import planning
from ldm.tasks.outpaint import (FILL_MODES, OutpaintOptions, extend_to, options_from_fields, outpaint, outpaint_preview,
                                prefilled_canvas, seam_mask)
from ldm.tasks.parameters import parse_parameters, read_png_parameters
from ldm.tasks.request import MAX_SIDE, GenerationRequest, TilingOptions

REQUEST = GenerationRequest("a red circle", steps=3, scale=3.0, seed=5, width=32, height=32)
SIDES = OutpaintOptions(left=8, right=16)


def picture(seed: int = 0, width: int = 32, height: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def middle(image: Image.Image, options: OutpaintOptions, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(image)[options.top : options.top + size[1], options.left : options.left + size[0]]


@pytest.mark.parametrize("model_name", ["loaded_default_hybrid", "loaded_sd2_inpainting", "loaded_sd_v1"])
def test_the_canvas_grows_and_the_picture_comes_back_exactly(model_name, request):
    loaded = request.getfixturevalue(model_name)
    image = picture(1, 30, 28)  # not on the grid: the canvas is worked at the model's multiple, then fitted back
    options = OutpaintOptions(left=8, right=16, top=4, bottom=0)
    result = outpaint(loaded, REQUEST, image, options=options)
    out = result.images[0]
    assert out.size == (54, 32)
    np.testing.assert_array_equal(middle(out, options, image.size), np.asarray(image))
    border = np.asarray(out)[:, :8]
    assert border.std() > 0 and not np.array_equal(border, np.asarray(prefilled_canvas(image, options))[:, :8])


def test_ldm_inpainting_big_outpaints_from_the_picture_alone(tiny_ldm_inpainting):
    """LDM's inpainting_big reads no prompt: the border follows the picture, with the notice saying so."""
    loaded = tiny_ldm_inpainting.load()
    image = picture(12)
    result = outpaint(loaded, REQUEST, image, options=SIDES)
    assert result.images[0].size == (56, 32)
    np.testing.assert_array_equal(middle(result.images[0], SIDES, image.size), np.asarray(image))
    assert any("no text stage" in notice for notice in result.notices)


@pytest.mark.parametrize("model_name", ["loaded_default_hybrid", "loaded_sd_v1"])
def test_each_masked_content_mode_runs_and_starts_the_border_differently(model_name, request):
    loaded = request.getfixturevalue(model_name)
    image = picture(2)
    borders = {}
    for fill in FILL_MODES:
        # at strength 0.6 the start shows through; each mode still returns the picture exactly
        options = OutpaintOptions(left=16, right=16, fill=fill, strength=0.6)
        out = outpaint(loaded, REQUEST, image, options=options).images[0]
        np.testing.assert_array_equal(middle(out, options, image.size), np.asarray(image))
        borders[fill] = np.asarray(out)[:, :16].astype(int)
    for i, a in enumerate(FILL_MODES):
        for b in FILL_MODES[i + 1 :]:
            assert not np.array_equal(borders[a], borders[b]), (a, b)


def test_the_same_seed_gives_the_same_picture_and_another_seed_another(loaded_sd_v1):
    a = outpaint(loaded_sd_v1, REQUEST, picture(3), options=SIDES).images[0]
    b = outpaint(loaded_sd_v1, REQUEST, picture(3), options=SIDES).images[0]
    c = outpaint(loaded_sd_v1, GenerationRequest(**{**REQUEST.__dict__, "seed": 6}), picture(3), options=SIDES).images[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_a_batch_gives_one_picture_per_seed(loaded_default_hybrid):
    result = outpaint(loaded_default_hybrid, GenerationRequest(**{**REQUEST.__dict__, "batch_size": 2}), picture(4), options=SIDES)
    assert result.seeds == [5, 6] and len(result.images) == 2
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(result.images[1]))


def test_the_native_model_sees_the_picture_next_to_the_border(loaded_default_hybrid):
    a = outpaint(loaded_default_hybrid, REQUEST, picture(5), options=SIDES).images[0]
    b = outpaint(loaded_default_hybrid, REQUEST, picture(6), options=SIDES).images[0]
    assert not np.array_equal(np.asarray(a)[:, :8], np.asarray(b)[:, :8])


def test_fill_starts_the_border_in_the_pictures_colours_and_original_stretches_its_edge():
    image = Image.new("RGB", (16, 16), (200, 40, 10))
    image.paste((0, 0, 250), (8, 0, 16, 16))
    options = OutpaintOptions(left=24, right=8)
    filled = np.asarray(prefilled_canvas(image, options)).astype(int)
    red, blue = np.array([200, 40, 10]), np.array([0, 0, 250])
    # the border next to each half takes its colour; further out the wide blurs mix the two
    assert np.abs(filled[:, 23] - red).sum() < np.abs(filled[:, 23] - blue).sum()
    assert np.abs(filled[:, -1] - blue).sum() < np.abs(filled[:, -1] - red).sum()
    assert (filled >= np.minimum(red, blue) - 1).all() and (filled <= np.maximum(red, blue) + 1).all()
    assert len({tuple(p) for p in filled[0, :24]}) > 2  # blurred, not one flat colour
    original = np.asarray(prefilled_canvas(image, replace_fill(options, "original")))
    assert (original[:, :24] == [200, 40, 10]).all() and (original[:, -8:] == [0, 0, 250]).all()
    nothing = np.asarray(prefilled_canvas(image, replace_fill(options, "latent nothing")))
    assert (nothing[:, :24] == 128).all()


def replace_fill(options: OutpaintOptions, fill: str) -> OutpaintOptions:
    return OutpaintOptions(**{**options.__dict__, "fill": fill})


def test_the_seam_reaches_mask_blur_pixels_into_the_picture_on_extended_sides_only():
    mask = seam_mask((32, 32), OutpaintOptions(left=8, mask_blur=4))
    assert mask.shape == (32, 40)
    assert (mask[:, :8] == 1).all()
    row = mask[10, 8:16]
    assert (np.diff(row[:5]) < 0).all() and (row[4:] == 0).all() and 0 < row[0] < 1
    assert (mask[:, 12:] == 0).all()  # top, bottom and right are not extended: the picture keeps its edges there
    assert (seam_mask((32, 32), OutpaintOptions(left=8, mask_blur=0))[:, 8:] == 0).all()


def test_the_preview_is_the_canvas_with_the_picture_in_place():
    image = picture(7)
    preview = outpaint_preview(image, OutpaintOptions(left=16, right=16, mask_blur=0))
    assert preview.size == (64, 32)
    np.testing.assert_array_equal(np.asarray(preview)[:, 16:48], np.asarray(image))


def test_extensions_for_a_target_size_or_aspect_centre_the_picture():
    assert extend_to((30, 20), 64, 20) == {"left": 17, "right": 17, "top": 0, "bottom": 0}
    assert extend_to((30, 20), 31, 25) == {"left": 0, "right": 1, "top": 2, "bottom": 3}
    assert extend_to((512, 512), aspect=4.0) == {"left": 768, "right": 768, "top": 0, "bottom": 0}
    assert extend_to((40, 20), aspect=1.0) == {"left": 0, "right": 0, "top": 10, "bottom": 10}
    with pytest.raises(ValueError, match="smaller than the 30x20 picture"):
        extend_to((30, 20), 16, 20)


def test_the_parameters_record_the_outpaint_and_read_back(loaded_default_hybrid):
    options = OutpaintOptions(left=8, right=16, top=0, bottom=8, fill="latent noise", mask_blur=6, strength=0.9)
    result = outpaint(loaded_default_hybrid, REQUEST, picture(8), options=options)
    fields = parse_parameters(result.parameters[0])
    assert fields["Size"] == "56x40" and fields["Masked content"] == "latent noise" and fields["Mask blur"] == "6"
    assert fields["Denoising strength"] == "0.9" and fields["Outpaint"] == "left 8, right 16, top 0, bottom 8"
    assert '"left 8, right 16, top 0, bottom 8"' in result.parameters[0]  # quoted: it has commas
    assert OutpaintOptions(**options_from_fields(fields)) == options
    original = outpaint(loaded_default_hybrid, REQUEST, picture(8), options=replace_fill(options, "original"))
    fields = parse_parameters(original.parameters[0])
    assert "Masked content" not in fields  # AUTOMATIC1111 leaves its default out
    assert options_from_fields(fields)["fill"] == "original"


@pytest.mark.parametrize("options, size, message", [
    (OutpaintOptions(), (32, 32), "nothing to outpaint"),
    (OutpaintOptions(left=-8), (32, 32), "the left extension must be a whole number of pixels, 0 or more, got -8"),
    (OutpaintOptions(top=4.5), (32, 32), "the top extension must be a whole number"),
    (OutpaintOptions(right=MAX_SIDE), (32, 32), f"gives a {MAX_SIDE + 32}x32 canvas; the limit is {MAX_SIDE} px a side"),
    (OutpaintOptions(left=8, fill="blur"), (32, 32), "masked content 'blur' is not known; use one of fill, original"),
    (OutpaintOptions(left=8, mask_blur=100), (32, 32), "mask blur must be a whole number of pixels from 0 to 64"),
    (OutpaintOptions(left=8, strength=1.5), (32, 32), "denoising strength must be from 0"),
    (OutpaintOptions(left=8), (1, 1), "the picture is 1x1 px; outpainting continues a picture of at least 8 px a side"),
])
def test_bad_input_is_refused_with_a_message(loaded_default_hybrid, options, size, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        outpaint(loaded_default_hybrid, REQUEST, picture(0, *size), options=options)


def test_an_upscaler_cannot_outpaint(loaded_default_upscale):
    with pytest.raises(ValueError, match="cannot inpaint"):
        outpaint(loaded_default_upscale, REQUEST, picture(), options=SIDES)


# --- the command line ----------------------------------------------------------------------------------


def test_the_command_line_outpaints_on_the_embedded_model(tmp_path, capsys):
    source, out = tmp_path / "in.png", tmp_path / "out.png"
    picture(9, 48, 40).save(source)
    argv = ["outpaint", "--image", str(source), "--left", "16", "--right", "8", "--fill", "latent nothing",
            "--mask-blur", "4", "--strength", "0.8", "--prompt", "a red circle", "--steps", "2", "--seed", "3", "--out", str(out)]
    assert main(argv) == 0
    with Image.open(out) as image:
        assert image.size == (72, 40)
        np.testing.assert_array_equal(np.asarray(image)[:, 16:64], np.asarray(picture(9, 48, 40)))
    fields = read_png_parameters(out)
    assert fields["Outpaint"] == "left 16, right 8, top 0, bottom 0" and fields["Masked content"] == "latent nothing"
    assert fields["Mask blur"] == "4" and fields["Denoising strength"] == "0.8" and fields["Seed"] == "3"
    assert "seed 3" in capsys.readouterr().out


def test_the_command_line_extends_to_a_target_size_and_refuses_bad_extensions(tmp_path, capsys):
    source = tmp_path / "in.png"
    picture(9, 32, 32).save(source)
    base = ["outpaint", "--image", str(source), "--steps", "1", "--seed", "1", "--out", str(tmp_path / "o.png")]
    assert main([*base, "--width", "64"]) == 0
    assert read_png_parameters(tmp_path / "o.png")["Outpaint"] == "left 16, right 16, top 0, bottom 0"
    assert main(base) == 2
    assert "nothing to outpaint" in capsys.readouterr().err
    assert main([*base, "--left", "5000"]) == 2
    assert f"the limit is {MAX_SIDE} px a side" in capsys.readouterr().err
    assert main([*base, "--left", "8", "--aspect", "2:1"]) == 2
    assert "--aspect or --width/--height, not with --left" in capsys.readouterr().err


# --- a panorama under the memory guard -------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
    from ldm.checkpoints.loader import load_model
    from ldm.checkpoints.presets import DEFAULT_MODELS

    return load_model(DEFAULT_MODELS["txt2img"], device="cpu")


def test_a_picture_grows_step_by_step_into_a_panorama_sampled_in_tiles(embedded, caplog):
    """The embedded model's training size is 64 px: a 128 px picture extended by 64 px a side three
    times becomes a 512x128 panorama, four times the picture's width; under a small budget the guard
    samples the wider canvases in tiles, each call within the budget."""
    budget = 16  # MB
    request = GenerationRequest("a red circle", steps=1, scale=1.0, seed=2, width=64, height=64,
                                tiling=TilingOptions(budget_mb=budget))
    first = picture(10, 128, 128)
    image = first
    with caplog.at_level(logging.INFO, logger="ldm"):
        for _ in range(3):
            result = outpaint(embedded, request, image, options=OutpaintOptions(left=64, right=64))
            image = result.images[0]
    assert image.size == (512, 128)
    np.testing.assert_array_equal(np.asarray(image)[:, 192:320], np.asarray(first))  # the first picture, exactly, in the middle
    assert any("sampled in tiles" in notice for notice in result.notices)
    planned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory:")]
    assert len(planned) == 3 and "windows a call" in planned[-1]
    assert all(float(re.search(r"sampling ([\d,.]+) MB", m).group(1)) <= budget for m in planned)


def test_a_2048x512_panorama_of_a_512_picture_stays_within_the_memory_guard(embedded):
    """At the size a 512 px picture reaches when outpainted to 2048x512, the guard's plan: the UNet in
    tiles within the budget, the autoencoder in tiles, the whole well within a modest machine's free
    memory (what ``planning.plan`` checks before a call runs)."""
    model, f = embedded.model, embedded.model.config.downsampling_factor
    budget = 256
    request = GenerationRequest("a red circle", steps=1, scale=1.0, width=2048, height=512, tiling=TilingOptions(budget_mb=budget))
    chosen = planning.plan(model, request, 512 // f, 2048 // f, free_mb=1024)  # raises NotEnoughMemory if it did not fit
    parts = planning.estimate_parts(model, chosen, planning.plan_rows(model, request), 1, 512 // f, 2048 // f, request.tiling)
    whole = planning.estimate_first_stage_bytes(model, 1, 512, 2048) / 2**20
    assert chosen.tiled and chosen.estimate_mb > budget and parts["sampling"] <= budget
    assert planning.first_stage_tile(model, request.tiling, 1, 512, 2048) and parts["autoencoder"] < whole
    with pytest.raises(planning.NotEnoughMemory, match="make the image or the batch smaller"):
        planning.plan(model, request, 512 // f, 2048 // f, free_mb=100)  # and it would refuse a machine without the room


# --- the studio's Outpaint mode ------------------------------------------------------------------------


def test_the_studio_restores_the_outpaint_settings_and_previews_the_canvas(loaded_default_hybrid):
    import gradio as gr

    from ui.outpaint import outpaint_controls, preview_update, restored

    with gr.Blocks():
        controls = outpaint_controls("test")
    options = OutpaintOptions(left=0, right=24, top=8, bottom=16, fill="latent nothing", mask_blur=3, strength=0.7)
    fields = parse_parameters(outpaint(loaded_default_hybrid, REQUEST, picture(11), options=options).parameters[0])
    updates = restored(controls, fields)
    assert [updates[c] for c in controls.settings] == [0, 24, 8, 16, "latent nothing", 3, 0.7]
    assert restored(controls, parse_parameters("a cat\nSteps: 20, Sampler: DDIM, Mask blur: 4")) == {}  # inpainted, not outpainted
    shown = preview_update(picture(11), [8, 8, 0, 0, "fill", 4, 1.0])
    assert shown["value"].size == (48, 32) and "48x32" in shown["label"]
    refused = preview_update(picture(11), [0, 0, 0, 0, "fill", 4, 1.0])
    assert shown["value"] is not None and refused["value"] is None and "nothing to outpaint" in refused["label"]
