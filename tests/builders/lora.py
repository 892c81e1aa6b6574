"""Random LoRA files in kohya's naming for the tiny models, written from the layers' diffusers names."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm.addons.lora import TEXT, UNET, lora_targets, unet_diffusers_name

ATTENTION = ("to_q", "to_k", "to_v", "to_out_0")


def kohya_names(model, *, attention_only: bool = False, text: bool = True) -> dict[str, tuple[int, ...]]:
    """kohya module name (``lora_unet_down_blocks_0_...``) -> the weight shape it changes: every UNet
    Linear/Conv that diffusers names (only the attention projections with ``attention_only``), and the
    text encoder's attention and MLP layers."""
    names = {}
    per_block = model.config.unet.num_res_blocks
    for name, module in model.unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        diffusers = unet_diffusers_name(name, per_block)
        if diffusers is None or (attention_only and not diffusers.replace(".", "_").endswith(ATTENTION)):
            continue
        names["lora_unet_" + diffusers.replace(".", "_")] = tuple(module.weight.shape)
    if text:
        for (tower, name), target in lora_targets(model).items():
            if tower == TEXT:
                names["lora_te_" + name] = tuple(target.weight.shape)
    return names


def random_lora(names: dict[str, tuple[int, ...]], rank: int, seed: int = 0, *, alpha: float | None = None,
                scale: float = 0.1, conv3x3: bool = True) -> dict[str, torch.Tensor]:
    """kohya LoRA tensors for ``names`` (LoCon with a 3x3 ``lora_down`` for 3x3 convs when ``conv3x3``)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in names.items():
        out, inp = shape[0], shape[1]
        kernel = shape[2:] if len(shape) == 4 and (conv3x3 or shape[2:] == (1, 1)) else ()
        if len(shape) == 4 and not kernel:
            continue
        r = min(rank, out, inp)
        state[f"{name}.lora_down.weight"] = torch.randn(r, inp, *kernel, generator=g) * scale
        state[f"{name}.lora_up.weight"] = torch.randn(out, r, *((1, 1) if kernel else ()), generator=g) * scale
        state[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else r / 2))
    return state


def write(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


__all__ = ["UNET", "kohya_names", "random_lora", "write"]
