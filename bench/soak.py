"""Soak: many generations with the embedded default model through the running studio (one
gradio_client user, as a script drives it), printing the server process's resident memory as it
goes. Memory should level off after the first few and not grow with the count.

    .venv/bin/python bench/soak.py --count 200
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import app  # noqa: E402
from ui.client import StudioClient  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=20, help="print memory every N generations")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as outputs:
        studio = app.make_studio(app.parse_args(["--outputs", outputs, "--port", str(port)]))
        server = app.launch(studio, "127.0.0.1", port, block=False)
        client = StudioClient(f"http://127.0.0.1:{port}/")
        start, readings = time.perf_counter(), []
        print(f"before: {rss_mb():.0f} MB")
        for i in range(1, args.count + 1):
            status = client.generate("txt2img", Prompt=f"a red circle and a blue square {i}", Seed=i, Steps=args.steps).status
            if not status.startswith("saved "):
                raise SystemExit(f"generation {i}: {status}")
            if i % args.every == 0:
                gc.collect()
                readings.append(rss_mb())
                print(f"{i:4d} generations: {readings[-1]:.0f} MB resident, {(time.perf_counter() - start) / i:.2f} s each", flush=True)
        server.close()
    if len(readings) >= 2:
        print(f"growth from generation {args.every} to {args.count}: {readings[-1] - readings[0]:+.0f} MB")


if __name__ == "__main__":
    main()
