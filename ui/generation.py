"""A tab's generation, from its button to its gallery: the one handler every tab shares, the loop
that runs batches and shows each finished image at once, and the events around it (stop, seed
reuse, a new model's defaults).

A tab says only what is its own: ``prepare(data, loaded) -> Job``, the request from its inputs and
the task that runs it. Everything else (choosing the model, batches, previews, saving, stopping,
errors as messages) happens here, the same way for every tab.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import gradio as gr

from ldm.sampling.steps import SamplingCancelled
from ldm.tasks.request import MAX_BATCH, MAX_SEED, GenerationRequest, checked_number
from ldm.tasks.result import GenerationResult
from ui.controls import MODEL_DEFAULT, ModelMenu, OutputArea, SamplingControls, SizeControls, native_size
from ui.errors import friendly
from ui.jobs import Done, previewer, stream
from ui.outputs import read_parameters_text
from ui.services import Studio

MAX_BATCH_COUNT = 16
# The gallery shows a session's newest images, at most this many (every image stays in the outputs
# folder): a long session would otherwise send an ever longer gallery with each result.
MAX_GALLERY = 64


@dataclass(frozen=True)
class Job:
    """What a tab's generate button runs: ``run(request, callback, should_stop)`` once a batch, with
    ``request`` at that batch's seed; ``record`` (the tab's own settings) is saved in each PNG and
    ``attachments`` (its input pictures) beside it."""

    request: GenerationRequest
    run: Callable[..., GenerationResult]
    record: dict = field(default_factory=dict)
    attachments: dict = field(default_factory=dict)


def chosen_model(studio: Studio, path: str | None, task: str):
    """The loaded model for the menu's value, checked against the task."""
    if not path:
        raise ValueError(f"no model for {task} is installed; put a checkpoint in weights/ and press ↻ Rescan")
    entry = studio.entry(path)
    if not studio.serves(entry, task):
        raise ValueError(f"{entry.name} cannot do {task}; choose another model")
    return studio.models.get(path)


def batch_request(prompt: str, negative: str, sampling: dict, width: int, height: int, batch_size: int, boxes=(),
                  **more) -> GenerationRequest:
    """A request from a tab's values; ``more`` carries the other fields (regions, tiling)."""
    return GenerationRequest(prompt=prompt, negative_prompt=negative, width=width, height=height,
                             batch_size=checked_number("batch size", batch_size, 1, MAX_BATCH, integer=True),
                             boxes=tuple(boxes), **sampling, **more)


def generation_handler(studio: Studio, task: str, model: ModelMenu, output: OutputArea,
                       prepare: Callable[[dict, object], Job], batch_count: gr.Slider | None = None):
    """The generate event's handler of a tab: a generator of output updates, given the tab's inputs by
    component. ``batch_count``: the slider of batches run one after another (one batch without it)."""

    @friendly
    def generate(data: dict, request: gr.Request, progress=gr.Progress()):
        loaded = chosen_model(studio, data[model.dropdown], task)
        job = prepare(data, loaded)

        def one_batch(seed: int, callback, should_stop) -> tuple[list[Path], list[str]]:
            result = job.run(replace(job.request, seed=seed, lora_dirs=studio.lora_dirs(),
                                     embedding_dirs=studio.embedding_dirs()), callback, should_stop)
            return save_result(studio, result, {"task": task, "model": loaded.name, **job.record}, job.attachments)

        yield from run_batches(studio, output, loaded, stop=studio.stop_flag(request.session_hash),
                               batch_count=1 if batch_count is None else data[batch_count], base_seed=job.request.seed,
                               one_batch=one_batch, previous=data[output.images], progress=progress)

    return generate


def run_batches(
    studio: Studio,
    area: OutputArea,
    loaded,
    *,
    stop,
    batch_count,
    base_seed: int,
    one_batch: Callable[[int, Callable, Callable], tuple[list[Path], list[str]]],
    previous: list[str] | None,
    progress: gr.Progress,
) -> Iterator[dict]:
    """Run ``one_batch(seed, callback, should_stop)`` ``batch_count`` times (seeds following on), each
    returning the paths it saved and its notices; every finished image shows at once. Holds the
    model's lock, so a model runs one generation at a time. A stop keeps everything finished."""
    batch_count = checked_number("batch count", batch_count, 1, MAX_BATCH_COUNT, integer=True)
    stop.clear()
    seed = random.randrange(MAX_SEED) if base_seed == -1 else base_seed
    shown = list(previous or [])
    preview = previewer(loaded.model)
    lock = studio.models.lock(loaded.path)
    while not lock.acquire(timeout=0.5):
        yield {area.status: f"Waiting for another generation with {loaded.name} to finish…"}
    try:
        for run in range(batch_count):
            label = f"batch {run + 1} of {batch_count}: " if batch_count > 1 else ""
            try:
                for event in stream(lambda callback, should_stop, s=seed: one_batch(s, callback, should_stop), stop, preview):
                    if isinstance(event, Done):
                        saved, notices = event.value
                        break
                    progress((event.step, event.total), desc=f"{label}step {event.step}/{event.total}")
                    yield {area.preview: event.preview, area.status: f"{label}step {event.step} of {event.total}"}
            except SamplingCancelled as cancelled:
                yield {area.status: f"Stopped after {cancelled.step} of {cancelled.total} steps; finished images are kept."}
                return
            for notice in notices:
                gr.Warning(notice)
            shown = ([str(p) for p in saved] + shown)[:MAX_GALLERY]
            first = str(saved[0])
            yield {area.gallery: shown, area.images: shown, area.selected: first, area.parameters: read_parameters_text(first),
                   area.last_seed: seed, area.status: f"{label}saved {', '.join(p.name for p in saved)} in {saved[0].parent}"}
            seed = (seed + len(saved)) % (MAX_SEED + 1)
    finally:
        lock.release()


def save_result(studio: Studio, result: GenerationResult, extra: dict, attachments: dict | None = None) -> tuple[list[Path], list[str]]:
    """What a batch returns to ``run_batches``: the paths of its saved images (each with its
    parameters, the studio's record ``extra`` and ``attachments``), and the task's notices."""
    paths = [studio.writer.save(image, text, seed, extra, attachments)
             for image, seed, text in zip(result.images, result.seeds, result.parameters)]
    return paths, result.notices


def connect_generation(studio: Studio, handler, inputs: set, *, model: ModelMenu, generate: gr.Button, stop: gr.Button,
                       sampling: SamplingControls, output: OutputArea, size: SizeControls | None = None,
                       submit: gr.Textbox | None = None) -> None:
    """The events every generating tab has: generate (and Enter in ``submit``) through the shared
    "generate" queue, stop, seed reuse, and a new model's size and sampler defaults. ``inputs``: the
    tab's own inputs; the model, the sampling settings and the gallery's state are added here."""
    # API names follow the buttons' ids ("txt2img-generate" -> /txt2img_generate), so that scripts
    # (gradio_client) can drive each tab; Enter in the prompt is the same event, unnamed. A set's
    # inputs reach the API in the order the components were made.
    prefix = generate.elem_id.removesuffix("-generate")
    events = dict(fn=handler, inputs={model.dropdown, *sampling.components, output.images, *inputs},
                  outputs=output.components, concurrency_id="generate")
    generate.click(**events, api_name=f"{prefix}_generate")
    if submit is not None:
        submit.submit(**events, api_name=False)
    stop.click(stopper(studio), None, None, queue=False, api_name=f"{prefix}_stop")
    sampling.reuse_seed.click(lambda last: -1 if last is None else last, output.last_seed, sampling.seed, queue=False)
    targets = [*([size.width, size.height] if size else []), *sampling.settings]
    model.dropdown.change(model_changed(studio, sampling, size), [model.dropdown, sampling.preset], targets, queue=False)


def stopper(studio: Studio):
    def stop(request: gr.Request):
        studio.stop_flag(request.session_hash).set()

    return stop


def model_changed(studio: Studio, sampling: SamplingControls, size: SizeControls | None):
    """On a new model: its training size, and its sampler defaults (sampler, schedule, steps, eta,
    guidance) when the preset menu says so."""

    @friendly
    def changed(path, preset_name):
        if not path:
            return {}
        entry = studio.entry(path)
        updates = {}
        if size is not None:
            step = entry.preset.model.size_multiple
            native = native_size(studio, path)
            updates[size.width] = updates[size.height] = gr.update(value=native, step=step, minimum=step)
        if preset_name == MODEL_DEFAULT:
            defaults = entry.preset.sampler
            updates.update(sampling.defaults(defaults.sampler, defaults.schedule, defaults.steps, defaults.eta,
                                             defaults.scale))
        return updates

    return changed
