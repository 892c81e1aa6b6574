"""A running API server for the API tests: the studio of ``app.py`` (the embedded default models, CPU,
outputs in a temporary folder) behind the standalone ``/sdapi/v1`` app, served by uvicorn in a
thread on a free port."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import uvicorn

import app as studio_app
from api.engine import ApiEngine
from api.server import standalone_app
from tests.helpers import free_port


@dataclass
class Running:
    url: str  # http://127.0.0.1:PORT
    port: int
    engine: ApiEngine

    @property
    def api(self) -> str:
        return f"{self.url}/sdapi/v1"


def make_engine(outputs, models_dir=None) -> ApiEngine:
    more = ["--models-dir", str(models_dir)] if models_dir else []
    studio = studio_app.make_studio(studio_app.parse_args(["--outputs", str(outputs), "--device", "cpu", *more]))
    return ApiEngine(studio, flags={"api": True})


@contextlib.contextmanager
def serving(engine: ApiEngine, logins=(), **options):
    """The API of ``engine`` served until the block ends."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(standalone_app(engine, logins, **options), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the API server did not start")
        time.sleep(0.05)
    try:
        yield Running(f"http://127.0.0.1:{port}", port, engine)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
