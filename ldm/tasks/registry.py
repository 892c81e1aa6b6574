"""The tasks by name, in the order the studio shows their tabs. Each task module says what it is
(``NAME``) and which models it serves (``serves(config) -> None or why not``); adding a task is its
module, its tab (``ui/tabs/<NAME>.py``, found by name) and one line here."""

from __future__ import annotations

from ldm.models.latent_diffusion import LatentDiffusionConfig
from ldm.tasks import img2img, inpaint, layout, semantic, txt2img, upscale

TASKS = {task.NAME: task for task in (txt2img, img2img, inpaint, upscale, layout, semantic)}


def task(name: str):
    if name not in TASKS:
        raise ValueError(f"task {name!r} is not known; tasks: {', '.join(TASKS)}")
    return TASKS[name]


def serves(name: str, config: LatentDiffusionConfig) -> bool:
    """Whether task ``name`` runs on models of ``config``."""
    return task(name).serves(config) is None


def tasks_for(config: LatentDiffusionConfig) -> tuple[str, ...]:
    """The names of the tasks that run on models of ``config``."""
    return tuple(name for name, module in TASKS.items() if module.serves(config) is None)
