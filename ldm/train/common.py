"""Shared training plumbing: recipes, learning-rate schedule, checkpoints that resume."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def read_recipe(path: str | Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def learning_rate(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_training_state(path: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(), **(extra or {})}, tmp)
    os.replace(tmp, path)


def resume(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load a training state written by ``save_training_state``; the step to continue from (0 if none)."""
    if not path.exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    log.info("resumed %s at step %d", path, state["step"])
    return int(state["step"])


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k].float(), b[k].float()) for k in a)


def same_shapes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
