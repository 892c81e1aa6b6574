"""A tiny model in the Stable Diffusion 2.x layout, with random weights, saved as an original single file.

Differences from the SD v1 layout (``tests.builders.sd_v1``) are those of SD 2.x: heads set by their
width (``num_head_channels``), linear ``proj_in``/``proj_out``, an OpenCLIP text tower under
``cond_stage_model.model.`` read at its penultimate block, and v-prediction. One description of the
architecture feeds our preset and the original config structure that diffusers' converters read
(``converted_models`` builds diffusers' and transformers' models from a file with them). With
``inpainting=True`` it is the layout of SD 2 inpainting instead: a 9-channel input
[x, mask, masked-image latent], hybrid conditioning and eps prediction.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm.checkpoints.loader import build_model
from ldm.checkpoints.presets import ModelPreset, preset_from_dict
from tests.builders import TINY_KL, TinyFiles, original_ddconfig, randomise, schedule_buffers, weights
from tests.builders.clip_tokenizer import tiny_vocab_size, write_tiny_clip_tokenizer
from tests.builders.sd_v1 import SCALE_FACTOR, SCHEDULE

HEAD_CHANNELS = 16  # 2 heads at 32 channels, 4 at 64
UNET = dict(
    in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 1], num_res_blocks=2,
    channel_mult=[1, 2], transformer_depth=1, context_dim=32,
)
TEXT = dict(width=32, heads=2, layers=3, context_length=77, embed_dim=24, mlp_ratio=4)


def unet_in_channels(inpainting: bool) -> int:
    return 9 if inpainting else UNET["in_channels"]


def make_preset(vocab_size: int, parameterization: str = "v", inpainting: bool = False) -> ModelPreset:
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
            "first_stage": dict(TINY_KL),
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
                "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": original_ddconfig(TINY_KL)}},
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


def write(folder: Path, seed: int = 0, *, parameterization: str = "v", inpainting: bool = False) -> TinyFiles:
    """``folder/tiny-v2.safetensors`` (with schedule buffers, as an original file) and a tokenizer
    folder ``folder/tokenizer``. The weights do not depend on ``parameterization``."""
    tokenizer_dir = write_tiny_clip_tokenizer(folder / "tokenizer")
    preset = make_preset(tiny_vocab_size(tokenizer_dir), parameterization, inpainting)
    model = build_model(preset.model, device="cpu")
    randomise(model, seed)
    text_norms_near_identity(model, seed + 1)
    state = weights(model)
    state.update(schedule_buffers(preset.model.schedule))
    path = folder / "tiny-v2.safetensors"
    save_file(state, str(path))
    return TinyFiles(path, preset, tokenizer_dir)


def converted_models(path, ours, config: dict):
    """diffusers' UNet and transformers' CLIP text model, made from the same file by diffusers' converters."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    from ldm.checkpoints.io import read_state_dict

    checkpoint = read_state_dict(path)
    unet_config = sfu.create_unet_diffusers_config_from_ldm(config, checkpoint)
    assert unet_config["use_linear_projection"] and list(unet_config["attention_head_dim"]) == [2, 4]
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    return unet.eval(), converted_text_model(ours, checkpoint)


def converted_text_model(ours, checkpoint: dict):
    """transformers' CLIP text model from a file's OpenCLIP tower, by diffusers' converter."""
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    blocks = TEXT["layers"] - 1  # SD 2.x reads the penultimate block: a transformers model one block shorter
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=ours.model.cond_stage_model.config.vocab_size, hidden_size=TEXT["width"],
        intermediate_size=TEXT["width"] * TEXT["mlp_ratio"], num_hidden_layers=blocks,
        num_attention_heads=TEXT["heads"], max_position_embeddings=TEXT["context_length"], hidden_act="gelu",
    ))
    converted = sfu.convert_open_clip_checkpoint(text, checkpoint)
    # transformers 5 dropped the "text_model." level; the projection belongs to CLIPTextModelWithProjection.
    converted = {k.removeprefix("text_model."): v for k, v in converted.items() if k != "text_projection.weight"}
    converted = {k: v for k, v in converted.items() if not k.startswith(f"encoder.layers.{blocks}.")}
    text.load_state_dict(converted, strict=True)
    return text.eval()
