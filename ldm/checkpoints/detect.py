"""Detect a checkpoint's family from its key names and tensor shapes against the preset registry.

Each preset lists a few keys with their shapes (its ``detect`` section). A file matches a preset when
it has every one of those keys with exactly those shapes, and when the prediction type that its
metadata states (if any) is one the preset admits (``detect_prediction``). Exactly one preset must
match; "no match" is checked before the result is used and reports the closest preset and what differs.

Some families share every tensor shape and differ only in what the network predicts (SD 2.x eps
and v). Weights are never inspected to guess which; the only evidence read is what the file says
of itself in Stability's ModelSpec metadata (a safetensors header): ``modelspec.prediction_type``
("epsilon" or "v"), else ``modelspec.architecture`` where the id implies it. A file that states
nothing goes to the one preset that admits "unstated", and the detection carries a notice naming
the other presets, so the choice is never silent. (A pickle's ``global_step``, from which diffusers
guesses, is not used: a step count identifies a training run, not what the network predicts.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.io import read_key_shapes_and_metadata
from ldm.checkpoints.presets import UNSTATED, ModelPreset

Shapes = Mapping[str, tuple[int, ...]]
Metadata = Mapping[str, object]

PREDICTION_KEY = "modelspec.prediction_type"
ARCHITECTURE_KEY = "modelspec.architecture"
MODELSPEC_PREDICTIONS = {"epsilon": "eps", "v": "v"}
# ModelSpec architecture ids that imply a prediction type (its listing names both SD 2.x kinds).
MODELSPEC_ARCHITECTURES = {"stable-diffusion-v2-512": "eps", "stable-diffusion-v2-768-v": "v"}


class Detection(NamedTuple):
    preset: ModelPreset
    notice: str  # empty unless the choice rests on a default the user should know about


def stated_prediction(metadata: Metadata | None) -> str:
    """What a file says it predicts: "eps", "v", another word as the file writes it, or "unstated".
    ``modelspec.prediction_type`` wins over an architecture id that implies one."""
    metadata = metadata or {}
    value = metadata.get(PREDICTION_KEY)
    if isinstance(value, str) and value:
        return MODELSPEC_PREDICTIONS.get(value, value)
    return MODELSPEC_ARCHITECTURES.get(str(metadata.get(ARCHITECTURE_KEY, "")), UNSTATED)


def admitted_predictions(preset: ModelPreset) -> tuple[str, ...]:
    return preset.detect_prediction or (preset.model.parameterization, UNSTATED)


def shape_mismatches(preset: ModelPreset, shapes: Shapes) -> list[str]:
    problems = []
    for key, shape in preset.detect.items():
        if key not in shapes:
            problems.append(f"no key {key}")
        elif tuple(shapes[key]) != shape:
            problems.append(f"{key} has shape {list(shapes[key])}, expected {list(shape)}")
    return problems


def mismatches(preset: ModelPreset, shapes: Shapes, metadata: Metadata | None = None) -> list[str]:
    """What keeps a file (``shapes`` and ``metadata``) from matching ``preset``; empty when it matches."""
    problems = shape_mismatches(preset, shapes)
    stated, admitted = stated_prediction(metadata), admitted_predictions(preset)
    if stated not in admitted:
        if stated == UNSTATED:
            problems.append(f"its metadata does not state the prediction type, and {preset.name} is only "
                            f"detected from a stated {' or '.join(admitted)}")
        else:
            problems.append(f"its metadata states prediction type {stated!r}; {preset.name} takes "
                            f"{' or '.join(p for p in admitted if p != UNSTATED)}")
    return problems


def matching_presets(shapes: Shapes, presets: Iterable[ModelPreset], metadata: Metadata | None = None) -> list[ModelPreset]:
    return [p for p in presets if p.detect and not mismatches(p, shapes, metadata)]


def detect(shapes: Shapes, presets: Iterable[ModelPreset], source: str | Path, metadata: Metadata | None = None) -> Detection:
    """The one preset that matches a file, with a notice when the file's tensors fit others too."""
    presets = list(presets)
    found = matching_presets(shapes, presets, metadata)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise CheckpointError(f"{source}: the file matches several model families ({names}); name one with --preset")
    if found:
        return Detection(found[0], _shared_shapes_notice(found[0], shapes, presets, metadata, source))
    candidates = [p for p in presets if p.detect]
    if not candidates:
        raise CheckpointError(f"{source}: no model presets with detection rules are installed")
    closest = min(candidates, key=lambda p: len(mismatches(p, shapes, metadata)))
    shown = "; ".join(mismatches(closest, shapes, metadata)[:3])
    known = ", ".join(p.name for p in candidates)
    raise CheckpointError(
        f"{source}: unknown model layout ({len(shapes)} tensors). It matches none of the known families "
        f"({known}). Closest is {closest.name}: {shown}. If you know its architecture, pass --preset NAME_OR_YAML."
    )


def _shared_shapes_notice(chosen: ModelPreset, shapes: Shapes, presets: list[ModelPreset], metadata, source) -> str:
    if stated_prediction(metadata) != UNSTATED:
        return ""
    others = [p for p in presets if p is not chosen and p.detect and not shape_mismatches(p, shapes)]
    if not others:
        return ""
    alternatives = "; ".join(f"for {p.family} pass --preset {p.name}" for p in others)
    return (
        f"{source}: the file does not say what its network predicts, and its tensors fit several presets; "
        f"using {chosen.name} ({chosen.model.parameterization} prediction, {chosen.family}). "
        f"If images come out as noise or flat colour, it is another kind: {alternatives}."
    )


def detect_preset(
    shapes: Shapes, presets: Iterable[ModelPreset], source: str | Path, metadata: Metadata | None = None
) -> ModelPreset:
    """The preset alone; callers that show the user what detection assumed use ``detect``."""
    return detect(shapes, presets, source, metadata).preset


def detect_file(path: str | Path, presets: Iterable[ModelPreset]) -> Detection:
    """Detect a checkpoint file's family from its keys, shapes and metadata (read once)."""
    shapes, metadata = read_key_shapes_and_metadata(path)
    return detect(shapes, presets, path, metadata)
