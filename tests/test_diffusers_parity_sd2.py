"""Numerics of the SD 2.x family against an independent implementation: a tiny SD 2.x-layout file
(heads by width, linear proj_in/proj_out, OpenCLIP text tower, v-prediction) converted by diffusers'
own single-file converters into diffusers and transformers models, compared at fp32 to 1e-4.

Where diffusers departs from the original, the original is followed and the test says so:
- diffusers' legacy scheduler loading ignores ``parameterization`` in the YAML and guesses from
  ``global_step``; here the scheduler is given ``prediction_type="v_prediction"`` as the config says.
- diffusers' converter drops the text tower's last block by its ViT-H name (``resblocks.23``); the
  tiny tower's last block is dropped here the same way, since SD 2.x reads the penultimate block.
- Token ids are built by open_clip's ``tokenize`` rule (start, BPE ids, end, then zeros), not by a
  hub tokenizer whose pad token depends on files this test does not have.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.checkpoints.io import read_state_dict
from ldm.checkpoints.loader import load_model
from ldm.tasks.request import GenerationRequest
from ldm.tasks.txt2img import sample_latents
from tests.test_diffusers_parity import assert_unet_matches
from tests.tiny_sd2 import TEXT, original_v2_config, write_tiny_v2_checkpoint

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, tokenizer_dir, preset = write_tiny_v2_checkpoint(tmp_path_factory.mktemp("tiny_v2"))
    return path, load_model(path, preset=preset, tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def reference(tiny):
    path, ours = tiny
    return converted_models(path, ours, original_v2_config())


def converted_models(path, ours, config: dict) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """diffusers' UNet and transformers' CLIP text model, made from the same file by diffusers' converters."""
    checkpoint = read_state_dict(path)
    unet_config = sfu.create_unet_diffusers_config_from_ldm(config, checkpoint)
    assert unet_config["use_linear_projection"] and list(unet_config["attention_head_dim"]) == [2, 4]
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    return unet.eval(), converted_text_model(ours, checkpoint)


def converted_text_model(ours, checkpoint: dict) -> CLIPTextModel:
    """transformers' CLIP text model from a file's OpenCLIP tower, by diffusers' converter."""
    blocks = TEXT["layers"] - 1  # SD 2.x reads the penultimate block: a transformers model one block shorter
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=ours.model.cond_stage_model.config.vocab_size, hidden_size=TEXT["width"],
        intermediate_size=TEXT["width"] * TEXT["mlp_ratio"], num_hidden_layers=blocks,
        num_attention_heads=TEXT["heads"], max_position_embeddings=TEXT["context_length"], hidden_act="gelu",
    ))
    converted = sfu.convert_open_clip_checkpoint(text, checkpoint)
    # transformers 5 dropped the "text_model." level; the projection belongs to CLIPTextModelWithProjection.
    converted = {k.removeprefix("text_model."): v for k, v in converted.items() if k != "text_projection.weight"}
    converted = {k: v for k, v in converted.items() if not k.startswith(f"encoder.layers.{blocks}.")}
    text.load_state_dict(converted, strict=True)
    return text.eval()


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def open_clip_ids(ours, prompts: list[str]) -> torch.Tensor:
    """open_clip's tokenize: [start, ids..., end] then zeros to 77."""
    tokenizer = ours.model.cond_stage_model.tokenizer
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    return torch.tensor([row + [0] * (77 - len(row)) for row in rows])


def reference_embeddings(ours, text, prompts):
    return text(open_clip_ids(ours, prompts)).last_hidden_state


def test_tokens_are_padded_with_zero_as_open_clip_does(tiny):
    _, ours = tiny
    prompts = ["a photo of a red cat", ""]
    ids = ours.model.cond_stage_model.token_chunks(prompts)
    assert ids.shape == (2, 1, 77)
    assert torch.equal(ids[:, 0], open_clip_ids(ours, prompts))
    eos = ours.model.cond_stage_model.tokenizer.eos_token_id
    assert ids[1, 0, :3].tolist() == [eos - 1, eos, 0]


@torch.no_grad()
def test_open_clip_text_path_matches_diffusers(tiny, reference):
    _, ours = tiny
    _, text = reference
    prompts = ["a photo of a red cat", ""]
    expected = reference_embeddings(ours, text, prompts)
    got = ours.model.encode_prompts(prompts)
    assert expected.abs().mean() > 0.1, "the reference output should not be trivial"
    assert max_error(got, expected) < TOL


@torch.no_grad()
def test_the_penultimate_block_and_zero_padding_matter(tiny, reference):
    """Guards the two facts above: the last block's output, or end-token padding, differ measurably."""
    _, ours = tiny
    _, text = reference
    encoder = ours.model.cond_stage_model
    ids = open_clip_ids(ours, ["a red cat"])
    expected = reference_embeddings(ours, text, ["a red cat"])
    eos_padded = torch.where(ids == 0, encoder.tokenizer.eos_token_id, ids)
    assert max_error(encoder(eos_padded[:, None]), expected) > 100 * TOL
    last = type(encoder)(dataclasses.replace(encoder.config, layer="last"))
    last.load_state_dict(encoder.state_dict())
    assert max_error(last(ids[:, None]), expected) > 100 * TOL


def test_sd2_unet_prediction_matches_diffusers(tiny, reference):
    assert_unet_matches(tiny[1].model.unet, reference[0])


def original_ddim(prediction_type: str, steps: int) -> DDIMScheduler:
    """diffusers' DDIMScheduler set up as the original SD 2 sampler (its schedule and timestep spacing)."""
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    scheduler.set_timesteps(steps)
    return scheduler


def reference_v_sample(ours, reference, request: GenerationRequest) -> torch.Tensor:
    """The same generation with diffusers' DDIMScheduler set up as the original sampler, predicting v."""
    unet, text = reference
    scheduler = original_ddim("v_prediction", request.steps)
    generator = torch.Generator().manual_seed(request.seed)
    latents = torch.randn(1, 4, request.height // 2, request.width // 2, generator=generator)
    context = reference_embeddings(ours, text, [request.negative_prompt, request.prompt])
    for t in scheduler.timesteps:
        v_uncond, v_cond = unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample.chunk(2)
        v = v_uncond + request.scale * (v_cond - v_uncond)  # the original guides the raw model output
        latents = scheduler.step(v, t, latents, eta=request.eta, generator=generator).prev_sample
    return latents


@pytest.mark.parametrize("eta", [0.0, 1.0])
@torch.no_grad()
def test_ten_step_ddim_with_guidance_on_v_prediction_matches_diffusers(tiny, reference, eta):
    _, ours = tiny
    assert ours.model.config.parameterization == "v"
    request = GenerationRequest("a red cat", "a blue dog", steps=10, scale=9.0, eta=eta, seed=1234, width=32, height=32)
    expected = reference_v_sample(ours, reference, request)
    latents = sample_latents(ours, request)
    assert max_error(latents, expected) < TOL
