"""Rendering batch jobs: a ``Renderer`` holds one loaded model at a time (jobs come grouped by model)
and turns a job into a PNG's bytes and its sidecar record. The same class renders in this process and
inside a Ray actor (``ldm.distributed.batch``), so both give the same pictures."""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ldm.batch.jobs import BatchJob
from ldm.kernels.paths import SpeedPaths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadOptions:
    """How a renderer loads its models: the CLI's --device, --dtype, --memory-format and speed options,
    --preset, --tokenizer, --ema; ``threads``: torch's CPU threads (0: torch's default)."""

    device: str = "auto"
    dtype: str = "auto"
    memory_format: str = "auto"
    speed: SpeedPaths = SpeedPaths()
    preset: str | None = None
    tokenizer: str | None = None
    ema: bool | None = None
    threads: int = 0


@dataclass(frozen=True)
class RenderedJob:
    id: str
    png: bytes
    sidecar: dict  # the job's parameters, the PNG's parameters text, where and how long it rendered


class Renderer:
    """Renders jobs with ``options``; loads a model on the first job that names it and keeps it until a
    job names another one."""

    def __init__(self, options: LoadOptions = LoadOptions()):
        self.options = options
        self._loaded = None
        if options.threads:
            import torch

            torch.set_num_threads(options.threads)

    def model(self, job: BatchJob):
        """The loaded model of ``job``, checked to be the file the job was planned with."""
        if self._loaded is not None and str(self._loaded.path) == job.model:
            return self._loaded
        self._loaded = None  # the previous model's memory is freed before the next one loads
        path = Path(job.model)
        if not path.exists():
            raise ValueError(f"{socket.gethostname()}: model {path} is not there; every machine of the batch needs "
                             f"the model (hash {job.model_hash}) at the same path, e.g. in a shared folder")
        from ldm.checkpoints.loader import load_model
        from ldm.devices import choose_device, choose_dtype, keep_freed_memory

        device = choose_device(self.options.device)
        keep_freed_memory(device)
        loaded = load_model(path, device=device, dtype=choose_dtype(self.options.dtype, device), preset=self.options.preset,
                            ema=self.options.ema, tokenizer_dir=self.options.tokenizer,
                            memory_format=self.options.memory_format, speed=self.options.speed)
        if loaded.short_hash != job.model_hash:
            raise ValueError(f"{socket.gethostname()}: {path} has hash {loaded.short_hash}, not the batch's "
                             f"{job.model_hash}; every machine needs the same file at that path")
        self._loaded = loaded
        return loaded

    def render(self, job: BatchJob) -> RenderedJob:
        from ldm.addons.embeddings import default_embedding_dirs
        from ldm.addons.library import default_lora_dirs
        from ldm.tasks.parameters import encode_png
        from ldm.tasks.txt2img import txt2img

        loaded = self.model(job)
        start = time.perf_counter()
        request = replace(job.request(), lora_dirs=tuple(default_lora_dirs([loaded.path])),
                          embedding_dirs=tuple(default_embedding_dirs([loaded.path])))
        result = txt2img(loaded, request)
        seconds = time.perf_counter() - start
        parameters = result.parameters[0]
        sidecar = {"id": job.id, "file": f"{job.id}.png", "job": asdict(job), "parameters": parameters,
                   "notices": result.notices, "seconds": round(seconds, 4),
                   "worker": f"{socket.gethostname()}:{os.getpid()}"}
        log.info("rendered %s in %.2f s", job.id, seconds)
        return RenderedJob(job.id, encode_png(result.images[0], parameters), sidecar)
