"""Layout tokens of LDM's layout-to-image model (layout2img-openimages256).

The model's conditioning stage reads no text: its 92 "tokens" are a layout, built by
taming-transformers' ``ObjectsBoundingBoxConditionalBuilder`` (``taming/data/conditional_builder/``):

- 30 object slots of 3 tokens: (class id, token(x0, y0), token(x1, y1)), the box's top-left and
  bottom-right corners; empty slots are (8191, 8191, 8191), 8191 being the last id of the 8192;
- 2 crop tokens, the crop's two corners; a whole image is the crop (0, 0, 1, 1), i.e. [0, 8099].

A corner (x, y) in [0, 1] is the cell ``round(y * 89) * 90 + round(x * 89)`` of a 90 x 90 grid
(90 = int(sqrt(8192))), with Python's ``round`` (half to even), as taming's ``tokenize_coordinates``.

Class ids: taming numbers an object as ``category_no + no_object_classes * modifier`` (modifier bits
for group-of, occluded, depiction, inside). The class table of the released model cannot be
recovered from the released code, so boxes name class ids (whole numbers 0 to 8190) rather than
names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

LayoutBox = tuple  # (class id, x0, y0, x1, y1): the id an int or a string of one, corners in [0, 1]


@dataclass(frozen=True)
class LDMLayoutTokenizer:
    """Boxes to the layout ids of LDM's layout2img model. ``encode_batch(prompts, layouts)`` has the
    interface of the project's word-and-layout tokenizer; the prompts are not used (see ``notices``)."""

    vocab_size: int = 8192
    max_objects: int = 30
    grid: int = 90

    def __post_init__(self):
        if self.grid != math.isqrt(self.vocab_size):
            raise ValueError(f"grid {self.grid} must be int(sqrt(vocab_size)) = {math.isqrt(self.vocab_size)}, as taming's builder has it")

    @property
    def none_id(self) -> int:
        """The id of an empty slot's tokens: the vocabulary's last."""
        return self.vocab_size - 1

    @property
    def length(self) -> int:
        return 3 * self.max_objects + 2

    def coordinate_id(self, x: float, y: float) -> int:
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            raise ValueError(f"box corner ({x}, {y}) is outside the image; corners are normalised to [0, 1]")
        g = self.grid - 1
        return round(y * g) * self.grid + round(x * g)

    def class_id(self, label, index: int) -> int:
        """A box's class id: a whole number from 0 to vocab_size - 2 (the last id marks empty slots)."""
        name = f"box {index + 1}"
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise ValueError(f"{name}: the label must be a class id (a whole number), got {label!r}")
        text = str(label).strip()
        if not text.lstrip("-").isdigit():
            raise ValueError(f"{name}: this model takes class ids as labels (whole numbers 0 to {self.none_id - 1}), "
                             f"got {label!r}; the released model's class names are not known")
        value = int(text)
        if not 0 <= value < self.none_id:
            raise ValueError(f"{name}: class id {value} is out of range; use 0 to {self.none_id - 1}")
        return value

    def encode(self, boxes: Sequence[LayoutBox] | None) -> list[int]:
        """The 92 ids of a layout. Boxes keep the given order (taming shuffles them in training, so the
        model does not depend on it); the crop is the whole image."""
        boxes = list(boxes or [])
        if len(boxes) > self.max_objects:
            raise ValueError(f"{len(boxes)} boxes given; this model takes at most {self.max_objects}")
        ids = []
        for i, (label, x0, y0, x1, y1) in enumerate(boxes):
            ids += [self.class_id(label, i), self.coordinate_id(x0, y0), self.coordinate_id(x1, y1)]
        ids += [self.none_id] * (3 * self.max_objects - len(ids))
        return ids + [self.coordinate_id(0.0, 0.0), self.coordinate_id(1.0, 1.0)]

    def notices(self, prompts: Sequence[str]) -> list[str]:
        if any(p.strip() for p in prompts):
            return ["this model generates from the layout alone: the prompt and negative prompt are not used"]
        return []

    def encode_batch(self, prompts: Sequence[str], layouts: Sequence[Sequence[LayoutBox] | None] | None = None) -> torch.Tensor:
        if layouts is None:
            raise ValueError("this model generates from layout boxes only, not from a text prompt; "
                             "use the layout command (python -m ldm layout --boxes FILE) or the layout tab")
        return torch.tensor([self.encode(b) for _, b in zip(prompts, layouts, strict=True)], dtype=torch.long)  # (B, 92)
