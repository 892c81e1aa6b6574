"""Reading checkpoint files: round trips, unwrapping, and refusal of unsafe or broken files."""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import shlex
import struct
import sys
import time
import tracemalloc
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from ldm.checkpoints import io as ckpt_io
from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.io import (
    SUPPORTED_SUFFIXES,
    open_state_dict,
    read_key_shapes,
    read_metadata,
    read_state_dict,
)
from tests.helpers import same_bits

# ---------------------------------------------------------------- helpers


def small_state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=generator),
        "model.diffusion_model.input_blocks.0.0.bias": torch.randn(8, generator=generator),
        "first_stage_model.decoder.conv_out.weight": torch.randn(3, 8, 3, 3, generator=generator).half(),
        "cond_stage_model.position_ids": torch.arange(77).unsqueeze(0),
    }


def write_raw_safetensors(
    path: Path, header: object, data: bytes = b"", header_size: int | None = None
) -> Path:
    """Write a safetensors file byte by byte, so that its header can lie."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(raw) if header_size is None else header_size
    path.write_bytes(struct.pack("<Q", size) + raw + data)
    return path


def assert_error_names(path: Path, error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"


def marker_payload(marker: Path, how: str) -> object:
    """An object whose unpickling creates ``marker``: proof that code ran."""
    command = f"touch {shlex.quote(str(marker))}"
    source = f"open({str(marker)!r}, 'w').close()"

    class Payload:
        def __reduce__(self):
            return (os.system, (command,)) if how == "os.system" else (exec, (source,))

    return Payload()


def pickle_globals(path: Path) -> set[str]:
    """The GLOBAL names referenced by the data.pkl inside a torch.save zip."""
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        data = archive.read(name)
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def register_fake_global(monkeypatch: pytest.MonkeyPatch, qualified_name: str, marker: Path) -> type:
    """A class importable as ``qualified_name``; creating it or setting its state writes ``marker``."""
    module_name, _, attribute = qualified_name.rpartition(".")

    def touch(*_: object) -> None:
        marker.write_text("code ran")

    payload = type(attribute, (), {"__init__": touch, "__setstate__": touch,
                                   "__reduce__": lambda self: (type(self), (), {"state": 1})})
    payload.__module__, payload.__qualname__ = module_name, attribute
    parts = module_name.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        if name not in sys.modules or depth == len(parts):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setattr(sys.modules[module_name], attribute, payload, raising=False)
    return payload


def lightning_checkpoint(path: Path, callback: object, state: dict[str, torch.Tensor]) -> Path:
    torch.save({
        "epoch": 3,
        "global_step": 470000,
        "pytorch-lightning_version": "1.4.2",
        "callbacks": {type(callback): {"best_model_score": np.float64(0.25)}, "instance": callback},
        "dtype_class": type(np.dtype("float64")),
        "loss_scale": np.float64(1024.0),
        "state_dict": {**state, "ema_decay_step": np.int64(5)},
    }, path)
    return path


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]
)
def test_safetensors_round_trip_keeps_keys_shapes_dtypes_and_values(tmp_path, dtype):
    source = {k: (v * 3).to(dtype) for k, v in small_state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_file(source, path, metadata={"format": "pt"})

    loaded = read_state_dict(path)

    assert loaded.keys() == source.keys()
    for key, tensor in source.items():
        assert loaded[key].dtype == dtype
        assert loaded[key].device.type == "cpu"
        assert torch.equal(loaded[key], tensor), key
    assert read_key_shapes(path) == {k: tuple(v.shape) for k, v in source.items()}
    assert read_metadata(path) == {"format": "pt"}


def test_read_key_shapes_reads_only_the_safetensors_header(tmp_path, monkeypatch):
    path = tmp_path / "big.safetensors"
    save_file({"big": torch.zeros(512, 1024), "small": torch.ones(3)}, path)  # 2 MB of data
    header_size = struct.unpack("<Q", path.read_bytes()[:8])[0]
    bytes_read = []
    real_open = Path.open

    def counting_open(self, *args, **kwargs):
        handle = real_open(self, *args, **kwargs)
        real_read = handle.read

        def read(*read_args):
            chunk = real_read(*read_args)
            bytes_read.append(len(chunk))
            return chunk

        handle.read = read
        return handle

    def no_tensor_reads(*_, **__):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(Path, "open", counting_open)
    monkeypatch.setattr(ckpt_io, "_read_tensor", no_tensor_reads)

    assert read_key_shapes(path) == {"big": (512, 1024), "small": (3,)}
    assert 0 < sum(bytes_read) <= 8 + header_size


def test_pickled_checkpoints_load_weights_only_with_mmap(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    torch.save(small_state_dict(), path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    shapes = read_key_shapes(path)

    assert shapes == {k: tuple(v.shape) for k, v in small_state_dict().items()}
    assert calls == [{"map_location": "cpu", "weights_only": True, "mmap": True}]


def test_legacy_non_zip_torch_file_loads(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(small_state_dict(), path, _use_new_zipfile_serialization=False)

    loaded = read_state_dict(path)

    for key, tensor in small_state_dict().items():
        assert torch.equal(loaded[key], tensor)


def test_nested_state_dicts_are_unwrapped_and_non_tensors_dropped(tmp_path):
    inner = {**small_state_dict(), "note": "not a tensor", "step": 3}
    path = tmp_path / "nested.ckpt"
    torch.save({"state_dict": {"state_dict": inner, "other": 1}, "global_step": 7}, path)

    loaded = read_state_dict(path)

    assert loaded.keys() == small_state_dict().keys()
    for key, tensor in small_state_dict().items():
        assert torch.equal(loaded[key], tensor)
        assert loaded[key].dtype == tensor.dtype
    assert read_key_shapes(path) == {k: tuple(v.shape) for k, v in small_state_dict().items()}


def test_parameters_come_back_as_plain_tensors(tmp_path):
    path = tmp_path / "params.pth"
    torch.save({"weight": torch.nn.Parameter(torch.ones(2, 2))}, path)

    loaded = read_state_dict(path)

    assert type(loaded["weight"]) is torch.Tensor
    assert not loaded["weight"].requires_grad


@pytest.mark.parametrize("content, fragment", [
    (torch.ones(3), "holds a Tensor"),
    ({"model": {"w": 1}, "optimizer": []}, "'model', 'optimizer'"),
])
def test_files_without_a_state_dict_are_explained(tmp_path, content, fragment):
    path = tmp_path / "odd.pt"
    torch.save(content, path)

    with pytest.raises(CheckpointError) as error:
        read_state_dict(path)
    assert_error_names(path, error, fragment)


# ---------------------------------------------------------------- reading one tensor at a time

EVERY_SAFETENSORS_DTYPE = [
    torch.bool, torch.uint8, torch.int8, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.int16,
    torch.float16, torch.bfloat16, torch.uint32, torch.int32, torch.float32, torch.uint64, torch.int64, torch.float64,
]


def odd_shapes(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A matrix of varied values, a scalar and an empty tensor, in ``dtype``."""
    values = torch.linspace(-3, 250, 35, dtype=torch.float64).reshape(5, 7)
    return {"matrix": values.to(dtype), "scalar": torch.tensor(2.5, dtype=torch.float64).to(dtype),
            "empty": torch.zeros(0, 4, dtype=dtype)}


