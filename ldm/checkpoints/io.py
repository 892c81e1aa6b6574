"""Reading checkpoint files safely: tensor keys and shapes, state dicts, metadata.

Nothing here builds a model. Two kinds of file are read:

* ``.safetensors``: the header is parsed and validated here, so that no memory is
  allocated from numbers the file merely claims, and checked by the ``safetensors``
  library too; it gives each tensor's place in the file, from which the tensor is read.
* pickled PyTorch files (``.ckpt .pt .pth .bin``): only through
  ``torch.load(weights_only=True)``, which refuses any pickle that would call code.
  The few harmless non-tensor objects that Lightning writes (a ``ModelCheckpoint``
  callback, numpy scalars and dtypes) are mapped to inert stand-ins so that such
  files load without running any of their code. Loaded onto the meta device, a zip
  file's pickle gives each tensor's place in the file without reading its data.

``open_state_dict`` reads no tensor up front: each is read from its place when it is
looked up, so that a loader can convert the tensors one at a time and never hold the
file's copy and the converted copy of the whole model at once (a legacy non-zip torch
file cannot be read in parts and is read whole).

Every failure is a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import struct
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from ldm.checkpoints.errors import CheckpointError

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # real headers are a few hundred kB
_PART_BYTES = 16 * 1024 * 1024  # how much of a tensor is read at a time when it is converted as it is read
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip format; the only one torch can mmap
_REDOWNLOAD = "The file is probably truncated or corrupt; download or copy it again"

# The torch dtype of each safetensors dtype string.
_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "I16": torch.int16, "F16": torch.float16, "BF16": torch.bfloat16,
    "U32": torch.uint32, "I32": torch.int32, "F32": torch.float32,
    "U64": torch.uint64, "I64": torch.int64, "F64": torch.float64,
}  # fmt: skip


class TensorInFile(NamedTuple):
    """Where one tensor's elements lie in its file."""

    offset: int  # of its first element, in bytes from the start of the file
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...] | None  # in elements; None: contiguous

    @property
    def nbytes(self) -> int:
        """The bytes from its first element to its last, any gaps between them included."""
        if self.stride is None:
            count = math.prod(self.shape)
        else:
            count = 0 if 0 in self.shape else 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        return count * self.dtype.itemsize


class _Header(NamedTuple):
    tensors: dict[str, TensorInFile]  # every tensor, validated against the file size
    metadata: dict[str, str]


def _fail(path: Path, problem: str, hint: str = _REDOWNLOAD) -> CheckpointError:
    return CheckpointError.for_file(path, problem, hint)


# ---------------------------------------------------------------- public API


def read_key_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Every tensor key and its shape, without reading tensor data where the format allows."""
    path = _checked_path(path)
    if _is_safetensors(path):
        return _shapes(_nonempty(path, _read_safetensors_header(path).tensors))
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
        return KeysAndMetadata(_shapes(_nonempty(path, header.tensors)), dict(header.metadata))
    loaded = _torch_load(path)
    state = _unwrap_state_dict(path, loaded)
    return KeysAndMetadata({key: tuple(t.shape) for key, t in state.items()}, _pickle_metadata(loaded))


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, on CPU, in their stored dtype."""
    return dict(open_state_dict(path))


