"""What every task returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


@dataclass(frozen=True)
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    parameters: list[str]  # the parameters text of each image
    notices: list[str] = field(default_factory=list)
