"""Family detection from key names and shapes against the preset registry."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoints.detect import (
    detect,
    detect_file,
    detect_preset,
    matching_presets,
    mismatches,
    shape_mismatches,
    stated_prediction,
)
from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.loader import SCHEDULE_BUFFERS, build_model, resolve_preset, select_weights
from ldm.checkpoints.presets import PRESET_DIR, find_preset, list_presets, preset_from_dict
from tests.helpers import (
    clip_vit_l14_text_keys,
    open_clip_vit_h14_text_keys,
    sd_v2_file_shapes,
    sdxl_file_shapes,
    write_header_only_file,
)

FIXTURES = Path(__file__).parent / "fixtures"


def sd_v1_file_shapes() -> dict[str, tuple[int, ...]]:
    """What an SD v1.x single file holds: the original keys, the text encoder and the schedule buffers."""
    shapes = {k: tuple(v) for k, v in json.loads((FIXTURES / "v1-inference.json").read_text()).items()}
    shapes.update({k: tuple(v) for k, v in clip_vit_l14_text_keys().items()})
    shapes.update({k: (1000,) for k in SCHEDULE_BUFFERS if k != "logvar"})
    return shapes


def test_an_sd_v1_file_is_detected_as_v1_inference():
    preset = detect_preset(sd_v1_file_shapes(), list_presets(), "sd-v1-5.safetensors")
    assert preset.name == "v1-inference"
    assert preset.family == "Stable Diffusion v1"


# What a file may say of itself: nothing, or Stability's ModelSpec keys in its safetensors header.
METADATA_CASES = [
    {},
    {"modelspec.prediction_type": "epsilon"},
    {"modelspec.prediction_type": "v"},
    {"modelspec.architecture": "stable-diffusion-v2-512"},
    {"modelspec.architecture": "stable-diffusion-v2-768-v"},
    {"modelspec.architecture": "stable-diffusion-v1"},
]


def test_no_two_registry_entries_match_the_same_file():
    presets = list_presets()
    assert presets, "the registry must not be empty"
    for preset in presets:
        if not preset.detect:
            continue
        model = build_model(preset.model)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        matched = {}
        for metadata in METADATA_CASES:
            names = [p.name for p in matching_presets(shapes, presets, stated_prediction(metadata))]
            assert len(names) <= 1, f"{preset.name}'s tensors with metadata {metadata} match {names}"
            matched[str(metadata)] = names
        assert [preset.name] in matched.values(), f"no file with {preset.name}'s tensors is detected as it: {matched}"




def test_the_v1_and_v2_fixtures_have_the_same_unet_keys_but_not_the_same_shapes():
    v1 = json.loads((FIXTURES / "v1-inference.json").read_text())
    v2 = json.loads((FIXTURES / "v2-inference.json").read_text())
    assert v2 == json.loads((FIXTURES / "v2-inference-v.json").read_text())  # why v and eps need metadata
    assert set(v1) == set(v2) and v1 != v2


@pytest.mark.parametrize(
    "metadata, expected",
    [
        ({"modelspec.prediction_type": "epsilon"}, "v2-inference"),
        ({"modelspec.architecture": "stable-diffusion-v2-512", "modelspec.title": "my 512 model"}, "v2-inference"),
        ({"modelspec.prediction_type": "v"}, "v2-inference-v"),
        ({"modelspec.architecture": "stable-diffusion-v2-768-v"}, "v2-inference-v"),
        # prediction_type is the specific key; it wins over an architecture id that implies another
        ({"modelspec.architecture": "stable-diffusion-v2-768-v", "modelspec.prediction_type": "epsilon"}, "v2-inference"),
    ],
)
def test_an_sd_v2_file_that_states_its_prediction_type_is_detected_without_a_notice(metadata, expected):
    detection = detect(sd_v2_file_shapes(), list_presets(), "sd2.safetensors", stated_prediction(metadata))
    assert detection.preset.name == expected
    assert detection.notice == ""


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}, {"global_step": 875000}])
def test_an_sd_v2_file_that_says_nothing_is_taken_as_v_with_a_notice(metadata):
    stated = stated_prediction(metadata)
    detection = detect(sd_v2_file_shapes(), list_presets(), "v2-1_768-ema-pruned.safetensors", stated)
    assert detection.preset.name == "v2-inference-v"
    assert detection.preset.model.parameterization == "v"
    assert "v2-1_768-ema-pruned.safetensors" in detection.notice
    assert "--preset v2-inference" in detection.notice


def test_a_v1_file_is_detected_without_a_notice_and_v2_rules_do_not_touch_it():
    detection = detect(sd_v1_file_shapes(), list_presets(), "sd-v1-5.safetensors", stated_prediction({}))
    assert (detection.preset.name, detection.notice) == ("v1-inference", "")


def test_a_file_that_states_a_prediction_no_preset_of_its_shapes_takes_is_refused():
    with pytest.raises(CheckpointError) as error:
        detect(sd_v1_file_shapes(), list_presets(), "v1-vpred.safetensors", stated_prediction({"modelspec.prediction_type": "v"}))
    assert "v1-vpred.safetensors" in str(error.value)
    assert "prediction type 'v'" in str(error.value)




@pytest.mark.parametrize("metadata, expected, notice", [
    ({}, "v2-inference-v", True),
    ({"modelspec.prediction_type": "epsilon"}, "v2-inference", False),
])
def test_the_loader_detects_a_v2_file_and_logs_the_notice(tmp_path, caplog, metadata, expected, notice):
    """The notice reaches the user through the loader's log (the CLI prints warnings)."""
    path = write_header_only_file(tmp_path / "sd2.safetensors", sd_v2_file_shapes(), metadata)
    with caplog.at_level(logging.WARNING, logger="ldm.checkpoints.loader"):
        assert resolve_preset(path, None).name == expected
    assert any("--preset v2-inference" in r.getMessage() for r in caplog.records) == notice