class LazyState(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors by key, each read from its file when it is asked for.

    ``state[key]`` reads the tensor (again, each time) onto the CPU in its stored dtype; ``read`` and ``pop``
    convert it as it is read. ``in``, ``len``, the keys, ``shapes`` and ``dtypes`` read nothing. Entries given
    as tensors (a legacy torch file, a diffusers folder) are already in memory; ``pop`` forgets an entry, so
    that such a tensor is freed once converted.
    """

    def __init__(self, path: Path, entries: dict[str, TensorInFile | torch.Tensor]) -> None:
        self.path = path
        self._entries = entries
        self._part: torch.Tensor | None = None  # the buffer converted tensors are read through; made when first needed

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.read(key)

    def __contains__(self, key: object) -> bool:
        return key in self._entries  # Mapping's own would read the tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return _shapes(self._entries)

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        return {key: entry.dtype for key, entry in self._entries.items()}

    def read(self, key: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor on ``device`` in ``dtype`` (None: as stored). Where either changes, it is converted as it is
        read, a part at a time through one small buffer, so that its stored copy is never whole in memory."""
        entry = self._entries[key]
        if isinstance(entry, torch.Tensor):
            return entry.to(device=device, dtype=dtype or entry.dtype)
        if self._part is None:
            self._part = torch.empty(_PART_BYTES, dtype=torch.uint8)
        return _read_tensor(self.path, key, entry, torch.device(device), dtype or entry.dtype, self._part)

    def pop(self, key: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """``read``, then forget the entry."""
        tensor = self.read(key, device, dtype)
        del self._entries[key]
        return tensor


def open_state_dict(path: str | os.PathLike[str]) -> LazyState:
    """The checkpoint's tensors as a ``LazyState``: here only the safetensors header, or the pickle of a torch
    zip file, is read. A legacy (non-zip) torch file cannot be read in parts and is read whole."""
    path = _checked_path(path)
    if _is_safetensors(path):
        return LazyState(path, _safetensors_entries(path))
    return LazyState(path, _pickle_entries(path))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, object]:
    """Small non-tensor facts: safetensors ``__metadata__``, or top-level ints/strs of a pickle."""
    path = _checked_path(path)
    if _is_safetensors(path):
        return dict(_read_safetensors_header(path).metadata)
    return _pickle_metadata(_torch_load(path))


def read_pickle(path: str | os.PathLike[str]) -> object:
    """The whole unpickled contents of a torch file (nested dicts, lists, tensors, numbers, strings), through
    the same safe unpickler as every other read: a file whose pickle would call code is refused, never run.
    For small files whose layout is not a flat state dict (a textual-inversion embedding)."""
    return _torch_load(_checked_path(path))


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


def _shapes(entries: Mapping[str, TensorInFile | torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(entry.shape) for key, entry in entries.items()}


def _read_tensor(path: Path, key: str, where: TensorInFile, device: torch.device, dtype: torch.dtype,
                 part: torch.Tensor) -> torch.Tensor:
    """One tensor from its place in the file, on ``device`` in ``dtype``: read straight into its own memory
    where neither changes, else through ``part`` (a uint8 buffer) a part at a time, each part converted into
    the result. A strided view in a torch file is read whole, then converted."""
    with _reading(path, where.offset) as handle:
        if where.stride is not None:
            stored = torch.empty(where.nbytes, dtype=torch.uint8)
            _fill(handle, stored, path, key)
            return stored.view(where.dtype).as_strided(where.shape, where.stride).to(device=device, dtype=dtype)
        tensor = torch.empty(where.shape, dtype=dtype, device=device)
        flat = tensor.view(-1)
        if dtype == where.dtype and device.type == "cpu":
            _fill(handle, flat, path, key)
            return tensor
        step = len(part) // where.dtype.itemsize
        for start in range(0, len(flat), step):
            piece = part[: min(step, len(flat) - start) * where.dtype.itemsize].view(where.dtype)
            _fill(handle, piece, path, key)
            flat[start : start + len(piece)].copy_(piece)
    return tensor


@contextmanager
def _reading(path: Path, offset: int) -> Iterator[BinaryIO]:
    """The file, unbuffered, at ``offset``; a failing read is a ``CheckpointError``."""
    try:
        with path.open("rb", buffering=0) as handle:
            handle.seek(offset)
            yield handle
    except OSError as error:
        raise _fail(path, f"could not be read ({error.strerror or error})", "") from error


def _fill(handle: BinaryIO, data: torch.Tensor, path: Path, key: str) -> None:
    """Read the contiguous CPU tensor's bytes from the file's current place."""
    buffer, filled = memoryview(data.view(-1).view(torch.uint8).numpy()), 0
    while filled < len(buffer):  # a read may return less than asked for
        count = handle.readinto(buffer[filled:])
        if not count:
            raise _fail(path, f"ended inside tensor {key!r}")
        filled += count


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
    data_start = 8 + header_size
    metadata = _parse_metadata(path, document.pop("__metadata__", {}))
    tensors = {key: _parse_tensor_entry(path, key, entry, data_start, file_size) for key, entry in document.items()}
    return _Header(tensors, metadata)


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


def _parse_tensor_entry(path: Path, key: str, entry: object, data_start: int, file_size: int) -> TensorInFile:
    def bad(problem: str) -> CheckpointError:
        return _fail(path, f"header entry {key!r} {problem}")

    data_size = file_size - data_start
    if not isinstance(entry, dict):
        raise bad(f"is a {type(entry).__name__}, not an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise bad(f"has unknown dtype {dtype!r} (known: {', '.join(_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise bad(f"has shape {shape!r}; expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise bad(f"has data_offsets {offsets!r}; expected [begin, end] as non-negative integers")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise bad(f"has data_offsets [{begin}, {end}] outside the {data_size}-byte data section")
    itemsize = _DTYPES[dtype].itemsize
    count = _element_count(shape, data_size)
    if count is None or count * itemsize > data_size:
        raise bad(f"has shape {shape}, which needs more than the {data_size}-byte data section")
    if count * itemsize != end - begin:
        raise bad(f"has shape {shape} of {dtype} ({count * itemsize} bytes) but its "
                  f"data_offsets span {end - begin} bytes")
    return TensorInFile(data_start + begin, _DTYPES[dtype], tuple(shape), None)


def _safetensors_entries(path: Path) -> dict[str, TensorInFile]:
    tensors = _nonempty(path, _read_safetensors_header(path).tensors)  # validate before the library looks
    try:  # the library's own checks (the tensors tile the data section, no gaps or overlaps); it reads no tensor
        with safe_open(path, framework="pt"):
            pass
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as error:
        raise _fail(path, f"was rejected by the safetensors reader ({_first_sentence(error)})") from error
    return tensors


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


def _torch_load(path: Path, *, meta: bool = False) -> object:
    """The unpickled file, its tensors on CPU (a zip file's mmapped). ``meta``: a zip file's tensors on the meta
    device instead, for which nothing but the pickle is read and torch records where each storage lies."""
    try:
        with path.open("rb") as handle:
            zipped = handle.read(4) == _ZIP_MAGIC  # legacy (non-zip) files can be neither mmapped nor read in parts
        location = "meta" if meta and zipped else "cpu"
        with _SAFE_GLOBALS_LOCK, torch.serialization.safe_globals(_INERT_GLOBALS):
            return torch.load(path, map_location=location, weights_only=True, mmap=zipped and not meta)
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


def _pickle_entries(path: Path) -> dict[str, TensorInFile | torch.Tensor]:
    """Where each tensor of a torch zip file lies; a legacy file's tensors, read whole."""
    state = _unwrap_state_dict(path, _torch_load(path, meta=True))
    if not next(iter(state.values())).is_meta:
        return state  # a legacy file: torch.load has read it whole
    located = _locate_in_zip(path, state)
    return located if located is not None else _unwrap_state_dict(path, _torch_load(path))


def _locate_in_zip(path: Path, state: dict[str, torch.Tensor]) -> dict[str, TensorInFile] | None:
    """Where the elements of each meta tensor lie in its zip file; None where torch did not record it, or where
    the bytes would need swapping (a file written on a big-endian machine): torch.load then reads the file."""
    if _written_big_endian(path):
        return None
    file_size, located = path.stat().st_size, {}
    for key, tensor in state.items():
        if tensor.layout != torch.strided:
            return None
        # Set by torch.load onto the meta device (a private attribute: without it, torch.load reads the file).
        start = getattr(tensor.untyped_storage(), "_checkpoint_offset", None)
        if start is None:
            return None
        stride = None if tensor.is_contiguous() else tuple(tensor.stride())
        where = TensorInFile(start + tensor.storage_offset() * tensor.element_size(), tensor.dtype,
                             tuple(tensor.shape), stride)
        if where.offset + where.nbytes > file_size:
            raise _fail(path, f"tensor {key!r} lies beyond the end of the file")
        located[key] = where
    return located


def _written_big_endian(path: Path) -> bool:
    """Whether a torch zip file's ``byteorder`` record says ``big`` (files without one are little-endian); read
    with torch's own zip reader, which has just read the file."""
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        return reader.has_record("byteorder") and bytes(reader.get_record("byteorder")).strip() == b"big"
    except _DECODE_ERRORS as error:
        raise _fail(path, f"could not be read as a PyTorch checkpoint ({type(error).__name__}: "
                    f"{_first_sentence(error)})") from error
