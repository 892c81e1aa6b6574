"""3x3 convolutions direct against Winograd F(2x2, 3x3) (``ldm.kernels.winograd``), at the shapes of
Stable Diffusion v1's UNet (batch 2) and VAE decoder (batch 1) for a 512 px image, channels-last, in
fp32 and bf16: the median time of each, and each one's largest error against a float64 reference, over
the output's largest value. Winograd runs with its data transforms through torch's operations and,
where our C++ kernels load (``ldm.kernels.cpu_kernels``), through those ("ours", as sampling runs it).

Before each timed call a 64 MB buffer is written, so that the call finds its data in memory rather than
in the caches, as it does inside a UNet step (``--hot`` times repeated calls instead). Freed memory is
kept in the process as the CLI and the studio keep it (``ldm.devices.keep_freed_memory``; ``--malloc
system`` for the C library's defaults, under which the transforms' large buffers are faulted in again
at every call).

    .venv/bin/python bench/convolutions.py [--rounds 5] [--dtypes fp32 bf16] [--parts unet vae] [--hot]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.devices import keep_freed_memory, reusing_freed_memory  # noqa: E402
from ldm.kernels.cpu_kernels import load_cpu_kernels  # noqa: E402
from ldm.kernels.winograd import winograd_conv3x3, winograd_weight  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (in channels, out channels, side): every 3x3 stride-1 shape of the SD v1 UNet at a 64x64 latent but the first and last
SHAPES = {
    "unet": (2, [(320, 320, 64), (640, 320, 64), (960, 320, 64), (640, 640, 32), (1280, 640, 32), (1920, 640, 32),
                 (1280, 1280, 32), (1280, 1280, 16), (2560, 1280, 16), (1280, 1280, 8), (2560, 1280, 8)]),
    # and of its VAE decoder at 512 px, from 256 channels up (narrower layers never use Winograd)
    "vae": (1, [(512, 512, 64), (512, 512, 128), (512, 512, 256), (512, 256, 256), (256, 256, 256), (256, 256, 512)]),
}


def median_seconds(call, rounds: int, flush: torch.Tensor | None) -> float:
    call()
    times = []
    for i in range(rounds):
        if flush is not None:
            flush.fill_(i)
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--parts", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--malloc", choices=["kept", "system"], default="kept")
    parser.add_argument("--hot", action="store_true", help="time repeated calls, the data left in the caches")
    args = parser.parse_args()
    kept = args.malloc == "kept" and keep_freed_memory(torch.device("cpu"))
    ours = load_cpu_kernels()
    flush = None if args.hot else torch.empty(16 * 2**20)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, memory {'kept' if kept else 'system'}, "
          f"{'hot' if args.hot else 'flushed'} caches, our transforms {'loaded' if ours else 'not available'}")
    print(f"{'part':4s} {'dtype':5s} {'in':>5s} {'out':>5s} {'side':>4s} {'direct':>9s} {'winograd':>9s} {'ours':>9s} "
          f"{'ratio':>5s}  error direct / winograd / ours (ratio: the faster Winograd over direct)")
    g = torch.Generator().manual_seed(0)
    for name, part in ((n, p) for n in args.dtypes for p in args.parts):
        dtype = DTYPES[name]
        batch, shapes = SHAPES[part]
        for cin, cout, side in shapes:
            x = torch.randn(batch, cin, side, side, generator=g)
            weight, bias = torch.randn(cout, cin, 3, 3, generator=g) * cin**-0.5 / 3, torch.randn(cout, generator=g)
            reference = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
            x = x.to(dtype).contiguous(memory_format=torch.channels_last)
            w, b = weight.to(dtype).contiguous(memory_format=torch.channels_last), bias.to(dtype)
            transformed = winograd_weight(w)
            calls = [lambda: F.conv2d(x, w, b, padding=1), lambda: winograd_conv3x3(x, transformed, b)]
            if ours:
                calls.append(lambda: winograd_conv3x3(x, transformed, b, transform_kernels=True))
            with torch.inference_mode(), reusing_freed_memory():  # kept as in sampling steps
                seconds = [median_seconds(call, args.rounds, flush) for call in calls]
                errors = [(call().double() - reference).abs().max().item() / reference.abs().max().item() for call in calls]
            times = " ".join(f"{1e3 * s:6.1f} ms" for s in seconds) + ("" if ours else f" {'-':>9s}")
            print(f"{part:4s} {name:5s} {cin:5d} {cout:5d} {side:4d} {times} {min(seconds[1:]) / seconds[0]:5.2f}  "
                  + " / ".join(f"{e:.1e}" for e in errors), flush=True)


if __name__ == "__main__":
    main()
