"""Stage 2 (and 3): train a latent diffusion UNet, and its conditioning transformer, over a frozen
autoencoder, with the epsilon objective of the paper.

The text-to-image model learns captions, layouts and inpainting at once: each sample's token
sequence carries its caption, its layout, both, or nothing (10%, for classifier-free guidance), and
its concat channels carry a mask and the masked image's latent (a brush or box mask, or "no mask").
The super-resolution model concatenates the low-resolution image (LDM-BSR style).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ldm.checkpoints.loader import build_model
from ldm.checkpoints.presets import PRESET_DIR, ModelPreset, find_preset
from ldm.data.batches import random_crop, scene_batch, scene_batches
from ldm.data.masks import training_mask
from ldm.data.world import MAX_OBJECTS
from ldm.devices import training_autocast
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.sampling.denoiser import training_target
from ldm.text.lookup import tokenizer_for
from ldm.text.word_tokenizer import WordLayoutTokenizer
from ldm.train.common import learning_rate, read_recipe, resume, same_shapes, save_training_state
from ldm.train.curves import LossLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConditioningMix:
    """How often a training sample sees each kind of conditioning: its tokens carry the caption only,
    the layout only, nothing (``dropped``) or both (the rest); its concat channels carry "no mask"
    (``unmasked``) or a brush or box mask over the masked image (the rest)."""

    caption_only: float = 0.4
    layout_only: float = 0.25
    dropped: float = 0.1
    unmasked: float = 0.5


def token_batch(tokenizer: WordLayoutTokenizer, scenes, rng: np.random.Generator, mix: ConditioningMix) -> torch.Tensor:
    rows = []
    for scene in scenes:
        u = rng.uniform()
        if u < mix.dropped:
            rows.append(tokenizer.encode(""))
        elif u < mix.dropped + mix.caption_only:
            rows.append(tokenizer.encode(scene.caption))
        elif u < mix.dropped + mix.caption_only + mix.layout_only:
            rows.append(tokenizer.encode("", scene.boxes))
        else:
            rows.append(tokenizer.encode(scene.caption, scene.boxes))
    return torch.tensor(rows, dtype=torch.long)


def low_resolution(images: torch.Tensor, factor: int) -> torch.Tensor:
    """The degraded input of super-resolution: area downsampling by ``factor``."""
    return F.avg_pool2d(images, factor)


def diffusion_loss(
    model: LatentDiffusion, latents: torch.Tensor, conditioning: dict, generator: torch.Generator, min_snr_gamma: float | None = None
) -> torch.Tensor:
    """|| target - f_theta(sqrt(abar) z + sqrt(1 - abar) eps, t) ||^2 with t uniform over the schedule,
    the target being eps, v or z by the model's parameterisation (eps is the paper's objective).

    With ``min_snr_gamma`` each sample is weighted so that its loss counts as min(SNR, gamma) times
    the error of its implied z (Min-SNR weighting, Hang et al. 2023): the nearly clean steps, which
    the plain objective lets dominate, stop crowding out the noisy ones where a scene's composition
    is decided."""
    b = latents.shape[0]
    t = torch.randint(0, len(model.alphas_cumprod), (b,), generator=generator)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    abar = model.alphas_cumprod[t].float().view(b, 1, 1, 1).to(latents)
    t = t.to(latents.device)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    kind = model.config.parameterization
    target = training_target(latents, noise, abar.flatten(), kind)
    errors = (model.denoiser().network_output(noisy, t, **conditioning).float() - target).pow(2).mean(dim=(1, 2, 3))
    if min_snr_gamma is None:
        return errors.mean()
    return (errors * min_snr_weight(abar.flatten(), kind, min_snr_gamma)).mean()


def min_snr_weight(alpha_bar: torch.Tensor, kind: str, gamma: float) -> torch.Tensor:
    """The per-sample factor that turns a ``kind`` loss into min(SNR, gamma) * ||z - z_hat||^2.

    The eps error is SNR times the z error and the v error (SNR + 1) times it, so the factor is
    min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v and min(SNR, gamma) for z."""
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    if kind == "eps":
        return clipped / snr
    if kind == "v":
        return clipped / (snr + 1)
    if kind == "x0":
        return clipped
    raise ValueError(f"unknown parameterization {kind!r}; known: eps, v, x0")


class EMA:
    """Exponential moving average of the trainable weights, warming up as LitEma does."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(model).requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow.parameters(), model.parameters()):
            s.lerp_(p.detach(), 1 - decay)


