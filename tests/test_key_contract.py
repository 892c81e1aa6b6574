"""The model built from a preset has exactly the original checkpoint's keys and shapes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from ldm.checkpoints.loader import build_model
from ldm.checkpoints.presets import find_preset
from tests.helpers import clip_vit_l14_text_keys, open_clip_vit_h14_text_keys

FIXTURES = Path(__file__).parent / "fixtures"




def preset_key_shapes(name: str) -> dict[str, list[int]]:
    model = build_model(find_preset(name).model)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def v1_keys():
    return preset_key_shapes("v1-inference")


def test_v1_unet_and_autoencoder_keys_match_the_original_exactly(v1_keys):
    reference = json.loads((FIXTURES / "v1-inference.json").read_text())
    ours = {k: v for k, v in v1_keys.items() if not k.startswith("cond_stage_model.")}
    assert sorted(set(reference) - set(ours)) == []
    assert sorted(set(ours) - set(reference)) == []
    assert {k: v for k, v in ours.items() if reference[k] != v} == {}


def test_v1_text_encoder_keys_are_clip_vit_l14(v1_keys):
    ours = {k: v for k, v in v1_keys.items() if k.startswith("cond_stage_model.")}
    assert ours == clip_vit_l14_text_keys()


def test_v1_parameter_count_is_stable_diffusions(v1_keys):
    counts = {}
    for key, shape in v1_keys.items():
        n = 1
        for d in shape:
            n *= d
        part = key.split(".")[0]
        counts[part] = counts.get(part, 0) + n
    # Published sizes: UNet 859.5 M, KL-f8 VAE 83.7 M, CLIP ViT-L/14 text 123.1 M.
    assert round(counts["model"] / 1e6, 1) == 859.5
    assert round(counts["first_stage_model"] / 1e6, 1) == 83.7
    assert round(counts["cond_stage_model"] / 1e6, 1) == 123.1


@pytest.mark.parametrize("name", ["v2-inference", "v2-inference-v", "v2-inpainting-inference"])
def test_v2_unet_and_autoencoder_keys_match_the_original_exactly(name):
    reference = json.loads((FIXTURES / f"{name}.json").read_text())
    ours = {k: v for k, v in preset_key_shapes(name).items() if not k.startswith("cond_stage_model.")}
    assert sorted(set(reference) - set(ours)) == []
    assert sorted(set(ours) - set(reference)) == []
    assert {k: v for k, v in ours.items() if reference[k] != v} == {}


@pytest.mark.parametrize("name", ["v2-inference", "v2-inference-v", "v2-inpainting-inference"])
def test_v2_text_encoder_keys_are_open_clip_vit_h14(name):
    ours = {k: v for k, v in preset_key_shapes(name).items() if k.startswith("cond_stage_model.")}
    assert ours == open_clip_vit_h14_text_keys()


def test_v2_presets_differ_only_in_prediction_and_size():
    eps, v = find_preset("v2-inference"), find_preset("v2-inference-v")
    assert (eps.model.parameterization, v.model.parameterization) == ("eps", "v")
    assert (eps.model.latent_size, v.model.latent_size) == (64, 96)
    assert dataclasses.replace(v.model, parameterization="eps", latent_size=64) == eps.model
    assert eps.detect == v.detect


def test_v2_inpainting_is_the_512_base_network_with_a_9_channel_input_and_hybrid_conditioning():
    base, inpainting = find_preset("v2-inference"), find_preset("v2-inpainting-inference")
    assert inpainting.model.unet.in_channels == 9
    assert (inpainting.model.conditioning, inpainting.model.parameterization) == ("hybrid", "eps")
    unet = dataclasses.replace(inpainting.model.unet, in_channels=4)
    assert dataclasses.replace(inpainting.model, unet=unet, conditioning="crossattn", concat_input="none") == base.model


def test_x4_upscaling_keys_match_the_original_exactly():
    reference = json.loads((FIXTURES / "x4-upscaling.json").read_text())
    keys = preset_key_shapes("x4-upscaling")
    ours = {k: v for k, v in keys.items() if not k.startswith("cond_stage_model.")}
    assert sorted(set(reference) - set(ours)) == []
    assert sorted(set(ours) - set(reference)) == []
    assert {k: v for k, v in ours.items() if reference[k] != v} == {}
    assert {k: v for k, v in keys.items() if k.startswith("cond_stage_model.")} == open_clip_vit_h14_text_keys()


def test_x4_upscaling_is_a_v_prediction_hybrid_with_noise_augmentation():
    model = find_preset("x4-upscaling").model
    assert (model.parameterization, model.conditioning, model.scale_factor) == ("v", "hybrid", 0.08333)
    assert (model.unet.in_channels, model.unet.num_classes, model.first_stage.downsampling_factor) == (7, 1000, 4)
    assert model.noise_augmentation.max_noise_level == 350
    assert model.noise_augmentation.schedule == model.schedule  # linear 1e-4 to 0.02 over 1000, as the original's
