"""The command line: txt2img writes PNGs with their parameters; inspect names families and keys."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

import app
from ldm import options
from ldm.cli import build_parser, configure_logging, load, main, make_request
from ldm.tasks import request
from ldm.tasks.parameters import read_png_parameters
from ldm.tasks.request import TilingOptions
from ldm.tasks.upscale import InputTiles
from tests.builders import TinyFiles, sd_v1, x4
from tests.builders.clip_tokenizer import tiny_vocab_size
from tests.helpers import clip_vit_l14_text_keys, sd_v2_file_shapes, write_header_only_file

FIXTURES = Path(__file__).parent / "fixtures"


class CliModel(NamedTuple):
    files: TinyFiles
    preset_yaml: Path  # the preset as a file, as a user passes it


@pytest.fixture(scope="module")
def tiny(tiny_sd_v1, tmp_path_factory):
    preset_yaml = sd_v1.write_preset_yaml(tmp_path_factory.mktemp("cli") / "tiny-v1.yaml",
                                          tiny_vocab_size(tiny_sd_v1.tokenizer_dir))
    return CliModel(tiny_sd_v1, preset_yaml)


def txt2img_args(tiny: CliModel, out, *extra):
    files = tiny.files
    return ["txt2img", "--model", str(files.path), "--preset", str(tiny.preset_yaml), "--tokenizer", str(files.tokenizer_dir),
            "--prompt", "a red cat", "--negative", "a blue dog", "--steps", "3", "--scale", "6",
            "--seed", "11", "--width", "32", "--height", "32", "--out", str(out), *extra]


def test_txt2img_writes_a_png_with_its_parameters(tiny, tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert main(txt2img_args(tiny, out)) == 0
    with Image.open(out) as image:
        assert image.size == (32, 32)
    params = read_png_parameters(out)
    assert params["Prompt"] == "a red cat" and params["Negative prompt"] == "a blue dog"
    assert params["Steps"] == "3" and params["Seed"] == "11" and params["CFG scale"] == "6.0"
    assert params["Size"] == "32x32" and params["Sampler"] == "DDIM" and len(params["Model hash"]) == 10
    assert "seed 11" in capsys.readouterr().out


def test_the_same_command_gives_the_same_image(tiny, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    main(txt2img_args(tiny, a))
    main(txt2img_args(tiny, b))
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_a_batch_writes_numbered_files(tiny, tmp_path):
    out = tmp_path / "cat.png"
    assert main(txt2img_args(tiny, out, "--batch-size", "2")) == 0
    assert read_png_parameters(tmp_path / "cat-1.png")["Seed"] == "11"
    assert read_png_parameters(tmp_path / "cat-2.png")["Seed"] == "12"


def test_bad_input_is_a_message_not_a_traceback(tiny, tmp_path, capsys):
    assert main(txt2img_args(tiny, tmp_path / "x.png", "--steps", "0")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: steps must be between 1 and 1000") and "Traceback" not in err


def x4_upscale_args(files, folder: Path, *extra) -> list[str]:
    preset_yaml = x4.write_preset_yaml(folder / "tiny-x4.yaml", tiny_vocab_size(files.tokenizer_dir))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "low.png")
    return ["upscale", "--model", str(files.path), "--preset", str(preset_yaml), "--tokenizer", str(files.tokenizer_dir),
            "--image", str(folder / "low.png"), "--prompt", "a sharp photo", "--steps", "2", "--seed", "3", *extra]


def test_upscale_takes_a_prompt_and_noise_level_for_a_text_guided_upscaler(tiny_x4, tmp_path, capsys):
    out = tmp_path / "up.png"
    assert main(x4_upscale_args(tiny_x4, tmp_path, "--noise-level", "30", "--scale", "4", "--out", str(out))) == 0
    params = read_png_parameters(out)
    assert (params["Prompt"], params["Noise level"], params["CFG scale"], params["Size"]) == ("a sharp photo", "30", "4.0", "32x32")
    capsys.readouterr()
    assert main(x4_upscale_args(tiny_x4, tmp_path, "--noise-level", "351", "--out", str(out))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: noise level must be a whole number from 0 to 350") and "Traceback" not in err


def default_txt2img_args(out, *extra) -> list[str]:
    """txt2img on the embedded default model (64 px training size), two steps."""
    return ["txt2img", "--prompt", "a red circle", "--steps", "2", "--seed", "5", "--out", str(out), *extra]


def test_tiling_options_reach_the_request(tmp_path):
    args = build_parser().parse_args(default_txt2img_args(tmp_path / "x.png", "--tiling", "always", "--tile", "32",
                                                          "--overlap", "8", "--memory-budget", "512"))
    loaded = load(args, "txt2img")
    assert make_request(args, loaded).tiling == TilingOptions("always", 32, 8, 512)
    plain = build_parser().parse_args(default_txt2img_args(tmp_path / "x.png"))
    assert make_request(plain, loaded).tiling == TilingOptions()  # the studio's defaults: auto, 0, a quarter, 2048


def test_the_cli_and_the_studio_share_the_tiling_defaults():
    assert (options.TILING_MODES, options.DEFAULT_BUDGET_MB) == (request.TILING_MODES, request.DEFAULT_BUDGET_MB)
    assert app.parse_args([]).memory_budget == request.DEFAULT_BUDGET_MB
    assert app.parse_args(["--memory-budget", "1024"]).memory_budget == 1024
    upscale = build_parser().parse_args(["upscale", "--image", "x.png"])
    assert upscale.tile == InputTiles().tile  # the upscaling tab's 128 (its overlap, 16, is checked by a run below)


@pytest.mark.parametrize("command", [["txt2img"], ["layout", "--boxes", "boxes.json"]])
@pytest.mark.parametrize("typed, mode", [("never", "off"), ("Never", "off"), ("off", "off"), ("ALWAYS", "always")])
def test_tiling_never_is_off(command, typed, mode):
    assert build_parser().parse_args([*command, "--tiling", typed]).tiling == mode


def test_inpaint_and_semantic_have_no_tiling_options_as_in_the_studio(capsys):
    for command in (["inpaint", "--image", "a.png", "--mask", "m.png"], ["semantic", "--segmentation", "s.png"]):
        with pytest.raises(SystemExit) as exit:
            build_parser().parse_args([*command, "--tiling", "always"])
        assert exit.value.code == 2 and "unrecognized arguments: --tiling always" in capsys.readouterr().err


def test_txt2img_in_tiles_records_the_tiling(tmp_path, capsys):
    tiled, whole = tmp_path / "tiled.png", tmp_path / "whole.png"
    size = ["--width", "96", "--height", "64"]
    assert main(default_txt2img_args(tiled, *size, "--tiling", "always", "--tile", "32", "--overlap", "8")) == 0
    assert "the canvas is sampled in tiles of 32 px overlapping by 8 px" in capsys.readouterr().err
    assert main(default_txt2img_args(whole, *size, "--tiling", "never")) == 0
    assert "sampled in tiles" not in capsys.readouterr().err
    assert read_png_parameters(tiled)["Tiling"] == "always 32 8 2048"
    assert read_png_parameters(whole)["Tiling"] == "off 0 -1 2048"
    with Image.open(tiled) as a, Image.open(whole) as b:
        assert a.size == b.size == (96, 64)
        assert not np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("extra, message", [
    (["--memory-budget", "0"], "--memory-budget must be from 1 to 1048576 MB, got 0"),
    (["--tile", "5000"], "--tile must be from 0 to 4096 px (0: the model's training size), got 5000"),
    (["--overlap", "-2"], "--overlap must be from -1 to 4096 px (-1: a quarter of the tile), got -2"),
    (["--tile", "32", "--overlap", "32"], "--overlap must be less than the tile (--tile 32)"),
    (["--overlap", "64"], "--overlap must be less than the tile (--tile 0: the model's training size, 64 px)"),
])
def test_a_bad_tiling_option_is_named(tmp_path, capsys, extra, message):
    out = tmp_path / "x.png"
    assert main(default_txt2img_args(out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and "Traceback" not in err
    assert not out.exists()


def test_an_unknown_tiling_mode_lists_the_modes(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["txt2img", "--tiling", "sometimes"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "argument --tiling: invalid choice: 'sometimes'" in err and all(mode in err for mode in ("auto", "always", "off"))


def test_upscale_takes_the_tiles_of_its_input(tiny_x4, tmp_path, capsys):
    out = tmp_path / "up.png"
    assert main(x4_upscale_args(tiny_x4, tmp_path, "--out", str(out))) == 0
    assert (read_png_parameters(out)["Tile size"], read_png_parameters(out)["Tile overlap"]) == ("128", "16")  # the tab's
    assert main(x4_upscale_args(tiny_x4, tmp_path, "--tile", "8", "--overlap", "2", "--out", str(out))) == 0
    params = read_png_parameters(out)
    assert (params["Tile size"], params["Tile overlap"], params["Size"]) == ("8", "2", "32x32")
    assert main(x4_upscale_args(tiny_x4, tmp_path, "--tile", "0", "--out", str(out))) == 0  # no overlap to give
    assert "Tile size" not in read_png_parameters(out)  # the whole image at once
    capsys.readouterr()
    for extra, message in ((["--tile", "3"], "--tile: tile size must be 0 (no tiling) or from 4 to 1024"),
                           (["--tile", "8", "--overlap", "5"], "--overlap: tile overlap must be from 0 to half the tile size (4) pixels, got 5")):
        assert main(x4_upscale_args(tiny_x4, tmp_path, *extra, "--out", str(out))) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and "Traceback" not in err


def test_a_missing_model_file_is_named(tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    assert main(["txt2img", "--model", str(missing), "--prompt", "x"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_inspect_names_the_family_of_a_preset(capsys):
    assert main(["inspect", "v1-inference"]) == 0
    out = capsys.readouterr().out
    assert "Stable Diffusion v1" in out and "tensors: 1130" in out


def test_inspect_keys_prints_every_key_with_its_shape(capsys):
    assert main(["inspect", "v1-inference", "--keys"]) == 0
    keys = json.loads(capsys.readouterr().out)
    expected = json.loads((FIXTURES / "v1-inference.json").read_text()) | clip_vit_l14_text_keys()
    assert keys == expected


def test_inspect_of_a_file_reads_only_its_header(tiny, capsys):
    path = tiny.files.path
    assert main(["inspect", str(path)]) == 2  # the tiny layout is no registered family
    assert "unknown model layout" in capsys.readouterr().err


@pytest.mark.parametrize("metadata, family", [
    ({}, "Stable Diffusion v2 (768-v, v-prediction)"),
    ({"modelspec.architecture": "stable-diffusion-v2-512"}, "Stable Diffusion v2 (512-base, eps)"),
])
def test_inspect_names_the_family_of_an_sd2_file(tmp_path, capsys, metadata, family):
    path = write_header_only_file(tmp_path / "sd2.safetensors", sd_v2_file_shapes(), metadata)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"family: {family}" in out
    assert ("note:" in out and "--preset v2-inference" in out) == (metadata == {})


def test_python_dash_m_ldm_runs():
    done = subprocess.run([sys.executable, "-m", "ldm", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "txt2img" in done.stdout and "inspect" in done.stdout


@pytest.mark.parametrize("argv, message", [
    (["train"], "name a stage"),
    (["train", "txt2img", "--preset", "presets/train/default-txt2img.yaml"], "not both"),
    (["train", "--preset", "no-such-recipe.yaml"], "no such training recipe"),
    (["train", "txt2img", "--workers", "-1"], "--workers -1: expected 0"),
])
def test_train_needs_one_stage_or_recipe_and_sensible_workers(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, shown", [
    (["train", "txt2img"], True),      # a run of hours says how far it is without -v
    (["eval"], False),
    (["-v", "eval"], True),
])
def test_training_progress_is_logged_without_verbose(argv, shown, caplog):
    trainer = logging.getLogger("ldm.train")
    level = trainer.level
    try:
        configure_logging(build_parser().parse_args(argv))
        logging.getLogger("ldm.train.diffusion").info("default-txt2img step 50/1800")
    finally:
        trainer.setLevel(level)
    assert ("step 50/1800" in caplog.text) is shown


# --- samplers and schedules -------------------------------------------------------------------------


def test_the_clis_sampler_and_schedule_names_are_the_registrys():
    from ldm.sampling.samplers import SAMPLERS
    from ldm.sampling.sigmas import SCHEDULES

    assert (options.SAMPLER_NAMES, options.SCHEDULE_NAMES) == (tuple(SAMPLERS), tuple(SCHEDULES))


def test_the_clis_resize_and_fill_modes_are_the_tasks():
    from ldm.tasks import img2img, outpaint

    assert options.RESIZE_MODES == img2img.RESIZE_MODES
    assert (options.FILL_MODES, options.MAX_MASK_BLUR) == (outpaint.FILL_MODES, outpaint.MAX_MASK_BLUR)


@pytest.mark.parametrize("command", [["txt2img"], ["layout", "--boxes", "b.json"], ["inpaint", "--image", "a.png", "--mask", "m.png"],
                                     ["outpaint", "--image", "a.png", "--left", "64"], ["upscale", "--image", "a.png"],
                                     ["semantic", "--segmentation", "s.png"]])
def test_every_generating_command_takes_a_sampler_a_schedule_and_s_noise_by_any_case(command):
    args = build_parser().parse_args([*command, "--sampler", "dpm++ 2m sde", "--schedule", "karras", "--s-noise", "0.9"])
    assert (args.sampler, args.schedule, args.s_noise) == ("DPM++ 2M SDE", "Karras", 0.9)
    plain = build_parser().parse_args(command)
    assert (plain.sampler, plain.schedule, plain.s_noise) == (None, None, 1.0)


@pytest.mark.parametrize("argv, message", [
    (["--sampler", "DPM2 a"], "argument --sampler: invalid choice: 'DPM2 a' (choose from 'DDIM', 'Euler', 'Euler a', 'Heun', "
                              "'DPM++ 2M', 'DPM++ 2M SDE', 'DPM++ SDE', 'UniPC', 'LCM')"),
    (["--schedule", "Polyexponential"], "argument --schedule: invalid choice: 'Polyexponential' (choose from 'Automatic', "
                                        "'Uniform', 'Karras', 'Exponential', 'SGM Uniform', 'Simple', 'Normal', 'KL Optimal', "
                                        "'Align Your Steps', 'Beta')"),
    (["--sampler", "DPM++ 2M Karras"], "'DPM++ 2M Karras' fuses a sampler and a schedule as AUTOMATIC1111 up to 1.8 named "
                                       "them: use --sampler 'DPM++ 2M' --schedule 'Karras'"),
])
def test_an_unknown_sampler_or_schedule_is_refused_with_the_known_names(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["txt2img", *argv])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_the_help_lists_the_samplers_and_schedules(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["txt2img", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "DDIM, Euler, Euler a, Heun, DPM++ 2M, DPM++ 2M SDE, DPM++ SDE, UniPC, LCM" in text
    assert "Automatic, Uniform, Karras, Exponential, SGM Uniform, Simple, Normal, KL Optimal, Align Your Steps, Beta" in text


def test_txt2img_with_dpmpp_2m_karras_writes_it_and_reproduces(tiny, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(txt2img_args(tiny, a, "--sampler", "DPM++ 2M", "--schedule", "Karras")) == 0
    main(txt2img_args(tiny, b, "--sampler", "DPM++ 2M", "--schedule", "Karras"))
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    params = read_png_parameters(a)
    assert (params["Sampler"], params["Schedule type"]) == ("DPM++ 2M", "Karras") and "Eta DDIM" not in params
    ddim = tmp_path / "ddim.png"
    main(txt2img_args(tiny, ddim))
    assert not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(ddim)))


def test_a_named_sampler_takes_its_own_eta_and_schedule_unless_given(tmp_path):
    loaded = load(build_parser().parse_args(default_txt2img_args(tmp_path / "x.png")), "txt2img")

    def request_of(*extra):
        return make_request(build_parser().parse_args(default_txt2img_args(tmp_path / "x.png", *extra)), loaded)

    plain = request_of()  # the model preset's: DDIM, Automatic, its eta
    assert (plain.sampler, plain.schedule, plain.eta, plain.s_noise) == ("DDIM", "Automatic", loaded.preset.sampler.eta, 1.0)
    ancestral = request_of("--sampler", "Euler a", "--s-noise", "0.8")
    assert (ancestral.sampler, ancestral.schedule, ancestral.eta, ancestral.s_noise) == ("Euler a", "Automatic", 1.0, 0.8)
    assert request_of("--sampler", "Euler a", "--eta", "0.3").eta == 0.3
    assert request_of("--sampler", "DPM++ 2M", "--schedule", "Exponential").schedule == "Exponential"


def test_a_bad_s_noise_is_named(tiny, tmp_path, capsys):
    assert main(txt2img_args(tiny, tmp_path / "x.png", "--sampler", "Euler a", "--s-noise", "3")) == 2
    assert capsys.readouterr().err.startswith("error: s_noise (sigma noise) must be between 0 and 2, got 3")


def test_txt2img_reads_the_prompt_syntax_and_the_emphasis_option(tiny, tmp_path):
    plain, weighted, no_norm = tmp_path / "plain.png", tmp_path / "weighted.png", tmp_path / "no-norm.png"
    assert main(txt2img_args(tiny, plain)) == 0
    assert main(txt2img_args(tiny, weighted, "--prompt", "a (red:1.6) [cat]")) == 0
    assert main(txt2img_args(tiny, no_norm, "--prompt", "a (red:1.6) [cat]", "--emphasis", "no norm")) == 0
    images = [np.asarray(Image.open(p)) for p in (plain, weighted, no_norm)]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])


def test_an_absurd_prompt_weight_is_a_message_naming_the_range(tiny, tmp_path, capsys):
    assert main(txt2img_args(tiny, tmp_path / "x.png", "--prompt", "a (red:1e9) cat")) == 2
    err = capsys.readouterr().err
    assert "allowed range -10 to 10" in err and "Traceback" not in err
