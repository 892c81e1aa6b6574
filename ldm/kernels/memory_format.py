"""The memory layout a model runs in: channels-last where oneDNN's CPU convolutions are faster in it."""

from __future__ import annotations

import torch

MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def choose_memory_format(name: str | None, device: torch.device, unet_channels: int) -> torch.memory_format:
    """``None`` or "auto": channels-last on the CPU for models of Stable Diffusion's width or more
    (``unet_channels``, the UNet's base width, at least 128), where it measured faster; contiguous
    otherwise (narrower models measured slower in channels-last; ``python -m ldm bench
    [--channels-last]`` compares them)."""
    if name in (None, "auto"):
        return torch.channels_last if device.type == "cpu" and unet_channels >= 128 else torch.contiguous_format
    if name not in MEMORY_FORMATS:
        raise ValueError(f"memory format {name!r} is not supported; use auto, {', '.join(MEMORY_FORMATS)}")
    return MEMORY_FORMATS[name]


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-d tensor laid out so (and not also contiguous), else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
