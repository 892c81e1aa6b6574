"""Layout, inpainting and upscaling on tiny models of the default layouts, of SD v1 and of SD 2 inpainting."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ldm.tasks.inpaint import InpaintOptions, feather_alpha, inpaint, mask_region, working_size
from ldm.tasks.parameters import parse_parameters
from ldm.tasks.request import GenerationRequest
from ldm.tasks.txt2img import txt2img
from ldm.tasks.upscale import InputTiles, upscale

REQUEST = GenerationRequest("a red circle on the left", steps=3, scale=3.0, seed=5, width=32, height=32)


def picture(seed: int = 0, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def half_mask(size: int = 32) -> Image.Image:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:, size // 2 :] = 255
    return Image.fromarray(mask)


def test_layout_boxes_condition_a_layout_model(loaded_default_hybrid):
    plain = np.asarray(txt2img(loaded_default_hybrid, REQUEST).images[0])
    boxed = txt2img(loaded_default_hybrid, GenerationRequest(**{**REQUEST.__dict__, "boxes": (("red circle", 0.1, 0.1, 0.4, 0.4),)}))
    assert not np.array_equal(plain, np.asarray(boxed.images[0]))
    assert "Layout: red circle 0.100 0.100 0.400 0.400" in boxed.parameters[0]


def test_layout_on_a_text_only_model_becomes_region_prompts(loaded_sd_v1):
    result = txt2img(loaded_sd_v1, GenerationRequest(**{**REQUEST.__dict__, "boxes": (("cat", 0.1, 0.1, 0.4, 0.4),)}))
    assert "Regions: cat 0.100 0.100 0.400 0.400 1" in result.parameters[0] and "Layout:" not in result.parameters[0]
    plain = txt2img(loaded_sd_v1, REQUEST)
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(result.images[0]))


def test_boxes_without_area_are_refused(loaded_default_hybrid):
    with pytest.raises(ValueError, match="box 1 .*no area"):
        txt2img(loaded_default_hybrid, GenerationRequest(**{**REQUEST.__dict__, "boxes": (("red circle", 0.4, 0.1, 0.4, 0.4),)}))


@pytest.mark.parametrize("model_name", ["loaded_default_hybrid", "loaded_sd_v1", "loaded_sd2_inpainting"])
def test_inpainting_keeps_unmasked_pixels_exactly(model_name, request):
    loaded = request.getfixturevalue(model_name)
    image = picture(1, 36)  # not a multiple of the grid: generation runs at 32, paste-back at 36
    result = inpaint(loaded, REQUEST, image, half_mask(36))
    out, original = np.asarray(result.images[0]), np.asarray(image)
    assert out.shape == original.shape
    assert np.array_equal(out[:, :18], original[:, :18])
    assert not np.array_equal(out[:, 18:], original[:, 18:])


@pytest.mark.parametrize("model_name", ["loaded_default_hybrid", "loaded_sd2_inpainting"])
def test_native_inpainting_sees_the_image(model_name, request):
    loaded = request.getfixturevalue(model_name)
    assert loaded.model.inpaints_natively
    a = inpaint(loaded, REQUEST, picture(1), half_mask()).images[0]
    b = inpaint(loaded, REQUEST, picture(2), half_mask()).images[0]
    assert not np.array_equal(np.asarray(a)[:, 16:], np.asarray(b)[:, 16:])


def test_an_empty_mask_is_refused_with_a_message(loaded_default_hybrid):
    with pytest.raises(ValueError, match="mask is empty"):
        inpaint(loaded_default_hybrid, REQUEST, picture(), Image.new("L", (32, 32), 0))


@pytest.mark.parametrize("model_name", ["loaded_default_hybrid", "loaded_sd_v1"])
def test_a_full_mask_regenerates_the_whole_picture(model_name, request):
    loaded = request.getfixturevalue(model_name)
    full = Image.new("L", (32, 32), 255)
    a = np.asarray(inpaint(loaded, REQUEST, picture(1), full).images[0])
    b = np.asarray(inpaint(loaded, REQUEST, picture(2), full).images[0])
    np.testing.assert_array_equal(a, b)  # nothing of the input is kept: the same seed gives the same picture


def test_upscaling_multiplies_the_size_by_the_first_stage_factor(loaded_default_upscale):
    image = picture(3, 10)  # padded to the UNet's grid, cropped back
    result = upscale(loaded_default_upscale, image, GenerationRequest("", steps=3, seed=1))
    assert result.images[0].size == (20, 20)
    assert "Upscale: 2x" in result.parameters[0]


def test_the_upscaler_follows_its_input(loaded_default_upscale):
    a = np.asarray(upscale(loaded_default_upscale, picture(4, 8), GenerationRequest("", steps=3, seed=1)).images[0])
    b = np.asarray(upscale(loaded_default_upscale, picture(5, 8), GenerationRequest("", steps=3, seed=1)).images[0])
    assert not np.array_equal(a, b)


def test_a_model_that_is_not_an_upscaler_is_refused(loaded_default_hybrid):
    with pytest.raises(ValueError, match="not a super-resolution model"):
        upscale(loaded_default_hybrid, picture(), GenerationRequest("", steps=3))


# --- inpainting options: feathering and "only the masked area" ------------------------------------------

def box_mask(size: int, box: tuple[int, int, int, int]) -> Image.Image:
    mask = np.zeros((size, size), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    return Image.fromarray(mask)


@pytest.mark.parametrize("options", [InpaintOptions(feather=4), InpaintOptions(only_masked=True, padding=4),
                                     InpaintOptions(feather=3, only_masked=True, padding=0)])
def test_inpainting_options_keep_unmasked_pixels_exactly(loaded_default_hybrid, options):
    image, mask = picture(3, 48), box_mask(48, (20, 8, 36, 30))
    out = np.asarray(inpaint(loaded_default_hybrid, REQUEST, image, mask, options=options).images[0])
    keep = np.asarray(mask) == 0
    assert out.shape == (48, 48, 3)
    assert np.array_equal(out[keep], np.asarray(image)[keep])
    assert not np.array_equal(out[~keep], np.asarray(image)[~keep])


def test_feathering_fades_the_fill_in_from_the_mask_edge():
    mask = np.zeros((20, 20), dtype=bool)
    mask[4:16, 4:16] = True
    alpha = feather_alpha(mask, 3)
    assert alpha[~mask].max() == 0.0
    assert alpha[10, 10] == pytest.approx(1.0)
    ramp = alpha[10, 4:10]
    assert np.all(np.diff(ramp) >= 0) and 0 < ramp[0] < 0.5
    assert np.array_equal(feather_alpha(mask, 0), mask.astype(np.float32))


def test_only_masked_works_on_a_crop_around_the_mask(loaded_default_hybrid):
    """The model sees the crop (mask box plus padding) at its own resolution: pixels outside the crop
    cannot influence the fill, so changing them leaves the fill unchanged."""
    mask = box_mask(64, (40, 40, 56, 56))
    a, b = np.asarray(picture(1, 64)).copy(), np.asarray(picture(1, 64)).copy()
    b[:20, :20] = 0  # far outside the crop
    options = InpaintOptions(only_masked=True, padding=4)
    fill_a = np.asarray(inpaint(loaded_default_hybrid, REQUEST, Image.fromarray(a), mask, options=options).images[0])[40:56, 40:56]
    fill_b = np.asarray(inpaint(loaded_default_hybrid, REQUEST, Image.fromarray(b), mask, options=options).images[0])[40:56, 40:56]
    assert np.array_equal(fill_a, fill_b)
    assert mask_region(np.asarray(mask) > 0, 4) == (36, 36, 60, 60)
    assert working_size(24, 12, 32) == (32, 16)


def test_inpainting_options_are_checked(loaded_default_hybrid):
    with pytest.raises(ValueError, match="feather"):
        inpaint(loaded_default_hybrid, REQUEST, picture(), half_mask(), options=InpaintOptions(feather=-1))
    with pytest.raises(ValueError, match="padding"):
        inpaint(loaded_default_hybrid, REQUEST, picture(), half_mask(), options=InpaintOptions(padding=5000))


def test_inpainting_parameters_name_the_mask_settings(loaded_default_hybrid):
    text = inpaint(loaded_default_hybrid, REQUEST, picture(), half_mask(), options=InpaintOptions(feather=2, only_masked=True, padding=8)).parameters[0]
    fields = parse_parameters(text)
    assert fields["Mask blur"] == "2" and fields["Inpaint area"] == "Only masked" and fields["Masked area padding"] == "8"
    assert fields["Prompt"] == REQUEST.prompt


@pytest.mark.parametrize("model_name", ["loaded_default_hybrid", "loaded_sd_v1"])
def test_inpainting_at_a_strength_redraws_from_the_masked_content(model_name, request):
    """Below strength 1 (or from another masked content) the masked part is redrawn from what the mode
    puts there, in strength x steps steps; the unmasked pixels stay exact; each mode starts elsewhere."""
    loaded = request.getfixturevalue(model_name)
    image, mask = picture(3, 48), box_mask(48, (12, 8, 36, 30))
    keep = np.asarray(mask) == 0
    ask = GenerationRequest(**{**REQUEST.__dict__, "width": 48, "height": 48, "steps": 10})
    outs = {}
    for fill in ("fill", "original", "latent noise", "latent nothing"):
        steps = []
        result = inpaint(loaded, ask, image, mask, options=InpaintOptions(strength=0.4, fill=fill),
                         callback=lambda info: steps.append(info.step))
        outs[fill] = np.asarray(result.images[0])
        assert len(steps) == 4 and np.array_equal(outs[fill][keep], np.asarray(image)[keep])
        fields = parse_parameters(result.parameters[0])
        assert fields["Denoising strength"] == "0.4" and fields.get("Masked content") == (None if fill == "original" else fill)
    assert len({o[~keep].tobytes() for o in outs.values()}) == 4
    drawn = []
    inpaint(loaded, ask, image, mask, callback=lambda info: drawn.append(info.step))
    assert len(drawn) == 10  # the default: from noise, every step


def test_an_unknown_masked_content_lists_the_modes(loaded_default_hybrid):
    with pytest.raises(ValueError, match="masked content 'blur' is not known; use one of fill, original, latent noise"):
        inpaint(loaded_default_hybrid, REQUEST, picture(), half_mask(), options=InpaintOptions(fill="blur"))
    with pytest.raises(ValueError, match="denoising strength must be"):
        inpaint(loaded_default_hybrid, REQUEST, picture(), half_mask(), options=InpaintOptions(strength=1.5))


# --- tiled upscaling ---------------------------------------------------------------------------------

def test_one_tile_covering_the_image_equals_no_tiling(loaded_default_upscale):
    image, request = picture(6, 16), GenerationRequest("", steps=3, seed=2)
    whole = np.asarray(upscale(loaded_default_upscale, image, request, tiles=InputTiles(0, 0)).images[0])
    one_tile = np.asarray(upscale(loaded_default_upscale, image, request, tiles=InputTiles(32, 4)).images[0])
    assert np.array_equal(whole, one_tile)


def test_tiled_upscaling_fuses_windows_at_every_step_and_follows_its_input(loaded_default_upscale, monkeypatch):
    from ldm.sampling import tiling

    calls = []
    original = tiling.TiledDenoiser.__call__
    monkeypatch.setattr(tiling.TiledDenoiser, "__call__", lambda self, x, t, **extra: calls.append(len(self.windows(*x.shape[-2:]))) or original(self, x, t, **extra))
    steps = []
    image = picture(7, 40)
    result = upscale(loaded_default_upscale, image, GenerationRequest("", steps=2, seed=3), tiles=InputTiles(16, 4),
                     callback=lambda info: steps.append((info.step, info.total)))
    f = loaded_default_upscale.model.config.downsampling_factor
    assert result.images[0].size == (40 * f, 40 * f)
    assert len(calls) == 2 and calls[0] == len(tiling.window_starts(40, 16, 4, loaded_default_upscale.model.config.unet.downsampling_factor)) ** 2 > 1
    assert steps == [(0, 2), (1, 2)]
    assert np.asarray(result.images[0]).std() > 10
    assert "Tile size: 16" in result.parameters[0]


def test_tile_options_are_checked(loaded_default_upscale):
    with pytest.raises(ValueError, match="tile size"):
        upscale(loaded_default_upscale, picture(), GenerationRequest("", steps=2), tiles=InputTiles(3, 0))
    with pytest.raises(ValueError, match="overlap"):
        upscale(loaded_default_upscale, picture(), GenerationRequest("", steps=2), tiles=InputTiles(32, 20))


X4_REQUEST = GenerationRequest("a sharp photo", steps=2, scale=9.0, seed=4)


@pytest.mark.parametrize("noise_level", [-1, 351, 20.5, "20", True])
def test_the_noise_level_is_checked_against_the_models_range(loaded_x4, noise_level):
    with pytest.raises(ValueError, match=r"noise level must be a whole number from 0 to 350 \(the default is 20\)"):
        upscale(loaded_x4, picture(size=16), X4_REQUEST, noise_level=noise_level)


def test_a_text_guided_upscaler_follows_its_prompt_and_noise_level_and_records_them(loaded_x4):
    image = picture(size=16)
    base = upscale(loaded_x4, image, X4_REQUEST, tiles=InputTiles(0, 0))
    assert base.images[0].size == (32, 32)  # the tiny autoencoder's f is 2
    fields = parse_parameters(base.parameters[0])
    assert (fields["Prompt"], fields["Noise level"], fields["CFG scale"]) == ("a sharp photo", "20", "9.0")
    pixels = np.asarray(base.images[0])
    assert np.array_equal(pixels, np.asarray(upscale(loaded_x4, image, X4_REQUEST, tiles=InputTiles(0, 0)).images[0]))
    for changed in (dict(request=GenerationRequest(**{**X4_REQUEST.__dict__, "prompt": "a blurry drawing"})),
                    dict(noise_level=300), dict(image=picture(1, size=16))):
        other = upscale(loaded_x4, changed.get("image", image), changed.get("request", X4_REQUEST), tiles=InputTiles(0, 0),
                        noise_level=changed.get("noise_level", 20))
        assert not np.array_equal(pixels, np.asarray(other.images[0])), changed


def test_a_text_guided_upscaler_tiles_with_its_noise_level_in_every_window(loaded_x4):
    """The class label is repeated for each window of a batch; one tile covering the image equals none."""
    image = picture(2, size=24)
    tiled = upscale(loaded_x4, image, X4_REQUEST, tiles=InputTiles(8, 2))
    assert tiled.images[0].size == (48, 48)
    whole = np.asarray(upscale(loaded_x4, image, X4_REQUEST, tiles=InputTiles(0, 0)).images[0])
    one_tile = np.asarray(upscale(loaded_x4, image, X4_REQUEST, tiles=InputTiles(24, 4)).images[0])
    assert np.abs(whole.astype(int) - one_tile.astype(int)).max() <= 1


def test_the_default_upscaler_ignores_the_noise_level(loaded_default_upscale):
    """It has no noise augmentation: the level is neither checked nor recorded, and changes nothing."""
    request = GenerationRequest("", steps=2, seed=1)
    a = upscale(loaded_default_upscale, picture(4, 8), request)
    b = upscale(loaded_default_upscale, picture(4, 8), request, noise_level=999)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert "Noise level" not in parse_parameters(a.parameters[0])
