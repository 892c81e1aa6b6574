"""Detect a checkpoint's family from its key names and tensor shapes against the preset registry.

Each preset lists a few keys with their shapes (its ``detect`` section). A file matches a preset when
it has every one of those keys with exactly those shapes, and when the prediction type that the file
states (if any) is one the preset admits (``detect_prediction``). Exactly one preset must match;
"no match" is checked before the result is used and reports the closest preset and what differs.

Some families share every tensor shape and differ only in what the network predicts (SD 2.x eps
and v). Weights are never inspected to guess which; the evidence read is, in this order:

1. an original LDM config beside the checkpoint with the same name (``model.yaml`` next to
   ``model.safetensors``, AUTOMATIC1111's convention): its ``model.params.parameterization``, "eps"
   when absent as in the original defaults;
2. Stability's ModelSpec metadata in a safetensors header: ``modelspec.prediction_type``
   ("epsilon" or "v"), else ``modelspec.architecture`` where the id implies it.

A diffusers folder is detected from its tensors under the original keys (ldm.checkpoints.diffusers_folder),
and states its prediction type in ``scheduler/scheduler_config.json`` (``prediction_type`` epsilon or
v_prediction).

A file that states nothing goes to the one preset that admits "unstated", and the detection carries
a notice naming the other presets, so the choice is never silent. (A pickle's ``global_step``, from
which diffusers guesses, is not used: a step count identifies a training run, not a prediction type.)

Presets that differ only in the size they were trained at (LDM's semantic synthesis 256 and 512) are
one detected preset and its ``variant_of`` presets: an original config beside the file picks one by
its ``image_size``; a file without one gets the detected preset and a notice naming the variants.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.checkpoints.diffusers_folder import open_folder, read_folder_shapes
from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.io import read_key_shapes_and_metadata
from ldm.checkpoints.presets import UNSTATED, ModelPreset

log = logging.getLogger(__name__)

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


def config_beside(path: str | Path) -> Path:
    """Where an original config for a checkpoint sits: beside it, with the same name and ``.yaml``."""
    return Path(path).with_suffix(".yaml")


def original_params(config: Path) -> dict | None:
    """``model.params`` of an original LDM config; None for a YAML that is not one (a preset of ours, say)."""
    try:
        raw = OmegaConf.to_container(OmegaConf.load(config), resolve=False)
    except (OSError, OmegaConfBaseException) as error:
        raise CheckpointError(f"{config}: cannot read the config beside the checkpoint: {error}") from None
    model = raw.get("model") if isinstance(raw, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    if not isinstance(params, dict):
        log.debug("%s is not an original LDM config (no model.params); detection ignores it", config)
        return None
    return params


def config_prediction(config: Path) -> str | None:
    """The parameterization an original LDM config gives (``model.params.parameterization``, default
    "eps"); None for a YAML that is not an original config."""
    params = original_params(config)
    return None if params is None else str(params.get("parameterization", "eps"))


def file_prediction(path: str | Path, metadata: Metadata | None) -> str:
    """What a checkpoint states it predicts: an original config beside it, else its own metadata."""
    config = config_beside(path)
    stated = config_prediction(config) if config.is_file() else None
    return stated_prediction(metadata) if stated is None else stated


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


def mismatches(preset: ModelPreset, shapes: Shapes, stated: str = UNSTATED) -> list[str]:
    """What keeps a file (its ``shapes`` and the prediction type it ``stated``) from matching ``preset``;
    empty when it matches."""
    problems = shape_mismatches(preset, shapes)
    admitted = admitted_predictions(preset)
    if stated not in admitted:
        if stated == UNSTATED:
            problems.append(f"the file does not state its prediction type, and {preset.name} is only "
                            f"detected from a stated {' or '.join(admitted)}")
        else:
            problems.append(f"the file states prediction type {stated!r}; {preset.name} takes "
                            f"{' or '.join(p for p in admitted if p != UNSTATED)}")
    return problems


def distance(preset: ModelPreset, shapes: Shapes, stated: str) -> tuple[int, int]:
    """How far a file is from matching ``preset``, for naming the closest: tensors first, so that a
    preset whose tensors all fit comes first and the message says what the file states instead."""
    return len(shape_mismatches(preset, shapes)), len(mismatches(preset, shapes, stated))


def matching_presets(shapes: Shapes, presets: Iterable[ModelPreset], stated: str = UNSTATED) -> list[ModelPreset]:
    return [p for p in presets if p.detect and not mismatches(p, shapes, stated)]


def detect(shapes: Shapes, presets: Iterable[ModelPreset], source: str | Path, stated: str = UNSTATED) -> Detection:
    """The one preset that matches a file, with a notice when the file's tensors fit others too."""
    presets = list(presets)
    found = matching_presets(shapes, presets, stated)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise CheckpointError(f"{source}: the file matches several model families ({names}); name one with --preset")
    if found:
        variants = [p for p in presets if p.variant_of == found[0].name]
        if variants:
            return _variant_detection(found[0], variants, source)
        return Detection(found[0], _shared_shapes_notice(found[0], shapes, presets, stated, source))
    candidates = [p for p in presets if p.detect]
    if not candidates:
        raise CheckpointError(f"{source}: no model presets with detection rules are installed")
    closest = min(candidates, key=lambda p: distance(p, shapes, stated))
    shown = "; ".join(mismatches(closest, shapes, stated)[:3])
    known = ", ".join(p.name for p in candidates)
    raise CheckpointError(
        f"{source}: unknown model layout ({len(shapes)} tensors). It matches none of the known families "
        f"({known}). Closest is {closest.name}: {shown}. If you know its architecture, pass --preset NAME_OR_YAML."
    )


