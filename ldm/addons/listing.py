"""The add-ons in the folders, listed cheaply: what the studio's Add-ons list shows.

An entry says what a file is without mapping it onto a model: its name (the file's stem, as a prompt
names it), kind (``lora``; ``embedding`` for textual inversions), the family it was made for, its
rank, its size and where it is. Only a safetensors header is read (a pickle through the safe loader's
meta-device load, which reads no tensor data of a zip file). A file that cannot be read is listed
with its problem; it never breaks the list.

The family comes from kohya's metadata (``ss_base_model_version``, ``ss_v2``), else from the widths
of the tensors: a text-encoder change 768 wide is SD 1's CLIP, 1024 SD 2's OpenCLIP; without
text-encoder changes, the width of a cross-attention key (the text's width) tells the same; SDXL's
two text encoders (``lora_te1_``/``lora_te2_``) name SDXL.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ldm.addons.embeddings import list_embeddings
from ldm.addons.library import lora_files
from ldm.addons.lora import PEFT_NAMES, SDXL_PREFIXES, stated_family
from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.io import open_state_dict, read_key_shapes_and_metadata
from ldm.models.clip import CLIPTextEncoderConfig, OpenCLIPTextEncoderConfig
from ldm.models.sdxl_conditioner import SDXLConditionerConfig

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
# lora.py's family ids -> the short names a list shows
FAMILY_NAMES = {"sd_v1": "SD 1", "sd_v2": "SD 2", "sdxl": "SDXL"}
TEXT_WIDTHS = {768: "SD 1", 1024: "SD 2", 2048: "SDXL"}
TEXT_KEYS = ("lora_te_", "text_encoder.")
# the tensors whose first dimension is the rank: kohya's down, PEFT's A, LoHa's and factored LoKr's b
RANK_SUFFIXES = ("lora_down.weight", "lora_A.weight", "hada_w1_b", "hada_w2_b", "lokr_w1_b", "lokr_w2_b")
KIND_NAMES = {"hada_": "LoHa", "lokr_": "LoKr"}


@dataclass(frozen=True)
class AddonEntry:
    """One file of an add-on folder, as a list shows it."""

    kind: str  # "lora" or "embedding"
    name: str  # the file's stem: what a prompt names
    path: Path
    size: int  # bytes
    family: str = UNKNOWN  # "SD 1", "SD 2", "SDXL" or "unknown"
    rank: int | None = None  # None: not stated by its shapes (a full LoKr, an embedding, an unreadable file)
    types: tuple[str, ...] = ()  # "LoRA", "LoCon", "LoHa", "LoKr"
    problem: str | None = None  # why the file could not be read; the entry is still listed
    vectors: int | None = None  # an embedding's: the prompt positions it takes

    @property
    def prompt_text(self) -> str:
        """What a prompt takes to use it: ``<lora:NAME:1>``, or an embedding's name."""
        return f"<lora:{self.name}:1>" if self.kind == "lora" else self.name

    @property
    def size_mb(self) -> float:
        return round(self.size / 1e6, 1)


def list_loras(folders: Iterable[str | Path]) -> list[AddonEntry]:
    """Every LoRA file of ``folders`` (the first folder that holds a name wins, as when a tag is looked
    up), sorted by name, each read from its header only."""
    files = lora_files(folders)
    return [lora_entry(name, files[name]) for name in sorted(files, key=str.lower)]


def list_embedding_entries(folders: Iterable[str | Path]) -> list[AddonEntry]:
    """Every textual-inversion embedding of ``folders`` (``ldm.addons.embeddings.list_embeddings``: read once
    per file version), as list entries of kind "embedding"."""
    return [AddonEntry("embedding", e.name, e.path, e.size, e.family or UNKNOWN, problem=e.problem,
                       vectors=e.vectors or None) for e in list_embeddings(folders)]


def lora_entry(name: str, path: Path) -> AddonEntry:
    try:
        size = path.stat().st_size
        shapes, metadata = _shapes_and_metadata(path)
    except (CheckpointError, OSError) as error:
        log.info("listing %s: %s", path, error)
        return AddonEntry("lora", name, path, _size(path), problem=_problem(path, error))
    types = lora_types(shapes)
    if not types:
        return AddonEntry("lora", name, path, size, problem="holds no LoRA tensors (lora_down/lora_up, lora_A/lora_B, "
                                                            "hada_*, lokr_*): is it a checkpoint or an embedding?")
    return AddonEntry("lora", name, path, size, lora_family(shapes, metadata), lora_rank(shapes), types)


