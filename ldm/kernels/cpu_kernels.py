"""Our C++ kernels for CPUs with AVX512-BF16 (``csrc/``), built against the installed torch on first
use and loaded as ``torch.ops.ldm.*``:

- ``attention_bf16``: bf16 attention (``ldm.kernels.cpu_attention``).
- ``winograd_input``, ``winograd_output``: the data transforms of Winograd convolutions, fp32 and
  bf16 (``ldm.kernels.winograd``).

The sources are compiled side by side with the C++ compiler (``$CXX`` or ``c++``; once per source
text and torch version) into ``~/.cache/ldm-studio/kernels``; a library is written whole or
not at all, so processes that build at once never load half a file. Where the CPU lacks AVX512-BF16,
no compiler is installed or the build fails, ``load_cpu_kernels`` says why in a warning and returns
False, and every caller keeps torch's own kernels.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch

from ldm.devices import cpu_has_avx512_bf16

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("attention_bf16.cpp", "winograd_transforms.cpp")]
KERNEL_CACHE = Path.home() / ".cache" / "ldm-studio" / "kernels"
FLAGS = ["-O3", "-std=c++20", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"]


def library_path() -> Path:
    """One library per source text, torch version and flags, so that a change of any of them builds anew."""
    digest = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES) + " ".join(FLAGS).encode()).hexdigest()[:12]
    return KERNEL_CACHE / f"ldm-kernels-torch{torch.__version__}-{digest}.so"


def build(library: Path, compiler: str) -> None:
    """Compile the sources (side by side) and link them against this torch into ``library``."""
    from torch.utils import cpp_extension

    library.parent.mkdir(parents=True, exist_ok=True)
    partial = library.with_suffix(f".{os.getpid()}.partial")
    objects = [partial.with_name(f"{partial.name}.{source.stem}.o") for source in SOURCES]
    includes = [f"-I{folder}" for folder in cpp_extension.include_paths()]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    log.info("building our CPU kernels for this CPU (once, some seconds): %s", library)
    try:
        compiles = [subprocess.Popen([compiler, *FLAGS, abi, *includes, "-c", str(source), "-o", str(obj)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    for source, obj in zip(SOURCES, objects)]
        errors = [command.communicate()[1] for command in compiles]  # all finish before any object is removed
        for command, error in zip(compiles, errors):
            if command.returncode:
                raise subprocess.CalledProcessError(command.returncode, command.args, stderr=error)
        folders = cpp_extension.library_paths()
        subprocess.run([compiler, "-shared", "-fopenmp", *map(str, objects), "-o", str(partial),
                        *(f"-L{f}" for f in folders), "-lc10", "-ltorch_cpu", *(f"-Wl,-rpath,{f}" for f in folders)],
                       check=True, capture_output=True, text=True)
        os.replace(partial, library)
    finally:
        for leftover in (partial, *objects):
            leftover.unlink(missing_ok=True)


@functools.cache
def load_cpu_kernels() -> bool:
    """Whether ``torch.ops.ldm``'s kernels can be used in this process: built on the first call when
    they are not yet in the cache, then loaded; False (with a warning that says why) where they cannot."""
    if not cpu_has_avx512_bf16():
        return False
    library = library_path()
    if str(library) in torch.ops.loaded_libraries:
        return True
    if not library.exists():
        compiler = os.environ.get("CXX", "c++")
        if not shutil.which(compiler):
            log.warning("our CPU kernels (bf16 attention, Winograd transforms) are not used: building them needs a "
                        "C++ compiler (%s; Debian: apt-get install g++, which ./launch.sh installs)", compiler)
            return False
        try:
            build(library, compiler)
        except (subprocess.CalledProcessError, OSError) as error:
            detail = getattr(error, "stderr", None) or str(error)
            log.warning("our CPU kernels (bf16 attention, Winograd transforms) are not used: building %s failed: %s",
                        library, detail.strip()[-2000:])
            return False
    torch.ops.load_library(str(library))
    return True
