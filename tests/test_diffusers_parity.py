"""Numerics against an independent implementation: a tiny SD v1-layout file converted by diffusers'
own single-file converters into diffusers models, compared at fp32 to 1e-4."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.checkpoints.io import read_state_dict
from ldm.tasks.request import GenerationRequest
from ldm.tasks.txt2img import sample_latents
from tests.builders.sd_v1 import SCALE_FACTOR, original_config
from tests.helpers import TOL, assert_unet_matches, max_error

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def reference(tiny_sd_v1, loaded_sd_v1):
    """diffusers' UNet, VAE and CLIP text model made from the same file by diffusers' converters."""
    path, ours = tiny_sd_v1.path, loaded_sd_v1
    checkpoint = read_state_dict(path)
    config = original_config()
    unet_config = sfu.create_unet_diffusers_config_from_ldm(config, checkpoint)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(config, checkpoint, scaling_factor=SCALE_FACTOR)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)
    clip = ours.model.cond_stage_model.config
    text_config = CLIPTextConfig(
        vocab_size=clip.vocab_size, hidden_size=clip.hidden_size, intermediate_size=clip.intermediate_size,
        num_hidden_layers=clip.num_layers, num_attention_heads=clip.num_heads, max_position_embeddings=77,
        hidden_act="quick_gelu", bos_token_id=clip.vocab_size - 2, eos_token_id=clip.vocab_size - 1,
    )
    text = CLIPTextModel(text_config)
    converted = sfu.convert_ldm_clip_checkpoint(checkpoint)
    # transformers 5 dropped the "text_model." level that the original keys carry.
    converted = {k.removeprefix("text_model."): v for k, v in converted.items() if not k.endswith("position_ids")}
    text.load_state_dict(converted, strict=True)
    return unet.eval(), vae.eval(), text.eval()


def reference_embeddings(ours, text, prompts):
    tokenizer = ours.model.cond_stage_model.tokenizer
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return text(ids).last_hidden_state


def test_unet_prediction_matches_diffusers(loaded_sd_v1, reference):
    assert_unet_matches(loaded_sd_v1.model.unet, reference[0])


@torch.no_grad()
def test_vae_encode_and_decode_match_diffusers(loaded_sd_v1, reference):
    ours = loaded_sd_v1
    _, vae, _ = reference
    g = torch.Generator().manual_seed(4)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    posterior = ours.model.first_stage_model.encode(image)
    expected = vae.encode(image).latent_dist
    assert max_error(posterior.mean, expected.mean) < TOL
    assert max_error(posterior.logvar, expected.logvar) < TOL
    latent = torch.randn(1, 4, 16, 16, generator=g)
    assert max_error(ours.model.decode_first_stage(latent), vae.decode(latent / SCALE_FACTOR).sample) < TOL


@torch.no_grad()
def test_text_embedding_matches_diffusers(loaded_sd_v1, reference):
    ours = loaded_sd_v1
    _, _, text = reference
    prompts = ["a photo of a red cat", ""]
    expected = reference_embeddings(ours, text, prompts)
    assert max_error(ours.model.encode_prompts(prompts), expected) < TOL


def reference_sample(ours, reference, prompt, negative, seed, eta, steps, scale):
    """The same generation written with diffusers' DDIMScheduler set up as the original sampler."""
    unet, vae, text = reference
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    context = reference_embeddings(ours, text, [negative, prompt])
    for t in scheduler.timesteps:
        eps_uncond, eps_cond = unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample.chunk(2)
        eps = eps_uncond + scale * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents, eta=eta, generator=generator).prev_sample
    return latents, vae.decode(latents / SCALE_FACTOR).sample


@pytest.mark.parametrize("eta", [0.0, 1.0])
@torch.no_grad()
def test_ten_step_ddim_with_guidance_matches_diffusers(loaded_sd_v1, reference, eta):
    ours = loaded_sd_v1
    request = GenerationRequest("a red cat", "a blue dog", steps=10, scale=7.5, eta=eta, seed=1234, width=32, height=32)
    expected_latents, expected_image = reference_sample(ours, reference, request.prompt, request.negative_prompt,
                                                        request.seed, eta, 10, 7.5)
    latents = sample_latents(ours, request)
    assert max_error(latents, expected_latents) < TOL
    assert max_error(ours.model.decode_first_stage(latents), expected_image) < TOL
