"""What the tabs share: the model catalog and its lazily loaded, cached models, where outputs go,
and one stop flag per browser session. Built once by ``app.py``; nothing here runs at import."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm.addons.embeddings import default_embedding_dirs
from ldm.addons.library import default_lora_dirs
from ldm.addons.listing import AddonEntry, list_embedding_entries, list_loras
from ldm.checkpoints.catalog import CatalogEntry, scan
from ldm.checkpoints.loaded import LoadedModel
from ldm.checkpoints.loader import load_model
from ldm.checkpoints.presets import DEFAULT_MODELS, DEFAULT_WEIGHTS_DIR
from ldm.kernels.paths import SpeedPaths
from ldm.tasks import registry
from ldm.tasks.request import DEFAULT_BUDGET_MB
from ldm.tasks.sampler_presets import SamplerPreset, read_sampler_presets
from ui.outputs import OutputWriter

log = logging.getLogger(__name__)

WEIGHTS_DIR = DEFAULT_WEIGHTS_DIR.parent


class ModelCache:
    """Models loaded on first use and kept, by path; one lock per model, so that a model runs one
    generation at a time however many sessions ask for it."""

    def __init__(self, device: torch.device, dtype: torch.dtype,
                 memory_format: str = "contiguous", speed: SpeedPaths = SpeedPaths()):
        self.device, self.dtype, self.memory_format, self.speed = device, dtype, memory_format, speed
        self._models: dict[Path, LoadedModel] = {}
        self._locks: dict[Path, threading.Lock] = {}
        self._guard = threading.Lock()
        self._loading = threading.Lock()

    def lock(self, path: str | Path) -> threading.Lock:
        """The lock a generation with this model holds while it runs."""
        with self._guard:
            return self._locks.setdefault(Path(path).resolve(), threading.Lock())

    def loaded(self, path: str | Path) -> LoadedModel | None:
        """The model at ``path`` if it is loaded already, else None (nothing is loaded)."""
        return self._models.get(Path(path).resolve())

    def unload(self, path: str | Path) -> bool:
        """Drop a loaded model, once the generation holding its lock ends, and free its memory; it loads
        again when next used. Whether it was loaded."""
        path = Path(path).resolve()
        with self.lock(path), self._loading:
            dropped = self._models.pop(path, None) is not None
        if dropped:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return dropped

    def get(self, path: str | Path) -> LoadedModel:
        path = Path(path).resolve()
        with self._loading:
            if path not in self._models:
                log.info("loading %s", path)
                self._models[path] = load_model(path, device=self.device, dtype=self.dtype,
                                                 memory_format=self.memory_format, speed=self.speed)
            return self._models[path]


@dataclass
class Studio:
    model_dirs: Sequence[Path]
    writer: OutputWriter
    models: ModelCache
    sampler_presets: list[SamplerPreset] = field(default_factory=read_sampler_presets)
    memory_budget_mb: int = DEFAULT_BUDGET_MB  # the tiling section's default
    extra_lora_dirs: Sequence[Path] = ()  # --lora-dir
    extra_embedding_dirs: Sequence[Path] = ()  # --embeddings-dir
    _stops: dict[str, threading.Event] = field(default_factory=dict)
    _catalog: list[CatalogEntry] | None = None
    _addons: list[AddonEntry] | None = None

    def catalog(self, refresh: bool = False) -> list[CatalogEntry]:
        if self._catalog is None or refresh:
            self._catalog = scan([WEIGHTS_DIR, *self.model_dirs])
        return self._catalog

    def lora_dirs(self) -> tuple[Path, ...]:
        """Where <lora:NAME> tags are looked up: --lora-dir, then models/Lora beside each models folder."""
        return tuple(dict.fromkeys([*self.extra_lora_dirs, *default_lora_dirs([WEIGHTS_DIR, *self.model_dirs])]))

    def embedding_dirs(self) -> tuple[Path, ...]:
        """Where textual-inversion embeddings are looked up: --embeddings-dir, then models/embeddings beside
        each models folder."""
        folders = default_embedding_dirs([WEIGHTS_DIR, *self.model_dirs])
        return tuple(dict.fromkeys([*self.extra_embedding_dirs, *folders]))

    def addon_folders(self) -> dict[str, tuple[Path, ...]]:
        """Where each kind of add-on is looked for, by kind."""
        return {"lora": self.lora_dirs(), "embedding": self.embedding_dirs()}

    def addons(self, refresh: bool = False) -> list[AddonEntry]:
        """The LoRAs and embeddings of the folders (``ldm.addons.listing``), read once and again on ``refresh``."""
        if self._addons is None or refresh:
            self._addons = list_loras(self.lora_dirs()) + list_embedding_entries(self.embedding_dirs())
        return self._addons

    def entries_for(self, task: str) -> list[CatalogEntry]:
        """Recognised models that serve ``task`` (a name of ``ldm.tasks.registry.TASKS``)."""
        return [e for e in self.catalog() if self.serves(e, task)]

    @staticmethod
    def serves(entry: CatalogEntry, task: str) -> bool:
        return entry.preset is not None and registry.serves(task, entry.preset.model)

    def default_for(self, task: str) -> str | None:
        """The embedded default model that serves ``task`` where one does, else the first model that does."""
        paths = [e.path for e in self.entries_for(task)]
        shipped = [p.resolve() for p in DEFAULT_MODELS.values() if p.resolve() in paths]
        return str(shipped[0]) if shipped else (str(paths[0]) if paths else None)

    def entry(self, path: str | Path) -> CatalogEntry:
        path = Path(path).resolve()
        for e in self.catalog():
            if e.path == path:
                return e
        raise ValueError(f"{path.name} is not in the model list; press the refresh button next to the model menu")

    def stop_flag(self, session: str) -> threading.Event:
        return self._stops.setdefault(session, threading.Event())
