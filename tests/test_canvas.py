"""Large canvases: tiled (MultiDiffusion) denoising, region prompts, and when tiling engages."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from ldm.sampling.regions import Region, RegionFusion, box_weight, context_window
from ldm.sampling.tiling import TiledDenoiser, Window, plan_windows, window_weight
from ldm.tasks.generate import sample
from ldm.tasks.planning import estimate_unet_bytes, plan_canvas, sampling_fixed_mb
from ldm.tasks.request import GenerationRequest, RegionPrompt, TilingOptions, resolve_request
from ldm.tasks.txt2img import txt2img


def pointwise(x, t, *, concat=None, context=None):
    """A denoiser whose output at a pixel depends only on that pixel (and the context's mean)."""
    out = torch.tanh(x) * (1 + t.view(-1, 1, 1, 1).float() / 1000)
    if concat is not None:
        out = out + concat[:, :1]
    if context is not None:
        out = out + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    return out


def test_windows_cover_the_canvas_overlapping_and_ending_flush():
    windows = plan_windows(40, 24, tile=16, overlap=4, grid=2)
    covered = torch.zeros(40, 24)
    for w in windows:
        assert (w.height, w.width) == (16, 16) and w.top % 2 == 0 and w.left % 2 == 0
        covered[w.top : w.top + w.height, w.left : w.left + w.width] += 1
    assert covered.min() >= 1 and covered.max() > 1
    assert max(w.top + w.height for w in windows) == 40 and max(w.left + w.width for w in windows) == 24
    with pytest.raises(ValueError, match="overlap must be smaller than the tile"):
        plan_windows(40, 24, tile=8, overlap=8)


def test_window_weights_fall_only_towards_neighbours():
    inner = window_weight(Window(0, 8, 16, 16), 16, 40, overlap=4)
    assert torch.all(inner[:, 4:12] == 1) and torch.all(inner[0, :] > 0)
    assert inner[5, 0] < inner[5, 1] < inner[5, 2] < inner[5, 3] < 1  # left side: a neighbour overlaps
    assert torch.all(inner[:, -1] < 1)  # and on the right
    assert torch.all(inner[0, 4:12] == 1) and torch.all(inner[-1, 4:12] == 1)  # canvas edges: no fall
    assert torch.all(window_weight(Window(0, 0, 16, 40), 16, 40, overlap=4) == 1)


def test_a_single_window_is_exactly_the_plain_denoiser():
    x = torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    concat = torch.randn(2, 5, 12, 12, generator=torch.Generator().manual_seed(1))
    tiled = TiledDenoiser(pointwise, tile=16, overlap=4)
    assert torch.equal(tiled(x, t, concat=concat), pointwise(x, t, concat=concat))


def test_tiles_fuse_a_pointwise_denoiser_back_into_itself_with_spatial_conditioning_cropped():
    x = torch.randn(2, 4, 20, 36, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900, 900])
    concat = torch.randn(2, 5, 20, 36, generator=torch.Generator().manual_seed(1))
    context = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(2))
    tiled = TiledDenoiser(pointwise, tile=8, overlap=3, batch_windows=3)
    assert len(tiled.windows(20, 36)) > 6
    torch.testing.assert_close(tiled(x, t, concat=concat, context=context), pointwise(x, t, concat=concat, context=context))


def test_tiled_sampling_with_one_window_equals_plain_sampling_exactly(loaded_sd_v1):
    request, _ = resolve_request(GenerationRequest("a red cat", "blurry", steps=3, scale=5.0, eta=0.5, seed=3, width=64, height=64), 8)
    plain = sample(loaded_sd_v1.model, replace(request, tiling=TilingOptions(mode="off")))
    one_window = sample(loaded_sd_v1.model, replace(request, tiling=TilingOptions(mode="always", tile=64)))
    assert torch.equal(plain, one_window)


def test_tiled_sampling_of_a_canvas_larger_than_a_tile_is_fused_from_several_windows(loaded_sd_v1):
    request, _ = resolve_request(GenerationRequest("a red cat", steps=3, scale=3.0, seed=3, width=128, height=64), 8)
    whole = sample(loaded_sd_v1.model, replace(request, tiling=TilingOptions(mode="off")))
    tiled = sample(loaded_sd_v1.model, replace(request, tiling=TilingOptions(mode="always", tile=64, overlap=16)))
    assert tiled.shape == whole.shape == (1, 4, 32, 64)  # the tiny model's factor is 2
    assert not torch.equal(tiled, whole) and torch.isfinite(tiled).all()


