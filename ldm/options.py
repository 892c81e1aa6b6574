"""The command-line options of where and how models run, shared by the studio, the CLI and the bench.

Only argparse here: ``python -m ldm --help`` builds every option without importing torch.
"""

from __future__ import annotations

import argparse


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype and --memory-format, then the speed paths (``add_speed_arguments``)."""
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto",
                        help="auto (fp16 on CUDA; bf16 on a CPU with bf16 units, else fp32), fp32, fp16, bf16")
    parser.add_argument("--memory-format", default="auto", choices=["auto", "channels_last", "contiguous"],
                        help="auto (channels_last on the CPU for models of SD's width, where it is faster), channels_last, contiguous")
    add_speed_arguments(parser)


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per speed path of ``ldm.kernels.paths.SpeedPaths`` (read back with its ``from_arguments``)."""
    parser.add_argument("--compile", action="store_true",
                        help="compile the UNet with torch.compile: the first generation at each size waits for the "
                        "compiler, later ones run faster; needs g++ on a CPU")
    parser.add_argument("--no-winograd", dest="winograd", action="store_false",
                        help="run 3x3 convolutions directly on the CPU too (by default sampling runs them as Winograd "
                        "where that is faster, for 16/9 of their kernels' memory)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="on a CUDA GPU, launch the UNet's kernels one by one at every step (by default each "
                        "image size's step is recorded once as a CUDA graph and replayed)")
    parser.add_argument("--no-cpu-kernels", dest="cpu_kernels", action="store_false",
                        help="use torch's kernels only (by default a CPU with AVX512-BF16 runs bf16 attention and "
                        "Winograd's data transforms through ours, built once with g++)")
