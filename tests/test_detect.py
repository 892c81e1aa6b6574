"""Family detection from key names and shapes against the preset registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ldm.checkpoints.detect import detect_preset, matching_presets
from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.loader import SCHEDULE_BUFFERS, build_model
from ldm.checkpoints.presets import list_presets
from tests.test_key_contract import clip_vit_l14_text_keys

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


def test_no_two_registry_entries_match_the_same_file():
    presets = list_presets()
    assert presets, "the registry must not be empty"
    for preset in presets:
        if not preset.detect:
            continue
        model = build_model(preset.model)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert [p.name for p in matching_presets(shapes, presets)] == [preset.name]


def test_every_detect_rule_names_real_keys_of_its_own_model():
    for preset in list_presets():
        model_shapes = {k: tuple(v.shape) for k, v in build_model(preset.model).state_dict().items()}
        for key, shape in preset.detect.items():
            assert model_shapes.get(key) == shape, f"{preset.name}: detect rule {key} {shape}"


def test_an_unknown_layout_names_the_file_and_the_closest_family():
    shapes = sd_v1_file_shapes()
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)  # an inpainting UNet
    with pytest.raises(CheckpointError) as error:
        detect_preset(shapes, list_presets(), "mystery.safetensors")
    message = str(error.value)
    assert "mystery.safetensors" in message
    assert "v1-inference" in message
    assert "[320, 9, 3, 3]" in message and "--preset" in message


def test_a_file_of_something_else_is_refused():
    with pytest.raises(CheckpointError, match="unknown model layout"):
        detect_preset({"encoder.weight": (3, 3)}, list_presets(), "lora.safetensors")