def test_auto_tiling_engages_only_beyond_the_memory_budget(loaded_sd_v1):
    model = loaded_sd_v1.model
    small = plan_canvas(model, TilingOptions(budget_mb=4096), 2, 16, 16)
    assert not small.tiled
    budget = sampling_fixed_mb(model) + estimate_unet_bytes(model, 2, 64, 64) / 2**20
    assert not plan_canvas(model, TilingOptions(budget_mb=int(budget) + 1), 2, 64, 64).tiled
    big = plan_canvas(model, TilingOptions(budget_mb=int(budget) - 1), 2, 64, 64)
    assert big.tiled and big.tile == model.config.latent_size and big.overlap == big.tile // 4
    assert not plan_canvas(model, TilingOptions(mode="off", budget_mb=1), 2, 64, 64).tiled
    assert plan_canvas(model, TilingOptions(mode="always"), 2, 16, 16).tiled
    assert not plan_canvas(model, TilingOptions(mode="always"), 2, 8, 8).tiled  # fits one tile
    assert estimate_unet_bytes(model, 2, 64, 64) == 4 * estimate_unet_bytes(model, 2, 32, 32)


def test_one_full_canvas_region_of_full_strength_is_plain_guidance_with_its_prompt(loaded_sd_v1):
    base = GenerationRequest("a blue dog", "grainy", steps=3, scale=5.0, eta=0.3, seed=11, width=48, height=48)
    request, _ = resolve_request(base, 8)
    region = RegionPrompt("a red cat", (0.0, 0.0, 1.0, 1.0), negative_prompt="blurry")
    fused = sample(loaded_sd_v1.model, replace(request, regions=(region,)))
    plain = sample(loaded_sd_v1.model, replace(request, prompt="a red cat", negative_prompt="blurry"))
    assert torch.equal(fused, plain)
    other = sample(loaded_sd_v1.model, request)
    assert not torch.equal(fused, other)


def test_a_region_rules_inside_its_box_and_the_global_prompt_outside():
    x = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([400])
    background = {"context": torch.zeros(1, 2, 4)}
    region_extra = {"context": torch.full((1, 2, 4), 3.0)}
    box = Window(8, 8, 8, 8)
    window = context_window(box, 24, 24, margin=2, minimum=12)
    assert window.top <= 6 and window.top + window.height >= 18 and window.height >= 12
    weight = box_weight(box, window, 24, 24, strength=1.0, feather=2)
    out = RegionFusion(pointwise, background, [Region(window, weight, region_extra)])(x, t)
    global_only, region_only = pointwise(x, t, **background), pointwise(x, t, **region_extra)
    torch.testing.assert_close(out[..., 10:14, 10:14], region_only[..., 10:14, 10:14])  # the box's core
    torch.testing.assert_close(out[..., :8, :], global_only[..., :8, :])  # outside the box
    edge = out[..., 8, 12]  # on the feathered edge: between the two
    lo, hi = torch.minimum(global_only[..., 8, 12], region_only[..., 8, 12]), torch.maximum(global_only[..., 8, 12], region_only[..., 8, 12])
    assert torch.all(edge > lo) and torch.all(edge < hi)


def test_half_strength_mixes_the_region_with_the_global_prompt():
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([400])
    background, region_extra = {"context": torch.zeros(1, 2, 4)}, {"context": torch.full((1, 2, 4), 2.0)}
    canvas = Window(0, 0, 16, 16)
    out = RegionFusion(pointwise, background, [Region(canvas, box_weight(canvas, canvas, 16, 16, 0.5, 2), region_extra)])(x, t)
    torch.testing.assert_close(out, (pointwise(x, t, **background) + pointwise(x, t, **region_extra)) / 2)


