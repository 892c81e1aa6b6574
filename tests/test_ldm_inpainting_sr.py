"""CompVis LDM's inpainting_big and bsr_sr: the presets' key contracts and detection, loading with and
without inpainting_big's ``cond_stage_model.*`` copy of its first stage, the inpainting task against
a hand-written reference of LDM's scripts/inpaint.py, the upscale task, and the command line.

The inpainting reference follows the original's formulas step by step: image and mask in [0, 1], the
mask binarised at 0.5, ``masked_image = (1 - mask) * image``, all three mapped to [-1, 1]; ``c`` is
the first stage's pre-quantisation latent of the masked image with the mask resized to latent size
by nearest neighbour appended; the UNet reads ``[x, c, mask]``; DDIM (LDM's uniform timesteps, eta 0,
no guidance); the VQ decoder quantises; the result is ``(1 - mask) * image + mask * decoded``. Its
autoencoder is diffusers' ``VQModel`` converted from the same file (there is no diffusers inpainting
pipeline for this model, nor a converter for its legacy-attention UNet, so the UNet is the engine's,
whose numerics the architecture tests pin). One departure: the script truncates to 8 bits
(``astype(np.uint8)``) where the engine rounds, so images are compared to the reference rounded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from ldm.checkpoints.detect import detect_file, detect_preset
from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.io import read_state_dict
from ldm.checkpoints.loader import SCHEDULE_BUFFERS, build_model, load_model
from ldm.checkpoints.presets import find_preset, list_presets
from ldm.cli import main
from ldm.tasks.generate import sample
from ldm.tasks.inpaint import InpaintOptions, inpaint
from ldm.tasks.parameters import read_png_parameters
from ldm.tasks.registry import tasks_for
from ldm.tasks.request import GenerationRequest, resolve_request
from ldm.tasks.upscale import InputTiles, upscale
from tests.builders import ldm_image

FIXTURES = Path(__file__).parent / "fixtures"
SIZE = 32


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Each file an original may be written as: plain, with the first stage's copy, with a tampered copy."""
    folder = tmp_path_factory.mktemp("ldm")
    return {
        "inpainting": ldm_image.write(folder, kind="inpainting").path,
        "inpainting_copy": ldm_image.write(folder, kind="inpainting", first_stage_copy=True).path,
        "inpainting_tampered": ldm_image.write(folder, kind="inpainting", first_stage_copy=True, tamper=True).path,
        "sr": ldm_image.write(folder, kind="sr").path,
        "sr_copy": ldm_image.write(folder, kind="sr", first_stage_copy=True).path,
        "presets": (ldm_image.make_preset("inpainting"), ldm_image.make_preset("sr")),
    }


@pytest.fixture(scope="module")
def inpainter(files):
    return load_model(files["inpainting_copy"], preset=files["presets"][0])


@pytest.fixture(scope="module")
def upscaler(files):
    return load_model(files["sr"], preset=files["presets"][1])


def picture(seed: int = 0, size: int = SIZE) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def box_mask(box=(5, 9, 23, 26), size: int = SIZE) -> Image.Image:
    """A mask (white = fill) whose edges fall inside 2x2 latent cells, where nearest-neighbour
    resizing and max-pooling differ."""
    mask = np.zeros((size, size), dtype=np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask)


# Presets: keys, detection, loading


@pytest.mark.parametrize("name", ["inpainting_big", "bsr_sr"])
def test_the_preset_builds_the_original_keys_exactly(name):
    reference = json.loads((FIXTURES / f"{name}.json").read_text())
    ours = {k: list(v.shape) for k, v in build_model(find_preset(name).model).state_dict().items()}
    assert sorted(set(reference) - set(ours)) == []
    assert sorted(set(ours) - set(reference)) == []
    assert {k: v for k, v in ours.items() if reference[k] != v} == {}


@pytest.mark.parametrize("name, unet, first_stage", [("inpainting_big", 387.2, 53.2), ("bsr_sr", 113.6, 55.3)])
def test_parameter_counts(name, unet, first_stage):
    """Millions of values in the UNet and the first stage, pinned (the key contract fixes the shapes;
    this says the sizes at a glance)."""
    counts = {}
    for key, tensor in build_model(find_preset(name).model).state_dict().items():
        counts[key.split(".")[0]] = counts.get(key.split(".")[0], 0) + tensor.numel()
    assert (round(counts["model"] / 1e6, 1), round(counts["first_stage_model"] / 1e6, 1)) == (unet, first_stage)