def test_a_preset_with_an_unknown_detect_prediction_is_refused_naming_the_allowed_values():
    raw = OmegaConf.to_container(OmegaConf.load(PRESET_DIR / "v2-inference.yaml"))
    raw["detect_prediction"] = ["epsilon"]  # ModelSpec's word, not the preset's
    with pytest.raises(ValueError, match="detect_prediction must be a list of eps, v, x0, unstated"):
        preset_from_dict(raw, Path("bad.yaml"))


def original_config(params: dict) -> str:
    """A config in the original LDM structure (target and params), as SAI's v2-inference(-v).yaml are."""
    return OmegaConf.to_yaml({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}})


@pytest.mark.parametrize("config, expected, notice", [
    (original_config({"parameterization": "v", "linear_start": 0.00085}), "v2-inference-v", False),
    (original_config({"linear_start": 0.00085}), "v2-inference", False),  # absent: the original default, eps
    (None, "v2-inference-v", True),
])
def test_an_original_config_beside_the_file_states_its_prediction_type(tmp_path, config, expected, notice):
    """AUTOMATIC1111's convention: model.yaml next to model.safetensors. It wins over the file's own header;
    a preset of ours beside the file is not an original config and states nothing."""
    metadata = {"modelspec.prediction_type": "nonsense"} if config else {}
    path = write_header_only_file(tmp_path / "model.safetensors", sd_v2_file_shapes(), metadata)
    if config:
        (tmp_path / "model.yaml").write_text(config)
    else:
        shutil.copy(PRESET_DIR / "v2-inference.yaml", tmp_path / "model.yaml")
    detection = detect_file(path, list_presets())
    assert detection.preset.name == expected
    assert bool(detection.notice) == notice


def sd_v2_inpainting_file_shapes() -> dict[str, tuple[int, ...]]:
    """An SD 2 inpainting single file (512-inpainting-ema): SD 2.x's tensors with a 9-channel input conv."""
    shapes = {k: tuple(v) for k, v in json.loads((FIXTURES / "v2-inpainting-inference.json").read_text()).items()}
    shapes.update({k: tuple(v) for k, v in open_clip_vit_h14_text_keys().items()})
    shapes.update({k: (1000,) for k in SCHEDULE_BUFFERS if k != "logvar"})
    return shapes