def _shared_shapes_notice(chosen: ModelPreset, shapes: Shapes, presets: list[ModelPreset], stated: str, source) -> str:
    if stated != UNSTATED:
        return ""
    others = [p for p in presets if p is not chosen and p.detect and not shape_mismatches(p, shapes)]
    if not others:
        return ""
    alternatives = "; ".join(f"for {p.family} pass --preset {p.name}" for p in others)
    return (
        f"{source}: the file does not say what its network predicts, and its tensors fit several presets; "
        f"using {chosen.name} ({chosen.model.parameterization} prediction, {chosen.family}). "
        f"If images come out as noise or flat colour, it is another kind: {alternatives}, "
        f"or {_how_to_state(source)}."
    )


def _how_to_state(source) -> str:
    if Path(source).is_dir():
        return "set prediction_type (epsilon or v_prediction) in its scheduler/scheduler_config.json"
    return f"put its original config beside it as {config_beside(source).name}"


def config_latent_size(config: Path) -> int | None:
    """The latent side an original LDM config trained at (``model.params.image_size``, else its
    UNet's); None for a YAML that is not an original config or gives none."""
    params = original_params(config)
    if params is None:
        return None
    unet = params.get("unet_config")
    unet_params = unet.get("params") if isinstance(unet, dict) else None
    size = params.get("image_size", unet_params.get("image_size") if isinstance(unet_params, dict) else None)
    return size if isinstance(size, int) else None


def _variant_detection(chosen: ModelPreset, variants: list[ModelPreset], source) -> Detection:
    """Presets whose files hold the same tensors and differ in training size (``variant_of``): the
    original config beside the file decides by its image_size; without one, ``chosen`` with a notice."""
    config = config_beside(source)
    size = config_latent_size(config) if config.is_file() else None
    if size is not None:
        for preset in (chosen, *variants):
            if preset.model.latent_size == size:
                return Detection(preset, "")
        log.debug("%s gives image_size %s, which no variant of %s has", config, size, chosen.name)
    alternatives = "; ".join(f"for {p.family} pass --preset {p.name}" for p in variants)
    return Detection(chosen, (
        f"{source}: files of {chosen.family} and of its variants hold the same tensors, and this one does not say "
        f"which it is; using {chosen.name} (trained at latent size {chosen.model.latent_size}). "
        f"{alternatives[0].upper()}{alternatives[1:]}, or put its original config beside it as {config_beside(source).name}."
    ))


def detect_preset(shapes: Shapes, presets: Iterable[ModelPreset], source: str | Path, stated: str = UNSTATED) -> ModelPreset:
    """The preset alone; callers that show the user what detection assumed use ``detect``."""
    return detect(shapes, presets, source, stated).preset


def detect_file(path: str | Path, presets: Iterable[ModelPreset]) -> Detection:
    """Detect a checkpoint file's family from its keys, shapes, metadata (read once) and any config beside it;
    a diffusers folder's from its tensors under the original keys and the prediction type its scheduler states."""
    if Path(path).is_dir():
        return detect(read_folder_shapes(path), presets, path, open_folder(path).prediction)
    shapes, metadata = read_key_shapes_and_metadata(path)
    return detect(shapes, presets, path, file_prediction(path, metadata))
