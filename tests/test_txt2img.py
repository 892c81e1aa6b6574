"""Text to image on a tiny SD v1-layout model: seeds, batches, long prompts, previews and stopping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.sampling.steps import SamplingCancelled
from ldm.tasks.request import GenerationRequest
from ldm.tasks.txt2img import txt2img

REQUEST = GenerationRequest("a red cat", "a blue dog", steps=4, scale=5.0, eta=0.5, seed=7, width=32, height=32)


def pixels(image) -> np.ndarray:
    return np.asarray(image)


def test_a_seed_reproduces_an_image_bit_for_bit(loaded_sd_v1):
    first, second = txt2img(loaded_sd_v1, REQUEST), txt2img(loaded_sd_v1, REQUEST)
    assert np.array_equal(pixels(first.images[0]), pixels(second.images[0]))
    other = txt2img(loaded_sd_v1, GenerationRequest(**{**REQUEST.__dict__, "seed": 8}))
    assert not np.array_equal(pixels(first.images[0]), pixels(other.images[0]))


def test_each_image_of_a_batch_is_reproducible_alone_from_its_own_seed(loaded_sd_v1):
    batch = txt2img(loaded_sd_v1, GenerationRequest(**{**REQUEST.__dict__, "batch_size": 3}))
    assert batch.seeds == [7, 8, 9]
    alone = txt2img(loaded_sd_v1, GenerationRequest(**{**REQUEST.__dict__, "seed": 9}))
    assert np.abs(pixels(batch.images[2]).astype(int) - pixels(alone.images[0]).astype(int)).max() <= 1
    assert "Seed: 9," in batch.parameters[2]


def test_a_random_seed_is_chosen_and_reported(loaded_sd_v1):
    result = txt2img(loaded_sd_v1, GenerationRequest(**{**REQUEST.__dict__, "seed": -1}))
    seed = result.seeds[0]
    assert 0 <= seed < 2**32
    again = txt2img(loaded_sd_v1, GenerationRequest(**{**REQUEST.__dict__, "seed": seed}))
    assert np.array_equal(pixels(result.images[0]), pixels(again.images[0]))


def test_sides_are_rounded_to_the_latent_grid_with_a_notice(loaded_sd_v1):
    result = txt2img(loaded_sd_v1, GenerationRequest(**{**REQUEST.__dict__, "width": 37, "height": 24}))
    assert result.images[0].size == (36, 24)
    assert any("width 37" in n and "36" in n for n in result.notices)


def test_a_long_prompt_is_encoded_in_chunks_not_cut(loaded_sd_v1):
    encoder = loaded_sd_v1.model.cond_stage_model
    words = " ".join(["red cat"] * 60)  # far more than 75 tokens
    ids = encoder.token_chunks([words])
    assert ids.shape[:2] == (1, 2) and ids.shape[2] == 77
    tail = encoder.tokenizer(words, add_special_tokens=False)["input_ids"][75:]
    assert ids[0, 1, 1 : 1 + len(tail)].tolist() == tail
    with torch.no_grad():
        context = loaded_sd_v1.model.encode_prompts([words])
        first_chunk_alone = encoder(ids[:, :1])
    assert context.shape[1] == 154
    torch.testing.assert_close(context[:, :77], first_chunk_alone)


def test_prompt_and_negative_prompt_get_the_same_number_of_chunks(loaded_sd_v1):
    long = " ".join(["blue dog"] * 60)
    ids = loaded_sd_v1.model.cond_stage_model.token_chunks(["", long])
    assert ids.shape[1] == 2
    empty = loaded_sd_v1.model.cond_stage_model.token_chunks([""])[0, 0]
    assert torch.equal(ids[0, 0], empty) and torch.equal(ids[0, 1], empty)


def test_the_callback_sees_every_step_and_stopping_cancels(loaded_sd_v1):
    seen = []
    txt2img(loaded_sd_v1, REQUEST, callback=lambda info: seen.append((info.step, info.total, tuple(info.denoised.shape))))
    assert seen == [(i, 4, (1, 4, 16, 16)) for i in range(4)]
    calls = iter([False, False, True])
    with pytest.raises(SamplingCancelled) as stop:
        txt2img(loaded_sd_v1, REQUEST, should_stop=lambda: next(calls))
    assert stop.value.step == 2


def test_guidance_changes_the_image_and_negative_prompt_matters(loaded_sd_v1):
    base = pixels(txt2img(loaded_sd_v1, REQUEST).images[0])
    other_negative = pixels(txt2img(loaded_sd_v1, GenerationRequest(**{**REQUEST.__dict__, "negative_prompt": "the sky"})).images[0])
    assert not np.array_equal(base, other_negative)
    unguided = GenerationRequest(**{**REQUEST.__dict__, "scale": 1.0, "negative_prompt": "the sky"})
    unguided_2 = GenerationRequest(**{**REQUEST.__dict__, "scale": 1.0, "negative_prompt": "a house"})
    # at scale 1 the negative prompt never runs
    assert np.array_equal(pixels(txt2img(loaded_sd_v1, unguided).images[0]), pixels(txt2img(loaded_sd_v1, unguided_2).images[0]))


def test_bf16_weights_run_and_stay_close_to_fp32(loaded_sd_v1, tiny_sd_v1):
    full = loaded_sd_v1
    half = tiny_sd_v1.load(dtype=torch.bfloat16)
    assert half.model.model.diffusion_model.input_blocks[0][0].weight.dtype == torch.bfloat16
    a, b = (pixels(txt2img(m, REQUEST).images[0]).astype(float) for m in (full, half))
    psnr = 10 * np.log10(255**2 / max(((a - b) ** 2).mean(), 1e-9))
    assert psnr > 25, psnr