def test_sd2_inpainting_differs_from_sd2_in_the_input_convolution_alone():
    inpainting = json.loads((FIXTURES / "v2-inpainting-inference.json").read_text())
    base = json.loads((FIXTURES / "v2-inference.json").read_text())
    assert {k for k in base if base[k] != inpainting.get(k)} == {"model.diffusion_model.input_blocks.0.0.weight"}
    assert inpainting["model.diffusion_model.input_blocks.0.0.weight"] == [320, 9, 3, 3]


@pytest.mark.parametrize("metadata", [{}, {"modelspec.prediction_type": "epsilon"},
                                      {"modelspec.architecture": "stable-diffusion-v2-512"}])
def test_an_sd2_inpainting_file_is_detected_without_a_notice(metadata):
    """Its input convolution rules out v2-inference and v2-inference-v, so a file that states nothing is no
    ambiguity: only eps inpainting models were published in this layout."""
    detection = detect(sd_v2_inpainting_file_shapes(), list_presets(), "512-inpainting-ema.safetensors",
                       stated_prediction(metadata))
    assert (detection.preset.name, detection.notice) == ("v2-inpainting-inference", "")


def test_an_sd2_inpainting_file_that_states_v_prediction_is_refused_naming_what_the_preset_takes():
    """The closest preset named is the one whose tensors all fit, not v2-inference-v (as many problems)."""
    with pytest.raises(CheckpointError, match="Closest is v2-inpainting-inference: .*prediction type 'v'.* takes eps"):
        detect(sd_v2_inpainting_file_shapes(), list_presets(), "inpaint-v.safetensors",
               stated_prediction({"modelspec.prediction_type": "v"}))


@pytest.mark.parametrize("shapes, name", [(sd_v1_file_shapes, "v1-inference"), (sd_v2_file_shapes, "v2-inference-v")])
def test_the_sd2_inpainting_rules_do_not_touch_v1_or_v2_files(shapes, name):
    inpainting = next(p for p in list_presets() if p.name == "v2-inpainting-inference")
    assert mismatches(inpainting, shapes()) != []
    assert detect_preset(shapes(), list_presets(), "model.safetensors").name == name


def test_the_loader_detects_an_sd2_inpainting_file_with_its_original_config_beside_it(tmp_path):
    path = write_header_only_file(tmp_path / "model.safetensors", sd_v2_inpainting_file_shapes(), {})
    (tmp_path / "model.yaml").write_text(original_config({"conditioning_key": "hybrid", "linear_start": 0.00085}))
    detection = detect_file(path, list_presets())
    assert (detection.preset.name, detection.notice) == ("v2-inpainting-inference", "")
    assert resolve_preset(path, None).name == "v2-inpainting-inference"


def sd_x4_upscaler_file_shapes() -> dict[str, tuple[int, ...]]:
    """An x4 upscaler single file: the original keys, OpenCLIP, and the schedule buffers twice (the
    diffusion's and the noise augmentation's, under ``low_scale_model.``)."""
    shapes = {k: tuple(v) for k, v in json.loads((FIXTURES / "x4-upscaling.json").read_text()).items()}
    shapes.update({k: tuple(v) for k, v in open_clip_vit_h14_text_keys().items()})
    shapes.update({k: (1000,) for k in SCHEDULE_BUFFERS if k != "logvar"})
    shapes.update({f"low_scale_model.{k}": (1000,) for k in SCHEDULE_BUFFERS if k != "logvar"})
    return shapes


@pytest.mark.parametrize("metadata", [{}, {"modelspec.prediction_type": "v"}])
def test_an_x4_upscaler_file_is_detected_without_a_notice(metadata):
    """Its 256-wide 7-channel input convolution is no other preset's, so a file that states nothing is no ambiguity."""
    detection = detect(sd_x4_upscaler_file_shapes(), list_presets(), "x4-upscaler-ema.safetensors", stated_prediction(metadata))
    assert (detection.preset.name, detection.notice) == ("x4-upscaling", "")


@pytest.mark.parametrize("shapes, name", [(sd_v1_file_shapes, "v1-inference"), (sd_v2_file_shapes, "v2-inference-v"),
                                          (sd_v2_inpainting_file_shapes, "v2-inpainting-inference")])