@pytest.fixture
def small_parts(monkeypatch):
    """Convert through a 64-byte part buffer, so that a small tensor takes several parts."""
    monkeypatch.setattr(ckpt_io, "_PART_BYTES", 64)


@pytest.mark.parametrize("dtype", EVERY_SAFETENSORS_DTYPE, ids=str)
def test_safetensors_tensors_read_one_at_a_time_match_the_library(tmp_path, dtype, small_parts):
    path = tmp_path / "model.safetensors"
    save_file(odd_shapes(dtype), path)
    library, state = load_file(path), open_state_dict(path)
    assert state.shapes == {k: tuple(v.shape) for k, v in library.items()}
    assert state.dtypes == {k: dtype for k in library}
    for key, tensor in library.items():
        assert same_bits(state[key], tensor), key
        for target in (torch.float32, torch.bfloat16):
            assert same_bits(state.read(key, dtype=target), tensor.to(target)), (key, target)


def test_zip_checkpoint_tensors_read_one_at_a_time_match_torch_load(tmp_path, small_parts):
    """Views into one storage (at an offset, transposed, expanded), parameters, scalars and empty tensors,
    each read from its place in the file as torch.load itself reads them."""
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(6, 10, generator=generator)
    state = {
        "half": torch.randn(3, 33, generator=generator).half(),
        "bf16": torch.randn(40, generator=generator).bfloat16(),
        "row_slice": shared[2:5],
        "transposed": shared.t(),
        "column": shared[:, 3],
        "expanded": torch.arange(4.0).expand(3, 4),
        "parameter": torch.nn.Parameter(torch.randn(2, 2, generator=generator)),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
        "flags": torch.tensor([True, False, True]),
    }
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 3}, path)
    expected = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    lazy = open_state_dict(path)
    assert list(lazy) == list(state)
    for key, tensor in expected.items():
        tensor = tensor.detach()
        assert same_bits(lazy[key], tensor), key
        if tensor.is_floating_point():
            assert same_bits(lazy.read(key, dtype=torch.bfloat16), tensor.to(torch.bfloat16)), key


