"""Numerics of SDXL against an independent implementation: tiny SDXL-layout files (base and refiner)
converted by diffusers' own single-file converters into diffusers' UNet (with its ``text_time``
addition embedding) and transformers' CLIP text models, compared at fp32 to 1e-4.

What the reference side is given, and why:
- diffusers' config builder recognises SDXL by a context of 2048 or 1280; the tiny models' is 64 and 32,
  so its "projection" class embedding is replaced by SDXL's ``text_time`` addition embedding (256 per
  number), which is what it builds for the full-size models (``tests.builders.sdxl.diffusers_unet``);
  its key converter then maps ``label_emb`` to ``add_embedding``.
- Token ids follow the two original tokenizations: CLIP pads with its end token, open_clip with 0.
- The contexts are both encoders' ``hidden_states[-2]`` (no final norm) side by side, the pooled vector
  the bigG tower's ``text_embeds`` (diffusers' ``encode_prompt``); the size numbers are diffusers'
  ``add_time_ids`` (original size, crop, target size; the refiner's aesthetic score in place of the target).
- An empty negative prompt is zeros for the context and pooled vector on both sides (diffusers'
  ``force_zeros_for_empty_prompt``, AUTOMATIC1111's zeroing).
"""

from __future__ import annotations

import pytest
import torch

from ldm.checkpoints.io import read_state_dict
from ldm.sampling.noise import randn, seeded_generators
from ldm.tasks.request import GenerationRequest
from ldm.tasks.txt2img import sample_latents
from tests.builders.sdxl import diffusers_text_models, diffusers_unet
from tests.helpers import TOL, max_error, original_ddim

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def base_reference(tiny_sdxl, loaded_sdxl):
    checkpoint = read_state_dict(tiny_sdxl.path)
    vocab_size = loaded_sdxl.model.conditioner.open_clip.config.vocab_size
    return (diffusers_unet(checkpoint, "base"), *diffusers_text_models(checkpoint, vocab_size, "base"))


def token_ids(ours, prompts: list[str], pad: int | None) -> torch.Tensor:
    """[start, ids..., end], then ``pad`` (None: the end token) to 77."""
    tokenizer = ours.model.conditioner.tokenizer
    pad = tokenizer.eos_token_id if pad is None else pad
    return torch.tensor([row + [pad] * (77 - len(row)) for row in (tokenizer(p)["input_ids"] for p in prompts)])


@torch.no_grad()
def reference_text(ours, reference, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, pooled) as diffusers' SDXL ``encode_prompt`` computes them, zeros for an empty prompt."""
    _, clip_model, big_g = reference
    g = big_g(token_ids(ours, prompts, 0), output_hidden_states=True)
    contexts = [g.hidden_states[-2]]
    if clip_model is not None:
        contexts.insert(0, clip_model(token_ids(ours, prompts, None), output_hidden_states=True).hidden_states[-2])
    context, pooled = torch.cat(contexts, dim=-1), g.text_embeds
    empty = torch.tensor([p == "" for p in prompts])
    return context.masked_fill(empty[:, None, None], 0.0), pooled.masked_fill(empty[:, None], 0.0)


def time_ids(height: int, width: int, last: tuple[float, ...], batch: int) -> torch.Tensor:
    return torch.tensor([[height, width, 0, 0, *last]] * batch, dtype=torch.float32)


@torch.no_grad()
def test_both_text_encoders_and_the_pooled_vector_match_diffusers(loaded_sdxl, base_reference):
    prompts = ["a photo of a red cat", "the blue house with a green tree"]
    context, pooled = reference_text(loaded_sdxl, base_reference, prompts)
    got = loaded_sdxl.model.conditioner.encode_text(prompts)
    assert got.context.shape == (2, 77, 64) and got.pooled.shape == (2, 24)
    assert context.abs().mean() > 0.1 and pooled.abs().mean() > 0.1, "the reference output should not be trivial"
    assert max_error(got.context, context) < TOL
    assert max_error(got.pooled, pooled) < TOL