class Curriculum:
    """Scenes with few objects first: ``[[step, max_objects], ...]`` (steps ascending, the first 0)
    raises the most objects a scene may hold from each step on. Colour and shape words bind far
    sooner on one-object scenes (measured: README, v2), and the later phases keep drawing those too."""

    def __init__(self, phases: list[list[int]]):
        starts = [int(step) for step, _ in phases]
        counts = [int(n) for _, n in phases]
        if not phases or starts[0] != 0 or starts != sorted(starts) or not all(1 <= n <= MAX_OBJECTS for n in counts):
            raise ValueError(
                f"curriculum {phases!r}: expected [[0, n], [step, n], ...] with ascending steps and n from 1 to {MAX_OBJECTS}"
            )
        self.phases = list(zip(starts, counts))

    def max_objects(self, step: int) -> int:
        return [n for start, n in self.phases if start <= step][-1]


def build_training_model(preset: ModelPreset, autoencoder_state: dict, scale_factor: float) -> LatentDiffusion:
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(preset.model, scale_factor=scale_factor), device="cpu")
    model.first_stage_model.load_state_dict(autoencoder_state)
    model.first_stage_model.requires_grad_(False).eval()
    if model.cond_stage_model is not None:
        model.cond_stage_model.tokenizer = tokenizer_for(model.cond_stage_model, preset.source, None, preset_name=preset.name,
                                                         vocabulary_root=PRESET_DIR.parent)
        if isinstance(model.cond_stage_model.tokenizer, WordLayoutTokenizer):
            structure_layout_embeddings(model.cond_stage_model.transformer.token_emb.weight, model.cond_stage_model.tokenizer)
    return model


