"""Reading checkpoint files safely: tensor keys and shapes, state dicts, metadata.

Nothing here builds a model. Two kinds of file are read:

* ``.safetensors``: the header is parsed and validated here, so that no memory is
  allocated from numbers the file merely claims; the tensors are then read by the
  ``safetensors`` library.
* pickled PyTorch files (``.ckpt .pt .pth .bin``): only through
  ``torch.load(weights_only=True)``, which refuses any pickle that would call code.
  The few harmless non-tensor objects that Lightning writes (a ``ModelCheckpoint``
  callback, numpy scalars and dtypes) are mapped to inert stand-ins so that such
  files load without running any of their code.

Every failure is a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import struct
import threading
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ldm.checkpoints.errors import CheckpointError

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # real headers are a few hundred kB
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip format; the only one torch can mmap
_REDOWNLOAD = "The file is probably truncated or corrupt; download or copy it again"

# Bytes per element for each safetensors dtype string.
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip


class _Header(NamedTuple):
    shapes: dict[str, tuple[int, ...]]  # every tensor key, validated against the file size
    metadata: dict[str, str]


def _fail(path: Path, problem: str, hint: str = _REDOWNLOAD) -> CheckpointError:
    return CheckpointError.for_file(path, problem, hint)


# ---------------------------------------------------------------- public API


def read_key_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Every tensor key and its shape, without reading tensor data where the format allows."""
    path = _checked_path(path)
    if _is_safetensors(path):
        return _nonempty(path, _read_safetensors_header(path).shapes)
    state = _unwrap_state_dict(path, _torch_load(path))
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


class KeysAndMetadata(NamedTuple):
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, object]


def read_key_shapes_and_metadata(path: str | os.PathLike[str]) -> KeysAndMetadata:
    """``read_key_shapes`` and ``read_metadata`` with one read of the file (a pickle is loaded once)."""
    path = _checked_path(path)
    if _is_safetensors(path):
        header = _read_safetensors_header(path)
        return KeysAndMetadata(_nonempty(path, header.shapes), dict(header.metadata))
    loaded = _torch_load(path)
    state = _unwrap_state_dict(path, loaded)
    return KeysAndMetadata({key: tuple(t.shape) for key, t in state.items()}, _pickle_metadata(loaded))


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, on CPU, in their stored dtype."""
    path = _checked_path(path)
    if _is_safetensors(path):
        return _load_safetensors(path)
    return _unwrap_state_dict(path, _torch_load(path))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, object]:
    """Small non-tensor facts: safetensors ``__metadata__``, or top-level ints/strs of a pickle."""
    path = _checked_path(path)
    if _is_safetensors(path):
        return dict(_read_safetensors_header(path).metadata)
    return _pickle_metadata(_torch_load(path))


def _pickle_metadata(loaded: object) -> dict[str, object]:
    if not isinstance(loaded, dict):
        return {}
    return {k: v for k, v in loaded.items() if isinstance(k, str) and type(v) in (int, str)}


# ---------------------------------------------------------------- shared


def _checked_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.exists():
        raise _fail(path, "does not exist", "Check the path, or put the file in weights/")
    if path.is_dir():
        raise _fail(path, "is a directory, not a checkpoint file",
                    "Point to a single .safetensors or .ckpt file")
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise _fail(path, f"has unsupported suffix {path.suffix!r}",
                    f"Supported suffixes: {', '.join(SUPPORTED_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise _fail(path, "is empty (0 bytes)", "The download or copy probably failed; fetch it again")
    return path


def _is_safetensors(path: Path) -> bool:
    return path.suffix.lower() == ".safetensors"


def _nonempty(path: Path, tensors: dict) -> dict:
    if not tensors:
        raise _fail(path, "contains no tensors", "Expected a model's weights")
    return tensors


def _first_sentence(error: BaseException) -> str:
    """The opening sentence of an exception message; torch's run on for paragraphs."""
    text = str(error).strip() or type(error).__name__
    return re.split(r"(?<=\.)\s", text.splitlines()[0], maxsplit=1)[0][:300]


