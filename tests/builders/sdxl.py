"""A tiny model in the Stable Diffusion XL layout, with random weights, saved as an original single file.

The structure of SDXL at tiny widths: three UNet levels with no attention at the first, transformer
depths per level ([1, 1, 2], so the middle block has 2), linear projections, heads by width, the
ADM vector into ``label_emb`` (pooled + 6 x 256 Fourier features); CLIP under
``conditioner.embedders.0.transformer.text_model.`` read at its penultimate layer with no final norm,
and an OpenCLIP tower under ``conditioner.embedders.1.model.`` (penultimate, no ln_final; pooled from
the last block). With ``kind="refiner"``: four levels, depth 2, the OpenCLIP tower alone at
``conditioner.embedders.0`` and the aesthetic score in the vector. No schedule buffers: sgm's files
keep the schedule in the denoiser, not in the state dict.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.checkpoints.loader import build_model
from ldm.checkpoints.presets import ModelPreset, preset_from_dict
from tests.builders import TINY_KL, TinyFiles, original_ddconfig, randomise, weights
from tests.builders.clip_tokenizer import tiny_vocab_size, write_tiny_clip_tokenizer

SCHEDULE = dict(kind="linear", timesteps=1000, linear_start=0.00085, linear_end=0.012)
SCALE_FACTOR = 0.13025
FOURIER = 256
CLIP = dict(hidden_size=32, intermediate_size=37, num_layers=3, num_heads=2, max_positions=77, layer="penultimate")
OPEN_CLIP = dict(width=32, heads=2, layers=3, context_length=77, embed_dim=24, layer="penultimate", final_norm=False)
BASE_INPUTS = ["original_size", "crop_coords_top_left", "target_size"]
REFINER_INPUTS = ["original_size", "crop_coords_top_left", "aesthetic_score"]
UNETS = {
    "base": dict(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2], num_res_blocks=2,
                 channel_mult=[1, 2, 2], head_dim=16, transformer_depth=[1, 1, 2],
                 context_dim=CLIP["hidden_size"] + OPEN_CLIP["width"],
                 adm_in_channels=OPEN_CLIP["embed_dim"] + 6 * FOURIER),
    "refiner": dict(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2], num_res_blocks=2,
                    channel_mult=[1, 2, 2, 2], head_dim=16, transformer_depth=2, context_dim=OPEN_CLIP["width"],
                    adm_in_channels=OPEN_CLIP["embed_dim"] + 5 * FOURIER),
}


def preset_dict(vocab_size: int, kind: str = "base") -> dict:
    if kind not in UNETS:
        raise ValueError(f"no tiny SDXL model of kind {kind!r}; use one of {', '.join(UNETS)}")
    open_clip = dict(OPEN_CLIP, vocab_size=vocab_size)
    cond = dict(kind="sdxl", open_clip=open_clip, fourier_dim=FOURIER)
    if kind == "base":
        cond.update(clip=dict(CLIP, vocab_size=vocab_size), vector_inputs=BASE_INPUTS)
    else:
        cond.update(vector_inputs=REFINER_INPUTS)
    return {
        "name": f"tiny-sdxl-{kind}",
        "family": f"tiny SDXL {kind} layout (tests)",
        "model": {
            "parameterization": "eps", "scale_factor": SCALE_FACTOR, "conditioning": "crossattn", "latent_size": 16,
            "schedule": SCHEDULE,
            "unet": dict(UNETS[kind], num_classes="sequential", use_spatial_transformer=True, use_linear_in_transformer=True),
            "first_stage": dict(TINY_KL),
            "cond_stage": cond,
        },
        "sampler": {"steps": 10, "scale": 5.0, "eta": 0.0, "sampler": "Euler"},
    }


def make_preset(vocab_size: int, kind: str = "base") -> ModelPreset:
    return preset_from_dict(preset_dict(vocab_size, kind), Path(f"tiny-sdxl-{kind}.yaml"))


def write_preset_yaml(path: Path, vocab_size: int, kind: str = "base") -> Path:
    """The preset as a YAML file, for ``--preset FILE``."""
    OmegaConf.save(OmegaConf.create(preset_dict(vocab_size, kind)), path)
    return path


def original_config(kind: str = "base") -> dict:
    """The same UNet and first stage in the structure of sgm's sd_xl_base.yaml / sd_xl_refiner.yaml, as far as
    diffusers' converters read it (``network_config`` and ``first_stage_config``)."""
    unet = dict(copy.deepcopy(UNETS[kind]), num_classes="sequential", use_linear_in_transformer=True,
                num_head_channels=UNETS[kind]["head_dim"])
    del unet["head_dim"]
    return {"model": {"params": {
        "scale_factor": SCALE_FACTOR,
        "network_config": {"params": unet},
        "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": original_ddconfig(TINY_KL)}},
    }}}


