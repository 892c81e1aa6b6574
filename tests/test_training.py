"""Training code of the default model: masks, conditioning mixes, losses that go down, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.checkpoints.presets import find_preset
from ldm.data.batches import default_workers, random_crop, scene_batch, scene_batches
from ldm.data.masks import box_mask, brush_mask, training_mask
from ldm.data.world import MAX_OBJECTS
from ldm.models.autoencoder import Autoencoder
from ldm.train import pipeline
from ldm.train.autoencoder import autoencoder_loss, gradient_l1
from ldm.train.common import read_recipe
from ldm.train.diffusion import (
    ConditioningMix,
    Curriculum,
    diffusion_loss,
    masked_concat,
    min_snr_weight,
    structure_layout_embeddings,
    token_batch,
    training_inputs,
)
from tests.builders import default


def test_masks_are_boolean_and_varied():
    rng = np.random.default_rng(0)
    brush, box = brush_mask(rng, 64), box_mask(rng, 64)
    assert brush.dtype == bool and 0 < brush.mean() < 1 and 0 < box.mean() < 1
    kinds = [training_mask(rng, 32).all() for _ in range(400)]
    assert 0.4 < np.mean(kinds) < 0.6  # "no mask" half of the time
    assert 0.75 < np.mean([training_mask(rng, 32, p_none=0.85).all() for _ in range(400)]) < 0.95


def test_the_conditioning_mix_drops_captions_and_layouts_as_asked():
    from ldm.text.word_tokenizer import WordLayoutTokenizer
    from tests.helpers import DEFAULT_VOCAB as VOCAB

    tokenizer = WordLayoutTokenizer.from_file(VOCAB, 40, 4, 16)
    _, scenes = scene_batch(0, 400, 16)
    ids = token_batch(tokenizer, scenes, np.random.default_rng(1), ConditioningMix(caption_only=0.4, layout_only=0.25, dropped=0.1))
    pad = tokenizer.id("<pad>")
    has_caption = (ids[:, :40] != pad).any(1).float()
    has_layout = (ids[:, 40:] != pad).any(1).float()
    dropped = ((1 - has_caption) * (1 - has_layout)).mean().item()
    assert 0.05 < dropped < 0.15
    assert 0.55 < has_caption.mean().item() < 0.75  # caption only + both
    assert 0.4 < has_layout.mean().item() < 0.6  # layout only + both


def test_random_crop_takes_windows_of_the_images():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    crops = random_crop(images, 4, torch.Generator().manual_seed(0))
    assert crops.shape == (2, 3, 4, 4)
    top, left = divmod(int(crops[0, 0, 0, 0].item()), 8)
    assert torch.equal(crops[0], images[0, :, top : top + 4, left : left + 4])


def test_scenes_drawn_ahead_by_worker_processes_are_the_scenes_drawn_inline():
    jobs = [(seed, 3, 32, objects) for seed, objects in ((0, 1), (3, 4), (50, 2))]
    inline = list(scene_batches(jobs, workers=0))
    ahead = list(scene_batches(jobs, workers=2))
    assert [scenes for _, scenes in ahead] == [scenes for _, scenes in inline]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(ahead, inline))
    assert torch.equal(inline[1][0], scene_batch(3, 3, 32, 4)[0])
    endless = scene_batches(((seed, 3, 32, 4) for seed in range(10**6)), workers=1)
    next(endless)
    endless.close()  # stops the pool and drops what was drawn ahead instead of drawing forever


def test_scenes_are_drawn_ahead_only_for_a_gpu():
    assert default_workers(torch.device("cpu")) == 0
    assert 1 <= default_workers(torch.device("cuda")) <= 12


def test_gradient_l1_sees_edges_but_not_flat_shifts():
    flat = torch.zeros(1, 3, 8, 8)
    assert gradient_l1(flat, flat + 0.5).item() == 0.0
    edge = flat.clone()
    edge[..., 4:] = 1.0
    assert gradient_l1(edge, flat).item() > 0


def test_a_few_autoencoder_steps_lower_its_loss():
    torch.manual_seed(0)
    model = Autoencoder(default.make_preset("hybrid").model.first_stage)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    images, _ = scene_batch(0, 4, 32)
    recipe = {"gradient_weight": 0.5, "kl_weight": 1e-6}
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(15):
        loss, _ = autoencoder_loss(model, images, g, recipe)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_a_few_diffusion_steps_lower_the_loss_on_a_fixed_batch(tiny_default_hybrid):
    model = tiny_default_hybrid.load().model.requires_grad_(True).train()  # its own copy: it is trained
    model.first_stage_model.requires_grad_(False)
    images, _ = scene_batch(0, 4, 32)
    latents = model.encode_first_stage(images).detach()
    masks = torch.ones(4, 1, 32, 32)
    context = {"context": torch.zeros(4, 52, 32), "concat": masked_concat(model, images, masks)}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    first = last = None
    for step in range(30):
        loss = diffusion_loss(model, latents, context, torch.Generator().manual_seed(step % 3))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
        last = loss.item()
    assert last < first


def test_masked_concat_equals_encoding_every_row(loaded_default_hybrid):
    model = loaded_default_hybrid.model
    images, _ = scene_batch(0, 3, 32)
    masks = torch.ones(3, 1, 32, 32)
    masks[1, :, :16] = 0
    with torch.no_grad():
        expected = torch.cat([model.inpainting_concat(torch.zeros_like(images[i : i + 1]) if i != 1 else images[1:2],
                                                      masks[i : i + 1]) for i in range(3)])
        torch.testing.assert_close(masked_concat(model, images, masks), expected)


def test_set_preset_scale_rewrites_only_that_line(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model:\n  scale_factor: 1.0   # replaced\n  other: 2\n")
    pipeline.set_preset_scale(preset, 0.4321)
    assert preset.read_text() == "model:\n  scale_factor: 0.432100 # replaced\n  other: 2\n"


def test_the_curriculum_raises_the_object_count_at_its_steps():
    curriculum = Curriculum([[0, 1], [100, 2], [250, 4]])
    assert [curriculum.max_objects(s) for s in (0, 99, 100, 249, 250, 10_000)] == [1, 1, 2, 2, 4, 4]
    _, scenes = scene_batch(0, 50, 16, max_objects=curriculum.max_objects(0))
    assert {len(s.objects) for s in scenes} == {1}
    _, scenes = scene_batch(0, 200, 16, max_objects=curriculum.max_objects(100))
    assert {len(s.objects) for s in scenes} == {1, 2}


@pytest.mark.parametrize("phases", [[], [[5, 1]], [[0, 2], [10, 1], [5, 4]], [[0, 0]], [[0, 5]]])
def test_a_curriculum_that_cannot_be_followed_is_refused(phases):
    with pytest.raises(ValueError, match="curriculum"):
        Curriculum(phases)


@pytest.mark.parametrize("kind", ["eps", "v", "x0"])
def test_min_snr_weighting_makes_every_loss_min_snr_times_the_clean_latent_error(kind):
    from ldm.sampling.denoiser import training_target

    torch.manual_seed(0)
    x0, eps, x0_hat = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    abar = torch.tensor([0.999, 0.5, 0.01])  # SNR 999, 1 and about 0.01
    a = abar.view(-1, 1, 1, 1)
    # the network output that implies x0_hat at this x_t, in the kind's own terms
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    eps_hat = (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()
    error = (training_target(x0_hat, eps_hat, abar, kind) - training_target(x0, eps, abar, kind)).pow(2).mean((1, 2, 3))
    clean_error = (x0_hat - x0).pow(2).mean((1, 2, 3))
    snr = abar / (1 - abar)
    torch.testing.assert_close(error * min_snr_weight(abar, kind, 5.0), snr.clamp(max=5.0) * clean_error, rtol=1e-4, atol=1e-5)


def test_min_snr_weighting_leaves_the_noisy_steps_alone_for_eps():
    weights = min_snr_weight(torch.tensor([0.999, 0.5, 0.01]), "eps", 5.0)
    assert weights[0] < 0.01 and weights[1:].tolist() == [1.0, 1.0]


def test_layout_token_embeddings_start_from_what_they_mean():
    from ldm.text.word_tokenizer import WordLayoutTokenizer
    from tests.helpers import DEFAULT_VOCAB as VOCAB

    tokenizer = WordLayoutTokenizer.from_file(VOCAB, 40, 4, 16)
    table = torch.randn(len(tokenizer.tokens), 64, generator=torch.Generator().manual_seed(0))
    words_before = table[tokenizer.id("red")].clone()
    structure_layout_embeddings(table, tokenizer)

    def grid(row, col):
        return table[tokenizer.id(f"<grid:{row * 16 + col}>")]

    def similarity(a, b):
        return torch.nn.functional.cosine_similarity(a, b, dim=0).item()

    assert similarity(grid(3, 3), grid(3, 4)) > similarity(grid(3, 3), grid(3, 9)) > similarity(grid(3, 3), grid(12, 12))
    assert similarity(grid(3, 3), grid(4, 3)) > similarity(grid(3, 3), grid(9, 3))
    assert 0.7 < table[tokenizer.id("<grid:0>")].std().item() / table.std().item() < 1.3  # the table's own spread
    torch.testing.assert_close(table[tokenizer.id("red")], words_before)  # words are left as they were
    expected = (table[tokenizer.id("red")] + table[tokenizer.id("circle")]) / 2**0.5
    torch.testing.assert_close(table[tokenizer.id("<class:red circle>")], expected)


def test_training_inputs_mask_as_often_as_the_mix_says(loaded_default_hybrid):
    model = loaded_default_hybrid.model
    images, scenes = scene_batch(0, 64, 32)
    for unmasked, low, high in ((1.0, 64, 64), (0.0, 0, 0)):
        mix = ConditioningMix(unmasked=unmasked)
        _, conditioning = training_inputs(model, "txt2img", images, scenes, np.random.default_rng(0), mix, torch.Generator())
        full = (conditioning["concat"][:, :1] == 1).flatten(1).all(1).sum().item()  # mask channel first
        assert low <= full <= high


@pytest.mark.parametrize("from_scratch", [False, True])
def test_a_stage_starts_from_the_shipped_weights_unless_asked_to_start_from_scratch(tmp_path, monkeypatch, from_scratch):
    import ldm.train.diffusion

    started = {}
    monkeypatch.setattr(ldm.train.diffusion, "train_diffusion", lambda recipe, work, ae, steps, device, init, workers: started.setdefault("init", init))
    monkeypatch.setattr(pipeline, "export", lambda model, name: None)
    pipeline.train_stage("txt2img", tmp_path, from_scratch=from_scratch)
    if from_scratch:
        assert started["init"] is None
    else:
        shipped = pipeline.shipped_weights("default-txt2img", "")
        assert started["init"].keys() == shipped.keys() and torch.equal(started["init"]["model.diffusion_model.out.2.weight"],
                                                                       shipped["model.diffusion_model.out.2.weight"])


RECIPES = sorted(pipeline.RECIPES.glob("*.yaml"))
# The runs that made the shipped text-to-image weights, in order (README, "The embedded default model").
SHIPPED_CHAIN = ["default-txt2img-gpu", "default-txt2img-gpu-continue", "default-txt2img-cpu-continue",
                 "default-txt2img-gpu-continue2", "default-txt2img-gpu-continue3"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_has_what_its_trainer_reads(path):
    stage, recipe = pipeline.stage_of(path), read_recipe(path)
    for key in ("image_size", "batch_size", "steps", "learning_rate", "warmup_steps", "log_every", "save_every"):
        assert isinstance(recipe[key], (int, float)) and recipe[key] > 0, key
    if stage == "autoencoder":
        return
    assert find_preset(recipe["preset"]).name == recipe["preset"]
    assert recipe["ema_decay"] < 1
    Curriculum(recipe.get("curriculum", [[0, MAX_OBJECTS]]))
    ConditioningMix(**recipe.get("conditioning", {}))


def test_each_run_behind_the_shipped_weights_drew_scenes_of_its_own():
    assert {p.stem for p in RECIPES} >= set(SHIPPED_CHAIN)
    spans = []
    for name in SHIPPED_CHAIN + ["default-autoencoder"]:
        recipe = read_recipe(pipeline.RECIPES / f"{name}.yaml")
        first = recipe.get("seed_offset", 0)
        spans.append((first, first + recipe["steps"] * recipe["batch_size"], name))
    spans.sort()
    for (_, end, before), (start, _, after) in zip(spans, spans[1:]):
        assert end <= start, f"{before} and {after} draw the same scenes"
