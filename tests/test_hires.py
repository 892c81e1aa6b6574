"""Hires fix on the tiny SD v1-layout model: the target size (factor, size, cover and crop), every
upscaler (the latent modes, Lanczos, a super-resolution model), seeds and batches, the two passes'
progress and stopping, the PNG fields and their reading, bad input, and the command line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.cli import main
from ldm.tasks import hires as hires_module
from ldm.sampling.steps import SamplingCancelled
from ldm.tasks.hires import (LANCZOS, LATENT_UPSCALERS, HiresOptions, crop_latent, hires_fix, hires_size, read_hires,
                             upscale_latent)
from ldm.tasks.parameters import parse_parameters, read_png_parameters
from ldm.tasks.request import GenerationRequest, TilingOptions
from ldm.tasks.txt2img import txt2img

REQUEST = GenerationRequest("a red cat", "a blue dog", steps=3, scale=5.0, seed=7, width=16, height=16)
FAST = HiresOptions(scale=2.0, steps=2, strength=0.5)


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(int)


def with_(request: GenerationRequest = REQUEST, **changes) -> GenerationRequest:
    return GenerationRequest(**{**request.__dict__, **changes})


def test_scale_two_doubles_the_size_and_the_text_keeps_the_first_pass_size(loaded_sd_v1):
    result = hires_fix(loaded_sd_v1, REQUEST, FAST)
    assert result.images[0].size == (32, 32)
    fields = parse_parameters(result.parameters[0])
    assert fields["Size"] == "16x16" and fields["Steps"] == "3"  # AUTOMATIC1111 writes the first pass's
    assert (fields["Hires upscale"], fields["Hires steps"], fields["Hires upscaler"]) == ("2", "2", "Latent")
    assert fields["Denoising strength"] == "0.5" and "Hires resize" not in fields
    plain = txt2img(loaded_sd_v1, REQUEST)
    assert plain.images[0].size == (16, 16)


def test_a_target_size_is_covered_with_the_aspect_kept_and_cropped(loaded_sd_v1):
    result = hires_fix(loaded_sd_v1, with_(width=16, height=24), HiresOptions(width=48, height=40))
    assert result.images[0].size == (48, 40)
    fields = parse_parameters(result.parameters[0])
    assert fields["Hires resize"] == "48x40" and "Hires upscale" not in fields and "Hires steps" not in fields
    size, _ = hires_size(16, 24, HiresOptions(width=48, height=40), 8)
    assert size.cover == (48, 72) and size.target == (48, 40)
    one_side, _ = hires_size(16, 24, HiresOptions(width=32), 8)
    assert one_side.cover == one_side.target == (32, 48)
    latent = torch.arange(9 * 6, dtype=torch.float32).reshape(1, 1, 9, 6)
    cropped = crop_latent(latent, size, 8)
    assert cropped.shape[-2:] == (5, 6) and torch.equal(cropped, latent[..., 2:7, :])  # the centre, as A1111 cuts it


def test_sides_that_are_not_a_multiple_are_rounded_with_a_notice(loaded_sd_v1):
    result = hires_fix(loaded_sd_v1, REQUEST, HiresOptions(scale=1.4, steps=1, strength=0.3))
    assert result.images[0].size == (24, 24)  # 22.4 -> 22 -> 24 on the grid of 4
    assert any("hires width 22 is not a multiple of 4; using 24" in n for n in result.notices)


@pytest.mark.parametrize("name", [*LATENT_UPSCALERS, LANCZOS])
def test_every_built_in_upscaler_runs_and_is_written(loaded_sd_v1, name):
    result = hires_fix(loaded_sd_v1, REQUEST, HiresOptions(upscaler=name, steps=1, strength=0.4))
    assert result.images[0].size == (32, 32)
    assert parse_parameters(result.parameters[0])["Hires upscaler"] == name


def test_the_latent_modes_interpolate_as_named():
    latent = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    nearest = upscale_latent(latent, "Latent (nearest)", 4, 4)
    assert torch.equal(nearest[0, 0, :2, :2], torch.zeros(2, 2)) and torch.equal(nearest[0, 0, 2:, 2:], torch.full((2, 2), 3.0))
    bilinear = upscale_latent(latent, "Latent", 4, 4)
    assert bilinear[0, 0, 0, 1].item() == pytest.approx(0.25)  # between 0 and 1, a quarter of the way
    assert not torch.equal(upscale_latent(latent, "Latent (bicubic)", 4, 4), bilinear)


def test_strength_zero_keeps_the_upscaled_first_pass(loaded_sd_v1):
    """With nothing redrawn, a Lanczos hires fix is the first pass resized and through the autoencoder."""
    kept = hires_fix(loaded_sd_v1, REQUEST, HiresOptions(upscaler=LANCZOS, strength=0.0))
    redrawn = hires_fix(loaded_sd_v1, REQUEST, HiresOptions(upscaler=LANCZOS, strength=0.8, steps=2))
    assert any("runs no step" in n for n in kept.notices)
    assert not np.array_equal(pixels(kept.images[0]), pixels(redrawn.images[0]))


def test_a_seed_reproduces_and_each_image_of_a_batch_is_its_seed_alone(loaded_sd_v1):
    first, again = hires_fix(loaded_sd_v1, REQUEST, FAST), hires_fix(loaded_sd_v1, REQUEST, FAST)
    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))
    batch = hires_fix(loaded_sd_v1, with_(batch_size=2), FAST)
    assert batch.seeds == [7, 8]
    alone = hires_fix(loaded_sd_v1, with_(seed=8), FAST)
    assert np.abs(pixels(batch.images[1]) - pixels(alone.images[0])).max() <= 1
    assert not np.array_equal(pixels(batch.images[0]), pixels(batch.images[1]))
    assert "Seed: 8," in batch.parameters[1]


def test_progress_counts_both_passes_and_stopping_in_the_second_says_where(loaded_sd_v1):
    seen = []
    hires_fix(loaded_sd_v1, REQUEST, FAST, callback=lambda info: seen.append((info.step, info.total, info.denoised.shape[-1])))
    assert seen == [(0, 5, 8), (1, 5, 8), (2, 5, 8), (3, 5, 16), (4, 5, 16)]  # 3 steps at 16 px, then 2 at 32 px
    calls = iter([False] * 4 + [True])
    with pytest.raises(SamplingCancelled) as stop:
        hires_fix(loaded_sd_v1, REQUEST, FAST, should_stop=lambda: next(calls))
    assert (stop.value.step, stop.value.total) == (4, 5)


def test_a_super_resolution_model_upscales_between_the_passes(loaded_sd_v1, tiny_ldm_sr, monkeypatch, tmp_path):
    sr = tiny_ldm_sr.load()
    seen = []
    options = HiresOptions(upscaler=sr.name, steps=2, strength=0.5)
    result = hires_fix(loaded_sd_v1, REQUEST, options, upscaler=sr, callback=lambda info: seen.append(info))
    assert result.images[0].size == (32, 32)
    assert parse_parameters(result.parameters[0])["Hires upscaler"] == sr.name
    # 3 first-pass steps, 2 of the upscaler (shown as the first pass's latent), 2 of the second pass
    assert [info.step for info in seen] == list(range(7)) and {info.total for info in seen} == {7}
    assert all(info.denoised.shape[1] == loaded_sd_v1.model.config.latent_channels for info in seen)
    lanczos = hires_fix(loaded_sd_v1, REQUEST, HiresOptions(upscaler=LANCZOS, steps=2, strength=0.5))
    assert not np.array_equal(pixels(result.images[0]), pixels(lanczos.images[0]))
    texts = []
    real_upscale = hires_module.upscale

    def spy(model, image, request, **kwargs):
        texts.append((request.prompt, request.negative_prompt, request.lora_dirs))
        return real_upscale(model, image, request, **kwargs)

    monkeypatch.setattr(hires_module, "upscale", spy)
    from tests.builders.lora import kohya_names, random_lora, write

    write(tmp_path / "ink.safetensors", random_lora(kohya_names(loaded_sd_v1.model, attention_only=True), 2))
    hires_fix(loaded_sd_v1, with_(prompt="a red cat <lora:ink:0.5>", lora_dirs=(tmp_path,)), options, upscaler=sr)
    assert texts == [("a red cat ", "a blue dog", ())]  # the LoRA is the generating model's, not the upscaler's
    with pytest.raises(ValueError, match="is not a super-resolution model"):
        hires_fix(loaded_sd_v1, REQUEST, HiresOptions(upscaler="other"), upscaler=loaded_sd_v1)


def test_a_canvas_beyond_the_budget_takes_the_tiled_path(loaded_sd_v1):
    request = with_(tiling=TilingOptions(budget_mb=1))
    result = hires_fix(loaded_sd_v1, request, HiresOptions(scale=4.0, steps=1, strength=0.3))
    assert result.images[0].size == (64, 64)
    assert any("sampled in tiles" in n for n in result.notices)


def test_the_default_model_at_twice_512_is_planned_by_the_memory_guard():
    """2x of 512 on the embedded default model (64 px native) is a 1024 px second pass: planned like
    any large canvas, whole within the default budget and in tiles within a small one."""
    from ldm.checkpoints.loader import load_model
    from ldm.checkpoints.presets import DEFAULT_MODELS
    from ldm.tasks.planning import canvas_notices

    model = load_model(DEFAULT_MODELS["txt2img"], device=torch.device("cpu"), dtype=torch.float32).model
    size, _ = hires_size(512, 512, HiresOptions(), model.config.size_multiple)
    second = GenerationRequest("a red circle", width=size.target[0], height=size.target[1], seed=1)
    assert size.target == (1024, 1024)
    assert canvas_notices(model, second) == []  # about 820 MB whole, within the default 2048
    small = with_(second, tiling=TilingOptions(budget_mb=256))
    assert any("sampled in tiles of 64 px" in n for n in canvas_notices(model, small))


@pytest.mark.parametrize("options, message", [
    (HiresOptions(scale=5.0), "hires upscale factor must be between 1 and 4, got 5"),
    (HiresOptions(scale=0.5), "hires upscale factor must be between 1 and 4"),
    (HiresOptions(width=5000), "hires width must be between 0 and 4096, got 5000"),
    (HiresOptions(steps=-1), "hires steps must be between 0 and 1000"),
    (HiresOptions(steps=2.5), "hires steps must be a whole number"),
    (HiresOptions(strength=1.5), "denoising strength must be from 0"),
    (HiresOptions(upscaler="R-ESRGAN 4x"), ("hires upscaler 'R-ESRGAN 4x' is not known; use one of Latent, "
                                             "Latent \\(antialiased\\), .*Lanczos, or a super-resolution model")),
])
def test_bad_options_are_refused_with_what_is_allowed(loaded_sd_v1, options, message):
    with pytest.raises(ValueError, match=message):
        hires_fix(loaded_sd_v1, REQUEST, options)


def test_a_target_beyond_the_largest_side_is_refused(loaded_sd_v1):
    with pytest.raises(ValueError, match="the hires width would be 4800 px; at most 4096"):
        hires_fix(loaded_sd_v1, with_(width=1200, height=16), HiresOptions(scale=4.0))


def test_the_fields_are_read_back():
    options = HiresOptions(scale=1.5, upscaler="Latent (bicubic)", steps=12, strength=0.45)
    result_text = ("a cat\nSteps: 20, Sampler: DDIM, Seed: 1, Size: 64x64, Denoising strength: 0.45, "
                   "Hires upscale: 1.5, Hires steps: 12, Hires upscaler: Latent (bicubic)")
    assert read_hires(parse_parameters(result_text)) == options
    resized = read_hires(parse_parameters("a cat\nSteps: 20, Seed: 1, Hires resize: 1024x0, Hires upscaler: Lanczos"))
    assert resized == HiresOptions(width=1024, height=0, upscaler=LANCZOS)
    assert read_hires(parse_parameters("a cat\nSteps: 20, Seed: 1, Denoising strength: 0.7")) is None


def test_cli_hires_writes_the_target_size_and_the_fields(tiny_sd_v1, tmp_path, capsys):
    from tests.builders import sd_v1
    from tests.builders.clip_tokenizer import tiny_vocab_size

    preset = sd_v1.write_preset_yaml(tmp_path / "tiny-v1.yaml", tiny_vocab_size(tiny_sd_v1.tokenizer_dir))
    base = ["txt2img", "--model", str(tiny_sd_v1.path), "--preset", str(preset), "--tokenizer", str(tiny_sd_v1.tokenizer_dir),
            "--prompt", "a red cat", "--steps", "2", "--seed", "3", "--width", "16", "--height", "16"]
    out = tmp_path / "hires.png"
    assert main([*base, "--hires-scale", "2", "--hires-steps", "1", "--hires-strength", "0.4",
                 "--hires-upscaler", "Latent (nearest)", "--out", str(out)]) == 0
    params = read_png_parameters(out)
    assert (params["Size"], params["Hires upscale"], params["Hires steps"]) == ("16x16", "2", "1")
    assert (params["Denoising strength"], params["Hires upscaler"]) == ("0.4", "Latent (nearest)")
    from PIL import Image

    assert Image.open(out).size == (32, 32)
    by_model = tmp_path / "sr.png"
    from ldm.checkpoints.presets import DEFAULT_MODELS

    upscaler = DEFAULT_MODELS["upscale"]
    assert main([*base, "--hires-scale", "2", "--hires-steps", "1", "--hires-upscaler", str(upscaler),
                 "--out", str(by_model)]) == 0
    assert Image.open(by_model).size == (32, 32) and read_png_parameters(by_model)["Hires upscaler"] == upscaler.stem
    sized = tmp_path / "sized.png"
    assert main([*base, "--hires-width", "24", "--hires-steps", "1", "--out", str(sized)]) == 0
    assert Image.open(sized).size == (24, 24) and read_png_parameters(sized)["Hires resize"] == "24x0"
    capsys.readouterr()
    assert main([*base, "--hires-scale", "9", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "error: hires upscale factor must be between 1 and 4, got 9" in err and "Traceback" not in err
    assert "sampling" not in err  # refused before the progress bar starts
    assert main([*base, "--hires-scale", "2", "--hires-upscaler", "ESRGAN", "--out", str(tmp_path / "y.png")]) == 2
    assert "hires upscaler 'ESRGAN' is not known; use one of Latent" in capsys.readouterr().err
    assert main([*base, "--hires-steps", "5", "--out", str(tmp_path / "z.png")]) == 2
    assert "--hires-steps set the hires fix, which runs with --hires-scale F" in capsys.readouterr().err
    assert main([*base, "--width", "1200", "--hires-scale", "4", "--out", str(tmp_path / "w.png")]) == 2
    err = capsys.readouterr().err
    assert "the hires width would be 4800 px; at most 4096" in err and "sampling" not in err
    assert not (tmp_path / "z.png").exists() and not (tmp_path / "w.png").exists()


def test_cli_help_names_every_upscaler():
    from ldm.cli import build_parser
    from ldm.tasks.hires import UPSCALERS

    t2i = build_parser()._subparsers._group_actions[0].choices["txt2img"]
    help_text = next(a.help for a in t2i._actions if a.dest == "hires_upscaler")
    assert all(name in help_text for name in UPSCALERS)


# --- the studio's section, without a browser ---------------------------------------------------------


@pytest.fixture(scope="module")
def section(studio):
    import gradio as gr

    from ui.hires import hires_controls

    with gr.Blocks():
        return hires_controls(studio, "txt2img")


def test_the_menu_offers_the_built_in_upscalers_and_the_catalogs_upscaling_models(studio, section):
    from ui.hires import upscaler_choices

    values = [value for _, value in upscaler_choices(studio)]
    assert values[: len(LATENT_UPSCALERS) + 1] == [*LATENT_UPSCALERS, LANCZOS]
    assert studio.default_for("upscale") in values
    data = {c: c.value for c in section.components}
    assert section.options(data) is None  # off until its box is ticked
    data[section.enable] = True
    assert section.options(data) == HiresOptions()


def test_the_studio_runs_a_catalog_upscaler_and_a_png_restores_the_section(studio, section):
    from ui.hires import hires_job

    loaded = studio.models.get(studio.default_for("txt2img"))
    path = studio.default_for("upscale")
    run = hires_job(studio, loaded, HiresOptions(upscaler=path, steps=1, strength=0.3))
    result = run(GenerationRequest("a red circle", steps=2, seed=3, width=32, height=32), None, None)
    assert result.images[0].size == (64, 64)
    fields = parse_parameters(result.parameters[0])
    assert fields["Hires upscaler"] == "default-upscale"  # the model's name, as the PNG names it
    updates = section.restore_updates(studio, fields)
    assert updates[section.enable] is True and updates[section.upscaler] == path and updates[section.steps] == 1
    assert section.restore_updates(studio, {"Steps": "20"}) == {section.enable: False}
    with pytest.raises(ValueError, match="cannot do upscale"):
        hires_job(studio, loaded, HiresOptions(upscaler=studio.default_for("txt2img")))
