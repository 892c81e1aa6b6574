"""Tiny models in the layouts of CompVis LDM's inpainting_big (``kind="inpainting"``) and bsr_sr
(``kind="sr"``), with random weights, saved as original single files (schedule buffers included,
and for inpainting_big optionally the ``cond_stage_model.*`` copy of the first stage that
``__is_first_stage__`` writes).

Both use a VQ first stage (3-channel latent, a small codebook) and a UNet with legacy
AttentionBlocks: inpainting_big's by head count with ResBlock down/up-sampling and no autoencoder
mid attention, bsr_sr's by head width. One description feeds our preset and the original config
structure that diffusers' converters read (``diffusers_vq``). Each tiny preset detects its files by
the same keys as the full-size preset, with the tiny shapes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm.checkpoints.loader import build_model
from ldm.checkpoints.presets import ModelPreset, find_preset, preset_from_dict
from tests.builders import TINY_VQ, TinyFiles, randomise, schedule_buffers, weights

N_EMBED = TINY_VQ["n_embed"]
INPAINTING_SCHEDULE = dict(kind="linear", timesteps=1000, linear_start=0.0015, linear_end=0.0205)
SR_SCHEDULE = dict(kind="linear", timesteps=1000, linear_start=0.0015, linear_end=0.0155)
INPAINTING_UNET = dict(in_channels=7, out_channels=3, model_channels=32, attention_resolutions=[2], num_res_blocks=1,
                       channel_mult=[1, 2], num_heads=2, resblock_updown=True)
SR_UNET = dict(in_channels=6, out_channels=3, model_channels=32, attention_resolutions=[2], num_res_blocks=1,
               channel_mult=[1, 2], head_dim=16)


FULL_SIZE = {"inpainting": "inpainting_big", "sr": "bsr_sr"}


def preset_dict(kind: str = "inpainting") -> dict:
    if kind not in FULL_SIZE:
        raise ValueError(f"no tiny LDM model of kind {kind!r}; use one of {', '.join(FULL_SIZE)}")
    if kind == "inpainting":
        return {
            "name": "tiny-ldm-inpainting",
            "family": "tiny LDM inpainting_big layout (tests)",
            "model": {
                "conditioning": "concat", "concat_input": "masked_latent_and_mask", "latent_size": 8, "scale_factor": 1.0,
                "schedule": INPAINTING_SCHEDULE, "unet": INPAINTING_UNET,
                "first_stage": dict(TINY_VQ, mid_attention=False),
                "cond_stage": {"kind": "first_stage"},
            },
            "sampler": {"steps": 6, "scale": 1.0, "eta": 0.0},
        }
    return {
        "name": "tiny-ldm-sr",
        "family": "tiny LDM bsr_sr layout (tests)",
        "model": {
            "conditioning": "concat", "concat_input": "low_res_image", "latent_size": 8, "scale_factor": 1.0,
            "schedule": SR_SCHEDULE, "unet": SR_UNET, "first_stage": dict(TINY_VQ),
        },
        "sampler": {"steps": 6, "scale": 1.0, "eta": 1.0},
    }


def with_detect(raw: dict, full_size: str) -> dict:
    """``raw`` with a detect section: the keys the full-size preset detects by, at this model's shapes."""
    shapes = build_model(preset_from_dict(raw, Path("x.yaml")).model).state_dict()
    return dict(raw, detect={k: list(shapes[k].shape) for k in find_preset(full_size).detect})


def make_preset(kind: str = "inpainting") -> ModelPreset:
    return preset_from_dict(with_detect(preset_dict(kind), FULL_SIZE[kind]), Path(f"tiny-ldm-{kind}.yaml"))


def original_first_stage_config(mid_attention: bool) -> dict:
    """The VQ first stage in the structure of LDM's first_stage_config (for diffusers' VAE converter)."""
    ddconfig = {k: v for k, v in TINY_VQ.items() if k not in ("kind", "embed_dim", "n_embed")}
    ddconfig.update(double_z=False, in_channels=3, out_ch=3, dropout=0.0)
    if not mid_attention:
        ddconfig["attn_type"] = "none"
    return {"model": {"params": {"first_stage_config": {"params": {
        "embed_dim": TINY_VQ["embed_dim"], "n_embed": N_EMBED, "ddconfig": ddconfig}}}}}


def spread_codebook(model: torch.nn.Module, seed: int) -> None:
    """Codebook entries at the scale of the encoder's latents, so that quantisation picks among many."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        embedding = model.first_stage_model.quantize.embedding.weight
        embedding.copy_(torch.randn(embedding.shape, generator=g) * 0.8)


def write(folder: Path, seed: int = 0, *, kind: str = "inpainting", first_stage_copy: bool = False,
          tamper: bool = False) -> TinyFiles:
    """``folder/tiny-ldm-<kind>.safetensors``, with the schedule buffers. With ``first_stage_copy`` the
    first stage is written again under ``cond_stage_model.`` (``-copy`` in the name; ``tamper``: one
    copied tensor differs, ``-copy-tampered``)."""
    preset = make_preset(kind)
    model = build_model(preset.model, device="cpu")
    randomise(model, seed)
    spread_codebook(model, seed + 1)
    state = weights(model)
    if first_stage_copy:
        state.update({"cond_stage_model." + k.removeprefix("first_stage_model."): v.clone()
                      for k, v in state.items() if k.startswith("first_stage_model.")})
        if tamper:
            state["cond_stage_model.decoder.conv_in.bias"] += 1e-3
    state.update(schedule_buffers(preset.model.schedule))
    suffix = "-copy" if first_stage_copy else ""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{preset.name}{suffix}{'-tampered' if tamper else ''}.safetensors"
    save_file(state, str(path))
    return TinyFiles(path, preset)


def diffusers_vq(checkpoint: dict[str, torch.Tensor], mid_attention: bool):
    """diffusers' ``VQModel`` holding a file's first stage, converted by diffusers' own VAE converter
    (``convert_ldm_vae_checkpoint`` maps encoder, decoder, quant_conv and post_quant_conv; it has no
    entry for the VQ codebook, whose key ``quantize.embedding.weight`` is the same in both layouts)."""
    from diffusers import VQModel
    from diffusers.loaders import single_file_utils as sfu

    original = original_first_stage_config(mid_attention)
    config = sfu.create_vae_diffusers_config_from_ldm(original, checkpoint, scaling_factor=1.0)
    vq = VQModel(**config, num_vq_embeddings=N_EMBED, vq_embed_dim=TINY_VQ["embed_dim"],
                 mid_block_add_attention=mid_attention)
    weights = sfu.convert_ldm_vae_checkpoint(checkpoint, config)
    weights["quantize.embedding.weight"] = checkpoint["first_stage_model.quantize.embedding.weight"]
    vq.load_state_dict(weights, strict=True)
    return vq.eval()
