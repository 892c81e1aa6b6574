"""A tiny model in the layout of LDM's semantic synthesis models, with random weights, saved as an
original single file: VQ-f4 first stage, a UNet of three levels whose only attention is the middle
block's AttentionBlock, and a ``SpatialRescaler`` (bilinear x0.5 twice, 1x1 ``channel_mapper``) of
a small label set. There is no diffusers implementation of this model to compare against.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.checkpoints.loader import build_model
from ldm.checkpoints.presets import read_preset
from tests.builders import TINY_VQ, TinyFiles, randomise, schedule_buffers, weights

CLASSES = 12
SCHEDULE = dict(kind="linear", timesteps=1000, linear_start=0.0015, linear_end=0.0205)
UNET = dict(in_channels=6, out_channels=3, model_channels=32, attention_resolutions=[32, 16, 8], num_res_blocks=1,
            channel_mult=[1, 2, 2], num_heads=2)
FIRST_STAGE = dict(TINY_VQ, ch_mult=[1, 2, 2])  # f = 4, as the original's
COND_STAGE = dict(kind="spatial_rescaler", n_stages=2, in_channels=CLASSES, out_channels=3, method="bilinear",
                  multiplier=0.5, bias=False)


def preset_dict() -> dict:
    return {
        "name": "tiny-semantic",
        "family": "tiny LDM semantic synthesis layout (tests)",
        "model": {
            "parameterization": "eps", "scale_factor": 1.0, "conditioning": "concat", "concat_input": "segmentation",
            "latent_size": 8, "schedule": SCHEDULE, "unet": UNET, "first_stage": dict(FIRST_STAGE), "cond_stage": COND_STAGE,
        },
        "sampler": {"steps": 4, "scale": 1.0, "eta": 1.0},
    }


def write(folder: Path, seed: int = 0) -> TinyFiles:
    """``folder/tiny-semantic.safetensors`` (with schedule buffers, as an original file) and its preset
    as ``folder/tiny-semantic-preset.yaml`` (a path ``--preset`` takes)."""
    folder.mkdir(parents=True, exist_ok=True)
    preset_path = folder / "tiny-semantic-preset.yaml"
    OmegaConf.save(OmegaConf.create(preset_dict()), preset_path)
    preset = read_preset(preset_path)
    model = build_model(preset.model, device="cpu")
    randomise(model, seed)
    with torch.no_grad():  # a strong map, so that it shows through the VQ codebook's snapping of the latent
        model.cond_stage_model.channel_mapper.weight.mul_(4.0)
    state = weights(model)
    state.update(schedule_buffers(preset.model.schedule))
    path = folder / "tiny-semantic.safetensors"
    save_file(state, str(path))
    return TinyFiles(path, preset)


def label_map(size: tuple[int, int] = (32, 48), classes: int = CLASSES, seed: int = 0):
    """A blocky label map (mode L) of ``size`` (width, height) using classes below ``classes``."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    width, height = size
    blocks = torch.randint(0, classes, (height // 8 + 1, width // 8 + 1), generator=g, dtype=torch.uint8)
    labels = blocks.repeat_interleave(8, 0).repeat_interleave(8, 1)[:height, :width]
    return Image.fromarray(labels.numpy(), mode="L")
