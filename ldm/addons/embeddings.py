"""Textual-inversion embeddings: files read and checked, the folders they live in, the ones a model's
text encoder can take, and their hashes.

An embedding is a few learned token vectors, (n_vec, width), used where its name (the file's stem)
appears in a prompt (``ldm.models.clip`` puts them in). The files read are:

    A1111 ``.pt``                 {"string_to_param": {"*": tensor[n, width]}, "name": ..., "step": ...}
    kohya ``.safetensors``/``.pt``  {"emb_params": tensor[n, width]}
    diffusers ``.bin``/``.safetensors``  {"<token>": tensor[width] or tensor[n, width]}
    any other one-tensor dict     that tensor (1-D is one vector)
    SDXL                          {"clip_l": [n, 768], "clip_g": [n, 1280]}: clip_l for the CLIP ViT-L, clip_g for the bigG

``.pt`` and ``.bin`` files are read only through the safe unpickler (``ldm.checkpoints.io``): one
whose pickle would call code is refused, never run. The vectors must be finite, 1 to 75 of them.
An embedding fits a model whose text encoder has its width (SD 1: 768, SD 2: 1024); an SDXL one
fits an SDXL model whose encoders have the widths of its clip_l and clip_g (the refiner, the bigG
alone, takes clip_g). Its vectors go to the model as [clip_l | clip_g] side by side, which the SDXL
conditioner splits by its encoders' widths. Others are skipped with a notice when a prompt names
them (an SD 1/2 embedding on SDXL: it has one encoder's vectors, SDXL needs both). Files are read once per (path, size, mtime).

The folders are ``--embeddings-dir DIR`` (repeatable) and, by default, ``models/embeddings`` beside
each models folder and under the project (AUTOMATIC1111's layout); the first folder with a name wins.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import NamedTuple

import torch

from ldm.addons.library import addon_files, default_addon_dirs
from ldm.addons.tags import extract_lora_tags
from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.io import read_pickle, read_state_dict
from ldm.models.clip import CLIPTextEncoder, OpenCLIPTextEncoder, embedding_names_in
from ldm.models.sdxl_conditioner import SDXLConditioner
from ldm.text.prompt_syntax import prompt_schedule

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
EMBEDDINGS_FOLDER = "embeddings"
MAX_VECTORS = 75  # one chunk: an embedding is never split between chunks
MAX_FILE_BYTES = 16 * 1024 * 1024  # 75 SDXL vectors in fp32 are 0.6 MB; a bigger file is a model or a LoRA
FAMILIES = {768: "SD 1", 1024: "SD 2"}
SDXL = "SDXL"
SDXL_WIDTHS = {"clip_l": 768, "clip_g": 1280}


class EmbeddingError(CheckpointError):
    """An embedding file that cannot be used: the message names the file and why."""


def _fail(path: Path, problem: str, hint: str = "") -> EmbeddingError:
    return EmbeddingError.for_file(path, problem, hint)


@dataclass(frozen=True)
class Embedding:
    """One file's vectors (SDXL: its clip_g vectors), named by the file's stem."""

    name: str
    path: Path
    vectors: torch.Tensor  # (n_vec, width) float32 (SDXL: clip_g's)
    family: str  # "SD 1", "SD 2", "SDXL", or "width N" for a width no model here has
    clip_l: torch.Tensor | None = None  # SDXL: the CLIP ViT-L's vectors (n_vec, 768)

    @property
    def width(self) -> int:
        return self.vectors.shape[1]

    def fits(self, width: int) -> bool:
        return self.family != SDXL and self.width == width


# ---------------------------------------------------------------- reading one file


def read_embedding(path: str | Path) -> Embedding:
    """The embedding in ``path``. Raises ``CheckpointError`` (``EmbeddingError`` for a file that reads but
    holds no usable embedding) naming the file: unsafe, truncated, unknown layout, bad shape, NaN."""
    path = Path(path)
    if path.suffix.lower() not in EMBEDDING_SUFFIXES:
        raise _fail(path, f"has suffix {path.suffix!r}", f"Embeddings are {', '.join(EMBEDDING_SUFFIXES)} files")
    size = path.stat().st_size if path.is_file() else 0
    if size > MAX_FILE_BYTES:
        raise _fail(path, f"is {size / 2**20:.0f} MB, too big for an embedding (at most {MAX_FILE_BYTES // 2**20} MB)",
                    "Is it a model or a LoRA? Those go in their own folders")
    data = read_state_dict(path) if path.suffix.lower() == ".safetensors" else read_pickle(path)
    if not isinstance(data, dict):
        raise _fail(path, f"holds a {type(data).__name__}, not an embedding's dict of tensors")
    if "clip_l" in data and "clip_g" in data:
        clip_l, clip_g = _sdxl_vectors(path, data)
        return Embedding(path.stem, path, clip_g, SDXL, clip_l)
    vectors = _checked(path, _vectors_of(path, data))
    return Embedding(path.stem, path, vectors, FAMILIES.get(vectors.shape[1], f"width {vectors.shape[1]}"))


def _vectors_of(path: Path, data: dict) -> object:
    """The one tensor of an A1111, kohya, diffusers or one-key file."""
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            count = len(params) if isinstance(params, dict) else type(params).__name__
            raise _fail(path, f"has an A1111 'string_to_param' with {count} terms; expected exactly one")
        return next(iter(params.values()))
    if "emb_params" in data:
        return data["emb_params"]
    tensors = [value for value in data.values() if isinstance(value, torch.Tensor)]
    if len(tensors) != 1:
        keys = ", ".join(repr(k) for k in list(data)[:8]) or "none"
        raise _fail(path, f"is not an embedding layout read here (A1111 string_to_param, kohya emb_params, or one "
                    f"tensor; keys: {keys})", "Is it a LoRA or a model? Those go in their own folders")
    return tensors[0]


def _checked(path: Path, tensor: object, what: str = "its vectors") -> torch.Tensor:
    """A finite (n_vec, width) float32 copy of ``tensor``, 1 <= n_vec <= 75; a 1-D tensor is one vector."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise _fail(path, f"{what} are {kind}, not floating-point numbers")
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2:
        raise _fail(path, f"{what} have shape {tuple(tensor.shape)}; expected (vectors, width)")
    count, width = tensor.shape
    if not 1 <= count <= MAX_VECTORS or width == 0:
        raise _fail(path, f"{what} have shape {tuple(tensor.shape)}; expected 1 to {MAX_VECTORS} vectors of a "
                    "non-zero width")
    vectors = tensor.detach().to(torch.float32, copy=True)
    if not torch.isfinite(vectors).all():
        raise _fail(path, f"{what} hold NaN or infinite values", "The training diverged; use an earlier save")
    return vectors


