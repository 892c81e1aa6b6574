"""Detect a checkpoint's family from its key names and tensor shapes against the preset registry.

Each preset lists a few keys with their shapes (its ``detect`` section). A file matches a preset when
it has every one of those keys with exactly those shapes. Exactly one preset must match; "no match"
is checked before the result is used and reports the closest preset and what differs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.presets import ModelPreset

Shapes = Mapping[str, tuple[int, ...]]


def mismatches(preset: ModelPreset, shapes: Shapes) -> list[str]:
    """What keeps ``shapes`` from matching ``preset``; empty when it matches."""
    problems = []
    for key, shape in preset.detect.items():
        if key not in shapes:
            problems.append(f"no key {key}")
        elif tuple(shapes[key]) != shape:
            problems.append(f"{key} has shape {list(shapes[key])}, expected {list(shape)}")
    return problems


def matching_presets(shapes: Shapes, presets: Iterable[ModelPreset]) -> list[ModelPreset]:
    return [p for p in presets if p.detect and not mismatches(p, shapes)]


def detect_preset(shapes: Shapes, presets: Iterable[ModelPreset], source: str | Path) -> ModelPreset:
    presets = list(presets)
    found = matching_presets(shapes, presets)
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise CheckpointError(f"{source}: the file matches several model families ({names}); name one with --preset")
    candidates = [p for p in presets if p.detect]
    if not candidates:
        raise CheckpointError(f"{source}: no model presets with detection rules are installed")
    closest = min(candidates, key=lambda p: len(mismatches(p, shapes)))
    shown = "; ".join(mismatches(closest, shapes)[:3])
    known = ", ".join(p.name for p in candidates)
    raise CheckpointError(
        f"{source}: unknown model layout ({len(shapes)} tensors). It matches none of the known families "
        f"({known}). Closest is {closest.name}: {shown}. If you know its architecture, pass --preset NAME_OR_YAML."
    )
