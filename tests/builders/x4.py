"""A tiny model in the layout of Stable Diffusion's x4 upscaler, with random weights, saved as an original single file.

What sets it apart from the SD 2.x layout (``tests.builders.sd2``): a 7-channel input (latent and the
low-resolution RGB image), the noise level as a class label (``label_emb``), cross-attention in
place of self-attention where ``disable_self_attentions`` says, heads by count (``num_heads``), and
noise augmentation of the low-resolution image with its own schedule (``low_scale_model.*``
buffers in the file). One description feeds our preset and the original config that diffusers'
converters read.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.checkpoints.loader import build_model
from ldm.checkpoints.presets import ModelPreset, preset_from_dict
from tests.builders import TINY_KL, TinyFiles, original_ddconfig, randomise, schedule_buffers, weights
from tests.builders.clip_tokenizer import tiny_vocab_size, write_tiny_clip_tokenizer
from tests.builders.sd2 import TEXT, text_norms_near_identity

SCALE_FACTOR = 0.08333
SCHEDULE = dict(kind="linear", timesteps=1000, linear_start=0.0001, linear_end=0.02)  # both schedules, as the original's
MAX_NOISE_LEVEL = 350
NUM_CLASSES = 1000
UNET = dict(
    in_channels=7, out_channels=4, model_channels=32, attention_resolutions=[1, 2], num_res_blocks=2,
    channel_mult=[1, 2], num_heads=2, transformer_depth=1, context_dim=32, use_spatial_transformer=True,
    use_linear_in_transformer=True, num_classes=NUM_CLASSES, disable_self_attentions=[True, False],
)


def preset_dict(vocab_size: int) -> dict:
    return {
        "name": "tiny-x4",
        "family": "tiny SD x4 upscaler layout (tests)",
        "model": {
            "parameterization": "v",
            "scale_factor": SCALE_FACTOR,
            "conditioning": "hybrid", "concat_input": "low_res_image",
            "latent_size": 8,
            "schedule": SCHEDULE,
            "noise_augmentation": {"max_noise_level": MAX_NOISE_LEVEL, "schedule": SCHEDULE},
            "unet": UNET,
            "first_stage": dict(TINY_KL),
            "cond_stage": dict(TEXT, kind="open_clip", vocab_size=vocab_size, layer="penultimate"),
        },
        "sampler": {"steps": 10, "scale": 9.0, "eta": 0.0},
    }


def make_preset(vocab_size: int) -> ModelPreset:
    return preset_from_dict(preset_dict(vocab_size), Path("tiny-x4.yaml"))


def write_preset_yaml(path: Path, vocab_size: int) -> Path:
    """The preset as a YAML file, for ``--preset FILE``."""
    OmegaConf.save(OmegaConf.create(preset_dict(vocab_size)), path)
    return path


def original_x4_config() -> dict:
    """The same architecture in the structure of SAI's x4-upscaling.yaml (for diffusers' converters)."""
    unet = {k: v for k, v in UNET.items() if k != "num_classes"}
    unet.update(num_classes=NUM_CLASSES, image_size=8, legacy=False, disable_middle_self_attn=False)
    return {
        "model": {
            "params": {
                "parameterization": "v", "low_scale_key": "lr", "conditioning_key": "hybrid-adm",
                "linear_start": SCHEDULE["linear_start"], "linear_end": SCHEDULE["linear_end"],
                "timesteps": 1000, "image_size": 8, "channels": 4, "scale_factor": SCALE_FACTOR,
                "low_scale_config": {"params": {"noise_schedule_config": {
                    "linear_start": SCHEDULE["linear_start"], "linear_end": SCHEDULE["linear_end"]},
                    "max_noise_level": MAX_NOISE_LEVEL}},
                "unet_config": {"params": unet},
                "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": original_ddconfig(TINY_KL)}},
                "cond_stage_config": {"params": {"freeze": True, "layer": "penultimate"}},
            }
        }
    }


def write(folder: Path, seed: int = 0) -> TinyFiles:
    """``folder/tiny-x4.safetensors`` (with both sets of schedule buffers, as an original file) and a
    tokenizer folder ``folder/tokenizer``."""
    tokenizer_dir = write_tiny_clip_tokenizer(folder / "tokenizer")
    preset = make_preset(tiny_vocab_size(tokenizer_dir))
    model = build_model(preset.model, device="cpu")
    randomise(model, seed)
    text_norms_near_identity(model, seed + 1)
    state = weights(model)
    for prefix in ("", "low_scale_model."):  # the model's schedule, and the augmentation's (the same numbers)
        state.update(schedule_buffers(preset.model.schedule, prefix))
    path = folder / "tiny-x4.safetensors"
    save_file(state, str(path))
    return TinyFiles(path, preset, tokenizer_dir)
