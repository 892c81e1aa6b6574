"""Choosing the device and dtype: CPU by default, CUDA when present; both can be named."""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import shutil
from dataclasses import dataclass
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
    """The instructions our C++ kernels are built with (``ldm.models.cpu_kernels``)."""
    return "avx512_bf16" in cpu_flags()


def keep_freed_memory(device: torch.device) -> bool:
    """On a CPU with glibc, keep freed memory in the process for the next tensors (no mmap for large
    blocks, no trimming) instead of handing every large activation back to the system and faulting
    it in again on the next layer. SD v1 guided UNet step on 2 cores, fp32: 10.3 and 10.1 s -> 9.6 and
    9.9 s (alternating processes); bf16: no change beyond the noise. The process keeps its peak memory
    for reuse until it exits (free_memory_mb counts it as free). A process-wide setting, made
    by the CLI, the studio and the bench when they run on the CPU; ``LDM_STUDIO_MALLOC=system``
    leaves the C library's defaults. Returns whether the setting was made."""
    libc = glibc()
    if device.type != "cpu" or os.environ.get("LDM_STUDIO_MALLOC") == "system" or libc is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


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
    or AMX), else float32. bf16 on such a CPU: SD v1 UNet step 5.6 s against 10.0 s in fp32 (2 cores),
    images 44 dB PSNR from the fp32 ones (default model: mean 44.9 dB, lowest 35.4 dB over 40
    held-out captions; ``python -m ldm bench --parts fidelity``)."""
    if name in (None, "auto"):
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use auto, {', '.join(sorted(set(DTYPES)))}")
    return DTYPES[name]


MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def choose_memory_format(name: str | None, device: torch.device, unet_channels: int) -> torch.memory_format:
    """``None`` or "auto": channels-last on the CPU for models of Stable Diffusion's width or more
    (``unet_channels``, the UNet's base width, at least 128), where oneDNN's convolutions run faster in
    it, contiguous otherwise. Measured on a 2-core CPU with ``python -m ldm bench [--channels-last]``:
    SD v1 VAE decode 512 px bf16 8.15 -> 6.79 s, UNet step bf16 0.98x -> 0.93x of diffusers' time;
    the 64-channel default model's text to image 0.43 -> 0.48 s (slower). Not measured on a GPU."""
    if name in (None, "auto"):
        return torch.channels_last if device.type == "cpu" and unet_channels >= 128 else torch.contiguous_format
    if name not in MEMORY_FORMATS:
        raise ValueError(f"memory format {name!r} is not supported; use auto, {', '.join(MEMORY_FORMATS)}")
    return MEMORY_FORMATS[name]


INDUCTOR_CACHE = Path.home() / ".cache" / "ldm-studio" / "inductor"


def compile_unet(unet: torch.nn.Module, device: torch.device) -> None:
    """Compile ``unet`` in place with ``torch.compile`` (its parameter names, the checkpoint
    contract, stay as they are). The first call at each new size compiles (84 s for the SD v1 UNet
    on a 2-core CPU) and later ones run faster (5.42 s against 5.77 s a bf16 step there); compiled
    kernels are kept in ``~/.cache/ldm-studio/inductor`` (or ``$TORCHINDUCTOR_CACHE_DIR``) for the
    next start. On the CPU the compiled kernels are C++, so a C++ compiler must be installed."""
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        raise ValueError("compiling the model on the CPU needs a C++ compiler and none was found; install one "
                         "(Debian: apt-get install g++) or run without --compile")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(INDUCTOR_CACHE))
    unet.compile()


def free_memory_mb(device: torch.device) -> float | None:
    """Memory a new allocation can still take on ``device``, in MB: the GPU's free memory, or the
    system's MemAvailable on Linux; None where it cannot be known (not checked then)."""
    if device.type == "cuda":  # free on the card, plus what torch's cache holds but no tensor uses
        free, _ = torch.cuda.mem_get_info(device)
        return (free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)) / 2**20
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):  # plus what the process keeps freed (keep_freed_memory)
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


def heap_free_bytes() -> int:
    info = heap_info()
    return 0 if info is None else info.fordblks


@dataclass(frozen=True)
class SpeedPaths:
    """The faster ways a loaded model can sample, each used where it applies (``set_speed_paths`` in
    ``ldm.checkpoints.loader``): all on by default except ``compile``.

    ``compile``: the UNet through torch.compile (``compile_unet``); the compiler then chooses its
    kernels, so the UNet gets neither Winograd, our CPU kernels nor CUDA graphs.
    ``winograd``: 3x3 convolutions as Winograd on a CPU where that is faster (``ldm.models.winograd``).
    ``cuda_graphs``: the UNet's steps recorded once per size and replayed on a CUDA GPU (``ldm.models.cuda_graphs``).
    ``cpu_kernels``: on a CPU with AVX512-BF16, our C++ kernels (``ldm.models.cpu_kernels``, built on
    first use) for bf16 attention and for Winograd's data transforms."""

    compile: bool = False
    winograd: bool = True
    cuda_graphs: bool = True
    cpu_kernels: bool = True

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> SpeedPaths:
        """From the options of ``add_device_arguments``."""
        return cls(args.compile, args.winograd, args.cuda_graphs, args.cpu_kernels)


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of where and how models run, shared by the studio and the command line."""
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto",
                        help="auto (fp16 on CUDA; bf16 on a CPU with bf16 units, else fp32), fp32, fp16, bf16")
    parser.add_argument("--compile", action="store_true",
                        help="compile the UNet with torch.compile: the first generation at each size waits for the "
                        "compiler (84 s for SD v1 on a 2-core CPU), later ones are faster (6%% there); needs g++ on a CPU")
    parser.add_argument("--no-winograd", dest="winograd", action="store_false",
                        help="run 3x3 convolutions directly on the CPU too (by default sampling runs them as Winograd "
                        "where that is faster: SD v1 steps 11%% faster there, for 16/9 of their kernels' memory)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="on a CUDA GPU, launch the UNet's kernels one by one at every step (by default each "
                        "image size's step is recorded once as a CUDA graph and replayed)")
    parser.add_argument("--no-cpu-kernels", dest="cpu_kernels", action="store_false",
                        help="use torch's kernels only (by default a CPU with AVX512-BF16 runs bf16 attention and "
                        "Winograd's data transforms through ours, built once with g++: 12 s on a 2-core CPU)")
    parser.add_argument("--memory-format", default="auto", choices=["auto", "channels_last", "contiguous"],
                        help="auto (channels_last on the CPU for models of SD's width, where it is faster), channels_last, contiguous")
