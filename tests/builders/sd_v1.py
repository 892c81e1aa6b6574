"""A tiny model in the Stable Diffusion v1 layout, with random weights, saved as an original single file.

One description of the architecture feeds both sides: our preset (``make_preset``) and the original
LDM config structure that diffusers' own converters read (``original_config``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.checkpoints.loader import build_model, ema_key
from ldm.checkpoints.presets import ModelPreset, preset_from_dict
from tests.builders import TINY_KL, TinyFiles, original_ddconfig, randomise, schedule_buffers, weights
from tests.builders.clip_tokenizer import tiny_vocab_size, write_tiny_clip_tokenizer

UNET = dict(
    in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 1], num_res_blocks=2,
    channel_mult=[1, 2], num_heads=2, transformer_depth=1, context_dim=32,
)
SCHEDULE = dict(kind="linear", timesteps=1000, linear_start=0.00085, linear_end=0.012)
SCALE_FACTOR = 0.18215


def preset_dict(vocab_size: int) -> dict:
    return {
        "name": "tiny-v1",
        "family": "tiny SD v1 layout (tests)",
        "model": {
            "parameterization": "eps",
            "scale_factor": SCALE_FACTOR,
            "conditioning": "crossattn",
            "latent_size": 8,
            "schedule": SCHEDULE,
            "unet": dict(UNET, use_spatial_transformer=True),
            "first_stage": dict(TINY_KL),
            "cond_stage": dict(kind="clip", vocab_size=vocab_size, hidden_size=32, intermediate_size=37,
                               num_layers=2, num_heads=2, max_positions=77),
        },
        "sampler": {"steps": 10, "scale": 7.5, "eta": 0.0},
    }


def make_preset(vocab_size: int) -> ModelPreset:
    return preset_from_dict(preset_dict(vocab_size), Path("tiny-v1.yaml"))


def write_preset_yaml(path: Path, vocab_size: int) -> Path:
    """The preset as a YAML file, for ``--preset FILE``."""
    OmegaConf.save(OmegaConf.create(preset_dict(vocab_size)), path)
    return path


def original_config() -> dict:
    """The same architecture in the structure of CompVis' v1-inference.yaml (for diffusers' converters)."""
    return {
        "model": {
            "params": {
                "linear_start": SCHEDULE["linear_start"], "linear_end": SCHEDULE["linear_end"],
                "timesteps": 1000, "image_size": 8, "channels": 4, "scale_factor": SCALE_FACTOR,
                "unet_config": {"params": dict(UNET, image_size=8, use_spatial_transformer=True, legacy=False)},
                "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": original_ddconfig(TINY_KL)}},
            }
        }
    }


def write(folder: Path, seed: int = 0, *, ema: bool = False) -> TinyFiles:
    """``folder/tiny-v1.safetensors`` (with the schedule buffers an original file carries) and a
    tokenizer folder ``folder/tokenizer``. With ``ema``, LitEma's copies of the UNet too (the weights
    times 0.5, so that a test can tell which were loaded)."""
    tokenizer_dir = write_tiny_clip_tokenizer(folder / "tokenizer")
    preset = make_preset(tiny_vocab_size(tokenizer_dir))
    model = build_model(preset.model, device="cpu")
    randomise(model, seed)
    state = weights(model)
    state.update(schedule_buffers(preset.model.schedule))
    if ema:
        for k in list(state):
            if k.startswith("model.diffusion_model."):
                state[ema_key(k)] = state[k] * 0.5
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(10)
    path = folder / "tiny-v1.safetensors"
    save_file(state, str(path))
    return TinyFiles(path, preset, tokenizer_dir)
