"""Numerics of SD 2 inpainting against an independent implementation: a tiny file in the original
layout of v2-inpainting-inference (9-channel input, hybrid conditioning, eps) converted by diffusers'
own single-file converters, compared at fp32 to 1e-4 with a guided DDIM run written with diffusers'
UNet, VAE and DDIMScheduler, its [x, mask, masked-image latent] input built as Stability's
scripts/gradio/inpainting.py builds it (``reference_concat``).

Where the two sides differ from the original, the test says how:
- diffusers' pipelines are not used, only its components: its inpainting pipeline defaults to eta 0
  and draws the masked image's latent with its own generator; the original samples at eta 1.0.
- The original draws the masked image's latent from the autoencoder's posterior with the global
  RNG, which no seed reproduces; the engine takes the posterior's mean, and so does the reference.
- The original shrinks the mask to latent size by nearest-neighbour interpolation (one pixel of
  each latent pixel's block decides); the engine marks a latent pixel when any of its pixels is
  masked. The two agree on masks aligned to the latent grid, the one used for parity here; on
  others the engine fills a little more, never less
  (``test_on_a_mask_off_the_latent_grid_the_engines_latent_mask_covers_at_least_the_originals``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.loaders import single_file_utils as sfu
from PIL import Image

from ldm.checkpoints.io import read_state_dict
from ldm.checkpoints.presets import find_preset
from ldm.tasks.inpaint import inpaint
from ldm.tasks.registry import tasks_for
from ldm.tasks.request import GenerationRequest
from ldm.tasks.txt2img import sample_latents
from tests.builders.sd2 import converted_models, original_v2_config
from tests.builders.sd_v1 import SCALE_FACTOR
from tests.helpers import TOL, assert_unet_matches, max_error, original_ddim, reference_embeddings

pytestmark = pytest.mark.parity

SIZE = 32  # pixels; the tiny autoencoder's f is 2, so latents are 16 x 16


@pytest.fixture(scope="module")
def reference(tiny_sd2_inpainting, loaded_sd2_inpainting):
    """diffusers' UNet and VAE and transformers' text model, from the same file by diffusers' converters."""
    path, ours = tiny_sd2_inpainting.path, loaded_sd2_inpainting
    config = original_v2_config("eps", inpainting=True)
    unet, text = converted_models(path, ours, config)
    assert unet.config.in_channels == 9
    checkpoint = read_state_dict(path)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(config, checkpoint, scaling_factor=SCALE_FACTOR)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)
    return unet, vae.eval(), text


def picture(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def grid_mask(top: int = 8, left: int = 12, bottom: int = 24, right: int = 28) -> Image.Image:
    """White = fill; a rectangle on even pixels, so aligned to the tiny model's latent grid."""
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask)


