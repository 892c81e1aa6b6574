"""Where models run: the device and dtype (CPU by default, CUDA when present; both can be named), the
CPU's features, the memory that is free, and how freed memory is kept on the CPU while sampling."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return frozenset()
    return frozenset(flag for line in lines if line.startswith("flags") for flag in line.split(":", 1)[1].split())


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matrix units that make bf16 worth using on a CPU."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_has_avx512_bf16() -> bool:
    """The instructions our C++ kernels are built with (``ldm.kernels.cpu_kernels``)."""
    return "avx512_bf16" in cpu_flags()


def cpu_has_amx() -> bool:
    """AMX tiles with bf16 (Intel Sapphire Rapids and later), which oneDNN uses for torch's bf16
    convolutions, matrix products and attention."""
    return "amx_bf16" in cpu_flags()


# glibc's mallopt parameters and the defaults it is given back after sampling: blocks from 32 MB (its
# largest dynamic threshold) mapped on their own and returned when freed, the heap trimmed past 64 MB
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
SYSTEM_MMAP_THRESHOLD, SYSTEM_TRIM_THRESHOLD = 32 * 2**20, 64 * 2**20


@dataclass
class _FreedMemory:
    """The process's policy for freed memory: ``kept`` once ``keep_freed_memory`` opted in, and how
    many ``reusing_freed_memory`` blocks are running (the studio may sample on several threads)."""

    kept: bool = False
    sampling: int = 0
    returning: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


_FREED = _FreedMemory()


def keep_freed_memory(device: torch.device) -> bool:
    """Opt this process in to keeping freed memory while it samples (``reusing_freed_memory``): on a
    CPU with glibc, a sampler's steps allocate the same large activations again and again, and
    keeping them in the process instead of handing each back to the system and faulting it in again
    on the next layer is faster (SD v1's bf16 step here: 2.18 s against 2.26 s, ``python -m ldm bench
    --parts unet --malloc kept|system``). A process-wide setting, made by the CLI, the
    studio and the benches when they run on the CPU; ``LDM_STUDIO_MALLOC=system`` leaves the C
    library's defaults throughout. Returns whether the process opted in."""
    if device.type != "cpu" or os.environ.get("LDM_STUDIO_MALLOC") == "system" or glibc() is None:
        return False
    _FREED.kept = True
    return True


@contextlib.contextmanager
def reusing_freed_memory() -> Iterator[None]:
    """While inside (a sampler's steps), freed blocks under 32 MB stay in the process for the next
    tensors (the heap is never trimmed); larger ones are still mapped alone and returned when freed.
    When the last such block ends, the C library's behaviour comes back and what was kept is handed
    back to the system (``malloc_trim``), so that the autoencoder, the next model and the rest of the
    machine get it. Keeping every block instead (no block mapped alone) left a heap whose free chunks
    the tiled autoencoder then filled: SD v1's decoder at 1024 px in tiles added 1,578 MB after a
    guided call of 9 windows against 939 MB so, and the call itself peaked 560 MB higher. Does
    nothing unless ``keep_freed_memory`` opted in."""
    libc = glibc()
    if not _FREED.kept or libc is None:
        yield
        return
    with _FREED.lock:
        _FREED.sampling += 1
        if _FREED.sampling == 1:  # blocks under 32 MB kept in the heap; larger ones still mapped alone, so
            # that the heap a sampler leaves does not fragment the large maps of the autoencoder after it
            libc.mallopt(M_MMAP_THRESHOLD, SYSTEM_MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        with _FREED.lock:
            _FREED.sampling -= 1
            if _FREED.sampling == 0:
                libc.mallopt(M_MMAP_THRESHOLD, RETURNING_MMAP_THRESHOLD if _FREED.returning else SYSTEM_MMAP_THRESHOLD)
                libc.mallopt(M_TRIM_THRESHOLD, SYSTEM_TRIM_THRESHOLD)
                libc.malloc_trim(0)


# while the tiled autoencoder runs: blocks from 4 MB (its tiles' maps) mapped on their own
RETURNING_MMAP_THRESHOLD = 4 * 2**20


@contextlib.contextmanager
def returning_freed_memory() -> Iterator[None]:
    """While inside (the tiled autoencoder), every block of 4 MB or more is mapped on its own and
    handed back to the system when freed, instead of coming from the heap, where the many freed
    tile-sized maps of a large canvas would stay resident beside the level's stored maps (SD v1's
    decoder at 1024 px in tiles of 256: 658 MB added against 805-866 MB, for about 10% of its time).
    Does nothing unless ``keep_freed_memory`` opted in, or while a sampler keeps freed memory on
    another thread."""
    libc = glibc()
    if not _FREED.kept or libc is None:
        yield
        return
    with _FREED.lock:
        _FREED.returning += 1
        if _FREED.sampling == 0:
            libc.mallopt(M_MMAP_THRESHOLD, RETURNING_MMAP_THRESHOLD)
    try:
        yield
    finally:
        with _FREED.lock:
            _FREED.returning -= 1
            if _FREED.returning == 0 and _FREED.sampling == 0:
                libc.mallopt(M_MMAP_THRESHOLD, SYSTEM_MMAP_THRESHOLD)
                libc.malloc_trim(0)


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The GNU C library, or None (macOS, Windows, musl)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "mallopt"):
        return None
    if hasattr(libc, "mallinfo2"):  # glibc 2.33 and later
        libc.mallinfo2.restype = _MallInfo2
    return libc


