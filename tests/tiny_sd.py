"""A tiny model in the Stable Diffusion v1 layout, with random weights, saved as an original single file.

One description of the architecture feeds both sides: our preset (``tiny_preset``) and the original
LDM config structure that diffusers' own converters read (``original_config``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.checkpoints.loader import build_model
from ldm.checkpoints.presets import ModelPreset, preset_from_dict
from ldm.sampling.schedules import ScheduleConfig, make_alphas_cumprod, make_betas
from tests.tokenizer_fixtures import tiny_vocab_size, write_tiny_clip_tokenizer

UNET = dict(
    in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 1], num_res_blocks=2,
    channel_mult=[1, 2], num_heads=2, transformer_depth=1, context_dim=32,
)
FIRST_STAGE = dict(embed_dim=4, z_channels=4, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], resolution=32)
SCHEDULE = dict(kind="linear", timesteps=1000, linear_start=0.00085, linear_end=0.012)
SCALE_FACTOR = 0.18215


def tiny_preset_dict(vocab_size: int) -> dict:
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
            "first_stage": dict(FIRST_STAGE, kind="kl"),
            "cond_stage": dict(kind="clip", vocab_size=vocab_size, hidden_size=32, intermediate_size=37,
                               num_layers=2, num_heads=2, max_positions=77),
        },
        "sampler": {"steps": 10, "scale": 7.5, "eta": 0.0},
    }


def tiny_preset(vocab_size: int) -> ModelPreset:
    return preset_from_dict(tiny_preset_dict(vocab_size), Path("tiny-v1.yaml"))


def write_tiny_preset_yaml(path: Path, vocab_size: int) -> Path:
    OmegaConf.save(OmegaConf.create(tiny_preset_dict(vocab_size)), path)
    return path


def original_config() -> dict:
    """The same architecture in the structure of CompVis' v1-inference.yaml (for diffusers' converters)."""
    return {
        "model": {
            "params": {
                "linear_start": SCHEDULE["linear_start"], "linear_end": SCHEDULE["linear_end"],
                "timesteps": 1000, "image_size": 8, "channels": 4, "scale_factor": SCALE_FACTOR,
                "unet_config": {"params": dict(UNET, image_size=8, use_spatial_transformer=True, legacy=False)},
                "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": dict(
                    FIRST_STAGE, double_z=True, in_channels=3, out_ch=3, dropout=0.0)}},
            }
        }
    }


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


def write_tiny_checkpoint(folder: Path, seed: int = 0, ema: bool = False) -> tuple[Path, Path, ModelPreset]:
    """Writes ``tiny-v1.safetensors`` (with the schedule buffers an original file carries) and a tokenizer
    folder; returns (checkpoint, tokenizer folder, preset)."""
    tokenizer_dir = write_tiny_clip_tokenizer(folder / "tokenizer")
    preset = tiny_preset(tiny_vocab_size(tokenizer_dir))
    model = build_model(preset.model, device="cpu")
    randomise(model, seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    schedule = ScheduleConfig(**SCHEDULE)
    state["betas"] = make_betas(schedule).float()
    state["alphas_cumprod"] = make_alphas_cumprod(schedule).float()
    if ema:
        from ldm.checkpoints.loader import ema_key

        for k in list(state):
            if k.startswith("model.diffusion_model."):
                state[ema_key(k)] = state[k] * 0.5
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(10)
    path = folder / "tiny-v1.safetensors"
    save_file(state, str(path))
    return path, tokenizer_dir, preset