def _unwrap_state_dict(path: Path, loaded: object) -> dict[str, torch.Tensor]:
    """Descend through nested ``state_dict`` entries and keep only the tensors."""
    state = loaded
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise _fail(path, f"holds a {type(state).__name__}, not a dict of tensors",
                    "Save model.state_dict() rather than the model object")
    tensors = {}
    for key, value in state.items():
        if isinstance(key, str) and isinstance(value, torch.Tensor):
            tensors[key] = value if type(value) is torch.Tensor else value.detach()
        else:
            logger.debug("%s: dropping non-tensor entry %r (%s)", path, key, type(value).__name__)
    if not tensors:
        keys = ", ".join(repr(k) for k in list(state)[:10]) or "none"
        raise _fail(path, f"contains no tensors (keys found: {keys})",
                    "Expected a state dict, or a Lightning file with a 'state_dict' entry")
    return tensors


# ---------------------------------------------------------------- safetensors


def _read_safetensors_header(path: Path) -> _Header:
    """Read and validate the JSON header; nothing in it is trusted before this passes."""
    file_size = path.stat().st_size
    if file_size < 8:
        raise _fail(path, f"is only {file_size} bytes, too short for a safetensors file")
    try:
        with path.open("rb") as handle:
            prefix = handle.read(8)
            (header_size,) = struct.unpack("<Q", prefix)
            _check_header_size(path, header_size, file_size, prefix)
            raw = handle.read(header_size)
    except OSError as error:
        raise _fail(path, f"could not be read ({error.strerror or error})", "") from error
    if len(raw) != header_size:
        raise _fail(path, "ended inside its header")
    document = _parse_header_json(path, raw)
    data_size = file_size - 8 - header_size
    metadata = _parse_metadata(path, document.pop("__metadata__", {}))
    shapes = {key: _parse_tensor_entry(path, key, entry, data_size) for key, entry in document.items()}
    return _Header(shapes, metadata)


def _check_header_size(path: Path, header_size: int, file_size: int, prefix: bytes) -> None:
    hint = _REDOWNLOAD
    if prefix.startswith(_ZIP_MAGIC):
        hint = "It looks like a PyTorch zip checkpoint: rename it to .ckpt"
    if header_size > _MAX_HEADER_BYTES:
        raise _fail(path, f"declares a {header_size}-byte header, over the {_MAX_HEADER_BYTES}-byte "
                    "limit, so it is not a valid safetensors file", hint)
    if 8 + header_size > file_size:
        raise _fail(path, f"declares a {header_size}-byte header but the whole file is "
                    f"{file_size} bytes", hint)


def _parse_header_json(path: Path, raw: bytes) -> dict:
    try:
        document = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as error:  # includes UnicodeDecodeError, JSONDecodeError
        raise _fail(path, f"has a header that is not valid JSON ({_first_sentence(error)})") from error
    if not isinstance(document, dict):
        raise _fail(path, f"has a JSON header that is a {type(document).__name__}, not an object")
    return document


def _parse_metadata(path: Path, metadata: object) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(path, "has a '__metadata__' header entry that is not a string-to-string object")
    return metadata


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0  # bool is an int subclass; refuse it too


def _element_count(shape: list[int], limit: int) -> int | None:
    """prod(shape), or None as soon as it exceeds ``limit`` (never builds huge integers)."""
    if 0 in shape:
        return 0
    count = 1
    for dim in shape:
        count *= dim
        if count > limit:
            return None
    return count


