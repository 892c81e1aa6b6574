"""A tiny model in the Stable Diffusion 2.x layout, with random weights, saved as an original single file.

Differences from the SD v1 layout (``tests.tiny_sd``) are those of SD 2.x: heads set by their width
(``num_head_channels``), linear ``proj_in``/``proj_out``, an OpenCLIP text tower under
``cond_stage_model.model.`` read at its penultimate block, and v-prediction. One description of the
architecture feeds our preset and the original config structure that diffusers' converters read.
With ``inpainting=True`` it is the layout of SD 2 inpainting instead: a 9-channel input
[x, mask, masked-image latent], hybrid conditioning and eps prediction.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm.checkpoints.loader import build_model
from ldm.checkpoints.presets import ModelPreset, preset_from_dict
from ldm.sampling.schedules import ScheduleConfig, make_alphas_cumprod, make_betas
from tests.tiny_sd import FIRST_STAGE, SCALE_FACTOR, SCHEDULE, randomise
from tests.tokenizer_fixtures import tiny_vocab_size, write_tiny_clip_tokenizer

HEAD_CHANNELS = 16  # 2 heads at 32 channels, 4 at 64
UNET = dict(
    in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 1], num_res_blocks=2,
    channel_mult=[1, 2], transformer_depth=1, context_dim=32,
)
TEXT = dict(width=32, heads=2, layers=3, context_length=77, embed_dim=24, mlp_ratio=4)


def unet_in_channels(inpainting: bool) -> int:
    return 9 if inpainting else UNET["in_channels"]


def tiny_v2_preset(vocab_size: int, parameterization: str = "v", inpainting: bool = False) -> ModelPreset:
    name = "tiny-v2-inpainting" if inpainting else f"tiny-v2-{parameterization}"
    raw = {
        "name": name,
        "family": "tiny SD 2.x layout (tests)",
        "model": {
            "parameterization": parameterization,
            "scale_factor": SCALE_FACTOR,
            "conditioning": "hybrid" if inpainting else "crossattn",
            "concat_input": "mask_and_masked_latent" if inpainting else "none",
            "latent_size": 8,
            "schedule": SCHEDULE,
            "unet": dict(UNET, in_channels=unet_in_channels(inpainting), head_dim=HEAD_CHANNELS,
                         use_spatial_transformer=True, use_linear_in_transformer=True),
            "first_stage": dict(FIRST_STAGE, kind="kl"),
            "cond_stage": dict(TEXT, kind="open_clip", vocab_size=vocab_size, layer="penultimate"),
        },
        "sampler": {"steps": 10, "scale": 9.0, "eta": 0.0},
    }
    return preset_from_dict(raw, Path(f"{name}.yaml"))


def original_v2_config(parameterization: str = "v", inpainting: bool = False) -> dict:
    """The same architecture in the structure of SAI's v2-inference(-v).yaml, or v2-inpainting-inference.yaml
    (for diffusers' converters)."""
    unet = dict(UNET, in_channels=unet_in_channels(inpainting), num_head_channels=HEAD_CHANNELS, image_size=8,
                use_spatial_transformer=True, use_linear_in_transformer=True, legacy=False)
    return {
        "model": {
            "params": {
                "parameterization": parameterization,
                "linear_start": SCHEDULE["linear_start"], "linear_end": SCHEDULE["linear_end"],
                "timesteps": 1000, "image_size": 8, "channels": 4, "scale_factor": SCALE_FACTOR,
                "unet_config": {"params": unet},
                "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": dict(
                    FIRST_STAGE, double_z=True, in_channels=3, out_ch=3, dropout=0.0)}},
                "cond_stage_config": {"params": {"freeze": True, "layer": "penultimate"}},
            }
        }
    }


def text_norms_near_identity(model, seed: int) -> None:
    """The OpenCLIP tower's layer norms near identity, as in a trained one (``randomise`` spreads them)."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.cond_stage_model.named_parameters():
            if ".ln_" in name or name.startswith("model.ln_"):
                noise = 0.1 * torch.randn(p.shape, generator=g)
                p.copy_(1.0 + noise if name.endswith("weight") else noise)


def write_tiny_v2_checkpoint(
    folder: Path, parameterization: str = "v", seed: int = 0, inpainting: bool = False
) -> tuple[Path, Path, ModelPreset]:
    """Writes ``tiny-v2.safetensors`` (with schedule buffers, as an original file) and a tokenizer folder;
    returns (checkpoint, tokenizer folder, preset)."""
    tokenizer_dir = write_tiny_clip_tokenizer(folder / "tokenizer")
    preset = tiny_v2_preset(tiny_vocab_size(tokenizer_dir), parameterization, inpainting)
    model = build_model(preset.model, device="cpu")
    randomise(model, seed)
    text_norms_near_identity(model, seed + 1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    schedule = ScheduleConfig(**SCHEDULE)
    state["betas"] = make_betas(schedule).float()
    state["alphas_cumprod"] = make_alphas_cumprod(schedule).float()
    path = folder / "tiny-v2.safetensors"
    save_file(state, str(path))
    return path, tokenizer_dir, preset
