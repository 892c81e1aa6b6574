"""Stage 1: train the KL autoencoder on rendered scenes (L1 + L1 on image gradients + a tiny KL)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm.data.batches import held_out_batch, random_crop, scene_batches
from ldm.data.world import MAX_OBJECTS
from ldm.models.autoencoder import Autoencoder, AutoencoderConfig
from ldm.train.common import learning_rate, read_recipe, resume, save_training_state
from ldm.train.curves import LossLog

log = logging.getLogger(__name__)


def gradient_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical finite differences of two images."""
    dx = lambda x: x[..., :, 1:] - x[..., :, :-1]  # noqa: E731
    dy = lambda x: x[..., 1:, :] - x[..., :-1, :]  # noqa: E731
    return (dx(a) - dx(b)).abs().mean() + (dy(a) - dy(b)).abs().mean()


def autoencoder_loss(model: Autoencoder, images: torch.Tensor, generator: torch.Generator, recipe: dict) -> tuple[torch.Tensor, dict]:
    posterior = model.encode(images)
    reconstruction = model.decode(posterior.sample(generator))
    l1 = (reconstruction - images).abs().mean()
    grad = gradient_l1(reconstruction, images)
    kl = posterior.kl().mean()
    loss = l1 + recipe["gradient_weight"] * grad + recipe["kl_weight"] * kl
    return loss, {"l1": l1.item(), "grad": grad.item(), "kl": kl.item()}


@torch.no_grad()
def reconstruction_psnr(model: Autoencoder, count: int = 64, size: int = 64) -> float:
    """PSNR (dB) of the posterior mean's reconstruction on held-out scenes, in 8-bit pixel units."""
    images = held_out_batch(0, count, size)[0].to(next(model.parameters()).device)
    reconstruction = model.decode(model.encode(images).mean).clamp(-1, 1)
    to_8bit = lambda x: ((x + 1) * 127.5).round()  # noqa: E731
    mse = F.mse_loss(to_8bit(reconstruction), to_8bit(images)).item()
    return 10 * torch.log10(torch.tensor(255.0**2 / max(mse, 1e-10))).item()


def recipe_config(recipe_path: str | Path) -> AutoencoderConfig:
    raw = read_recipe(recipe_path)["autoencoder"]
    return AutoencoderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def train_autoencoder(
    recipe_path: str | Path,
    work_dir: str | Path,
    steps: int | None = None,
    device: str | torch.device = "cpu",
    init: dict[str, torch.Tensor] | None = None,
    workers: int = 0,
) -> Autoencoder:
    """Train (or go on training) the autoencoder; ``init`` gives starting weights when no training
    state exists yet; ``workers`` processes draw the scenes ahead."""
    recipe = read_recipe(recipe_path)
    config = recipe_config(recipe_path)
    torch.manual_seed(0)
    model = Autoencoder(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["learning_rate"], weight_decay=0.0)
    state_path = Path(work_dir) / "autoencoder-state.pt"
    start = resume(state_path, model, optimizer)
    if start == 0 and init is not None:
        model.load_state_dict(init)
        log.info("starting from the shipped autoencoder weights")
    total = steps or recipe["steps"]
    generator = torch.Generator().manual_seed(start)
    batch = recipe["batch_size"]
    losses = LossLog(work_dir, "autoencoder", start)
    jobs = ((step * batch, batch, recipe["image_size"], MAX_OBJECTS) for step in range(start, total))
    began = time.time()
    for step, (images, _) in zip(range(start, total), scene_batches(jobs, workers)):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe["learning_rate"], recipe["warmup_steps"], total)
        images = random_crop(images, recipe.get("crop_size", recipe["image_size"]), generator).to(device)
        loss, parts = autoencoder_loss(model, images, generator, recipe)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.add(step + 1, loss=loss.item(), l1=parts["l1"], grad=parts["grad"])
        if (step + 1) % recipe["log_every"] == 0:
            log.info("step %d/%d loss %.4f l1 %.4f grad %.4f kl %.1f (%.2f s/step)", step + 1, total, loss.item(),
                     parts["l1"], parts["grad"], parts["kl"], (time.time() - began) / (step + 1 - start))
        if (step + 1) % recipe["save_every"] == 0 or step + 1 == total:
            save_training_state(state_path, step + 1, model, optimizer)
            losses.save()
            log.info("step %d: held-out PSNR %.2f dB", step + 1, reconstruction_psnr(model))
    return model.cpu()