@torch.no_grad()
def structure_layout_embeddings(table: torch.Tensor, tokenizer: WordLayoutTokenizer) -> None:
    """Start the layout tokens' embeddings from what they mean rather than from noise.

    Grid tokens get a 2-D sinusoidal code of their cell (half the width for the row, half for the
    column, frequencies from half a period over the image to one period every two cells), so nearby
    corners start near each other and what the UNet learns for one corner carries to its neighbours
    instead of being learned 256 times over. A class token ("<class:red circle>") starts as the sum
    of its words' embeddings. Both are only a start: training moves them freely. The codes are scaled
    to the table's own spread."""
    scale = table.std()
    quarter = table.shape[1] // 4
    frequencies = math.pi * torch.logspace(-1, math.log2(tokenizer.grid), quarter, base=2.0)
    cells = torch.arange(tokenizer.grid * tokenizer.grid)
    for coordinate, offset in ((cells // tokenizer.grid, 0), (cells % tokenizer.grid, 2 * quarter)):
        angles = coordinate[:, None].float() / (tokenizer.grid - 1) * frequencies[None]
        ids = torch.tensor([tokenizer.id(f"<grid:{i}>") for i in cells.tolist()])
        table[ids, offset : offset + quarter] = angles.sin() * math.sqrt(2) * scale
        table[ids, offset + quarter : offset + 2 * quarter] = angles.cos() * math.sqrt(2) * scale
    for label in tokenizer.classes:
        words = [tokenizer.id(w) for w in label.split()]
        table[tokenizer.id(f"<class:{label}>")] = table[words].sum(0) / math.sqrt(len(words))


@torch.no_grad()
def latent_scale(autoencoder: torch.nn.Module, count: int = 256, size: int = 64) -> float:
    """1 / std of the posterior means on training scenes (the paper's rescaling of the latent space)."""
    images, _ = scene_batch(0, count, size)
    return 1.0 / autoencoder.encode(images).mean.std().item()


def trainable(model: LatentDiffusion) -> torch.nn.Module:
    parts = torch.nn.ModuleDict({"model": model.model})
    if model.cond_stage_model is not None:
        parts["cond_stage_model"] = model.cond_stage_model
    return parts


def train_diffusion(
    recipe_path: str | Path,
    work_dir: str | Path,
    autoencoder_state: dict,
    steps: int | None = None,
    device: str | torch.device = "cpu",
    init: dict[str, torch.Tensor] | None = None,
    workers: int = 0,
) -> LatentDiffusion:
    """Train the preset named by the recipe (``recipe["task"]`` is "txt2img" or "upscale").

    Resumes from the training state in ``work_dir``, else starts from ``init`` (a shipped file's
    tensors) when given. Random draws come from CPU generators, so a run is the same on any device
    up to floating-point order; ``workers`` processes draw the scenes ahead (the same scenes)."""
    recipe = read_recipe(recipe_path)
    preset = find_preset(recipe["preset"])
    work_dir = Path(work_dir)
    state_path = work_dir / f"{preset.name}-state.pt"
    scale = recipe.get("scale_factor") or latent_scale_from(autoencoder_state, preset)
    model = build_training_model(preset, autoencoder_state, scale).to(device)
    parts = trainable(model)
    optimizer = torch.optim.AdamW(parts.parameters(), lr=recipe["learning_rate"], weight_decay=0.0)
    start = resume(state_path, parts, optimizer)
    if start == 0 and init is not None:
        init = {k: v for k, v in init.items() if not k.startswith("first_stage_model.")}
        if same_shapes(init, parts.state_dict()):
            parts.load_state_dict(init)
            log.info("starting from the shipped %s weights", preset.name)
        else:
            log.info("the shipped %s weights have another architecture than the preset: training from scratch", preset.name)
    ema = EMA(parts, recipe["ema_decay"])
    ema_path = work_dir / f"{preset.name}-ema.pt"
    if ema_path.exists():
        ema.shadow.load_state_dict(torch.load(ema_path, map_location="cpu", weights_only=True))
        ema.updates = start
    total = steps or recipe["steps"]
    generator = torch.Generator().manual_seed(1000 + start)
    rng = np.random.default_rng(1000 + start)
    batch, size = recipe["batch_size"], recipe["image_size"]
    mix = ConditioningMix(**recipe.get("conditioning", {}))
    # Scenes are rendered at these sizes in turn and cropped to image_size: larger renders show
    # objects larger than the crop's own scenes would.
    render_sizes = recipe.get("render_size", size)
    render_sizes = render_sizes if isinstance(render_sizes, list) else [render_sizes]
    curriculum = Curriculum(recipe.get("curriculum", [[0, MAX_OBJECTS]]))
    losses = LossLog(work_dir, preset.name, start)
    jobs = ((recipe.get("seed_offset", 0) + step * batch, batch, render_sizes[step % len(render_sizes)], curriculum.max_objects(step))
            for step in range(start, total))
    stream = scene_batches(jobs, workers)
    began, waited = time.perf_counter(), 0.0
    for step in range(start, total):
        before = time.perf_counter()
        images, scenes = next(stream)
        waited += time.perf_counter() - before
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe["learning_rate"], recipe["warmup_steps"], total)
        images = random_crop(images, size, generator).to(device)
        with training_autocast(torch.device(device), recipe.get("autocast")):
            latents, conditioning = training_inputs(model, recipe["task"], images, scenes, rng, mix, generator)
            loss = diffusion_loss(model, latents, conditioning, generator, recipe.get("min_snr_gamma"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parts.parameters(), 1.0)
        optimizer.step()
        ema.update(parts)
        losses.add(step + 1, loss=loss.item())
        if (step + 1) % recipe["log_every"] == 0:
            elapsed = time.perf_counter() - began
            log.info("%s step %d/%d loss %.4f (%.2f s/step, %.0f%% of it waiting for scenes)", preset.name, step + 1, total,
                     loss.item(), elapsed / (step + 1 - start), 100 * waited / elapsed)
        if (step + 1) % recipe["save_every"] == 0 or step + 1 == total:
            save_training_state(state_path, step + 1, parts, optimizer, {"scale_factor": scale})
            torch.save(ema.shadow.state_dict(), ema_path)
            losses.save()
    parts.load_state_dict(ema.shadow.state_dict())
    return model.cpu()


def latent_scale_from(autoencoder_state: dict, preset: ModelPreset) -> float:
    from ldm.models.autoencoder import Autoencoder

    autoencoder = Autoencoder(preset.model.first_stage)
    autoencoder.load_state_dict(autoencoder_state)
    return latent_scale(autoencoder)


def training_inputs(model, task: str, images, scenes, rng, mix, generator) -> tuple[torch.Tensor, dict]:
    """(scaled latents, conditioning keyword arguments of the denoiser) for one batch."""
    with torch.no_grad():
        # float32 even under autocast: the noise and the target are drawn at the latents' precision
        latents = model.config.scale_factor * model.first_stage_model.encode(images).sample(generator).float()
    if task == "upscale":
        return latents, {"concat": low_resolution(images, model.config.downsampling_factor)}
    size = images.shape[-1]
    masks = torch.from_numpy(np.stack([training_mask(rng, size, mix.unmasked) for _ in scenes]))[:, None].float().to(images.device)
    context = model.cond_stage_model(token_batch(model.cond_stage_model.tokenizer, scenes, rng, mix))
    return latents, {"context": context, "concat": masked_concat(model, images, masks)}


@torch.no_grad()
def masked_concat(model: LatentDiffusion, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``model.inpainting_concat`` for a batch, encoding the shared "no mask" input only once."""
    full = masks.flatten(1).all(dim=1)
    if not full.any():
        return model.inpainting_concat(images, masks)
    blank = model.inpainting_concat(torch.zeros_like(images[:1]), masks[full][:1])
    concat = blank.expand(len(images), -1, -1, -1).clone()
    if not full.all():
        concat[~full] = model.inpainting_concat(images[~full], masks[~full])
    return concat