def test_the_x4_rules_do_not_touch_sd_files(shapes, name):
    x4 = next(p for p in list_presets() if p.name == "x4-upscaling")
    assert mismatches(x4, shapes())
    assert detect_preset(shapes(), list_presets(), "model.safetensors").name == name


def test_the_loader_keeps_the_noise_augmentations_schedule_buffers_out_of_the_model():
    shapes = sd_x4_upscaler_file_shapes()
    expected = {k for k in shapes if k.startswith(("model.", "first_stage_model.", "cond_stage_model."))}
    state = {k: torch.zeros(0) for k in shapes}
    weights, _, ignored = select_weights(state, expected, None, Path("x4.safetensors"))
    assert set(weights) == expected and "low_scale_model.alphas_cumprod" in ignored
    with pytest.raises(CheckpointError, match="do not belong"):
        select_weights({**state, "low_scale_model.unknown": torch.zeros(0)}, expected, None, Path("x4.safetensors"))


@pytest.mark.parametrize("change, message", [
    (lambda m: m["unet"].pop("num_classes"), "noise augmentation gives the UNet its noise level as a class label"),
    (lambda m: m["noise_augmentation"].update(max_noise_level=1000), "max_noise_level must be from 0 to 999"),
    (lambda m: m["noise_augmentation"].update(max_level=350), "model.noise_augmentation: unknown key"),
    (lambda m: m["noise_augmentation"]["schedule"].update(kind="quadratic"), "schedule kind 'quadratic' is not known"),
])
def test_a_preset_with_a_bad_noise_augmentation_is_refused(change, message):
    raw = OmegaConf.to_container(OmegaConf.load(PRESET_DIR / "x4-upscaling.yaml"))
    change(raw["model"])
    with pytest.raises(ValueError, match=message):
        preset_from_dict(raw, Path("bad.yaml"))


# ---------------------------------------------------------------- SDXL


@pytest.mark.parametrize("kind, name", [("base", "sd_xl_base"), ("refiner", "sd_xl_refiner")])
@pytest.mark.parametrize("metadata", [{}, {"modelspec.architecture": "stable-diffusion-xl-v1-base"},
                                      {"modelspec.prediction_type": "epsilon"}])
def test_an_sdxl_file_is_detected_without_a_notice(kind, name, metadata):
    detection = detect(sdxl_file_shapes(kind), list_presets(), "sd_xl.safetensors", stated_prediction(metadata))
    assert (detection.preset.name, detection.notice) == (name, "")


@pytest.mark.parametrize("shapes, name", [(sd_v1_file_shapes, "v1-inference"), (sd_v2_file_shapes, "v2-inference-v"),
                                          (sd_v2_inpainting_file_shapes, "v2-inpainting-inference"),
                                          (lambda: sdxl_file_shapes("refiner"), "sd_xl_refiner")])
def test_the_sdxl_base_rules_do_not_touch_sd_or_refiner_files(shapes, name):
    base = next(p for p in list_presets() if p.name == "sd_xl_base")
    assert mismatches(base, shapes())
    assert detect_preset(shapes(), list_presets(), "model.safetensors").name == name


def test_no_sd_preset_matches_an_sdxl_file_even_with_its_unet_keys():
    """SD 1/2 presets look for cond_stage_model.*; an SDXL file has conditioner.* and a 2048-wide context."""
    shapes = sdxl_file_shapes()
    assert [p.name for p in list_presets() if p.detect and not shape_mismatches(p, shapes)] == ["sd_xl_base"]


def test_an_sdxl_inpainting_file_is_refused_naming_sdxl_base_as_the_closest():
    shapes = dict(sdxl_file_shapes(), **{"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)})
    with pytest.raises(CheckpointError, match=r"Closest is sd_xl_base: model.diffusion_model.input_blocks.0.0.weight has "
                                              r"shape \[320, 9, 3, 3\]"):
        detect(shapes, list_presets(), "sd_xl_inpainting.safetensors")


def test_the_loader_detects_an_sdxl_file_from_its_header(tmp_path):
    path = write_header_only_file(tmp_path / "sd_xl_base_1.0.safetensors", sdxl_file_shapes(), {})
    assert detect_file(path, list_presets()) == (find_preset("sd_xl_base"), "")