def test_opening_reads_no_tensor_and_pop_forgets_the_entry(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": small_state_dict()}, path)
    read = []
    real_read = ckpt_io._read_tensor
    monkeypatch.setattr(ckpt_io, "_read_tensor", lambda p, key, *args: read.append(key) or real_read(p, key, *args))
    state = open_state_dict(path)
    assert len(state) == 4 and "model.diffusion_model.input_blocks.0.0.bias" in state and "other" not in state
    assert state.shapes == {k: tuple(v.shape) for k, v in small_state_dict().items()}
    assert read == []
    tensor = state.pop("model.diffusion_model.input_blocks.0.0.bias", dtype=torch.float16)
    assert same_bits(tensor, small_state_dict()["model.diffusion_model.input_blocks.0.0.bias"].half())
    assert read == ["model.diffusion_model.input_blocks.0.0.bias"]
    assert "model.diffusion_model.input_blocks.0.0.bias" not in state and len(state) == 3


def test_a_torch_file_of_a_big_endian_machine_is_read_by_torch(tmp_path, monkeypatch):
    """Its bytes would need swapping, which torch.load does: such a file is read whole, as before."""
    path = tmp_path / "model.ckpt"
    torch.save(small_state_dict(), path)
    monkeypatch.setattr(ckpt_io, "_written_big_endian", lambda _: True)
    state = open_state_dict(path)
    assert all(isinstance(entry, torch.Tensor) for entry in state._entries.values())
    for key, tensor in small_state_dict().items():
        assert same_bits(state[key], tensor)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_file_cut_short_after_opening_names_the_tensor(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    tensors = {"first": torch.ones(4), "last": torch.ones(4096)}
    save_file(tensors, path) if suffix == ".safetensors" else torch.save(tensors, path)
    state = open_state_dict(path)
    data = path.read_bytes()
    last = state._entries["last"].offset
    path.write_bytes(data[: last + 100])
    with pytest.raises(CheckpointError) as error:
        state["last"]
    assert_error_names(path, error, "ended inside tensor 'last'")


# ---------------------------------------------------------------- code in pickles


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on protocol 5
@pytest.mark.parametrize("how", ["os.system", "exec"])
@pytest.mark.parametrize("writer", ["torch.save", "pickle protocol 2", "pickle protocol 5"])
def test_code_carrying_pickle_is_refused_and_never_executed(tmp_path, how, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": small_state_dict(), "payload": marker_payload(marker, how)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=int(writer[-1])))

    with pytest.raises(CheckpointError) as error:
        read_state_dict(path)

    assert_error_names(path, error, "was not loaded")
    if writer != "pickle protocol 5":  # protocol 5 opcodes are refused before any name is seen
        assert "could run code" in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("how", ["os.system", "exec"])
def test_the_code_payload_really_runs_when_unpickled_unsafely(tmp_path, how):
    """Control for the refusal test: the payload is live, so its marker proves execution."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(marker_payload(marker, how)))
    assert marker.exists()


def test_lightning_checkpoint_with_callback_and_numpy_scalars_runs_no_code(tmp_path, monkeypatch):
    marker = tmp_path / "callback-ran"
    callback_class = register_fake_global(
        monkeypatch, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint", marker)
    callback = callback_class.__new__(callback_class)
    path = lightning_checkpoint(tmp_path / "sd-v1.ckpt", callback, small_state_dict())
    assert {"pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint", "numpy.dtype",
            "numpy.dtypes.Float64DType"} <= pickle_globals(path)
    assert any(name.endswith("multiarray.scalar") for name in pickle_globals(path))

    loaded = read_state_dict(path)

    assert loaded.keys() == small_state_dict().keys()
    for key, tensor in small_state_dict().items():
        assert torch.equal(loaded[key], tensor)
    assert read_metadata(path) == {
        "epoch": 3, "global_step": 470000, "pytorch-lightning_version": "1.4.2"}
    assert not marker.exists()
    torch.load(path, weights_only=False)  # control: an unsafe load would have run the callback's code
    assert marker.exists()


@pytest.mark.parametrize("qualified_name", [
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
])
def test_known_harmless_globals_are_replaced_by_inert_stand_ins(tmp_path, monkeypatch, qualified_name):
    marker = tmp_path / "ran"
    payload_class = register_fake_global(monkeypatch, qualified_name, marker)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2), "extra": payload_class.__new__(payload_class)}}, path)
    assert qualified_name in pickle_globals(path)

    assert read_key_shapes(path) == {"w": (2,)}
    assert not marker.exists()


def test_other_globals_are_still_refused(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    payload_class = register_fake_global(
        monkeypatch, "pytorch_lightning.callbacks.early_stopping.EarlyStopping", marker)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "cb": payload_class.__new__(payload_class)}, path)

    with pytest.raises(CheckpointError) as error:
        read_state_dict(path)
    assert_error_names(path, error, "EarlyStopping", "could run code")
    assert not marker.exists()
    leftovers = set(ckpt_io._INERT_GLOBALS) & set(torch.serialization.get_safe_globals())
    assert not leftovers  # the stand-ins are allowed only during our own loads


# ---------------------------------------------------------------- broken files


@pytest.mark.parametrize("suffix", SUPPORTED_SUFFIXES)
def test_zero_byte_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.touch()
    with pytest.raises(CheckpointError) as error:
        read_key_shapes(path)
    assert_error_names(path, error, "empty")


@pytest.mark.parametrize("keep", [4, 8, 20, 0.5, -1])
def test_truncated_safetensors(tmp_path, keep):
    full = tmp_path / "full.safetensors"
    save_file(small_state_dict(), full)
    data = full.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:cut])

    with pytest.raises(CheckpointError) as error:
        read_state_dict(path)
    assert_error_names(path, error)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.95])
def test_truncated_ckpt(tmp_path, legacy, fraction):
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": small_state_dict()}, full, _use_new_zipfile_serialization=not legacy)
    data = full.read_bytes()
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[: int(len(data) * fraction)])

    with pytest.raises(CheckpointError) as error:
        read_state_dict(path)
    assert_error_names(path, error)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors", ".bin"])
def test_corrupt_bytes(tmp_path, suffix):
    path = tmp_path / f"noise{suffix}"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError) as error:
        read_state_dict(path)
    assert_error_names(path, error)


def test_zip_checkpoint_named_safetensors_gets_a_rename_hint(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save(small_state_dict(), path)
    with pytest.raises(CheckpointError) as error:
        read_key_shapes(path)
    assert_error_names(path, error, "rename it to .ckpt")


def one_tensor(dtype: object, shape: object, offsets: object) -> dict:
    return {"w": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}


# Each lying header: (header, data section, declared header size or None, text the error must name).
LYING_HEADERS = {
    "offsets beyond file": (one_tensor("F32", [4], [0, 16]), b"\0" * 8, None, "'w'"),
    "end before begin": (one_tensor("F32", [0], [8, 4]), b"\0" * 8, None, "'w'"),
    "huge header length": ({}, b"", 2**63, "header"),
    "header longer than file": ({}, b"", 5000, "5000-byte header"),
    "shape/offset mismatch": (one_tensor("F16", [3], [0, 8]), b"\0" * 8, None, "'w'"),
    "absurd shape": (one_tensor("F32", [2**62, 2**62, 2**62], [0, 8]), b"\0" * 8, None, "'w'"),
    "negative dim": (one_tensor("F32", [-2, -1], [0, 8]), b"\0" * 8, None, "'w'"),
    "float dim": (one_tensor("F32", [2.0], [0, 8]), b"\0" * 8, None, "'w'"),
    "bool dim": (one_tensor("U8", [True], [0, 1]), b"\0", None, "'w'"),
    "unknown dtype": (one_tensor("F128", [1], [0, 16]), b"\0" * 16, None, "F128"),
    "three offsets": (one_tensor("U8", [1], [0, 1, 2]), b"\0" * 2, None, "'w'"),
    "entry not object": ({"w": [1, 2]}, b"", None, "'w'"),
    "non-JSON header": (b"\xff\xfenot json at all", b"", None, "JSON"),
    "JSON array header": (b"[1, 2, 3]", b"", None, "list"),
    "bad metadata": ({"__metadata__": {"step": 5}}, b"", None, "__metadata__"),
}


@pytest.mark.parametrize("case", LYING_HEADERS)
def test_lying_safetensors_header_fails_fast_without_allocating(tmp_path, case):
    header, data, declared, fragment = LYING_HEADERS[case]
    path = write_raw_safetensors(tmp_path / "liar.safetensors", header, data, declared)

    tracemalloc.start()
    started = time.perf_counter()
    try:
        for reader in (read_key_shapes, read_state_dict, read_metadata):
            with pytest.raises(CheckpointError) as error:
                reader(path)
            assert_error_names(path, error, fragment)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 2.0
    assert peak < 5 * 1024 * 1024


def test_safetensors_without_tensors_is_explained(tmp_path):
    path = write_raw_safetensors(tmp_path / "empty.safetensors", {"__metadata__": {"a": "b"}})
    assert read_metadata(path) == {"a": "b"}
    with pytest.raises(CheckpointError) as error:
        read_state_dict(path)
    assert_error_names(path, error, "no tensors")


# ---------------------------------------------------------------- paths


@pytest.mark.parametrize("name", ["model.gguf", "model.txt", "model"])
def test_unknown_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError) as error:
        read_state_dict(path)
    assert_error_names(path, error, "unsupported suffix", ".safetensors")


def test_suffix_is_case_insensitive(tmp_path):
    path = tmp_path / "MODEL.SAFETENSORS"
    save_file({"w": torch.ones(2)}, path)
    assert read_key_shapes(path) == {"w": (2,)}


def test_missing_path(tmp_path):
    path = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(CheckpointError) as error:
        read_metadata(path)
    assert_error_names(path, error, "does not exist")


def test_directory(tmp_path):
    path = tmp_path / "folder.ckpt"
    path.mkdir()
    with pytest.raises(CheckpointError) as error:
        read_key_shapes(path)
    assert_error_names(path, error, "directory")


# ---------------------------------------------------------------- metadata and the error type


def test_read_metadata_of_plain_state_dict_is_empty(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(small_state_dict(), path)
    assert read_metadata(path) == {}


def test_read_metadata_returns_only_top_level_ints_and_strings(tmp_path):
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": small_state_dict(), "global_step": 12, "epoch": 1, "loss": 0.5,
                "hparams": {"lr": 1}, "version": "1.4.2"}, path)
    assert read_metadata(path) == {"global_step": 12, "epoch": 1, "version": "1.4.2"}


def test_checkpoint_error_names_the_file_and_survives_pickling():
    error = CheckpointError.for_file(Path("/w/model.ckpt"), "is broken", "Fetch it again")
    assert isinstance(error, ValueError)
    assert str(error) == "/w/model.ckpt: is broken. Fetch it again"
    assert error.path == "/w/model.ckpt"
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.path) == (str(error), error.path)
    assert str(CheckpointError("/w/x.ckpt: plain message")) == "/w/x.ckpt: plain message"


def test_errors_from_the_readers_carry_the_path(tmp_path):
    path = tmp_path / "empty.ckpt"
    path.touch()
    with pytest.raises(CheckpointError) as error:
        read_state_dict(path)
    assert error.value.path == str(path)


# ---------------------------------------------------------------- fuzzing


def valid_safetensors_bytes() -> bytes:
    from safetensors.torch import save

    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4).half()}
    return save(tensors, metadata={"k": "v"})


def valid_ckpt_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "seed.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2, 3)}, "global_step": 1}, path)
    return path.read_bytes()


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        action = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        if action == "flip" and data:
            data[position] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[position:]
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif data:
            del data[position: position + draw(st.integers(1, 16))]
    return bytes(data)


def assert_only_checkpoint_errors(path: Path) -> None:
    for reader in (read_key_shapes, read_state_dict, read_metadata):
        try:
            reader(path)
        except CheckpointError as error:
            assert str(path) in str(error)


# tmp_path is shared by the examples of one test; each example overwrites the same file.
FUZZ = settings(max_examples=50, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.one_of(st.binary(max_size=256), mutated(valid_safetensors_bytes())))
def test_fuzzed_safetensors_only_raise_checkpoint_error(tmp_path, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    assert_only_checkpoint_errors(path)


@FUZZ
@given(data=st.data())
def test_fuzzed_ckpt_only_raise_checkpoint_error(tmp_path, data):
    path = tmp_path / "fuzz.ckpt"
    path.write_bytes(data.draw(mutated(valid_ckpt_bytes(tmp_path))))
    assert_only_checkpoint_errors(path)