def test_region_prompts_and_a_panorama_run_end_to_end_with_notices(loaded_sd_v1):
    request = GenerationRequest("a landscape", steps=2, scale=4.0, seed=1, width=256, height=64,
                                regions=(RegionPrompt("a red sun", (0.7, 0.0, 0.95, 0.5)),),
                                tiling=TilingOptions(mode="always"))
    result = txt2img(loaded_sd_v1, request)
    assert result.images[0].size == (256, 64)
    assert np.asarray(result.images[0]).std() > 0
    assert any("tiles of 16 px overlapping by 4 px" in n for n in result.notices)
    assert "Regions: a red sun 0.700 0.000 0.950 0.500 1" in result.parameters[0]
    assert "Tiling: always 0 -1 2048" in result.parameters[0]


def test_layout_boxes_become_region_prompts_on_a_model_without_layout_conditioning(loaded_sd_v1):
    request = GenerationRequest("", steps=2, scale=4.0, seed=1, width=32, height=32, boxes=(("red cat", 0.0, 0.0, 0.5, 0.5),))
    result = txt2img(loaded_sd_v1, request)
    assert any("region prompt" in n for n in result.notices)
    assert "Regions: red cat 0.000 0.000 0.500 0.500 1" in result.parameters[0]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"regions": (RegionPrompt("", (0, 0, 1, 1)),)}, "region 1 needs a prompt"),
        ({"regions": (RegionPrompt("a cat", (0.5, 0, 0.5, 1)),)}, "region 1 box has no area"),
        ({"regions": (RegionPrompt("a cat", (0, 0, 1)),)}, r"region 1 box must be \(x0, y0, x1, y1\)"),
        ({"regions": (RegionPrompt("a cat", (0, 0, 1, 1), strength=0),)}, "strength must be more than 0"),
        ({"regions": (RegionPrompt("a cat", (0, 0, 1, 1), strength=2),)}, "strength must be between 0 and 1"),
        ({"regions": tuple(RegionPrompt("a cat", (0, 0, 1, 1)) for _ in range(17))}, "at most 16"),
        ({"tiling": TilingOptions(mode="sometimes")}, "tiling mode must be one of auto, always, off"),
        ({"tiling": TilingOptions(tile=-1)}, "tile size must be between 0"),
        ({"tiling": TilingOptions(budget_mb=0)}, "memory budget"),
    ],
)
def test_bad_regions_and_tiling_are_refused_with_what_is_allowed(change, message):
    with pytest.raises(ValueError, match=message):
        resolve_request(replace(GenerationRequest("x"), **change), 8)


def test_an_overlap_as_large_as_the_tile_is_refused(loaded_sd_v1):
    with pytest.raises(ValueError, match="tile overlap must be from 0 to less than the tile"):
        plan_canvas(loaded_sd_v1.model, TilingOptions(tile=64, overlap=64), 2, 32, 32)


def test_a_request_that_does_not_fit_the_free_memory_is_refused_with_the_numbers(loaded_sd_v1, monkeypatch):
    from ldm.tasks import generate
    from ldm.tasks.planning import NotEnoughMemory, check_memory

    request = GenerationRequest("a red cat", steps=2, scale=5.0, seed=1, width=256, height=256)
    monkeypatch.setattr(generate, "free_memory_mb", lambda device: 0.5)
    with pytest.raises(NotEnoughMemory, match=r"needs about [\d,]+ MB beyond the model's weights, but only 0 MB of memory "
                                              r"is free; make the image or the batch smaller, or set tiling to 'always'"):
        txt2img(loaded_sd_v1, request)
    monkeypatch.setattr(generate, "free_memory_mb", lambda device: None)  # unknown: not checked
    assert txt2img(loaded_sd_v1, request).images[0].size == (256, 256)
    # tiled, the UNet's share stops growing with the canvas; what grows is the autoencoder's, with the pixels
    options = TilingOptions(mode="always")
    needed = [check_memory(loaded_sd_v1.model, plan_canvas(loaded_sd_v1.model, options, 2, side, side), 2, 1, side, side, options, None)
              for side in (256, 512)]
    assert needed[1] <= 4.01 * needed[0]
    whole = check_memory(loaded_sd_v1.model, plan_canvas(loaded_sd_v1.model, TilingOptions(mode="off"), 2, 512, 512), 2, 1, 512, 512,
                         TilingOptions(mode="off"), None)
    assert whole > needed[1]
