"""Generation requests: every user-facing parameter validated up front, with messages that teach."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

MAX_STEPS = 1000
MAX_SIDE = 4096
MAX_BATCH = 16
MAX_SCALE = 50.0
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 50
    scale: float = 7.5
    eta: float = 0.0
    seed: int = -1  # -1: a random seed, chosen when the request is resolved
    width: int = 512
    height: int = 512
    batch_size: int = 1
    boxes: tuple = ()  # layout: (label, x0, y0, x1, y1) with coordinates normalised to [0, 1]


def _number(name: str, value, low: float, high: float, integer: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if integer and value != int(value):
        raise ValueError(f"{name} must be a whole number, got {value}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low:g} and {high:g}, got {value:g}")


def check_box(index: int, box) -> tuple[str, float, float, float, float]:
    """A layout box (label, x0, y0, x1, y1), corners normalised to [0, 1], x0 < x1 and y0 < y1."""
    name = f"box {index + 1}"
    if not isinstance(box, (tuple, list)) or len(box) != 5 or not isinstance(box[0], str) or not box[0].strip():
        raise ValueError(f"{name} must be (label, x0, y0, x1, y1) with a non-empty label, got {box!r}")
    for axis, value in zip(("x0", "y0", "x1", "y1"), box[1:]):
        _number(f"{name} {axis}", value, 0.0, 1.0)
    label, x0, y0, x1, y1 = box
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"{name} ({label}) has no area: it needs x0 < x1 and y0 < y1, got ({x0}, {y0}, {x1}, {y1})")
    return (label.strip(), float(x0), float(y0), float(x1), float(y1))


def round_side(name: str, value: int, multiple: int, notices: list[str]) -> int:
    _number(name, value, 1, MAX_SIDE, integer=True)
    rounded = max(multiple, int(round(value / multiple)) * multiple)
    if rounded != value:
        notices.append(f"{name} {value} is not a multiple of {multiple}; using {rounded}")
    return rounded


def resolve_request(request: GenerationRequest, size_multiple: int) -> tuple[GenerationRequest, list[str]]:
    """Check every field and return the request as it will run (sides rounded, seed chosen),
    with notices for what was changed. Raises ValueError naming the field, value and range."""
    if not isinstance(request.prompt, str) or not isinstance(request.negative_prompt, str):
        raise ValueError("prompt and negative prompt must be text")
    _number("steps", request.steps, 1, MAX_STEPS, integer=True)
    _number("guidance scale", request.scale, 0.0, MAX_SCALE)
    _number("eta", request.eta, 0.0, 1.0)
    _number("batch size", request.batch_size, 1, MAX_BATCH, integer=True)
    _number("seed", request.seed, -1, MAX_SEED, integer=True)
    boxes = tuple(check_box(i, b) for i, b in enumerate(request.boxes))
    notices: list[str] = []
    width = round_side("width", request.width, size_multiple, notices)
    height = round_side("height", request.height, size_multiple, notices)
    seed = random.randrange(MAX_SEED) if request.seed == -1 else int(request.seed)
    resolved = replace(
        request, steps=int(request.steps), width=width, height=height, seed=seed, batch_size=int(request.batch_size),
        boxes=boxes,
    )
    return resolved, notices