def _sdxl_vectors(path: Path, data: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """An SDXL file's (clip_l, clip_g) vectors, both checked (their widths against the model's, when it is
    known, at fitting)."""
    halves = {key: _checked(path, data[key], f"its {key} vectors") for key in SDXL_WIDTHS}
    if halves["clip_l"].shape[0] != halves["clip_g"].shape[0]:
        raise _fail(path, "its clip_l and clip_g hold different numbers of vectors")
    return halves["clip_l"], halves["clip_g"]


@lru_cache(maxsize=512)
def _read_cached(path: Path, size: int, mtime_ns: int) -> Embedding | str:
    try:
        return read_embedding(path)
    except CheckpointError as error:
        return str(error)


def load_embedding(path: str | Path) -> Embedding:
    """``read_embedding``, read again only when the file's size or mtime changed."""
    path = Path(path)
    stat = path.stat()
    found = _read_cached(path, stat.st_size, stat.st_mtime_ns)
    if isinstance(found, str):
        raise EmbeddingError(found)
    return found


# ---------------------------------------------------------------- folders


def default_embedding_dirs(model_paths: Iterable[str | Path] = ()) -> list[Path]:
    """``models/embeddings`` of the project, and ``embeddings`` beside the folder of each model path."""
    return default_addon_dirs(EMBEDDINGS_FOLDER, model_paths)


def embedding_files(folders: Iterable[str | Path]) -> dict[str, Path]:
    """Each embedding name (file stem) -> its file, searched recursively, the first folder first."""
    return addon_files(folders, EMBEDDING_SUFFIXES)


class EmbeddingEntry(NamedTuple):
    """One embedding file as the studio lists it."""

    name: str  # what to type in a prompt
    vectors: int  # n_vec, the prompt positions it takes (0 where the file cannot be read)
    width: int  # 768, 1024 (SDXL: clip_g's 1280); 0 where the file cannot be read
    family: str  # "SD 1", "SD 2", "SDXL", "width N"; "" where the file cannot be read
    size: int  # bytes
    path: Path
    problem: str | None = None  # why the file cannot be read, else None


def list_embeddings(folders: Iterable[str | Path]) -> list[EmbeddingEntry]:
    """Every embedding in the folders (the first folder's where a name repeats), sorted by name."""
    entries = []
    for name, path in embedding_files(folders).items():
        size = path.stat().st_size
        try:
            embedding = load_embedding(path)
        except CheckpointError as error:
            entries.append(EmbeddingEntry(name, 0, 0, "", size, path, str(error)))
            continue
        entries.append(EmbeddingEntry(name, len(embedding.vectors), embedding.width, embedding.family, size, path))
    return sorted(entries, key=lambda e: e.name.lower())


# ---------------------------------------------------------------- the ones a model takes


def encoder_width(model) -> int | None:
    """The token width of the model's CLIP or OpenCLIP text encoder (SDXL: all its encoders' together); None
    where it reads no CLIP tokens."""
    encoder = getattr(model, "cond_stage_model", None)
    if isinstance(encoder, (CLIPTextEncoder, OpenCLIPTextEncoder)):
        return encoder.config.context_dim
    if isinstance(encoder, SDXLConditioner):
        return encoder.config.context_dim
    return None


def sdxl_widths(model) -> dict[str, int] | None:
    """An SDXL model's encoder widths by the embedding file's keys (no clip_l for the refiner); None for others."""
    encoder = getattr(model, "cond_stage_model", None)
    if not isinstance(encoder, SDXLConditioner):
        return None
    widths = {"clip_g": encoder.open_clip.config.context_dim}
    if encoder.clip is not None:
        widths["clip_l"] = encoder.clip.config.context_dim
    return widths


def _sdxl_fit(embedding: Embedding, widths: dict[str, int], name: str) -> tuple[torch.Tensor | None, str]:
    """An embedding's [clip_l | clip_g] vectors for an SDXL model, or None and why not."""
    if embedding.family != SDXL:
        return None, (f"embedding {name!r} ({embedding.path}) holds one text encoder's vectors ({embedding.width} wide, "
                      f"{embedding.family}), but SDXL reads prompts with two encoders and needs an SDXL embedding "
                      "(clip_l and clip_g vectors); it was not used")
    have = {"clip_l": embedding.clip_l.shape[1], "clip_g": embedding.width}
    wrong = [f"{key} is {have[key]} wide, the model's {width}" for key, width in widths.items() if have[key] != width]
    if wrong:
        return None, f"embedding {name!r} ({embedding.path}) does not fit this SDXL model: {'; '.join(wrong)}; it was not used"
    return torch.cat([embedding.clip_l, embedding.vectors], dim=1), ""


class ModelEmbeddings(NamedTuple):
    """The embeddings of some folders as a model sees them."""

    vectors: dict[str, torch.Tensor]  # name -> (n_vec, width): what its encoder takes
    paths: dict[str, Path]  # of those
    skipped: dict[str, str]  # name -> why it is not used (another width, SDXL, an unreadable file)


def model_embeddings(model, folders: Iterable[str | Path]) -> ModelEmbeddings:
    """The folders' embeddings that fit the model's text encoder, and why the others do not. A model
    that reads no CLIP tokens takes none (their names stay words), and nothing is read for it."""
    width, xl = encoder_width(model), sdxl_widths(model)
    vectors, paths, skipped = {}, {}, {}
    if width is None:
        return ModelEmbeddings(vectors, paths, skipped)
    for name, path in embedding_files(folders).items():
        try:
            embedding = load_embedding(path)
        except CheckpointError as error:
            skipped[name] = f"embedding {name!r} was not used: {error}"
            continue
        if xl is not None:
            both, why = _sdxl_fit(embedding, xl, name)
            if both is None:
                skipped[name] = why
            else:
                vectors[name], paths[name] = both, path
        elif embedding.fits(width):
            vectors[name], paths[name] = embedding.vectors, path
        elif embedding.family == SDXL:
            skipped[name] = f"embedding {name!r} ({path}) is an SDXL embedding (clip_l and clip_g); it was not used"
        else:
            skipped[name] = (f"embedding {name!r} ({path}) is {embedding.width} wide ({embedding.family}) but this "
                             f"model's text encoder is {width} wide; it was not used")
    return ModelEmbeddings(vectors, paths, skipped)


def prompt_texts(prompts: Iterable[str], steps: int) -> list[str]:
    """Each prompt's texts over the steps (prompt editing, alternation), without ``<lora:...>`` tags."""
    return [entry.text for p in prompts for entry in prompt_schedule(extract_lora_tags(p).text, steps)]


def names_in_prompts(model, texts: Iterable[str], names: Iterable[str]) -> list[str]:
    """The ``names`` that the model's tokenizer finds in the texts, as its encoder would."""
    names = list(names)
    if not names or encoder_width(model) is None:
        return []
    return embedding_names_in(model.cond_stage_model.tokenizer, texts, names)


def embedding_notices(model, prompts: list[str], steps: int, folders: Iterable[str | Path]) -> list[str]:
    """Why each embedding that the prompts name is not used (another width, SDXL, a bad file)."""
    found = model_embeddings(model, folders)
    used = names_in_prompts(model, prompt_texts(prompts, steps), found.skipped)
    return [found.skipped[name] for name in used]


# ---------------------------------------------------------------- hashes


@cache
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def embedding_hash(path: Path) -> str:
    """A1111's short hash of an embedding: the first 12 hex digits of the whole file's sha256."""
    stat = path.stat()
    return _sha256(path, stat.st_size, stat.st_mtime_ns)[:12]


def embedding_hashes(model, prompts: list[str], steps: int, folders: Iterable[str | Path]) -> str | None:
    """AUTOMATIC1111's "TI hashes" value, ``name: 12hex, ...``, of the embeddings the prompts use on this
    model (the name without ``:`` and ``,``); None when they use none."""
    found = model_embeddings(model, folders)
    used = names_in_prompts(model, prompt_texts(prompts, steps), found.vectors)
    parts = [f"{name.replace(':', '').replace(',', '')}: {embedding_hash(found.paths[name])}" for name in used]
    return ", ".join(parts) or None


def prompt_vectors(model, folders: Iterable[str | Path]) -> Mapping[str, torch.Tensor] | None:
    """The vectors to give the model's encoder: every embedding that fits it (None where there is none)."""
    return model_embeddings(model, folders).vectors or None