def training_autocast(device: torch.device, name: str | None) -> torch.autocast:
    """The autocast context of a training step: ``name`` "bf16" uses bfloat16 where it pays (CUDA,
    or a CPU with bf16 units; elsewhere it runs in float32), None or "none" never does."""
    if name in (None, "none"):
        return torch.autocast(device.type, enabled=False)
    if name != "bf16":
        raise ValueError(f"autocast {name!r} is not supported; use bf16 or none")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or cpu_has_bf16())


def choose_device(name: str | None = None) -> torch.device:
    """``None`` or "auto": CUDA when available, else the CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but this machine has no usable CUDA GPU; use --device cpu")
    return device


def choose_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``None`` or "auto": float16 on CUDA; on the CPU bfloat16 where it has bf16 units (AVX512-BF16
    or AMX), else float32: bf16 there runs about twice as fast, its images close to fp32's
    (``python -m ldm bench --parts fidelity`` measures how close)."""
    if name in (None, "auto"):
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use auto, {', '.join(sorted(set(DTYPES)))}")
    return DTYPES[name]


def free_memory_mb(device: torch.device) -> float | None:
    """Memory a new allocation can still take on ``device``, in MB: the GPU's free memory, or the
    system's MemAvailable on Linux; None where it cannot be known (not checked then)."""
    if device.type == "cuda":  # free on the card, plus what torch's cache holds but no tensor uses
        free, _ = torch.cuda.mem_get_info(device)
        return (free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)) / 2**20
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):  # plus what the process keeps freed (reusing_freed_memory)
                    return int(line.split()[1]) / 1024 + heap_free_bytes() / 2**20
    except OSError:
        pass
    return None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_info() -> _MallInfo2 | None:
    """glibc's ``mallinfo2`` (2.33 and later): ``fordblks`` bytes freed but held by the process,
    ``hblkhd`` bytes in blocks mapped on their own. None elsewhere."""
    mallinfo2 = getattr(glibc(), "mallinfo2", None)
    return None if mallinfo2 is None else mallinfo2()


def resident_mb() -> float | None:
    """This process's resident memory now, in MB (VmRSS; None where /proc is not)."""
    return _proc_status_mb("VmRSS:")


def peak_resident_mb() -> float | None:
    """The most resident memory this process has held, in MB (VmHWM; None where /proc is not)."""
    return _proc_status_mb("VmHWM:")


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def heap_free_bytes() -> int:
    info = heap_info()
    return 0 if info is None else info.fordblks
