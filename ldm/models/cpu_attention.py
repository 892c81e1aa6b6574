"""bf16 attention on CPUs with AVX512-BF16, through our own kernel (``csrc/attention_bf16.cpp``).

torch's CPU attention spends as long on the softmax's exponentials as on its two matrix products in
SD v1's 4096-token self-attention (head width 40). The kernel computes the products as AVX512-BF16
dot products over register tiles and the exponential as a short polynomial, one pass over the keys
per block of 48 queries (the online softmax of FlashAttention), accumulating in fp32.

Measured on a 2-core AMD EPYC (AVX512-BF16), one call, best of 3 (2026-11-27; the test shapes in
``bench/attention.py``): (2, 8, 4096, 40) self-attention 160 ms against torch's 360 ms; (2, 8, 1024,
80) 17 against 35 ms; cross-attention to 77 tokens 7.8 against 11.4 ms; the autoencoder's single
512-wide head over 4096 tokens 105 against 193 ms. Its error against a float64 reference is the
same as torch's bf16 kernel's (both are the final rounding to bf16).

The kernel is compiled once per source and torch version with the C++ compiler (about 10 s), kept
in ``~/.cache/ldm-studio/kernels``, and loaded as ``torch.ops.ldm.attention_bf16``. Where the CPU
lacks AVX512-BF16, or no compiler is installed, or the build fails, attention runs
through ``torch.nn.functional.scaled_dot_product_attention`` (a warning says why). Only sampling uses
it: calls that need gradients, other dtypes and other devices take torch's kernel.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm.devices import cpu_has_avx512_bf16

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "attention_bf16.cpp"
KERNEL_CACHE = Path.home() / ".cache" / "ldm-studio" / "kernels"
FLAGS = ["-O3", "-std=c++20", "-fPIC", "-shared", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"]


def library_path() -> Path:
    """One library per source text, torch version and flags, so that a change of any of them builds anew."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:12]
    return KERNEL_CACHE / f"attention_bf16-torch{torch.__version__}-{digest}.so"


def build(library: Path, compiler: str) -> None:
    """Compile the kernel against this torch into ``library`` (written whole or not at all, so that
    processes building at once do not load each other's half-written file)."""
    from torch.utils import cpp_extension

    library.parent.mkdir(parents=True, exist_ok=True)
    partial = library.with_suffix(f".{os.getpid()}.partial")
    command = [compiler, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               *(f"-I{folder}" for folder in cpp_extension.include_paths()), str(SOURCE), "-o", str(partial),
               *(f"-L{folder}" for folder in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu",
               *(f"-Wl,-rpath,{folder}" for folder in cpp_extension.library_paths())]
    log.info("building the bf16 attention kernel for this CPU (once, about 10 s): %s", library)
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
        os.replace(partial, library)
    finally:
        partial.unlink(missing_ok=True)


@functools.cache
def load_attention_kernel() -> Callable[..., torch.Tensor] | None:
    """``torch.ops.ldm.attention_bf16(q, k, v, scale)``, built on the first call of a process when it
    is not yet in the cache; None (with a warning that says why) where it cannot be used."""
    if not cpu_has_avx512_bf16():
        return None
    library = library_path()
    if str(library) not in torch.ops.loaded_libraries:
        if not library.exists():
            compiler = os.environ.get("CXX", "c++")
            if not shutil.which(compiler):
                log.warning("bf16 attention runs through torch's kernel: building ours needs a C++ compiler (%s; "
                            "Debian: apt-get install g++, which ./launch.sh installs)", compiler)
                return None
            try:
                build(library, compiler)
            except (subprocess.CalledProcessError, OSError) as error:
                detail = getattr(error, "stderr", None) or str(error)
                log.warning("bf16 attention runs through torch's kernel: building ours into %s failed: %s",
                            library, detail.strip()[-2000:])
                return None
        torch.ops.load_library(str(library))
    return torch.ops.ldm.attention_bf16


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, bf16_kernel: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, tokens, d) tensors; with ``bf16_kernel`` (set by
    ``set_attention_kernel``) sampling calls in bf16 on the CPU go to our kernel."""
    if (bf16_kernel and q.device.type == "cpu" and q.shape[-1] % 2 == 0
            and all(t.dtype == torch.bfloat16 and t.stride(-1) == 1 and not t.requires_grad for t in (q, k, v))):
        return torch.ops.ldm.attention_bf16(q, k, v, q.shape[-1] ** -0.5)
    return F.scaled_dot_product_attention(q, k, v)


def set_attention_kernel(model: nn.Module, enabled: bool) -> int:
    """Turn our bf16 attention kernel on or off in every attention layer of ``model`` (those with a
    ``bf16_kernel`` attribute); on builds or loads it first, and stays off where it cannot be had.
    Returns the number of layers that use it."""
    enabled = enabled and load_attention_kernel() is not None
    layers = [m for m in model.modules() if hasattr(m, "bf16_kernel")]
    for layer in layers:
        layer.bf16_kernel = enabled
    return len(layers) if enabled else 0
