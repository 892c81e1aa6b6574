"""The checkpoints (files and diffusers folders) in a set of folders, each with its detected family
(which tasks serve it is the tasks' own answer: ``ldm.tasks.registry``).

Listing reads only key names and shapes (a safetensors header, or a pickle through the safe
loader), never builds a model: a folder of large checkpoints lists in well under a second each.
A file that cannot be read or matches no family is listed with the reason, so a user sees why
their file is not offered.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ldm.checkpoints.detect import detect_file
from ldm.checkpoints.diffusers_folder import MODEL_INDEX, is_diffusers_folder
from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.presets import ModelPreset, list_presets

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class CatalogEntry:
    path: Path
    preset: ModelPreset | None  # None when the file could not be recognised
    problem: str = ""  # why, when preset is None
    notice: str = ""  # what detection assumed, when the file does not say (e.g. SD 2.x v or eps)

    @property
    def name(self) -> str:
        return self.path.name if self.path.is_dir() else self.path.stem

    def label(self) -> str:
        """What a model menu shows: the file's name and its family."""
        if self.preset is None:
            return f"{self.name} (not usable: {self.problem})"
        return f"{self.name} [{self.preset.family}]"


def checkpoint_files(folders: Iterable[str | Path]) -> list[Path]:
    """Checkpoint files and diffusers folders under the folders (recursively), sorted, each once; missing
    folders are skipped. A diffusers folder (one with model_index.json) is one entry, and the weights
    files inside it are not listed on their own."""
    found: dict[Path, None] = {}
    for folder in folders:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            continue
        pipelines = {index.parent for index in folder.rglob(MODEL_INDEX) if is_diffusers_folder(index.parent)}
        for path in sorted([*folder.rglob("*"), folder]):
            if path in pipelines:
                found[path.resolve()] = None
            elif (path.suffix.lower() in CHECKPOINT_SUFFIXES and path.is_file() and not path.name.startswith(".")
                  and not any(p in pipelines for p in path.parents)):
                found[path.resolve()] = None
    return list(found)


def identify(path: Path, presets: list[ModelPreset]) -> CatalogEntry:
    try:
        detection = detect_file(path, presets)
        return CatalogEntry(path, detection.preset, notice=detection.notice)
    except CheckpointError as error:
        reason = str(error).removeprefix(f"{path}: ").split(". ")[0]
        log.info("%s is not offered: %s", path, error)
        return CatalogEntry(path, None, reason)


def scan(folders: Iterable[str | Path], presets: list[ModelPreset] | None = None) -> list[CatalogEntry]:
    presets = list_presets() if presets is None else presets
    return [identify(path, presets) for path in checkpoint_files(folders)]
