"""Image to image: the strength's step arithmetic, every sampler started part-way down its schedule,
the task on every family (eps, v, native inpainting), resize modes, sketches, large canvases in
tiles, its PNG fields, bad input, and the ``img2img`` command."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.checkpoints.loader import load_model
from ldm.checkpoints.presets import DEFAULT_MODELS
from ldm.cli import main
from ldm.sampling.samplers import SAMPLERS, noised
from ldm.sampling.strength import STEP_MODES, PartWay, lowest_exact_strength, part_way_steps
from ldm.tasks.img2img import (
    Img2ImgOptions,
    apply_sketch,
    check_picture,
    default_size,
    denoise_latent,
    img2img,
    resize_picture,
)
from ldm.tasks.txt2img import txt2img
from ldm.tasks.parameters import parse_parameters, read_png_parameters
from ldm.tasks.request import GenerationRequest, TilingOptions, resolve_request
from tests.test_cli import tiny  # noqa: F401  (the fixture)

EXACT = STEP_MODES[1]


@pytest.fixture(scope="module")
def shipped():
    """The embedded default model: trained, so its autoencoder gives pictures back (the tiny random
    models' do not), for tests that compare pixels."""
    return load_model(DEFAULT_MODELS["txt2img"], device=torch.device("cpu"), dtype=torch.float32)


def picture(width=32, height=32, seed=0) -> Image.Image:
    """A picture with large shapes and colours, as a photo has."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)


def ask(**fields) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a red cat", "steps": 6, "seed": 21, "width": 32, "height": 32, **fields})


# ------------------------------------------------------------------ step arithmetic


@pytest.mark.parametrize("steps, strength, expected", [
    (20, 0.75, PartWay(20, 5)),  # diffusers: 15 steps from t = 701
    (10, 0.3, PartWay(10, 7)),
    (100, 0.29, PartWay(100, 72)),  # 0.29 * 100 = 28.999...: 28 steps, as diffusers' int() gives
    (10, 1.0, PartWay(10, 0)),
    (10, 0.0, PartWay(10, 10)),
    (10, 0.05, PartWay(10, 10)),  # fewer than one step: none
])
def test_strength_x_steps_is_diffusers_arithmetic(steps, strength, expected):
    assert part_way_steps(steps, strength) == expected


@pytest.mark.parametrize("steps, strength, expected", [
    (20, 0.75, PartWay(26, 6)),  # AUTOMATIC1111: int(20 / 0.75) = 26, the last 20 run
    (20, 0.5, PartWay(40, 20)),
    (20, 1.0, PartWay(20, 0)),  # int(20 / 0.999) = 20
    (20, 0.0, PartWay(20, 20)),
    (20, 0.01, PartWay(500, 480)),  # the schedule is at most 500 steps long
    (16, 5e-324, PartWay(500, 484)),  # the least float above 0 runs as the lowest exact strength (it overflowed)
])
def test_exact_steps_runs_the_asked_steps_of_a_longer_schedule(steps, strength, expected):
    part = part_way_steps(steps, strength, EXACT)
    assert part == expected
    assert part.run == (0 if strength == 0 else steps)
    assert lowest_exact_strength(20) == 0.04


@pytest.mark.parametrize("strength", [-0.1, 1.01, float("nan"), "0.5", True])
def test_a_strength_out_of_range_is_refused_with_the_range(strength):
    with pytest.raises(ValueError, match="denoising strength must be"):
        part_way_steps(10, strength)


def test_an_unknown_step_mode_lists_the_modes():
    with pytest.raises(ValueError, match="Strength x steps, Exact steps"):
        part_way_steps(10, 0.5, "Half")


# ------------------------------------------------------------------ samplers part-way


class Counting:
    """An epsilon denoiser of a fixed linear form, counting its calls and the timesteps it saw."""

    def __init__(self):
        self.timesteps = []

    def __call__(self, x, t, **_):
        self.timesteps.append(float(t[0]))
        return 0.1 * x


AC = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_starts_part_way_and_runs_the_rest(name):
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    steps, skip = 8, 5
    full, part = Counting(), Counting()
    generator = [torch.Generator().manual_seed(3)]
    calls_before = [0]  # the full run's denoiser calls before each step
    SAMPLERS[name].run(full, x_T, AC, steps, eta=0.0, generator=generator,
                       callback=lambda info: calls_before.append(len(full.timesteps)))
    done = []
    out = SAMPLERS[name].run(part, x_T, AC, steps, eta=0.0, generator=[torch.Generator().manual_seed(3)], init=init,
                             skip=skip, callback=lambda info: done.append(info.step))
    assert len(done) == steps - skip
    # the part-way run sees the full run's lower timesteps: its first one is the full run's step `skip`
    assert part.timesteps[0] == pytest.approx(full.timesteps[calls_before[skip]], abs=1e-6)
    assert out.shape == init.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_skipping_every_step_returns_the_image_latent(name):
    init = torch.randn(1, 4, 8, 8)
    denoiser = Counting()
    out = SAMPLERS[name].run(denoiser, torch.randn(1, 4, 8, 8), AC, 6, eta=0.0, generator=[torch.Generator()], init=init,
                             skip=6)
    assert torch.equal(out, init) and denoiser.timesteps == []


def test_a_skip_beyond_the_steps_is_refused():
    with pytest.raises(ValueError, match="steps to skip"):
        SAMPLERS["Euler"].run(Counting(), torch.randn(1, 4, 8, 8), AC, 6, eta=0.0, generator=[torch.Generator()],
                              init=torch.randn(1, 4, 8, 8), skip=7)


def test_noising_is_the_forward_process_in_sigma_space():
    init, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    assert torch.allclose(noised(init, eps, 2.5), init + 2.5 * eps)
    assert noised(init.half(), eps.half(), 1.0).dtype == torch.float32


# ------------------------------------------------------------------ the task


def test_img2img_keeps_the_picture_at_low_strength_and_redraws_it_at_full(shipped):
    source = txt2img(shipped, ask(prompt="a red circle above a blue square", width=64, height=64, steps=8, seed=3)).images[0]
    pixels = np.asarray(source).astype(float)
    distance = {}
    for strength in (0.0, 0.2, 1.0):
        out = img2img(shipped, ask(prompt="a green triangle", width=64, height=64, steps=8), source,
                      options=Img2ImgOptions(strength=strength)).images[0]
        assert out.size == (64, 64)
        distance[strength] = np.abs(np.asarray(out) - pixels).mean()
    assert distance[0.0] < 1 and distance[0.2] < 2  # the autoencoder's round trip, then a light touch
    assert distance[1.0] > 2 * distance[0.2]


def test_strength_zero_runs_no_step_and_says_so(loaded_sd_v1):
    steps = []
    result = img2img(loaded_sd_v1, ask(), picture(), options=Img2ImgOptions(strength=0.0),
                     callback=lambda info: steps.append(info))
    assert steps == [] and any("runs no step" in n for n in result.notices)


def test_the_step_modes_run_their_step_counts(loaded_sd_v1):
    for mode, expected in ((STEP_MODES[0], 3), (EXACT, 6)):
        steps = []
        img2img(loaded_sd_v1, ask(), picture(), options=Img2ImgOptions(strength=0.5, step_mode=mode),
                callback=lambda info: steps.append(info.step))
        assert len(steps) == expected


def test_a_batch_image_equals_its_seed_alone(loaded_sd_v1):
    options = Img2ImgOptions(strength=0.6)
    batch = img2img(loaded_sd_v1, ask(sampler="Euler a", batch_size=2), picture(), options=options)
    alone = img2img(loaded_sd_v1, ask(sampler="Euler a", seed=22), picture(), options=options)
    assert batch.seeds == [21, 22]
    # the same noise; a batched matmul may round one 8-bit level differently, as for text to image
    assert np.abs(np.asarray(batch.images[1]).astype(int) - np.asarray(alone.images[0]).astype(int)).max() <= 1
    assert not np.array_equal(np.asarray(batch.images[0]), np.asarray(batch.images[1]))


@pytest.mark.parametrize("family", ["loaded_sd2_v", "loaded_sd2_inpainting", "loaded_default_hybrid"])
def test_img2img_runs_on_every_family(family, request):
    loaded = request.getfixturevalue(family)
    for sampler in ("DDIM", "DPM++ 2M"):
        result = img2img(loaded, ask(sampler=sampler), picture(), options=Img2ImgOptions(strength=0.5))
        pixels = np.asarray(result.images[0])
        assert result.images[0].size == (32, 32) and pixels.std() > 0


def test_a_canvas_in_tiles_is_denoised_window_by_window(loaded_sd_v1):
    tiled = ask(width=64, height=48, tiling=TilingOptions("always", 32, 8))
    plain = ask(width=64, height=48)
    options = Img2ImgOptions(strength=0.5)
    a = img2img(loaded_sd_v1, tiled, picture(64, 48), options=options)
    b = img2img(loaded_sd_v1, plain, picture(64, 48), options=options)
    assert a.images[0].size == (64, 48) and "Tiling" in parse_parameters(a.parameters[0])
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))  # the windows were fused


def test_the_parameters_carry_the_strength_and_modes(loaded_sd_v1):
    options = Img2ImgOptions(strength=0.4, resize_mode="Crop and resize", step_mode=EXACT)
    fields = parse_parameters(img2img(loaded_sd_v1, ask(), picture(40, 32), options=options).parameters[0])
    assert fields["Denoising strength"] == "0.4" and fields["Resize mode"] == "Crop and resize"
    assert fields["Img2img steps"] == "Exact steps" and fields["Size"] == "32x32" and fields["Steps"] == "6"
    plain = parse_parameters(img2img(loaded_sd_v1, ask(), picture()).parameters[0])
    assert plain["Denoising strength"] == "0.75" and "Resize mode" not in plain and "Img2img steps" not in plain


def test_prompt_editing_counts_the_steps_that_run(loaded_sd_v1):
    """[a:b:0.5] switches halfway through the steps run, not through the full schedule."""
    edited = ask(prompt="[a red cat:a blue dog:0.5]", steps=8)
    options = Img2ImgOptions(strength=0.5)
    both = img2img(loaded_sd_v1, edited, picture(), options=options).images[0]
    cat = img2img(loaded_sd_v1, ask(prompt="a red cat", steps=8), picture(), options=options).images[0]
    assert not np.array_equal(np.asarray(both), np.asarray(cat))


# ------------------------------------------------------------------ pictures


def test_resize_modes_fit_the_picture_as_a1111_does():
    wide = Image.new("RGB", (80, 40), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 20, 40))  # a blue band on the left quarter
    stretched = np.asarray(resize_picture(wide, 40, 40, "Just resize"))
    cropped = np.asarray(resize_picture(wide, 40, 40, "Crop and resize"))
    filled = np.asarray(resize_picture(wide, 40, 40, "Resize and fill"))
    assert stretched.shape == cropped.shape == filled.shape == (40, 40, 3)
    assert stretched[20, 2, 2] > 200  # the band is still on the left, squeezed
    assert cropped[20, 2, 0] > 200 and cropped[20, 2, 2] < 50  # the centre crop dropped most of the band
    assert (filled[0] == filled[9]).all() and (filled[-1] == filled[-10]).all()  # top and bottom filled with edge rows
    assert filled[20, 2, 2] > 200


def test_default_size_is_the_pictures_within_limits():
    assert default_size(Image.new("RGB", (300, 200))) == ((300, 200), [])
    (w, h), notices = default_size(Image.new("RGB", (1, 1)))
    assert (w, h) == (64, 64) and "1x1" in notices[0]
    (w, h), notices = default_size(Image.new("L", (10000, 5000)))
    assert (w, h) == (4096, 2048) and "10000x5000" in notices[0]


def test_a_picture_too_large_to_read_is_refused_by_its_size():
    with pytest.raises(ValueError, match="30000x10 px; pictures up to 20000 px"):
        check_picture(Image.new("L", (30000, 10)))


def test_sixteen_bit_and_transparent_pictures_are_taken(loaded_sd_v1):
    grey16 = Image.fromarray(np.full((32, 32), 50000, dtype=np.uint16))
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    for source in (grey16, clear, Image.new("P", (32, 32))):
        result = img2img(loaded_sd_v1, ask(), source, options=Img2ImgOptions(strength=0.3))
        assert result.images[0].size == (32, 32)


def test_a_sketch_lays_its_strokes_over_the_picture():
    base = Image.new("RGB", (32, 32), (255, 255, 255))
    strokes = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    strokes.paste((0, 0, 255, 255), (0, 0, 32, 8))  # drawn on a canvas twice the size: fitted to the picture
    sketched = np.asarray(apply_sketch(base, strokes))
    assert np.abs(sketched[1, 1].astype(int) - (0, 0, 255)).max() <= 3  # Lanczos-fitted
    assert tuple(sketched[20, 20]) == (255, 255, 255)


def test_a_sketch_with_no_strokes_is_refused(loaded_sd_v1):
    with pytest.raises(ValueError, match="the sketch has no strokes"):
        img2img(loaded_sd_v1, ask(), picture(), sketch=Image.new("RGBA", (32, 32), (9, 9, 9, 0)))


def test_a_sketch_changes_the_result_where_it_is_drawn(shipped):
    source = txt2img(shipped, ask(width=64, height=64, steps=8, seed=3)).images[0]
    strokes = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    strokes.paste((0, 255, 0, 255), (8, 8, 56, 24))
    options = Img2ImgOptions(strength=0.25)

    def result(sketch):
        return np.asarray(img2img(shipped, ask(width=64, height=64), source, options=options,
                                  sketch=sketch).images[0]).astype(int)

    change = np.abs(result(strokes) - result(None)).mean(axis=2)
    inside = np.zeros((64, 64), dtype=bool)
    inside[8:24, 8:56] = True
    assert change[inside].mean() > 3 * change[~inside].mean()


def test_the_latent_path_noises_one_latent_per_seed(loaded_sd_v1):
    resolved, _ = resolve_request(ask(batch_size=2), 8)
    init = torch.zeros(1, 4, 4, 4)
    out = denoise_latent(loaded_sd_v1, resolved, init, Img2ImgOptions(strength=0.5))
    assert out.shape == (2, 4, 4, 4) and not torch.equal(out[0], out[1])


# ------------------------------------------------------------------ the command


def img2img_args(tiny, source, out, *extra):  # noqa: F811
    files = tiny.files
    return ["img2img", "--model", str(files.path), "--preset", str(tiny.preset_yaml), "--tokenizer",
            str(files.tokenizer_dir), "--prompt", "a red cat", "--steps", "4", "--seed", "5", "--image", str(source),
            "--out", str(out), *extra]


def test_the_img2img_command_writes_the_redrawn_picture(tiny, tmp_path, capsys):  # noqa: F811
    source = tmp_path / "in.png"
    picture(96, 64).save(source)
    out = tmp_path / "out.png"
    assert main(img2img_args(tiny, source, out, "--strength", "0.5", "--resize-mode", "crop and resize",
                             "--exact-steps")) == 0
    with Image.open(out) as image:
        assert image.size == (96, 64)
    fields = read_png_parameters(out)
    assert fields["Denoising strength"] == "0.5" and fields["Img2img steps"] == "Exact steps"
    assert fields["Resize mode"] == "Crop and resize" and "seed 5" in capsys.readouterr().out


def test_the_command_takes_one_side_and_keeps_the_aspect(tiny, tmp_path):  # noqa: F811
    source = tmp_path / "in.png"
    picture(64, 32).save(source)
    assert main(img2img_args(tiny, source, tmp_path / "o.png", "--width", "32")) == 0
    with Image.open(tmp_path / "o.png") as image:
        assert image.size == (32, 16)


def test_the_command_takes_a_sketch(tiny, tmp_path):  # noqa: F811
    source, sketch = tmp_path / "in.png", tmp_path / "sketch.png"
    picture().save(source)
    strokes = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    strokes.paste((0, 0, 255, 255), (0, 0, 16, 16))
    strokes.save(sketch)
    assert main(img2img_args(tiny, source, tmp_path / "o.png", "--sketch", str(sketch))) == 0


@pytest.mark.parametrize("extra, message", [
    (("--strength", "1.5"), "denoising strength must be from 0 (keep the image) to 1 (redraw it), got 1.5"),
    (("--resize-mode", "zoom"), "invalid choice"),
])
def test_the_command_names_a_bad_option(tiny, tmp_path, capsys, extra, message):  # noqa: F811
    source = tmp_path / "in.png"
    picture().save(source)
    try:
        code = main(img2img_args(tiny, source, tmp_path / "o.png", *extra))
    except SystemExit as exit_:  # argparse's own refusal of a choice
        code = exit_.code
    assert code == 2 and message in capsys.readouterr().err


def test_a_missing_picture_is_named_before_the_model_loads(tiny, tmp_path, capsys):  # noqa: F811
    assert main(img2img_args(tiny, tmp_path / "none.png", tmp_path / "o.png")) == 2
    assert "none.png: cannot read the image" in capsys.readouterr().err
