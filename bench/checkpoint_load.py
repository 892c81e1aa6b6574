"""Memory and time of loading one checkpoint file, in a fresh process (a figure, not a test): the resident
set after the imports, its peak during ``load_model`` and after it, and the load's wall time.

    .venv/bin/python bench/checkpoint_load.py FILE [--dtype bfloat16] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run in the child: everything it prints is one JSON line.
CHILD = """
import json, resource, sys, time
import torch
from ldm.checkpoints.loader import load_model
from ldm.devices import resident_mb as rss_mb

path, dtype, device = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3]
imported = rss_mb()
start = time.perf_counter()
loaded = load_model(path, dtype=dtype, device=device)
seconds = time.perf_counter() - start
weights = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values()) / 2**20
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"imported": imported, "peak": peak, "after": rss_mb(), "weights": weights, "seconds": seconds}))
"""


def measure(path: Path, dtype: str, device: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), dtype, device], cwd=ROOT, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    size = args.file.stat().st_size / 2**20
    figures = measure(args.file, args.dtype, args.device)
    print(f"{args.file.name} ({size:.0f} MiB) as {args.dtype} on {args.device}: "
          f"RSS after imports {figures['imported']:.0f} MiB, load peak {figures['peak']:.0f} MiB, "
          f"after {figures['after']:.0f} MiB (weights {figures['weights']:.0f} MiB), {figures['seconds']:.1f} s")


if __name__ == "__main__":
    main()