def test_inpainting_big_is_conditioned_by_its_first_stage_and_bsr_sr_by_the_image_itself():
    inpainting, sr = find_preset("inpainting_big"), find_preset("bsr_sr")
    assert inpainting.model.first_stage_conditions and not sr.model.first_stage_conditions
    assert (inpainting.model.concat_input, sr.model.concat_input) == ("masked_latent_and_mask", "low_res_image")
    assert not inpainting.model.first_stage.mid_attention and sr.model.first_stage.mid_attention
    assert build_model(inpainting.model).cond_stage_model is None and build_model(sr.model).cond_stage_model is None
    assert (inpainting.sampler.steps, inpainting.sampler.scale, inpainting.sampler.eta) == (50, 1.0, 0.0)
    assert (sr.sampler.steps, sr.sampler.scale, sr.sampler.eta) == (100, 1.0, 1.0)
    assert tasks_for(inpainting.model) == ("inpaint",)
    assert tasks_for(sr.model) == ("upscale",)


def full_size_file_shapes(name: str, first_stage_copy: bool = False) -> dict[str, tuple[int, ...]]:
    """What an original file of the preset holds: its keys, the schedule buffers and, for
    ``__is_first_stage__``, the first stage again under cond_stage_model."""
    shapes = {k: tuple(v) for k, v in json.loads((FIXTURES / f"{name}.json").read_text()).items()}
    if first_stage_copy:
        shapes.update({"cond_stage_model." + k.removeprefix("first_stage_model."): v for k, v in shapes.items()
                       if k.startswith("first_stage_model.")})
    shapes.update({k: (1000,) for k in SCHEDULE_BUFFERS if k != "logvar"})
    return shapes


@pytest.mark.parametrize("name, copy", [("inpainting_big", False), ("inpainting_big", True), ("bsr_sr", False)])
def test_an_original_file_is_detected_as_its_preset(name, copy):
    assert detect_preset(full_size_file_shapes(name, copy), list_presets(), f"{name}.ckpt").name == name


@pytest.mark.parametrize("key, preset", [("inpainting", 0), ("inpainting_copy", 0), ("sr", 1)])
def test_each_tiny_file_is_detected_as_its_family_and_nothing_else(files, key, preset):
    registry = [*list_presets(), *files["presets"]]
    assert detect_file(files[key], registry).preset.name == files["presets"][preset].name
    with pytest.raises(CheckpointError, match="unknown model layout"):  # not default-upscale, nor any other
        detect_file(files[key], list_presets())


def test_the_first_stage_copy_is_optional_and_ignored(files, inpainter):
    plain = load_model(files["inpainting"], preset=files["presets"][0])
    assert inpainter.report.tensors == plain.report.tensors
    assert sum(k.startswith("cond_stage_model.") for k in inpainter.report.ignored) > 0
    ours, theirs = plain.model.state_dict(), inpainter.model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_first_stage_copy_that_differs_is_refused(files):
    with pytest.raises(CheckpointError, match="cond_stage_model.decoder.conv_in.bias differs from first_stage_model"):
        load_model(files["inpainting_tampered"], preset=files["presets"][0])


def test_cond_stage_keys_are_refused_where_the_first_stage_does_not_condition(files):
    with pytest.raises(CheckpointError, match="do not belong to this model"):
        load_model(files["sr_copy"], preset=files["presets"][1])


def test_a_cond_stage_key_without_a_first_stage_twin_is_refused(files, tmp_path):
    from safetensors.torch import save_file

    state = read_state_dict(files["inpainting_copy"])
    state["cond_stage_model.extra.weight"] = torch.zeros(3)
    path = tmp_path / "stray.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="cond_stage_model.extra.weight has no counterpart"):
        load_model(path, preset=files["presets"][0])


# Inpainting against the original's formulas


