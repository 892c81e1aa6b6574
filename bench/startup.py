"""How long the command line takes to start: ``python -m ldm --help`` and ``python -m ldm inspect FILE``
(the embedded default model), each in a fresh process, the way a user runs them (a figure, not a test).

    .venv/bin/python bench/startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "python -m ldm --help": ["--help"],
    "python -m ldm inspect weights/default/default-txt2img.safetensors": ["inspect", "weights/default/default-txt2img.safetensors"],
}


def wall_seconds(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ldm", *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    for name, command in COMMANDS.items():
        wall_seconds(command)  # the first run warms the file cache
        times = [wall_seconds(command) for _ in range(args.runs)]
        print(f"{name}: median {statistics.median(times):.2f} s, best {min(times):.2f} s, worst {max(times):.2f} s "
              f"over {args.runs} runs", flush=True)


if __name__ == "__main__":
    main()
