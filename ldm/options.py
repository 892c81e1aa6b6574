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


# ldm.tasks.request's TILING_MODES and DEFAULT_BUDGET_MB, and the names of ldm.sampling.samplers.SAMPLERS
# and ldm.sampling.sigmas.SCHEDULES, repeated here so that declaring the options imports no torch;
# tests/test_cli.py pins them to the originals.
TILING_MODES = ("auto", "always", "off")
DEFAULT_BUDGET_MB = 2048
SAMPLER_NAMES = ("DDIM", "Euler", "Euler a", "Heun", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE", "UniPC", "LCM")
SCHEDULE_NAMES = ("Automatic", "Uniform", "Karras", "Exponential", "SGM Uniform", "Simple", "Normal", "KL Optimal",
                  "Align Your Steps", "Beta")
# and ldm.tasks.img2img.RESIZE_MODES, ldm.tasks.outpaint.FILL_MODES and MAX_MASK_BLUR, likewise
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill")
FILL_MODES = ("fill", "original", "latent noise", "latent nothing")
MAX_MASK_BLUR = 64


def named(choices: tuple[str, ...]):
    """An argparse ``type`` that spells a name as ``choices`` do, whatever its case ("dpm++ 2m" is
    "DPM++ 2M"); a name that is none of them is left for ``choices`` to refuse with the list."""
    by_case = {c.casefold(): c for c in choices}

    def spelled(text: str) -> str:
        return by_case.get(" ".join(text.split()).casefold(), text)

    return spelled


def sampler_name(text: str) -> str:
    """--sampler's ``type``: a name as ``named`` spells it; an old fused name ("DPM++ 2M Karras") is
    refused with the two options it stands for."""
    name = named(SAMPLER_NAMES)(text)
    for schedule in SCHEDULE_NAMES[1:]:
        base = named(SAMPLER_NAMES)(name[: -len(schedule)]) if name.casefold().endswith(" " + schedule.casefold()) else ""
        if base in SAMPLER_NAMES:
            raise argparse.ArgumentTypeError(f"{text!r} fuses a sampler and a schedule as AUTOMATIC1111 up to 1.8 named "
                                             f"them: use --sampler {base!r} --schedule {schedule!r}")
    return name


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """--sampler, --schedule, --s-noise: the request's sampler (AUTOMATIC1111's 1.9+ names), its noise
    schedule and the scale of the noise the ancestral and SDE samplers add."""
    parser.add_argument("--sampler", type=sampler_name, choices=SAMPLER_NAMES, metavar="NAME",
                        help=f"sampler, one of {', '.join(SAMPLER_NAMES)} (default: the model preset's; DDIM for "
                        "the original models)")
    parser.add_argument("--schedule", type=named(SCHEDULE_NAMES), choices=SCHEDULE_NAMES, metavar="NAME",
                        help=f"noise schedule, one of {', '.join(SCHEDULE_NAMES)}. Automatic (default) is the "
                        "sampler's own: Karras for DPM++ 2M and DPM++ SDE, Exponential for DPM++ 2M SDE, Uniform "
                        "for Euler, Euler a and Heun, their own timesteps for DDIM, UniPC and LCM")
    parser.add_argument("--s-noise", type=float, default=1.0, metavar="X",
                        help="scale of the noise Euler a, DPM++ 2M SDE and DPM++ SDE add at each step, 0 to 2 "
                        "(default 1); the other samplers ignore it")


def add_memory_budget_argument(parser: argparse.ArgumentParser, note: str = "") -> None:
    """--memory-budget MB, the studio's (the tiling section's default) and the CLI's, one default for both."""
    parser.add_argument("--memory-budget", type=int, default=DEFAULT_BUDGET_MB, metavar="MB",
                        help="the most memory (MB) a generation may add on top of the model's weights; a canvas "
                        "whose estimated peak is above it is sampled and decoded in tiles (tiling auto). Lower saves "
                        f"memory and costs time (default {DEFAULT_BUDGET_MB}){note}")


def tiling_mode(text: str) -> str:
    """A --tiling value as ``TilingOptions.mode`` has it: case aside, "never" is "off"."""
    mode = text.strip().lower()
    return "off" if mode == "never" else mode


def add_tiling_arguments(parser: argparse.ArgumentParser) -> None:
    """--memory-budget, --tiling, --tile and --overlap: the fields of ``ldm.tasks.request.TilingOptions``,
    with the defaults of the studio's "Large canvas: tiling" section."""
    group = parser.add_argument_group("large canvases", "beyond the model's training size, the canvas is denoised "
                                      "whole or in overlapping tiles blended at every step")
    add_memory_budget_argument(group)
    group.add_argument("--tiling", type=tiling_mode, choices=TILING_MODES, default="auto",
                       help="auto (default): whole while the estimated peak fits --memory-budget, in tiles beyond; "
                       "always: in tiles whenever the canvas is larger than a tile: flat memory, slower; off (or never): "
                       "whole, memory grows with the square of the side and a canvas that does not fit the free "
                       "memory is refused")
    group.add_argument("--tile", type=int, default=0, metavar="PX",
                       help="tile side in pixels (default 0: the model's training size); a larger tile takes more "
                       "memory (with its area) and fewer windows a step")
    group.add_argument("--overlap", type=int, default=-1, metavar="PX",
                       help="pixels neighbouring tiles share and blend across, 0 to less than the tile (default -1: "
                       "a quarter of the tile); more hides seams better and costs time (more windows)")
