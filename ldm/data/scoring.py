"""Scores for generated scenes: does an image show what its caption asked for, where it asked?

Every object a scene names is paired with at most one detection of the same colour and shape
(``match_objects``, nearest first). The caption holds when each pairing lies in the object's grid
cell (``caption_score``, ``caption_adherence``); the layout score is the mean IoU between each
requested box and its pairing's box, zero for an object with none (``layout_iou``). Detections the
scene does not name are not penalised. ``psnr`` compares two images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ldm.data.detector import Detection
from ldm.data.world import Scene, SceneObject

Box = tuple[float, float, float, float]


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes; 0 when the union is empty."""
    for name, box in (("a", a), ("b", b)):
        if box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"box {name} must be (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1, got {box}")
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0


def match_objects(
    objects: Sequence[SceneObject], detections: Sequence[Detection]
) -> list[tuple[SceneObject, Detection | None]]:
    """Each object, in order, with a distinct detection of its colour and shape or None.

    Greedy by distance: of all (object, detection) pairs that agree on colour and shape, the
    closest pair of centres is joined first, then the closest of those left, and so on.
    """
    candidates = sorted(
        (math.dist((obj.cx, obj.cy), det.centre), i, j)
        for i, obj in enumerate(objects)
        for j, det in enumerate(detections)
        if (det.colour, det.shape) == (obj.colour, obj.shape)
    )
    chosen: dict[int, int] = {}
    for _, i, j in candidates:
        if i not in chosen and j not in chosen.values():
            chosen[i] = j
    return [(obj, detections[chosen[i]] if i in chosen else None) for i, obj in enumerate(objects)]


@dataclass(frozen=True)
class CaptionScore:
    all_correct: bool  # every object named was found, in its place
    objects_found: int  # objects matched by a detection of their colour and shape in their grid cell
    objects: int

    @property
    def fraction(self) -> float:
        return self.objects_found / self.objects if self.objects else 1.0


def caption_score(scene: Scene, detections: Sequence[Detection]) -> CaptionScore:
    """How many of the scene's objects the detections show, with the right colour, shape and place.

    A detection is in the right place when its centre lies in the object's grid cell, which is
    what its ``position`` word says.
    """
    found = sum(
        1 for obj, det in match_objects(scene.objects, detections) if det is not None and det.position == obj.position
    )
    return CaptionScore(all_correct=found == len(scene.objects), objects_found=found, objects=len(scene.objects))


def coloured_in_place(scene: Scene, detections: Sequence[Detection]) -> int:
    """How many of the scene's objects have a detection of their colour (any shape) in their grid
    cell: a partial measure that moves long before whole captions hold."""
    return sum(any(d.colour == o.colour and d.position == o.position for d in detections) for o in scene.objects)


def caption_adherence(scene: Scene, detections: Sequence[Detection]) -> bool:
    """Whether every object the scene names is shown, with the right colour, shape and place."""
    return caption_score(scene, detections).all_correct


def layout_iou(scene: Scene, detections: Sequence[Detection]) -> float:
    """Mean over the scene's objects of the IoU between the requested box and the matched
    detection's box (0 for an object without a match)."""
    if not scene.objects:
        raise ValueError("layout_iou needs a scene with at least one object; this one has none")
    pairs = match_objects(scene.objects, detections)
    return sum(box_iou(obj.box, det.box) if det is not None else 0.0 for obj, det in pairs) / len(pairs)


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB of two images of one shape: uint8 arrays (peak 255) or
    float arrays in [0, 1] (peak 1), in any mix. Identical images give ``math.inf``."""
    x, y = _unit_range(a, "a"), _unit_range(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"psnr needs images of one shape, got {x.shape} and {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def _unit_range(image, name: str) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float64)
    raise ValueError(f"psnr image {name} must be uint8 or float in [0, 1], got dtype {array.dtype}")