def original_ddim(model, concat: torch.Tensor, shape, steps: int, seed: int) -> torch.Tensor:
    """LDM's DDIMSampler at eta 0 without guidance: uniform timesteps ``arange(0, 1000, 1000 // S) + 1``,
    the last step to alpha-bar at index 0, the UNet reading ``cat([x, c])``."""
    ac = model.alphas_cumprod
    ts = torch.arange(0, 1000, 1000 // steps) + 1
    a, a_prev = ac[ts], torch.cat([ac[:1], ac[ts[:-1]]])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    for index in reversed(range(len(ts))):
        e = model.unet(torch.cat([x, concat], dim=1), torch.full((shape[0],), int(ts[index])))
        pred_x0 = (x - (1 - a[index]) ** 0.5 * e) / a[index] ** 0.5
        x = (a_prev[index] ** 0.5 * pred_x0 + (1 - a_prev[index]) ** 0.5 * e).float()
    return x


def original_inpaint(model, vq, image: Image.Image, mask: Image.Image, steps: int, seed: int):
    """LDM scripts/inpaint.py, written out; returns (latents, image in [0, 1])."""
    image01 = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    mask01 = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]
    mask01 = (mask01 >= 0.5).float()
    masked01 = (1 - mask01) * image01
    mask_pm, masked_pm = mask01 * 2 - 1, masked01 * 2 - 1  # (the image in [-1, 1] only feeds the paste, done in [0, 1])
    c = vq.encode(masked_pm).latents  # cond_stage_model.encode: the VQ pre-quantisation latent
    cc = F.interpolate(mask_pm, size=c.shape[-2:])  # nearest
    c = torch.cat([c, cc], dim=1)
    latents = original_ddim(model, c, (1, 3, *c.shape[-2:]), steps, seed)
    decoded = vq.decode(latents).sample  # quantises first
    predicted = torch.clamp((decoded + 1) / 2, 0, 1)
    return latents, (1 - mask01) * image01 + mask01 * predicted


@pytest.fixture(scope="module")
def reference_vq(files):
    return ldm_image.diffusers_vq(read_state_dict(files["inpainting"]), mid_attention=False)


