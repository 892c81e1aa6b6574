"""A model config written in the structure of the original LDM / Stable Diffusion YAML configs
(``model.params`` with ``unet_config`` and ``first_stage_config``): what tools that read those
configs, diffusers' single-file converters among them, need to rebuild the same architecture.

Only the architecture and schedule facts are written; training settings, data and targets are not.
"""

from __future__ import annotations

from ldm.models.latent_diffusion import LatentDiffusionConfig


def original_config(model: LatentDiffusionConfig) -> dict:
    unet, first, schedule = model.unet, model.first_stage, model.schedule
    depth = list(unet.transformer_depth) if isinstance(unet.transformer_depth, tuple) else unet.transformer_depth
    unet_params = {
        "image_size": model.latent_size, "in_channels": unet.in_channels, "out_channels": unet.out_channels,
        "model_channels": unet.model_channels, "attention_resolutions": list(unet.attention_resolutions),
        "num_res_blocks": unet.num_res_blocks, "channel_mult": list(unet.channel_mult),
        "use_spatial_transformer": unet.use_spatial_transformer, "transformer_depth": depth,
        "resblock_updown": unet.resblock_updown, "legacy": False,
    }
    unet_params.update({"num_heads": unet.num_heads} if unet.num_heads else {"num_head_channels": unet.head_dim})
    optional = {"context_dim": unet.context_dim, "num_classes": unet.num_classes,
                "adm_in_channels": unet.adm_in_channels, "transformer_depth_middle": unet.transformer_depth_middle,
                "use_linear_in_transformer": unet.use_linear_in_transformer or None,
                "disable_self_attentions": list(unet.disable_self_attentions) if unet.disable_self_attentions else None}
    unet_params.update({k: v for k, v in optional.items() if v is not None})
    ddconfig = {
        "double_z": first.kind == "kl", "z_channels": first.z_channels, "resolution": first.resolution, "in_channels": 3,
        "out_ch": 3, "ch": first.ch, "ch_mult": list(first.ch_mult), "num_res_blocks": first.num_res_blocks,
        "attn_resolutions": list(first.attn_resolutions), "dropout": 0.0,
    }
    params = {
        "linear_start": schedule.linear_start, "linear_end": schedule.linear_end, "timesteps": schedule.timesteps,
        "image_size": model.latent_size, "channels": model.latent_channels, "scale_factor": model.scale_factor,
        "parameterization": model.parameterization,
        "unet_config": {"params": unet_params},
        "first_stage_config": {"params": {"embed_dim": first.embed_dim, "ddconfig": ddconfig}},
    }
    return {"model": {"params": params}}
