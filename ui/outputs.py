"""Finished images go to ``outputs/<date>/NNNNN-<seed>.png`` at once, each with its parameters
(the AUTOMATIC1111 ``parameters`` text chunk) and the studio's own settings (boxes, mask settings,
task, as an ``ldm_studio`` JSON chunk), so nothing finished is lost and every image can be
reproduced or restored: a dropped PNG gives its settings back to a tab (``Restore``)."""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
from PIL import Image

from ldm.addons.library import missing_loras
from ldm.tasks.parameters import SamplerSettings, parse_parameters, read_sampler, save_png
from ldm.text.prompt_syntax import EMPHASIS_MODES

_INDEX = re.compile(r"^(\d{5})-")


class OutputError(OSError):
    """The outputs folder cannot take an image: its message says where and why."""


@dataclass
class OutputWriter:
    root: Path
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def folder(self, now: dt.datetime | None = None) -> Path:
        return self.root / (now or dt.datetime.now()).strftime("%Y-%m-%d")

    def save(self, image: Image.Image, parameters: str, seed: int, extra: dict, attachments: dict[str, Image.Image] | None = None) -> Path:
        """Write one image (and its attachments, e.g. the mask, as NNNNN-<seed>-<name>.png) and return its path."""
        with self._lock:
            folder = self.folder()
            try:
                folder.mkdir(parents=True, exist_ok=True)
                index = 1 + max((int(m.group(1)) for p in folder.iterdir() if (m := _INDEX.match(p.name))), default=0)
                stem = f"{index:05d}-{seed}"
                files = {}
                for name, picture in (attachments or {}).items():
                    files[name] = save_png(picture, folder / f"{stem}-{name}.png").name
                return save_png(image, folder / f"{stem}.png", parameters, {**extra, **({"files": files} if files else {})})
            except OSError as error:
                why = error.strerror or str(error)
                raise OutputError(f"cannot save the image in {folder}: {why}; the images saved before it are kept. "
                                  "Free some space or start the studio with --outputs DIR") from error


@dataclass(frozen=True)
class Restored:
    """What a studio (or AUTOMATIC1111) PNG says about how it was made."""

    fields: dict[str, str]
    extra: dict

    def number(self, key: str, kind=float):
        try:
            return kind(self.fields[key])
        except (KeyError, ValueError):
            return None

    @property
    def size(self) -> tuple[int, int] | None:
        match = re.fullmatch(r"(\d+)x(\d+)", self.fields.get("Size", ""))
        return (int(match.group(1)), int(match.group(2))) if match else None


def read_restore(path: str | Path) -> Restored:
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {})
            parameters, extra = text.get("parameters"), text.get("ldm_studio")
    except OSError as error:
        raise ValueError(f"cannot read {Path(path).name} as an image ({error})") from None
    if parameters is None:
        raise ValueError(f"{Path(path).name} carries no generation parameters (drop a PNG the studio or AUTOMATIC1111 made)")
    try:
        decoded = json.loads(extra) if extra else {}
    except ValueError:
        decoded = {}
    return Restored(parse_parameters(parameters), decoded if isinstance(decoded, dict) else {})


def read_parameters_text(path: str | None) -> str:
    if not path:
        return ""
    with Image.open(path) as image:
        return getattr(image, "text", {}).get("parameters", "")


def restore_box(prefix: str, what: str = "settings") -> gr.File:
    return gr.File(label=f"Drop a studio PNG here to restore its {what}", file_types=[".png"], height=90,
                   elem_id=f"{prefix}-restore")