@torch.no_grad()
def test_the_unet_with_its_adm_vector_matches_diffusers(loaded_sdxl, base_reference):
    ours, unet = loaded_sdxl.model, base_reference[0]
    g = torch.Generator().manual_seed(3)
    x, context, pooled = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g), torch.randn(2, 24, generator=g)
    t = torch.tensor([999, 17])
    ids = torch.tensor([[1024.0, 768, 0, 0, 1024, 768], [512, 512, 32, 16, 512, 512]])
    expected = unet(x, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    from ldm.models.sdxl_conditioner import SizeConditioning

    sizes = [SizeConditioning((1024, 768), (1024, 768)), SizeConditioning((512, 512), (512, 512), (32, 16))]
    got = ours.unet(x, t, context=context, y=ours.conditioner.vector(pooled, sizes))
    assert expected.abs().mean() > 0.05
    assert max_error(got, expected) < TOL
    # the size numbers matter: another original size is another prediction
    other = ours.unet(x, t, context=context, y=ours.conditioner.vector(pooled, [sizes[1], sizes[1]]))
    assert max_error(other[0], got[0]) > 100 * TOL


def reference_sample(ours, reference, request: GenerationRequest, scheduler, k_diffusion: bool) -> torch.Tensor:
    """A guided generation as diffusers' SDXL pipeline runs its loop, with our initial noise."""
    unet = reference[0]
    x_T = randn((1, 4, request.height // 2, request.width // 2), seeded_generators([request.seed]),
                device=torch.device("cpu"), dtype=torch.float32)
    latents = x_T * scheduler.init_noise_sigma if k_diffusion else x_T
    context, pooled = reference_text(ours, reference, [request.negative_prompt, request.prompt])
    ids = time_ids(request.height, request.width, (request.height, request.width), 2)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        eps = unet(model_input, t, encoder_hidden_states=context,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        uncond, cond = eps.chunk(2)
        latents = scheduler.step(uncond + request.scale * (cond - uncond), t, latents).prev_sample
    return latents


@pytest.mark.parametrize("sampler, negative", [("DDIM", "a blue dog"), ("Euler", "")])
@torch.no_grad()
def test_a_guided_ten_step_sample_matches_diffusers(loaded_sdxl, base_reference, sampler, negative):
    from diffusers import EulerDiscreteScheduler

    if sampler == "DDIM":
        scheduler, schedule = original_ddim("epsilon", 10), "Automatic"
    else:  # Euler on Karras sigmas (A1111's "Euler" with schedule type Karras)
        scheduler, schedule = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                     beta_schedule="scaled_linear", timestep_spacing="linspace",
                                                     use_karras_sigmas=True), "Karras"
        scheduler.set_timesteps(10)
    request = GenerationRequest("a red cat", negative, steps=10, scale=5.0, seed=1234, width=16, height=16,
                                sampler=sampler, schedule=schedule)
    expected = reference_sample(loaded_sdxl, base_reference, request, scheduler, k_diffusion=sampler != "DDIM")
    latents = sample_latents(loaded_sdxl, request)
    assert expected.abs().mean() > 0.1
    assert max_error(latents, expected) < TOL


@torch.no_grad()
def test_the_refiners_unet_and_text_tower_match_diffusers(tiny_sdxl_refiner, loaded_sdxl_refiner):
    ours = loaded_sdxl_refiner.model
    checkpoint = read_state_dict(tiny_sdxl_refiner.path)
    vocab_size = ours.conditioner.open_clip.config.vocab_size
    reference = (diffusers_unet(checkpoint, "refiner"), *diffusers_text_models(checkpoint, vocab_size, "refiner"))
    prompts = ["a red cat", "a blue dog"]
    context, pooled = reference_text(loaded_sdxl_refiner, reference, prompts)
    encoded = ours.encode_conditioning(prompts, negative=[False, True], sizes=[_refiner_sizes(6.0), _refiner_sizes(2.5)])
    assert max_error(encoded["context"], context) < TOL
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([999, 400])
    ids = torch.tensor([[32.0, 32, 0, 0, 6.0], [32, 32, 0, 0, 2.5]])
    expected = reference[0](x, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    got = ours.unet(x, t, context=encoded["context"], y=encoded["y"])
    assert expected.abs().mean() > 0.05
    assert max_error(got, expected) < TOL


def _refiner_sizes(score: float):
    from ldm.models.sdxl_conditioner import SizeConditioning

    return SizeConditioning((32, 32), (32, 32), aesthetic_score=score)
