"""Tiny models of every family, with random weights, saved as the original single files hold them.

One module per family, each with one entry point of one signature: ``write(folder, seed=0,
**options) -> TinyFiles``. The options choose a variant of the family (``kind=``, SD 2's
``parameterization=``) or of its file (an EMA copy, a first-stage copy); the same seed writes the
same tensors, bit for bit. ``tests/conftest.py`` writes each family once per session.

- ``sd_v1``: Stable Diffusion v1; ``sd2``: SD 2.x (v, eps, inpainting); ``x4``: the x4 upscaler;
- ``default``: the default model's layouts (hybrid text/layout/inpainting, concat upscaler);
- ``ldm_image``: CompVis LDM's inpainting_big and bsr_sr; ``ldm_text``: LDM's text and layout models;
- ``semantic``: LDM's semantic synthesis;
- ``clip_tokenizer``: the tiny CLIP BPE tokenizer the SD families read.

The shared parts live here: the file record, the tiny first stages, random weights and the
schedule buffers an original file carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.checkpoints.presets import ModelPreset
from ldm.sampling.schedules import ScheduleConfig, make_alphas_cumprod, make_betas

# The tiny first stages: a 2x autoencoder of width 32, KL with 4 latent channels, VQ with 3 and 64 codes.
TINY_KL = dict(kind="kl", embed_dim=4, z_channels=4, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
               resolution=32)
TINY_VQ = dict(kind="vq", embed_dim=3, n_embed=64, z_channels=3, ch=32, ch_mult=[1, 2], num_res_blocks=1,
               attn_resolutions=[], resolution=32)


@dataclass(frozen=True)
class TinyFiles:
    """What a builder wrote: the checkpoint, the preset it was built from, and the tokenizer folder
    to pass to the loader (None where the family needs none or finds its own beside the file)."""

    path: Path
    preset: ModelPreset
    tokenizer_dir: Path | None = None

    def load(self, **options):
        """The checkpoint loaded the normal way (``ldm.checkpoints.loader.load_model``); ``options``
        as it takes them (device, dtype, speed, memory_format, ema)."""
        from ldm.checkpoints.loader import load_model

        return load_model(self.path, preset=self.preset, tokenizer_dir=self.tokenizer_dir, **options)


def original_ddconfig(first_stage: dict) -> dict:
    """A tiny KL first stage as the ``ddconfig`` of an original config (for diffusers' VAE converter)."""
    ddconfig = {k: v for k, v in first_stage.items() if k != "kind"}
    return dict(ddconfig, double_z=True, in_channels=3, out_ch=3, dropout=0.0)


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere, zero-initialised layers included, at scales that keep activations sane."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and ("norm" in name or "in_layers.0" in name or "out_layers.0" in name or name.endswith("out.0.weight")):
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(noise / max(fan_in, 1) ** 0.5)
        # Keep the predicted noise near unit scale, as in a trained model, so that ten guided steps stay
        # in the range of real latents instead of growing to tens.
        model.model.diffusion_model.out[2].weight.mul_(0.2)


def schedule_buffers(schedule: ScheduleConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """The schedule's ``betas`` and ``alphas_cumprod`` in float32, as an original file carries them."""
    return {prefix + "betas": make_betas(schedule).float(), prefix + "alphas_cumprod": make_alphas_cumprod(schedule).float()}


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A model's tensors, contiguous, ready for ``save_file``."""
    return {k: v.contiguous() for k, v in model.state_dict().items()}