@dataclass
class Restore:
    """The controls a dropped PNG's parameters set: the prompts, the sampling settings (a
    ``ui.controls.SamplingControls``: sampler, schedule, steps, guidance, eta, s_noise, seed) and,
    where the tab has them, the size sliders and the emphasis menu. ``lora_dirs``: where the
    prompt's LoRAs are looked for (a restored prompt naming one that is not there warns)."""

    prompt: gr.Textbox
    negative: gr.Textbox | None
    sampling: object
    width: gr.Slider | None = None
    height: gr.Slider | None = None
    lora_dirs: Callable[[], Sequence[Path]] | None = None

    @property
    def fields(self) -> dict:
        """Parameters-text field -> (component, type) for the numbers restored as they are written."""
        sampling = self.sampling
        pairs = {"Steps": (sampling.steps, int), "Seed": (sampling.seed, int), "CFG scale": (sampling.scale, float)}
        return {key: pair for key, pair in pairs.items() if pair[0] is not None}

    @property
    def components(self) -> list:
        """Every component ``updates`` may set (the outputs of a restore event)."""
        sizes = [self.width, self.height] if self.width is not None else []
        sampling = self.sampling
        emphasis = [sampling.emphasis] if getattr(sampling, "emphasis", None) is not None else []
        return [self.prompt, *([self.negative] if self.negative is not None else []),
                *(component for component, _ in self.fields.values()),
                sampling.sampler, sampling.schedule, sampling.eta, sampling.s_noise, *sizes, *emphasis]

    def updates(self, path: str | None) -> tuple[dict, Restored | None]:
        """Control updates from a dropped PNG's parameters, and the parsed record (for tab-specific fields).
        A sampler or schedule the studio does not have leaves those menus as they are, with a warning
        that lists the ones it has; the rest is restored."""
        if not path:
            return {}, None
        restored = read_restore(path)
        updates: dict = {self.prompt: restored.fields.get("Prompt", "")}
        if self.negative is not None:
            updates[self.negative] = restored.fields.get("Negative prompt", "")
        for key, (component, kind) in self.fields.items():
            value = restored.number(key, kind)
            if value is not None:
                updates[component] = value
        try:
            updates.update(self.sampler_updates(read_sampler(restored.fields)))
        except ValueError as error:
            gr.Warning(f"{error}; the sampler settings were not restored")
        if restored.size and self.width is not None:
            updates[self.width], updates[self.height] = restored.size
        updates.update(self.emphasis_update(restored.fields))
        self.warn_missing_loras(restored.fields)
        return updates, restored

    def emphasis_update(self, fields: dict[str, str]) -> dict:
        """The emphasis menu: the text's "Emphasis", "Original" where it has none (AUTOMATIC1111 writes
        it only when it is not the default); a mode the studio does not know leaves it, with a warning."""
        menu = getattr(self.sampling, "emphasis", None)
        if menu is None:
            return {}
        mode = fields.get("Emphasis", EMPHASIS_MODES[0]).strip()
        if mode not in EMPHASIS_MODES:
            gr.Warning(f"emphasis {mode!r} is not known; use one of {', '.join(EMPHASIS_MODES)}; it was not restored")
            return {}
        return {menu: mode}

    def warn_missing_loras(self, fields: dict[str, str]) -> None:
        """A warning naming the LoRAs the restored prompts name that are not in the folders (the
        prompts keep their tags)."""
        if self.lora_dirs is None:
            return
        folders = list(self.lora_dirs())
        missing = missing_loras([fields.get("Prompt", ""), fields.get("Negative prompt", "")], folders)
        if missing:
            where = ", ".join(str(f) for f in folders) or "(no LoRA folder)"
            gr.Warning(f"the prompt names LoRAs that are not in the LoRA folders: {', '.join(missing)} (searched {where}). "
                       "The prompt keeps their tags; put the files there, or pass --lora-dir DIR")

    def sampler_updates(self, settings: SamplerSettings | None) -> dict:
        if settings is None:
            return {}
        sampling = self.sampling
        updates = {sampling.sampler: settings.sampler, sampling.schedule: settings.schedule,
                   sampling.s_noise: settings.s_noise}
        if settings.eta is not None:
            updates[sampling.eta] = settings.eta
        return updates