def reference_concat(vae: AutoencoderKL, image: Image.Image, mask: Image.Image, latent_hw) -> torch.Tensor:
    """[mask, masked-image latent] as the original's make_batch_sd and inpaint build them."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
    m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32))[None, None] / 255.0
    m = (m >= 0.5).float()
    masked_image = pixels * (m < 0.5)
    latent_mask = F.interpolate(m, size=latent_hw)  # nearest, the interpolate default
    masked_latent = SCALE_FACTOR * vae.encode(masked_image).latent_dist.mean  # the original: a posterior sample
    return torch.cat([latent_mask, masked_latent], dim=1)


def reference_sample(ours, reference, request: GenerationRequest, concat: torch.Tensor) -> torch.Tensor:
    """Guided DDIM as the original samples an inpainting model: the unconditional branch keeps c_concat."""
    unet, _, text = reference
    scheduler = original_ddim("epsilon", request.steps)
    generator = torch.Generator().manual_seed(request.seed)
    latents = torch.randn(1, 4, *concat.shape[-2:], generator=generator)
    context = reference_embeddings(ours, text, [request.negative_prompt, request.prompt])
    for t in scheduler.timesteps:
        inputs = torch.cat([latents, concat], dim=1)  # x first, then the concat channels
        eps_uncond, eps_cond = unet(torch.cat([inputs] * 2), t, encoder_hidden_states=context).sample.chunk(2)
        eps = eps_uncond + request.scale * (eps_cond - eps_uncond)
        latents = scheduler.step(eps, t, latents, eta=request.eta, generator=generator).prev_sample
    return latents


def request_for(eta: float) -> GenerationRequest:
    # The original's unconditional prompt is "", and its gradio demo samples at eta 1.0.
    return GenerationRequest("a red cat on a sofa", "", steps=8, scale=10.0, eta=eta, seed=77, width=SIZE, height=SIZE)


def test_sd2_inpainting_unet_prediction_matches_diffusers(loaded_sd2_inpainting, reference):
    assert_unet_matches(loaded_sd2_inpainting.model.unet, reference[0], in_channels=9)


@torch.no_grad()
def test_the_unet_reads_the_mask_and_masked_image_channels(loaded_sd2_inpainting):
    unet = loaded_sd2_inpainting.model.unet
    g = torch.Generator().manual_seed(5)
    x, context, t = torch.randn(1, 9, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g), torch.tensor([500])
    changed = x.clone()
    changed[:, 4] = 1 - changed[:, 4]
    assert max_error(unet(x, t, context=context), unet(changed, t, context=context)) > 100 * TOL


@pytest.mark.parametrize("eta", [0.0, 1.0])
@torch.no_grad()
def test_guided_ddim_inpainting_matches_diffusers(loaded_sd2_inpainting, reference, eta):
    """Through the studio's inpainting task (``ldm.tasks.inpaint``); its last step reports the final latents."""
    ours = loaded_sd2_inpainting
    request, image, mask = request_for(eta), picture(), grid_mask()
    steps = []
    inpaint(ours, request, image, mask, callback=steps.append)
    concat = reference_concat(reference[1], image, mask, (SIZE // 2, SIZE // 2))
    assert concat[:, 0].sum() == 8 * 8  # 16 x 16 pixels, 8 x 8 latent pixels
    expected = reference_sample(ours, reference, request, concat)
    assert len(steps) == request.steps
    assert max_error(steps[-1].x, expected) < TOL


@torch.no_grad()
def test_text_to_image_on_sd2_inpainting_is_inpainting_with_everything_masked(loaded_sd2_inpainting, reference):
    """The txt2img path's "no mask": a mask of ones over a blank image, which the original's
    make_batch_sd would turn into the same channels (the masked image is zero everywhere)."""
    ours = loaded_sd2_inpainting
    request = request_for(1.0)
    white = Image.fromarray(np.full((SIZE, SIZE), 255, dtype=np.uint8))
    concat = reference_concat(reference[1], picture(), white, (SIZE // 2, SIZE // 2))
    expected = reference_sample(ours, reference, request, concat)
    assert max_error(sample_latents(ours, request), expected) < TOL


@torch.no_grad()
def test_on_a_mask_off_the_latent_grid_the_engines_latent_mask_covers_at_least_the_originals(loaded_sd2_inpainting):
    model = loaded_sd2_inpainting.model
    mask = np.zeros((1, 1, SIZE, SIZE), dtype=np.float32)
    mask[..., 7:20, 9:26] = 1  # odd edges: latent pixels half covered
    mask = torch.from_numpy(mask)
    ours = model.inpainting_concat(torch.zeros(1, 3, SIZE, SIZE), mask)[:, :1]
    original = F.interpolate(mask, size=(SIZE // 2, SIZE // 2))
    assert torch.all(ours >= original) and ours.sum() > original.sum()


def test_sd2_inpainting_inpaints_natively_and_serves_the_text_tasks():
    config = find_preset("v2-inpainting-inference").model
    assert config.concat_input == "mask_and_masked_latent" and tasks_for(config) == ("txt2img", "img2img", "inpaint", "layout")
    assert find_preset("v2-inference").model.concat_input == "none"


# --- outpainting: diffusers' own StableDiffusionInpaintPipeline on the extended canvas -----------------


@pytest.mark.parametrize("fill", ["fill", "original"])
@torch.no_grad()
def test_outpainting_matches_diffusers_inpaint_pipeline_on_the_extended_canvas(loaded_sd2_inpainting, reference, monkeypatch, fill):
    """Through ``ldm.tasks.outpaint`` at denoising strength 0.75, against StableDiffusionInpaintPipeline
    given the same pre-filled canvas (the masked-content fill is the engine's own; diffusers has none)
    and a mask drawn here: white on the new border and ``mask_blur`` pixels into the picture on the
    extended sides. The pipeline encodes the image with a posterior draw from its generator; the
    engine takes the posterior's mean, so the test has the pipeline's ``retrieve_latents`` take it too
    (its "argmax" mode). At strength 1 the pipeline starts from pure noise while the engine, as
    AUTOMATIC1111, noises the canvas's latent to the first level, hence 0.75 here."""
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as pipeline_module

    from ldm.tasks.outpaint import OutpaintOptions, outpaint, prefilled_canvas

    ours = loaded_sd2_inpainting
    unet, vae, text = reference
    options = OutpaintOptions(left=8, right=0, top=0, bottom=8, fill=fill, mask_blur=4, strength=0.75)
    request = GenerationRequest("a red cat on a sofa", "", steps=8, scale=7.0, eta=0.0, seed=41, width=SIZE, height=SIZE)
    steps = []
    outpaint(ours, request, picture(3), options=options, callback=steps.append)

    canvas = prefilled_canvas(picture(3), options)
    assert canvas.size == (SIZE + 8, SIZE + 8)
    mask = np.full((SIZE + 8, SIZE + 8), 255, dtype=np.uint8)
    mask[0 : SIZE - 4, 8 + 4 :] = 0  # the picture is at x 8.., y 0..SIZE; the seam eats 4 px on its left and bottom
    monkeypatch.setattr(pipeline_module, "retrieve_latents",
                        lambda encoded, generator=None, sample_mode="sample": encoded.latent_dist.mode())
    pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet,
                                          scheduler=original_ddim("epsilon", request.steps), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    context = reference_embeddings(ours, text, [request.negative_prompt, request.prompt])
    expected = pipe(prompt_embeds=context[1:], negative_prompt_embeds=context[:1], image=canvas, mask_image=Image.fromarray(mask),
                    height=canvas.height, width=canvas.width, strength=options.strength, num_inference_steps=request.steps,
                    guidance_scale=request.scale, eta=0.0, generator=torch.Generator().manual_seed(request.seed),
                    output_type="latent").images
    assert len(steps) == 6  # int(8 * 0.75) of the 8 steps run
    assert max_error(steps[-1].x, expected) < TOL
