"""Where add-on files live (LoRA here, textual-inversion embeddings in ``ldm.addons.embeddings``), and
the LoRAs a request's prompts name.

The LoRA folders are ``--lora-dir DIR`` (repeatable) and, by default, ``models/Lora`` as AUTOMATIC1111
lays it out: beside each models folder (``models/Stable-diffusion/x.safetensors`` ->
``models/Lora``) and under the project root. A LoRA is named by its file's stem; the first folder
that holds a name wins.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ldm.addons.lora import LORA_SUFFIXES, Applied, lora_hash, read_lora
from ldm.checkpoints.io import read_metadata
from ldm.addons.tags import TAG, LoraTag, extract_lora_tags

log = logging.getLogger(__name__)

PROJECT_MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
PROJECT_LORA_DIR = PROJECT_MODELS_DIR / "Lora"


def default_addon_dirs(folder: str, model_paths: Iterable[str | Path] = ()) -> list[Path]:
    """``models/<folder>`` of the project, and ``<folder>`` beside the folder of each model path (A1111's
    ``models/Stable-diffusion`` beside ``models/Lora`` and ``models/embeddings``)."""
    found = {PROJECT_MODELS_DIR / folder: None}
    for path in model_paths:
        path = Path(path).expanduser()
        parent = path if path.is_dir() and not (path / "model_index.json").exists() else path.parent
        found[parent.parent / folder] = None
    return list(found)


def addon_files(folders: Iterable[str | Path], suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Each name (file stem) -> its file with one of ``suffixes``, searched recursively, the first folder
    first; hidden files and folders are skipped."""
    found: dict[str, Path] = {}
    for folder in folders:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
            if path.suffix.lower() in suffixes and not hidden and path.is_file():
                found.setdefault(path.stem, path)
    return found


def default_lora_dirs(model_paths: Iterable[str | Path] = ()) -> list[Path]:
    """``models/Lora`` of the project, and the ``Lora`` folder beside the folder of each model path."""
    return default_addon_dirs("Lora", model_paths)


def lora_files(folders: Iterable[str | Path]) -> dict[str, Path]:
    """Each LoRA name (file stem) -> its file, searched recursively, the first folder first."""
    return addon_files(folders, LORA_SUFFIXES)


def find_lora(name: str, folders: list[Path]) -> Path:
    files = lora_files(folders)
    if name in files:
        return files[name]
    where = ", ".join(str(f) for f in folders) or "(no LoRA folder given)"
    known = ", ".join(sorted(files)[:10]) or "none"
    raise ValueError(f"<lora:{name}>: no LoRA named {name!r} in {where}; found: {known}. "
                     "Put the file there or pass --lora-dir DIR")


def named_loras(prompts: Iterable[str]) -> list[str]:
    """The names the prompts' ``<lora:...>`` tags give, once each, in order; a tag whose weights are
    malformed still names its LoRA (for messages, not for applying)."""
    names: dict[str, None] = {}
    for prompt in prompts:
        for match in TAG.finditer(prompt or ""):
            name = match.group(1).split(":")[0].strip()
            if name:
                names.setdefault(name)
    return list(names)


def missing_loras(prompts: Iterable[str], folders: Iterable[str | Path]) -> list[str]:
    """The LoRA names of the prompts' tags that no file of ``folders`` has."""
    files = lora_files(folders)
    return [name for name in named_loras(prompts) if name not in files]


@dataclass(frozen=True)
class PromptLoras:
    """A request's prompts without their tags, and the LoRAs they apply."""

    prompts: list[str]
    applied: list[Applied]


def tags_of(prompts: Iterable[str]) -> tuple[list[str], list[LoraTag]]:
    """The prompts without their tags, and the tags of all (a name given twice: its first tag)."""
    texts, tags = [], {}
    for prompt in prompts:
        tagged = extract_lora_tags(prompt)
        texts.append(tagged.text)
        for tag in tagged.tags:
            tags.setdefault(tag.name, tag)
    return texts, list(tags.values())


def prompt_loras(model, prompts: list[str], folders: list[Path]) -> PromptLoras:
    """Read every LoRA the prompts name, mapped onto ``model``. Raises ValueError (a tag, a missing
    name) or ``LoraError`` (a file that does not fit) before any weight is changed."""
    texts, tags = tags_of(prompts)
    applied = [Applied(read_lora(find_lora(tag.name, folders), model), tag.te, tag.unet) for tag in tags]
    return PromptLoras(texts, applied)


def lora_hashes(prompts: list[str], folders: list[Path]) -> str | None:
    """AUTOMATIC1111's "Lora hashes" value of the LoRAs the prompts' tags name, ``name: 12hex, ...`` (the
    name without ``:`` and ``,``); None when the prompts have no tag. Written after the images are made, so a
    file moved or deleted meanwhile is left out (and logged) rather than failing finished images."""
    _, tags = tags_of(prompts)
    parts = []
    for tag in tags:
        try:
            path = find_lora(tag.name, folders)
            parts.append(f"{tag.name.replace(':', '').replace(',', '')}: {lora_hash(path, read_metadata(path))}")
        except (ValueError, OSError) as error:
            log.warning("Lora hashes: %s left out (%s)", tag.name, error)
    return ", ".join(parts) or None
