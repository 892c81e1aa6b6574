"""Numerics of the x4 upscaler against an independent implementation: a tiny file in the original layout
of x4-upscaling (7-channel input, noise level as class label, cross-attention in place of disabled
self-attention, v-prediction) converted by diffusers' own single-file converters, compared at fp32 to
1e-4 with a guided DDIM upscale written with diffusers' UNet, VAE, DDIMScheduler and the low-res noise
scheduler its single-file loader builds for this model.

Where diffusers departs from the original, the original is followed and the test says so:
- diffusers' legacy scheduler loading gives this model type "epsilon" whatever the YAML says; the
  original config says ``parameterization: "v"``, so the DDIMScheduler here predicts v.
- diffusers' upscale pipeline defaults (noise level 20, eta 0) are the original script's too, but its
  pipeline draws the augmentation noise before the initial latents; the engine draws the initial
  latents first from each seed's generator, then the augmentation noise, and so does the reference
  here. (The original uses the global RNG for both, which no seed reproduces.)
- The DDIM scheduler is set up as the original sampler (``leading`` spacing, offset 1, final step to
  alpha-bar at index 0), not as diffusers' hub config for this model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from PIL import Image

from ldm.checkpoints.io import read_state_dict
from ldm.tasks.generate import sample
from ldm.tasks.images import from_pil
from ldm.tasks.request import GenerationRequest, resolve_request
from ldm.tasks.upscale import InputTiles, noised_low_res, upscale
from tests.builders.sd2 import converted_text_model
from tests.builders.x4 import MAX_NOISE_LEVEL, SCALE_FACTOR, SCHEDULE, original_x4_config
from tests.helpers import TOL, max_error, reference_embeddings

pytestmark = pytest.mark.parity

SIZE = 16  # low-resolution pixels; latents are 16 x 16 and the tiny autoencoder decodes them 2x


@pytest.fixture(scope="module")
def reference(tiny_x4, loaded_x4):
    """diffusers' UNet and VAE and transformers' text model, from the same file by diffusers' converters."""
    path, ours = tiny_x4.path, loaded_x4
    config = original_x4_config()
    checkpoint = read_state_dict(path)
    unet_config = sfu.create_unet_diffusers_config_from_ldm(config, checkpoint)
    assert (unet_config["in_channels"], unet_config["num_class_embeds"]) == (7, 1000)
    assert list(unet_config["only_cross_attention"]) == [True, False]
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    text = converted_text_model(ours, checkpoint)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(config, checkpoint, scaling_factor=SCALE_FACTOR)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)
    return unet.eval(), vae.eval(), text


def low_res_scheduler() -> DDPMScheduler:
    """The noise scheduler diffusers' single-file loader builds for the upscaler's low-resolution image."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                         clip_sample=True, prediction_type="epsilon", variance_type="fixed_small")


def original_ddim(steps: int) -> DDIMScheduler:
    """diffusers' DDIMScheduler set up as the original sampler on the upscaler's schedule, predicting v."""
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=SCHEDULE["linear_start"], beta_end=SCHEDULE["linear_end"],
        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        timestep_spacing="leading", prediction_type="v_prediction",
    )
    scheduler.set_timesteps(steps)
    return scheduler


def picture(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def reference_latents(ours, reference, request: GenerationRequest, low: torch.Tensor, noise_level: int) -> torch.Tensor:
    """Guided DDIM as the original script upscales: x_aug, the noised image, and the noise level are the
    same in both branches; only the text differs."""
    unet, _, text = reference
    scheduler = original_ddim(request.steps)
    generator = torch.Generator().manual_seed(request.seed)
    latents = torch.randn(1, 4, *low.shape[-2:], generator=generator)
    noise = torch.randn(low.shape, generator=generator)
    level = torch.tensor([noise_level])
    x_aug = low_res_scheduler().add_noise(low, noise, level)
    context = reference_embeddings(ours, text, [request.negative_prompt, request.prompt])
    for t in scheduler.timesteps:
        inputs = torch.cat([latents, x_aug], dim=1)
        v_uncond, v_cond = unet(torch.cat([inputs] * 2), t, encoder_hidden_states=context,
                                class_labels=torch.cat([level] * 2)).sample.chunk(2)
        v = v_uncond + request.scale * (v_cond - v_uncond)
        latents = scheduler.step(v, t, latents, eta=request.eta, generator=generator).prev_sample
    return latents


def request_for(eta: float) -> GenerationRequest:
    return GenerationRequest("a sharp photo of a red cat", "", steps=8, scale=9.0, eta=eta, seed=21, width=2 * SIZE,
                             height=2 * SIZE)


@torch.no_grad()
def test_x4_unet_prediction_with_class_labels_matches_diffusers(loaded_x4, reference):
    ours, unet = loaded_x4.model.unet, reference[0]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 8, 8, generator=g)
    context = torch.randn(2, 77, 32, generator=g)
    t, labels = torch.tensor([999, 17]), torch.tensor([20, 350])
    expected = unet(x, t, encoder_hidden_states=context, class_labels=labels).sample
    assert expected.abs().mean() > 0.05, "the reference output should not be trivial"
    assert max_error(ours(x, t, context=context, y=labels), expected) < TOL
    other = unet(x, t, encoder_hidden_states=context, class_labels=torch.tensor([0, 0])).sample
    assert max_error(other, expected) > 100 * TOL, "the class label should matter"


def test_the_augmentation_schedule_is_diffusers_low_res_scheduler(loaded_x4):
    ours = loaded_x4.model
    expected = low_res_scheduler().alphas_cumprod.double()
    assert torch.allclose(ours.low_scale_alphas_cumprod, expected, rtol=1e-6, atol=0)
    low, noise = torch.rand(1, 3, 4, 4) * 2 - 1, torch.randn(1, 3, 4, 4)
    for level in (0, 20, MAX_NOISE_LEVEL):
        got = ours.augment_low_res(low, level, noise)
        assert max_error(got, low_res_scheduler().add_noise(low, noise, torch.tensor([level]))) < 1e-5  # diffusers keeps its schedule in float32


@pytest.mark.parametrize("eta, noise_level", [(0.0, 20), (1.0, 100)])
@torch.no_grad()
def test_guided_ddim_upscale_matches_diffusers(loaded_x4, reference, eta, noise_level):
    ours = loaded_x4
    low = from_pil(picture())
    request, _ = resolve_request(request_for(eta), ours.model.config.size_multiple)
    expected = reference_latents(ours, reference, request, low, noise_level)
    got = sample(ours.model, request, concat=noised_low_res(ours.model, low, noise_level, request.batch_size), label=noise_level)
    assert max_error(got, expected) < TOL


@torch.no_grad()
def test_the_upscale_task_decodes_the_same_image_as_diffusers_vae(loaded_x4, reference):
    """The whole task (no tiling) against the reference latents decoded by diffusers' VAE: equal to one
    level of 8-bit rounding."""
    ours = loaded_x4
    _, vae, _ = reference
    request = request_for(0.0)
    low = from_pil(picture())
    result = upscale(ours, picture(), request, tiles=InputTiles(0, 0), noise_level=20)
    resolved, _ = resolve_request(request, ours.model.config.size_multiple)
    latents = reference_latents(ours, reference, resolved, low, 20)
    image = vae.decode(latents / SCALE_FACTOR).sample
    expected = ((image.clamp(-1, 1) + 1) * 127.5)[0].permute(1, 2, 0).numpy()
    got = np.asarray(result.images[0], dtype=np.float32)
    assert got.shape == (2 * SIZE, 2 * SIZE, 3)
    assert np.abs(got - expected).max() <= 1.0
