"""Run one generation in a worker thread and stream its progress to a Gradio generator handler.

The engine reports each finished sampler step through its callback; the worker turns that into a
preview picture and puts it on a queue; the handler yields the newest one. Stopping is a flag
that the engine checks between steps (``should_stop``); a browser that goes away stops the job.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ldm.models.latent_diffusion import LatentDiffusion
from ldm.sampling.steps import StepInfo
from ldm.tasks.preview import preview_image


@dataclass(frozen=True)
class Step:
    step: int  # 1-based: steps done
    total: int
    preview: Image.Image | None


@dataclass(frozen=True)
class Done:
    value: Any  # what the work returned


Work = Callable[[Callable[[StepInfo], None], Callable[[], bool]], Any]


def previewer(model: LatentDiffusion) -> Callable[[StepInfo], Image.Image | None]:
    """Preview of the first image's predicted x0 (``ldm.tasks.preview``)."""

    def preview(info: StepInfo) -> Image.Image | None:
        return preview_image(model, info.denoised)

    return preview


def stream(work: Work, stop: threading.Event, preview: Callable[[StepInfo], Image.Image | None]) -> Iterator[Step | Done]:
    """Run ``work(callback, should_stop)`` in a thread; yield the newest Step while it runs, then Done.
    Exceptions of the work are raised here, in the handler's thread."""
    events: queue.Queue = queue.Queue()

    def callback(info: StepInfo) -> None:
        events.put(Step(info.step + 1, info.total, preview(info)))

    def target() -> None:
        try:
            events.put(Done(work(callback, stop.is_set)))
        except BaseException as error:  # noqa: BLE001 - handed to the handler's thread, raised there
            events.put(error)

    worker = threading.Thread(target=target, name="generation", daemon=True)
    worker.start()
    try:
        while True:
            event = events.get()
            while isinstance(event, Step) and not events.empty():
                event = events.get()  # the browser only needs the newest step
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, Done):
                return
    finally:
        if worker.is_alive():
            stop.set()  # the handler was abandoned (browser closed): stop the engine at its next step
