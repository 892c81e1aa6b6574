"""Parity: a random rank-4 kohya LoRA over every layer diffusers names (LoCon on the 3x3 convs too),
loaded by diffusers (``load_lora_weights`` through its own kohya converter, then ``fuse_lora``) and by
us (``ldm.addons.lora``), gives the same UNet and text-encoder outputs within 1e-4 in fp32, on the
tiny SD v1 and SD 2 models. diffusers needs peft for LoRA loading (requirements-dev.txt)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

from ldm.addons.lora import Applied, merged_loras, read_lora  # noqa: E402
from ldm.checkpoints.io import read_state_dict  # noqa: E402
from tests.builders.lora import kohya_names, random_lora, write  # noqa: E402
from tests.builders.sd2 import TEXT, converted_models, original_v2_config  # noqa: E402
from tests.builders.sd_v1 import original_config  # noqa: E402
from tests.helpers import diffusers_clip_text_model, max_error, reference_embeddings as open_clip_embeddings  # noqa: E402

pytestmark = pytest.mark.parity
TOL = 1e-4
PROMPTS = ["a photo of a red cat", ""]


def sd1_reference(files, ours):
    checkpoint = read_state_dict(files.path)
    config = original_config()
    unet_config = sfu.create_unet_diffusers_config_from_ldm(config, checkpoint)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    text = diffusers_clip_text_model(ours, checkpoint)
    return unet.eval(), text.eval()


def diffusers_with_lora(unet, text, path):
    pipe = StableDiffusionPipeline(vae=None, text_encoder=text, tokenizer=None, unet=unet, scheduler=DDIMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=1.0)
    return pipe.unet, pipe.text_encoder


def unet_inputs(context_dim: int):
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 17]), torch.randn(2, 77, context_dim, generator=g)


@torch.no_grad()
def compare(ours, unet, text, path, text_reference) -> None:
    x, t, context = unet_inputs(ours.model.config.unet.context_dim)
    base_unet = unet(x, t, encoder_hidden_states=context).sample
    base_text = text_reference(text)
    lora_unet, lora_text = diffusers_with_lora(unet, text, path)
    expected_unet = lora_unet(x, t, encoder_hidden_states=context).sample
    expected_text = text_reference(lora_text)
    assert max_error(expected_unet, base_unet) > 100 * TOL and max_error(expected_text, base_text) > 100 * TOL
    with merged_loras([Applied(read_lora(path, ours.model))]):
        got_unet = ours.model.unet(x, t, context=context)
        got_text = ours.model.encode_prompts(PROMPTS)
    assert max_error(got_unet, expected_unet) < TOL
    assert max_error(got_text, expected_text) < TOL


def test_sd1_kohya_lora_matches_diffusers(tiny_sd_v1, tmp_path):
    ours = tiny_sd_v1.load()
    unet, text = sd1_reference(tiny_sd_v1, ours)
    path = write(tmp_path / "sd1.safetensors", random_lora(kohya_names(ours.model), 4, scale=0.3))
    tokenizer = ours.model.cond_stage_model.tokenizer

    def text_reference(model):
        ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return model(ids).last_hidden_state

    compare(ours, unet, text, path, text_reference)


def test_sd2_kohya_lora_matches_diffusers(tiny_sd2_v, tmp_path):
    ours = tiny_sd2_v.load()
    unet, text = converted_models(tiny_sd2_v.path, ours, original_v2_config())
    last = f"lora_te_text_model_encoder_layers_{TEXT['layers'] - 1}_"  # kohya trains SD 2 without the last block
    names = {k: v for k, v in kohya_names(ours.model).items() if not k.startswith(last)}
    path = write(tmp_path / "sd2.safetensors", random_lora(names, 4, scale=0.3), {"ss_base_model_version": "sd_v2"})
    compare(ours, unet, text, path, lambda model: open_clip_embeddings(ours, model, PROMPTS))
