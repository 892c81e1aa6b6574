"""The faster ways a loaded model can sample, and the one place that applies them to it.

Each speed path lives in this folder (``winograd``, ``cpu_attention`` with ``cpu_kernels``,
``cuda_graphs``, compiling) and is one field of ``SpeedPaths`` with one option in
``ldm.options``; ``set_speed_paths`` turns them on where they apply.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ldm.devices import cpu_has_amx
from ldm.kernels.cpu_attention import set_attention_kernel
from ldm.kernels.cuda_graphs import set_cuda_graphs
from ldm.kernels.winograd import set_winograd, winograd_kernel_bytes

INDUCTOR_CACHE = Path.home() / ".cache" / "ldm-studio" / "inductor"
log = logging.getLogger(__name__)

AMX_NOTICE = ("this CPU has AMX, whose bf16 matrix units run torch's own convolutions and attention faster than "
              "Winograd and our AVX512-BF16 kernels (which would also hold 16/9 of the UNet's 3x3 kernels again, "
              "1.9 GB for SD v1): both are off for bf16 here (bench/convolutions.py, bench/attention.py)")


@dataclass(frozen=True)
class SpeedPaths:
    """The speed paths to use where they apply: all on by default except ``compile``.

    ``compile``: the UNet through torch.compile (``compile_unet``); the compiler then chooses its
    kernels, so the UNet gets neither Winograd, our CPU kernels nor CUDA graphs.
    ``winograd``: 3x3 convolutions as Winograd on a CPU where that is faster (``ldm.kernels.winograd``).
    ``cuda_graphs``: the UNet's steps recorded once per size and replayed on a CUDA GPU (``ldm.kernels.cuda_graphs``).
    ``cpu_kernels``: on a CPU with AVX512-BF16, our C++ kernels (``ldm.kernels.cpu_kernels``, built on
    first use) for bf16 attention and for Winograd's data transforms."""

    compile: bool = False
    winograd: bool = True
    cuda_graphs: bool = True
    cpu_kernels: bool = True

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> SpeedPaths:
        """From the options of ``ldm.options.add_speed_arguments``."""
        return cls(args.compile, args.winograd, args.cuda_graphs, args.cpu_kernels)


def fitted_paths(paths: SpeedPaths, device: torch.device, dtype: torch.dtype) -> tuple[SpeedPaths, str | None]:
    """The paths of ``paths`` that pay for a model in ``dtype`` on ``device``, and why any were turned
    off (None when none were). On a CPU with AMX, bf16 goes through torch's kernels (oneDNN's AMX
    convolutions, torch's attention): there Winograd and our kernels are slower and Winograd's
    transformed kernels cost memory; fp32, which AMX does not run, keeps both."""
    if device.type == "cpu" and dtype == torch.bfloat16 and cpu_has_amx() and (paths.winograd or paths.cpu_kernels):
        return replace(paths, winograd=False, cpu_kernels=False), AMX_NOTICE
    return paths, None


@functools.cache
def say_once(notice: str) -> None:
    """Log a speed path's notice the first time this process meets it (every model loaded later keeps it)."""
    log.warning("%s", notice)


def winograd_fits(model, paths: SpeedPaths, free_mb: float | None, reserve_mb: float) -> tuple[SpeedPaths, str | None]:
    """``paths`` without Winograd when its transformed kernels and a generation (``reserve_mb``, the
    memory guard's estimate of one at the model's own size) would not fit in 90% of the ``free_mb`` left
    after the weights (the guard's rule), and why; unchanged when they fit or ``free_mb`` is unknown."""
    if not paths.winograd or free_mb is None:
        return paths, None
    kernels_mb = sum(winograd_kernel_bytes(part) for part in model.children()
                     if not (paths.compile and part is model.model)) / 2**20  # a compiled UNet makes none
    if not kernels_mb or kernels_mb + reserve_mb <= 0.9 * free_mb:
        return paths, None
    return replace(paths, winograd=False), (
        f"Winograd's transformed kernels ({kernels_mb:,.0f} MB beside the weights) and a generation at the model's "
        f"own size (about {reserve_mb:,.0f} MB) would not fit the {free_mb:,.0f} MB of memory that is free: Winograd "
        "is off for this model, its 3x3 convolutions run direct (slower; --no-winograd turns it off without this notice)")


def set_speed_paths(model, device: torch.device, paths: SpeedPaths = SpeedPaths(), *, free_mb: float | None = None,
                    reserve_mb: float = 0.0) -> None:
    """Apply ``paths`` to a loaded ``LatentDiffusion`` on ``device`` where they pay (``fitted_paths``;
    a path turned off is said once): Winograd 3x3 convolutions on a CPU, our C++ kernels on a CPU with
    AVX512-BF16 (bf16 attention, Winograd's data transforms), the UNet's steps replayed as CUDA graphs
    on a GPU, or a compiled UNet (which chooses its own kernels; the autoencoder keeps Winograd and
    our kernels)."""
    dtype = next(model.parameters()).dtype
    paths, notice = fitted_paths(paths, device, dtype)
    if notice:
        say_once(notice)
    paths, notice = winograd_fits(model, paths, free_mb, reserve_mb)
    if notice:
        say_once(notice)
    bf16_cpu = device.type == "cpu" and dtype == torch.bfloat16
    for part in model.children():  # a compiled UNet's Winograd kernels are never made (they take GiBs)
        compiled = paths.compile and part is model.model
        set_winograd(part, paths.winograd and not compiled, transform_kernels=paths.cpu_kernels)
        set_attention_kernel(part, paths.cpu_kernels and bf16_cpu and not compiled)
    set_cuda_graphs(model.unet, paths.cuda_graphs and not paths.compile)
    if paths.compile:
        compile_unet(model.unet, device)


def compile_unet(unet: torch.nn.Module, device: torch.device) -> None:
    """Compile ``unet`` in place with ``torch.compile`` (its parameter names, the checkpoint
    contract, stay as they are). The first call at each new size compiles, later ones run faster;
    compiled kernels are kept in ``~/.cache/ldm-studio/inductor`` (or ``$TORCHINDUCTOR_CACHE_DIR``)
    for the next start. On the CPU the compiled kernels are C++, so a C++ compiler must be installed."""
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        raise ValueError("compiling the model on the CPU needs a C++ compiler and none was found; install one "
                         "(Debian: apt-get install g++) or run without --compile")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(INDUCTOR_CACHE))
    unet.compile()
