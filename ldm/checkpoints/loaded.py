"""A loaded model and the report of its loading: what the tasks and the studio hold on to."""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from ldm.checkpoints.diffusers_folder import weight_files
from ldm.checkpoints.presets import ModelPreset
from ldm.models.latent_diffusion import LatentDiffusion


@dataclass(frozen=True)
class LoadReport:
    preset: str
    used_ema: bool
    ignored: tuple[str, ...] = ()
    tensors: int = 0
    filled: tuple[str, ...] = ()  # tensors a diffusers folder does not carry and sampling never reads, set to zeros

    def summary(self) -> str:
        ema = "EMA weights" if self.used_ema else "weights"
        ignored = f", ignored {len(self.ignored)} non-model entries" if self.ignored else ""
        filled = f", filled {len(self.filled)} unused tensors the folder does not carry with zeros" if self.filled else ""
        return f"loaded {self.tensors} {ema} as {self.preset}{ignored}{filled}"


@dataclass
class LoadedModel:
    model: LatentDiffusion
    preset: ModelPreset
    path: Path
    report: LoadReport
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:
        return self.path.name if self.path.is_dir() else self.path.stem

    @cached_property
    def short_hash(self) -> str:
        """``model_hash`` of the model's file or folder (the 'Model hash' other tools print)."""
        return model_hash(self.path)


def model_hash(path: Path) -> str:
    """First 10 hex digits of a checkpoint file's SHA-256; for a diffusers folder, of its UNet, VAE and
    text encoder weights read in that order. Read once per file as it is on disk (its size and
    modification time): a batch's planning and its renderer in the same process, or a model loaded
    again, do not read gigabytes twice."""
    parts = tuple(weight_files(path) if path.is_dir() else [path])
    stamps = tuple((str(Path(p).resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in parts)
    return _hash_of(stamps)


@functools.lru_cache(maxsize=64)
def _hash_of(stamps: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for part, _, _ in stamps:
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:10]
