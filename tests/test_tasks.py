"""Layout, inpainting and upscaling on tiny models of the default layouts and of SD v1."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ldm.checkpoints.loader import load_model
from ldm.tasks.inpaint import inpaint
from ldm.tasks.request import GenerationRequest
from ldm.tasks.txt2img import txt2img
from ldm.tasks.upscale import upscale
from tests import tiny_default
from tests.tiny_sd import write_tiny_checkpoint

REQUEST = GenerationRequest("a red circle on the left", steps=3, scale=3.0, seed=5, width=32, height=32)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    preset = tiny_default.hybrid_preset()
    return load_model(tiny_default.write(preset, tmp_path_factory.mktemp("hybrid")), preset=preset)


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    preset = tiny_default.upscale_preset()
    return load_model(tiny_default.write(preset, tmp_path_factory.mktemp("up")), preset=preset)


@pytest.fixture(scope="module")
def sd_v1(tmp_path_factory):
    path, tokenizer, preset = write_tiny_checkpoint(tmp_path_factory.mktemp("sd"))
    return load_model(path, preset=preset, tokenizer_dir=tokenizer)


def picture(seed: int = 0, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def half_mask(size: int = 32) -> Image.Image:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:, size // 2 :] = 255
    return Image.fromarray(mask)


def test_layout_boxes_condition_a_layout_model(hybrid):
    plain = np.asarray(txt2img(hybrid, REQUEST).images[0])
    boxed = txt2img(hybrid, GenerationRequest(**{**REQUEST.__dict__, "boxes": (("red circle", 0.1, 0.1, 0.4, 0.4),)}))
    assert not np.array_equal(plain, np.asarray(boxed.images[0]))
    assert "Layout: red circle 0.100 0.100 0.400 0.400" in boxed.parameters[0]


def test_layout_on_a_text_only_model_is_refused(sd_v1):
    with pytest.raises(ValueError, match="layout"):
        txt2img(sd_v1, GenerationRequest(**{**REQUEST.__dict__, "boxes": (("cat", 0.1, 0.1, 0.4, 0.4),)}))


def test_boxes_without_area_are_refused(hybrid):
    with pytest.raises(ValueError, match="box 1 .*no area"):
        txt2img(hybrid, GenerationRequest(**{**REQUEST.__dict__, "boxes": (("red circle", 0.4, 0.1, 0.4, 0.4),)}))


@pytest.mark.parametrize("model_name", ["hybrid", "sd_v1"])
def test_inpainting_keeps_unmasked_pixels_exactly(model_name, request):
    loaded = request.getfixturevalue(model_name)
    image = picture(1, 36)  # not a multiple of the grid: generation runs at 32, paste-back at 36
    result = inpaint(loaded, REQUEST, image, half_mask(36))
    out, original = np.asarray(result.images[0]), np.asarray(image)
    assert out.shape == original.shape
    assert np.array_equal(out[:, :18], original[:, :18])
    assert not np.array_equal(out[:, 18:], original[:, 18:])


def test_native_inpainting_sees_the_image(hybrid):
    a = inpaint(hybrid, REQUEST, picture(1), half_mask()).images[0]
    b = inpaint(hybrid, REQUEST, picture(2), half_mask()).images[0]
    assert not np.array_equal(np.asarray(a)[:, 16:], np.asarray(b)[:, 16:])


def test_an_empty_mask_is_refused_with_a_message(hybrid):
    with pytest.raises(ValueError, match="mask is empty"):
        inpaint(hybrid, REQUEST, picture(), Image.new("L", (32, 32), 0))


def test_upscaling_multiplies_the_size_by_the_first_stage_factor(upscaler):
    image = picture(3, 10)  # padded to the UNet's grid, cropped back
    result = upscale(upscaler, image, GenerationRequest("", steps=3, seed=1))
    assert result.images[0].size == (20, 20)
    assert "Upscale: 2x" in result.parameters[0]


def test_the_upscaler_follows_its_input(upscaler):
    a = np.asarray(upscale(upscaler, picture(4, 8), GenerationRequest("", steps=3, seed=1)).images[0])
    b = np.asarray(upscale(upscaler, picture(5, 8), GenerationRequest("", steps=3, seed=1)).images[0])
    assert not np.array_equal(a, b)


def test_a_model_that_is_not_an_upscaler_is_refused(hybrid):
    with pytest.raises(ValueError, match="not a super-resolution model"):
        upscale(hybrid, picture(), GenerationRequest("", steps=3))
