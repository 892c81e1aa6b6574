"""The default model's tokenizer: caption words and layout tokens in one sequence.

A sequence is the caption's word ids (at most ``caption_tokens``), then, for each box, a class token
and two grid-coordinate tokens (top-left and bottom-right corners), the layout scheme of the LDM
layout-to-image model, padded with ``<pad>`` to a fixed length. The vocabulary is a text file shipped
with the weights' preset: one token a line, in id order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

PAD, UNK = "<pad>", "<unk>"
_WORD = re.compile(r"[a-z]+|,")

Box = tuple[str, float, float, float, float]  # (label, x0, y0, x1, y1), normalised


@dataclass(frozen=True)
class WordLayoutTokenizer:
    tokens: tuple[str, ...]
    caption_tokens: int
    max_objects: int
    grid: int

    @classmethod
    def from_file(cls, path: str | Path, caption_tokens: int, max_objects: int, grid: int) -> "WordLayoutTokenizer":
        tokens = tuple(line.strip() for line in Path(path).read_text().splitlines() if line.strip())
        return cls(tokens, caption_tokens, max_objects, grid)

    def __post_init__(self):
        ids = {t: i for i, t in enumerate(self.tokens)}
        object.__setattr__(self, "_ids", ids)
        missing = [t for t in (PAD, UNK) if t not in ids] + [
            f"<grid:{i}>" for i in range(self.grid * self.grid) if f"<grid:{i}>" not in ids
        ]
        if missing:
            raise ValueError(f"tokenizer vocabulary lacks {', '.join(missing[:5])}")

    @property
    def length(self) -> int:
        return self.caption_tokens + 3 * self.max_objects

    @property
    def classes(self) -> list[str]:
        return [t[len("<class:") : -1] for t in self.tokens if t.startswith("<class:")]

    def id(self, token: str) -> int:
        return self._ids.get(token, self._ids[UNK])

    def caption_ids(self, caption: str) -> list[int]:
        return [self.id(w) for w in _WORD.findall(caption.lower())][: self.caption_tokens]

    def grid_token(self, x: float, y: float) -> int:
        g = self.grid - 1
        cell = round(min(max(y, 0.0), 1.0) * g) * self.grid + round(min(max(x, 0.0), 1.0) * g)
        return self._ids[f"<grid:{cell}>"]

    def layout_ids(self, boxes: Sequence[Box]) -> list[int]:
        if len(boxes) > self.max_objects:
            raise ValueError(f"{len(boxes)} boxes given; this model takes at most {self.max_objects}")
        ids = []
        for label, x0, y0, x1, y1 in boxes:
            token = f"<class:{label.strip().lower()}>"
            if token not in self._ids:
                raise ValueError(f"box label {label!r} is not a class this model knows; known: {', '.join(self.classes)}")
            ids += [self._ids[token], self.grid_token(x0, y0), self.grid_token(x1, y1)]
        return ids

    def encode(self, caption: str, boxes: Sequence[Box] | None = None) -> list[int]:
        caption_part = self.caption_ids(caption)
        caption_part += [self._ids[PAD]] * (self.caption_tokens - len(caption_part))
        layout_part = self.layout_ids(boxes or [])
        layout_part += [self._ids[PAD]] * (3 * self.max_objects - len(layout_part))
        return caption_part + layout_part

    def encode_batch(self, captions: Sequence[str], layouts: Sequence[Sequence[Box] | None] | None = None) -> torch.Tensor:
        layouts = layouts if layouts is not None else [None] * len(captions)
        return torch.tensor([self.encode(c, b) for c, b in zip(captions, layouts, strict=True)], dtype=torch.long)