def _parse_tensor_entry(path: Path, key: str, entry: object, data_size: int) -> tuple[int, ...]:
    def bad(problem: str) -> CheckpointError:
        return _fail(path, f"header entry {key!r} {problem}")

    if not isinstance(entry, dict):
        raise bad(f"is a {type(entry).__name__}, not an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
        raise bad(f"has unknown dtype {dtype!r} (known: {', '.join(_ITEMSIZE)})")
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise bad(f"has shape {shape!r}; expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise bad(f"has data_offsets {offsets!r}; expected [begin, end] as non-negative integers")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise bad(f"has data_offsets [{begin}, {end}] outside the {data_size}-byte data section")
    count = _element_count(shape, data_size)
    if count is None or count * _ITEMSIZE[dtype] > data_size:
        raise bad(f"has shape {shape}, which needs more than the {data_size}-byte data section")
    if count * _ITEMSIZE[dtype] != end - begin:
        raise bad(f"has shape {shape} of {dtype} ({count * _ITEMSIZE[dtype]} bytes) but its "
                  f"data_offsets span {end - begin} bytes")
    return tuple(shape)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    _nonempty(path, _read_safetensors_header(path).shapes)  # validate before the library reads
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as error:
        raise _fail(path, f"was rejected by the safetensors reader ({_first_sentence(error)})") from error


# ---------------------------------------------------------------- pickled torch files


class _InertStandIn:
    """Replaces a known-harmless class or function named in a Lightning or numpy pickle.

    The weights-only unpickler may call it (REDUCE), instantiate it (NEWOBJ) and set
    its state (BUILD); all of these ignore their arguments, so nothing from the file runs.
    """

    qualified_name = "?"

    def __new__(cls, *args: object, **kwargs: object) -> _InertStandIn:
        return super().__new__(cls)

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def __repr__(self) -> str:
        return f"<inert stand-in for {self.qualified_name}>"


_NUMPY_DTYPE_CLASSES = (
    "Bool", "Int8", "UInt8", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64",
    "LongLong", "ULongLong", "Float16", "Float32", "Float64", "Complex64", "Complex128",
)  # fmt: skip
_INERT_GLOBAL_NAMES = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    *(f"numpy.dtypes.{name}DType" for name in _NUMPY_DTYPE_CLASSES),
)
# torch accepts (object, "fully.qualified.name") pairs, so the names need not be importable.
_INERT_GLOBALS = [
    (type(f"Inert_{name.rsplit('.', 1)[1]}", (_InertStandIn,), {"qualified_name": name}), name)
    for name in _INERT_GLOBAL_NAMES
]
# torch's safe-globals list is process-wide: serialise our additions and removals.
_SAFE_GLOBALS_LOCK = threading.Lock()

# What torch.load raises on damaged input: zip reader and storage errors (RuntimeError),
# early end (EOFError), and the weights-only unpickler's own failures on garbage opcodes.
_DECODE_ERRORS = (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError,
                  AssertionError, TypeError, AttributeError, struct.error, OverflowError)
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")


def _torch_load(path: Path) -> object:
    try:
        with path.open("rb") as handle:
            use_mmap = handle.read(4) == _ZIP_MAGIC  # legacy (non-zip) files cannot be mmapped
        with _SAFE_GLOBALS_LOCK, torch.serialization.safe_globals(_INERT_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as error:
        raise _refusal(path, error) from None
    except _DECODE_ERRORS as error:
        raise _fail(path, "could not be read as a PyTorch checkpoint "
                    f"({type(error).__name__}: {_first_sentence(error)})") from error


def _refusal(path: Path, error: pickle.UnpicklingError) -> CheckpointError:
    # torch re-raises with advice to pass weights_only=False; report its original reason instead.
    reason = _first_sentence(error.__context__ or error)
    hint = "Ask the publisher for a .safetensors version; if a download was cut short, fetch it again"
    if reason.startswith("Unsupported operand"):
        return _fail(path, "uses pickle instructions that the safe loader refuses (it may carry "
                     f"code, or be corrupt: {reason}) and was not loaded", hint)
    found = _REFUSED_GLOBAL.search(reason)
    culprit = f" such as {found.group(1)}" if found else ""
    return _fail(path, f"contains Python objects{culprit} that could run code and was not loaded "
                 f"(safe loader: {reason})", hint)
