"""Tiny models in the default model's layouts, with random weights, saved as original-layout files:
``kind="hybrid"`` (text, layout and inpainting: a word-level transformer and a 9-channel UNet) and
``kind="upscale"`` (concat super-resolution of the low-resolution image)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from ldm.checkpoints.loader import build_model
from ldm.checkpoints.presets import ModelPreset, preset_from_dict
from tests.builders import TINY_KL, TinyFiles, randomise, weights

SCHEDULE = dict(kind="linear", timesteps=1000, linear_start=0.0015, linear_end=0.0195)


def hybrid_preset() -> ModelPreset:
    return preset_from_dict({
        "name": "tiny-hybrid",
        "model": {
            "conditioning": "hybrid", "concat_input": "mask_and_masked_latent", "latent_size": 8, "scale_factor": 1.0, "schedule": SCHEDULE,
            "unet": dict(in_channels=9, out_channels=4, model_channels=32, attention_resolutions=[1, 2], num_res_blocks=1,
                         channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True, context_dim=32),
            "first_stage": dict(TINY_KL),
            "cond_stage": dict(kind="transformer", vocab_size=329, max_seq_len=52, dim=32, depth=1, heads=2, head_dim=16,
                               vocab="tokenizers/default-words.txt", caption_tokens=40, max_objects=4, grid=16),
        },
        "sampler": {"steps": 4, "scale": 3.0},
    }, Path("tiny-hybrid.yaml"))


def upscale_preset() -> ModelPreset:
    return preset_from_dict({
        "name": "tiny-upscale",
        "model": {
            "conditioning": "concat", "concat_input": "low_res_image", "latent_size": 8, "scale_factor": 1.0, "schedule": SCHEDULE,
            "unet": dict(in_channels=7, out_channels=4, model_channels=32, attention_resolutions=[], middle_attention=False,
                         num_res_blocks=1, channel_mult=[1, 2]),
            "first_stage": dict(TINY_KL),
        },
        "sampler": {"steps": 4, "scale": 1.0},
    }, Path("tiny-upscale.yaml"))


def make_preset(kind: str = "hybrid") -> ModelPreset:
    return {"hybrid": hybrid_preset, "upscale": upscale_preset}[kind]()


def write(folder: Path, seed: int = 0, *, kind: str = "hybrid") -> TinyFiles:
    """``folder/tiny-<kind>.safetensors``; the vocabulary is the default model's, shipped in presets/."""
    preset = make_preset(kind)
    model = build_model(preset.model, device="cpu")
    randomise(model, seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{preset.name}.safetensors"
    save_file(weights(model), str(path))
    return TinyFiles(path, preset)
