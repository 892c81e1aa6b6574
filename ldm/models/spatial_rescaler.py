"""Semantic synthesis's conditioning stage: a segmentation map rescaled to the latent size (LDM's
``SpatialRescaler``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SPATIAL_RESCALER_METHODS = ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area")


@dataclass(frozen=True)
class SpatialRescalerConfig:
    """LDM's ``SpatialRescaler`` (``ldm.modules.encoders.modules``): the input is resized ``n_stages``
    times by ``multiplier`` with ``method``, then mapped from ``in_channels`` to ``out_channels`` by a
    1x1 convolution named ``channel_mapper`` (bias only when ``bias``). The semantic synthesis
    models use n_stages 2, in_channels 182 (COCO-Stuff labels, one-hot), out_channels 3."""

    n_stages: int = 1
    in_channels: int = 3
    out_channels: int = 3
    method: str = "bilinear"
    multiplier: float = 0.5
    bias: bool = False

    def __post_init__(self):
        if self.method not in SPATIAL_RESCALER_METHODS:
            raise ValueError(f"spatial rescaler method {self.method!r} is not known; use one of {', '.join(SPATIAL_RESCALER_METHODS)}")
        if self.n_stages < 0:
            raise ValueError(f"spatial rescaler n_stages must be 0 or more, got {self.n_stages}")

    @property
    def takes_text(self) -> bool:
        return False

    @property
    def downsampling_factor(self) -> int:
        """Input pixels per output pixel (2 for each stage at the original's multiplier 0.5)."""
        return round((1 / self.multiplier) ** self.n_stages)


class SpatialRescaler(nn.Module):
    """Maps (B, in_channels, H, W) to (B, out_channels, H / f, W / f), f = downsampling_factor.

    Each stage is ``F.interpolate(x, scale_factor=multiplier, mode=method)`` with the remaining
    arguments at their defaults (align_corners None, i.e. False for bilinear; no antialiasing;
    recompute_scale_factor None), as the original calls it through ``functools.partial``."""

    def __init__(self, config: SpatialRescalerConfig):
        super().__init__()
        self.config = config
        self.channel_mapper = nn.Conv2d(config.in_channels, config.out_channels, 1, bias=config.bias)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        x = maps.to(self.channel_mapper.weight)
        for _ in range(self.config.n_stages):
            x = nn.functional.interpolate(x, scale_factor=self.config.multiplier, mode=self.config.method)
        return self.channel_mapper(x)  # (B, out_channels, H / f, W / f)

    def encode(self, maps: torch.Tensor) -> torch.Tensor:
        return self(maps)

    def encode_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """``forward`` of the one-hot encoding of class indices (B, H, W), without building it: resizing
        acts on each channel alike and the 1x1 map on each pixel alike, both linear, so mapping first
        (the one-hot of class k maps to column k of the weight) and resizing after gives the same
        result up to float rounding, with 3 channels in memory instead of ``in_channels``
        (182 x 4 bytes a pixel would be 3 GB for a 2048 x 2048 map)."""
        if labels.dtype.is_floating_point or labels.dim() != 3:
            raise ValueError(f"labels must be integer class indices (B, H, W), got {labels.dtype} {tuple(labels.shape)}")
        weight = self.channel_mapper.weight[:, :, 0, 0]  # (out, in)
        x = weight.T[labels.to(weight.device)].permute(0, 3, 1, 2)  # (B, out, H, W)
        if self.channel_mapper.bias is not None:
            x = x + self.channel_mapper.bias[:, None, None]
        for _ in range(self.config.n_stages):
            x = nn.functional.interpolate(x, scale_factor=self.config.multiplier, mode=self.config.method)
        return x