def _shapes_and_metadata(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, object]]:
    if path.suffix.lower() == ".safetensors":
        return read_key_shapes_and_metadata(path)
    return open_state_dict(path).shapes, {}  # a pickle's own metadata would need its tensors read


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _problem(path: Path, error: Exception) -> str:
    """The error's message without the path it starts with (the list names the file)."""
    text = str(error)
    for prefix in (f"{path}: ", f"{path.name}: "):
        text = text.removeprefix(prefix)
    return text or type(error).__name__


def lora_family(shapes: dict[str, tuple[int, ...]], metadata: dict[str, object]) -> str:
    """"SD 1", "SD 2" or "SDXL" from the metadata, else from the text widths; "unknown" otherwise."""
    stated = stated_family(metadata)
    if stated is not None:
        return FAMILY_NAMES[stated]
    if any(key.startswith(SDXL_PREFIXES) for key in shapes):
        return "SDXL"
    text = [shape[1] for key, shape in shapes.items() if key.startswith(TEXT_KEYS) and _is_down(key) and len(shape) == 2]
    if not text:  # the key (or value) projection of cross-attention reads the text
        text = [shape[1] for key, shape in shapes.items()
                if _is_down(key) and ("attn2_to_k" in key or "attn2.to_k" in key) and len(shape) == 2]
    widths = {TEXT_WIDTHS.get(width) for width in text}
    return widths.pop() if len(widths) == 1 and None not in widths else UNKNOWN


def _is_down(key: str) -> bool:
    return key.endswith(("lora_down.weight", "lora_A.weight"))


def lora_rank(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The largest rank of the file's modules, from the first dimension of their down factors."""
    ranks = [shape[0] for key, shape in shapes.items() if key.endswith(RANK_SUFFIXES) and shape]
    return max(ranks) if ranks else None


def lora_types(shapes: dict[str, tuple[int, ...]]) -> tuple[str, ...]:
    """"LoRA" (linear layers and 1x1 convs), "LoCon" (a kernel of its own: 3x3 convs, or a CP mid), "LoHa", "LoKr"."""
    found = set()
    for key, shape in shapes.items():
        suffix = key.rsplit(".", 2)[-2:] if key.endswith(".weight") else key.rsplit(".", 1)[-1:]
        suffix = ".".join(suffix)
        if suffix in ("lora_down.weight", *PEFT_NAMES):
            found.add("LoCon" if len(shape) == 4 and tuple(shape[2:]) != (1, 1) else "LoRA")
        elif suffix == "lora_mid.weight":
            found.add("LoCon")
        else:
            found.update(name for prefix, name in KIND_NAMES.items() if suffix.startswith(prefix))
    if "LoCon" in found:
        found.discard("LoRA")
    return tuple(sorted(found))


def model_family_name(config) -> str | None:
    """The family a model of ``config`` (a ``LatentDiffusionConfig``) takes LoRAs of: "SD 1" for a CLIP text
    encoder, "SD 2" for OpenCLIP, "SDXL" for SDXL's two; None for the models LoRA files are not made for."""
    cond = getattr(config, "cond_stage", None)
    if isinstance(cond, SDXLConditionerConfig):
        return "SDXL"
    if isinstance(cond, CLIPTextEncoderConfig):
        return "SD 1"
    if isinstance(cond, OpenCLIPTextEncoderConfig):
        return "SD 2"
    return None


def fits(entry: AddonEntry, family: str | None) -> bool | None:
    """Whether the entry was made for a model of ``family``; None where either is not known."""
    if family is None or entry.family == UNKNOWN:
        return None
    return entry.family == family


def matches(entry: AddonEntry, text: str) -> bool:
    """Whether a search (a name's substring, any case) keeps the entry."""
    return text.strip().lower() in entry.name.lower()


__all__ = ["AddonEntry", "FAMILY_NAMES", "UNKNOWN", "fits", "list_loras", "lora_entry", "lora_family", "lora_rank",
           "lora_types", "matches", "model_family_name"]