@torch.no_grad()
def test_the_concat_is_the_masked_image_latent_and_the_nearest_resized_mask(inpainter, reference_vq):
    model = inpainter.model
    image = torch.from_numpy(np.asarray(picture(), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    mask = torch.from_numpy(np.asarray(box_mask()) >= 128).float()[None, None]
    concat = model.inpainting_concat(image, mask)
    assert concat.shape == (1, 4, SIZE // 2, SIZE // 2)
    black_where_masked = torch.where(mask.bool(), -1.0, image)
    assert (concat[:, :3] - reference_vq.encode(black_where_masked).latents).abs().max() < 1e-5
    expected_mask = mask[..., ::2, ::2] * 2 - 1  # nearest: the top-left pixel of each 2x2 cell
    assert torch.equal(concat[:, 3:], expected_mask)
    assert not torch.equal(concat[:, 3:], F.max_pool2d(mask, 2) * 2 - 1), "the mask should test nearest, not max-pool"


@torch.no_grad()
def test_inpainting_matches_the_original_script(inpainter, reference_vq):
    model = inpainter.model
    image, mask = picture(), box_mask()
    request = GenerationRequest("", steps=6, scale=1.0, eta=0.0, seed=17, width=SIZE, height=SIZE)
    expected_latents, expected = original_inpaint(model, reference_vq, image, mask, request.steps, request.seed)
    resolved, _ = resolve_request(request, model.config.size_multiple)
    work_image = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    work_mask = torch.from_numpy(np.asarray(mask) >= 128).float()[None, None]
    latents = sample(model, resolved, concat=model.inpainting_concat(work_image, work_mask))
    assert (latents - expected_latents).abs().max() < 1e-4
    result = inpaint(inpainter, request, image, mask)
    got = np.asarray(result.images[0], dtype=np.float32)
    want = (expected[0].permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(got - want).max() <= 1.0
    outside = np.asarray(mask) < 128
    assert np.array_equal(got[outside], np.asarray(image, dtype=np.float32)[outside])
    assert np.abs(got[~outside] - np.asarray(image, dtype=np.float32)[~outside]).mean() > 10, "the fill should be new"


def test_the_prompt_and_scale_are_not_used_and_a_notice_says_so(inpainter):
    base = GenerationRequest("", steps=2, scale=1.0, seed=3, width=SIZE, height=SIZE)
    plain = inpaint(inpainter, base, picture(), box_mask())
    prompted = inpaint(inpainter, GenerationRequest("a red door", "blurry", steps=2, scale=7.5, seed=3, width=SIZE,
                                                    height=SIZE), picture(), box_mask())
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(prompted.images[0]))
    assert not any("text stage" in n for n in plain.notices)
    assert any("no text stage: the prompt and the guidance scale are not used" in n for n in prompted.notices)
    assert "CFG scale: 1.0" in prompted.parameters[0] and "a red door" not in prompted.parameters[0]


def test_inpainting_only_the_masked_area_keeps_the_rest(inpainter):
    image = picture(size=48)
    result = inpaint(inpainter, GenerationRequest("", steps=2, seed=1, width=48, height=48), image, box_mask(size=48),
                     options=InpaintOptions(only_masked=True, padding=4))
    outside = np.asarray(box_mask(size=48)) < 128
    assert np.array_equal(np.asarray(result.images[0])[outside], np.asarray(image)[outside])


def test_an_empty_mask_is_refused_with_a_message(inpainter):
    with pytest.raises(ValueError, match="the mask is empty"):
        inpaint(inpainter, GenerationRequest("", steps=2, width=SIZE, height=SIZE), picture(), Image.new("L", (SIZE, SIZE)))


def test_an_upscaler_is_refused_for_inpainting(upscaler):
    with pytest.raises(ValueError, match="cannot inpaint: its UNet also reads a low res image"):
        inpaint(upscaler, GenerationRequest("", steps=2, width=SIZE, height=SIZE), picture(), box_mask())


# Upscaling


def test_the_upscaler_multiplies_the_size_and_follows_its_input(upscaler):
    request = GenerationRequest("", steps=3, eta=1.0, seed=2)
    a = upscale(upscaler, picture(0, 12), request, tiles=InputTiles(0, 0))
    b = upscale(upscaler, picture(1, 12), request, tiles=InputTiles(0, 0))
    assert a.images[0].size == (24, 24)  # the tiny first stage is f2; bsr_sr's VQ-f4 gives 4x
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert "Eta DDIM: 1.0" in a.parameters[0] and "CFG scale" not in a.parameters[0]


def test_the_upscaler_ignores_a_prompt_with_a_notice(upscaler):
    request = GenerationRequest("", steps=2, seed=2)
    plain = upscale(upscaler, picture(0, 8), request, tiles=InputTiles(0, 0))
    prompted = upscale(upscaler, picture(0, 8), GenerationRequest("sharp", steps=2, seed=2), tiles=InputTiles(0, 0))
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(prompted.images[0]))
    assert any("no text stage: the prompt is not used" in n for n in prompted.notices)


# Command line


def preset_yaml(folder: Path, raw: dict) -> Path:
    path = folder / f"{raw['name']}.yaml"
    OmegaConf.save(OmegaConf.create(raw), path)
    return path


def test_cli_inpaint_runs_a_model_without_a_text_stage(files, tmp_path, capsys):
    picture().save(tmp_path / "in.png")
    box_mask().save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    yaml = preset_yaml(tmp_path, ldm_image.preset_dict("inpainting"))
    args = ["inpaint", "--model", str(files["inpainting_copy"]), "--preset", str(yaml), "--image", str(tmp_path / "in.png"),
            "--mask", str(tmp_path / "mask.png"), "--steps", "2", "--seed", "4", "--out", str(out)]
    assert main([*args, "--prompt", "a door"]) == 0
    assert "no text stage: the prompt is not used" in capsys.readouterr().err
    params = read_png_parameters(out)
    assert (params["Steps"], params["CFG scale"], params["Size"]) == ("2", "1.0", f"{SIZE}x{SIZE}")
    Image.new("L", (SIZE, SIZE)).save(tmp_path / "empty.png")
    assert main([*args[:-2], "--mask", str(tmp_path / "empty.png"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "error: the mask is empty: paint over the part of the image to fill" in err and "Traceback" not in err
    assert "sampling" not in err  # refused before the progress bar starts


def test_cli_upscale_runs_an_ldm_upscaler(files, tmp_path, capsys):
    picture(0, 12).save(tmp_path / "low.png")
    out = tmp_path / "up.png"
    yaml = preset_yaml(tmp_path, ldm_image.preset_dict("sr"))
    assert main(["upscale", "--model", str(files["sr"]), "--preset", str(yaml), "--image", str(tmp_path / "low.png"),
                 "--steps", "2", "--seed", "4", "--out", str(out)]) == 0
    params = read_png_parameters(out)
    assert (params["Size"], params["Eta DDIM"], params["Upscale"]) == ("24x24", "1.0", "2x")  # the preset's eta
    assert Image.open(out).size == (24, 24)