def text_norms_near_identity(model, seed: int) -> None:
    """The text towers' layer norms near identity, as in trained ones (``randomise`` spreads them)."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.cond_stage_model.named_parameters():
            if ".ln_" in name or "model.ln_final" in name or "layer_norm" in name:
                noise = 0.1 * torch.randn(p.shape, generator=g)
                p.copy_(1.0 + noise if name.endswith("weight") else noise)


def write(folder: Path, seed: int = 0, *, kind: str = "base") -> TinyFiles:
    """``folder/tiny-sdxl-<kind>.safetensors`` and a tokenizer folder ``folder/tokenizer``."""
    tokenizer_dir = write_tiny_clip_tokenizer(folder / "tokenizer")
    preset = make_preset(tiny_vocab_size(tokenizer_dir), kind)
    model = build_model(preset.model, device="cpu")
    randomise(model, seed)
    text_norms_near_identity(model, seed + 1)
    path = folder / f"{preset.name}.safetensors"
    save_file(weights(model), str(path))
    return TinyFiles(path, preset, tokenizer_dir)


def diffusers_unet(checkpoint: dict, kind: str = "base"):
    """diffusers' UNet of a tiny SDXL file, by diffusers' converters. Its config builder knows SDXL by a context
    of 2048 or 1280; the tiny ones are narrower, so SDXL's ``text_time`` addition embedding (256 per number)
    replaces the "projection" class embedding it would choose, and ``label_emb`` maps to ``add_embedding``."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    config = sfu.create_unet_diffusers_config_from_ldm(original_config(kind), checkpoint)
    config.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=FOURIER)
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    return unet.eval()


def _text_config(vocab_size: int, width: int, intermediate: int, layers: int, heads: int, act: str, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=intermediate, num_hidden_layers=layers,
                          num_attention_heads=heads, max_position_embeddings=77, hidden_act=act,
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, **extra)


def diffusers_text_models(checkpoint: dict, vocab_size: int, kind: str = "base"):
    """transformers' CLIP-L (the base's; None for the refiner) and bigG with its projection, by diffusers' converters."""
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    clip_model = None
    if kind == "base":
        clip_model = CLIPTextModel(_text_config(vocab_size, CLIP["hidden_size"], CLIP["intermediate_size"],
                                                CLIP["num_layers"], CLIP["num_heads"], "quick_gelu"))
        converted = sfu.convert_ldm_clip_checkpoint(checkpoint, remove_prefix="conditioner.embedders.0.transformer.")
        clip_model.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()}, strict=True)
        clip_model.eval()
    g = OPEN_CLIP
    big_g = CLIPTextModelWithProjection(_text_config(vocab_size, g["width"], 4 * g["width"], g["layers"], g["heads"], "gelu",
                                                     projection_dim=g["embed_dim"]))
    prefix = f"conditioner.embedders.{1 if kind == 'base' else 0}.model."
    big_g.load_state_dict(sfu.convert_open_clip_checkpoint(big_g, checkpoint, prefix=prefix), strict=True)
    return clip_model, big_g.eval()


def write_diffusers_folder(files: TinyFiles, folder: Path, kind: str = "base") -> Path:
    """The tiny file as a diffusers SDXL pipeline folder (``StableDiffusionXLPipeline``, the refiner's
    ``StableDiffusionXLImg2ImgPipeline`` without ``text_encoder``), each part made by diffusers' converters."""
    import json
    import shutil

    from diffusers import AutoencoderKL, EulerDiscreteScheduler
    from diffusers.loaders import single_file_utils as sfu

    from ldm.checkpoints.io import read_state_dict

    checkpoint = read_state_dict(files.path)
    diffusers_unet(checkpoint, kind).save_pretrained(folder / "unet")
    vae_config = sfu.create_vae_diffusers_config_from_ldm(original_config(kind), checkpoint, scaling_factor=SCALE_FACTOR)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)
    vae.save_pretrained(folder / "vae")
    clip_model, big_g = diffusers_text_models(checkpoint, tiny_vocab_size(files.tokenizer_dir), kind)
    big_g.save_pretrained(folder / "text_encoder_2")
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionXLPipeline" if kind == "base" else "StableDiffusionXLImg2ImgPipeline",
             "_diffusers_version": "0.31.0", "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": [None, None], "tokenizer": [None, None],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    tokenizers = ["tokenizer_2"]
    if clip_model is not None:
        clip_model.save_pretrained(folder / "text_encoder")
        index.update(text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"])
        tokenizers.append("tokenizer")
    for name in tokenizers:
        shutil.copytree(files.tokenizer_dir, folder / name)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder
