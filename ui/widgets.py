"""Controls that several tabs share: the model menu, the sampling settings, the output area, and the
generation loop that fills it. Each group is a dataclass of named components; handlers take the
values as a ``{component: value}`` mapping (Gradio's set-of-inputs form) and read them by name."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from PIL import Image

from ldm.sampling.ddim import SamplingCancelled
from ldm.tasks.request import (
    MAX_BATCH,
    MAX_BUDGET_MB,
    MAX_SCALE,
    MAX_SEED,
    MAX_SIDE,
    TILING_MODES,
    GenerationRequest,
    TilingOptions,
    checked_number,
)
from ui.errors import friendly
from ui.jobs import Done, previewer, stream
from ui.outputs import read_restore
from ui.services import Studio

MODEL_DEFAULT = "Model default"
MAX_BATCH_COUNT = 16
# The gallery shows a session's newest images, at most this many (every image stays in the outputs
# folder): a long session would otherwise send an ever longer gallery with each result.
MAX_GALLERY = 64


# --- the model menu ---------------------------------------------------------------------------------


@dataclass
class ModelMenu:
    dropdown: gr.Dropdown
    refresh: gr.Button
    problems: gr.Markdown  # the files that cannot be used, and why; what detection assumed of others


def model_menu(studio: Studio, task: str, info: str = "") -> ModelMenu:
    with gr.Row(equal_height=True):
        dropdown = gr.Dropdown(choices=model_choices(studio, task), value=studio.default_for(task), label="Model",
                               info=info or None, scale=8, elem_id=f"{task}-model")
        refresh = gr.Button("↻ Rescan", scale=1, min_width=80)
    problems = gr.Markdown(unusable_files(studio), elem_id=f"{task}-model-problems")

    def rescan(current):
        studio.catalog(refresh=True)
        choices = model_choices(studio, task)
        values = [v for _, v in choices]
        value = current if current in values else studio.default_for(task)
        return gr.update(choices=choices, value=value), unusable_files(studio)

    refresh.click(rescan, dropdown, [dropdown, problems], queue=False)
    return ModelMenu(dropdown, refresh, problems)


def unusable_files(studio: Studio) -> str:
    """The files that cannot be used, and the notices of those loaded on an assumption (SD 2.x v or eps)."""
    lines = [f"- `{e.path.name}` cannot be used: {e.problem}" for e in studio.catalog() if e.preset is None]
    lines += [f"- `{e.path.name}`: {e.notice}" for e in studio.catalog() if e.preset is not None and e.notice]
    return "\n".join(lines)


def model_choices(studio: Studio, task: str) -> list[tuple[str, str]]:
    return [(e.label(), str(e.path)) for e in studio.entries_for(task)]


def chosen_model(studio: Studio, path: str | None, task: str):
    """The loaded model for the menu's value, checked against the task."""
    if not path:
        raise ValueError(f"no model for {task} is installed; put a checkpoint in weights/ and press ↻ Rescan")
    entry = studio.entry(path)
    if entry.capabilities is None or task not in entry.capabilities.tasks:
        raise ValueError(f"{entry.name} cannot do {task}; choose another model")
    return studio.models.get(path)


# --- sampling settings --------------------------------------------------------------------------------


@dataclass
class SamplingControls:
    preset: gr.Dropdown
    steps: gr.Slider
    scale: gr.Slider | None
    eta: gr.Slider
    seed: gr.Number
    random_seed: gr.Button
    reuse_seed: gr.Button

    def values(self, data: dict) -> dict:
        # checked, with the other fields, by resolve_request
        out = {"steps": data[self.steps], "eta": data[self.eta], "seed": seed_value(data[self.seed])}
        if self.scale is not None:
            out["scale"] = data[self.scale]
        return out


def seed_value(value) -> int:
    if value is None or value == "":
        return -1
    try:
        seed = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"seed must be a whole number from 0 to {MAX_SEED}, or -1 for a random one; got {value!r}") from None
    if not math.isfinite(seed):
        raise ValueError(f"seed must be a whole number from 0 to {MAX_SEED}, or -1 for a random one; got {value!r}")
    if seed != int(seed):
        raise ValueError(f"seed must be a whole number, got {value}")
    return int(seed)


def sampling_controls(studio: Studio, prefix: str, steps: int = 20, scale: float | None = 4.0, eta: float = 0.0) -> SamplingControls:
    presets = studio.sampler_presets
    preset = gr.Dropdown([MODEL_DEFAULT, *(p.name for p in presets)], value=MODEL_DEFAULT, label="Sampler preset",
                         info="DDIM settings from presets/samplers/", elem_id=f"{prefix}-sampler")
    with gr.Row():
        steps_slider = gr.Slider(1, 150, value=steps, step=1, label="Steps", elem_id=f"{prefix}-steps")
        scale_slider = None if scale is None else gr.Slider(0, MAX_SCALE, value=scale, step=0.5, label="Guidance scale (CFG)",
                                                            info="1: no guidance", elem_id=f"{prefix}-scale")
        eta_slider = gr.Slider(0, 1, value=eta, step=0.05, label="Eta", info="0: deterministic DDIM, 1: DDPM-like", elem_id=f"{prefix}-eta")
    with gr.Row(equal_height=True):
        seed = gr.Number(-1, label="Seed", info="-1: a new random seed each time", precision=0, minimum=-1, maximum=MAX_SEED,
                         scale=6, elem_id=f"{prefix}-seed")
        random_seed = gr.Button("Random", scale=1, min_width=80, elem_id=f"{prefix}-random-seed")
        reuse_seed = gr.Button("Reuse last", scale=1, min_width=80, elem_id=f"{prefix}-reuse-seed")
    controls = SamplingControls(preset, steps_slider, scale_slider, eta_slider, seed, random_seed, reuse_seed)
    random_seed.click(lambda: -1, None, seed, queue=False)
    by_name = {p.name: p for p in presets}

    def apply_preset(name):
        chosen = by_name.get(name)
        if chosen is None:
            return gr.update(), gr.update(), *([gr.update()] if scale_slider else [])
        updates = [chosen.steps, chosen.eta]
        if scale_slider is not None:
            updates.append(gr.update() if chosen.scale is None else chosen.scale)
        return tuple(updates)

    preset.change(apply_preset, preset, [steps_slider, eta_slider, *([scale_slider] if scale_slider else [])], queue=False)
    return controls


def model_defaults(controls: SamplingControls, loaded) -> list:
    """Slider values of a model's own sampler defaults (when the preset menu says "Model default")."""
    sampler = loaded.preset.sampler
    return [sampler.steps, sampler.eta, *([sampler.scale] if controls.scale is not None else [])]


# --- image size -------------------------------------------------------------------------------------


@dataclass
class SizeControls:
    width: gr.Slider
    height: gr.Slider


def size_controls(studio: Studio, task: str) -> SizeControls:
    native = native_size(studio, studio.default_for(task))
    with gr.Row():
        width = gr.Slider(16, MAX_SIDE, value=native, step=16, label="Width",
                          info="above the model's training size: convolutional, or tiled beyond the memory budget",
                          elem_id=f"{task}-width")
        height = gr.Slider(16, MAX_SIDE, value=native, step=16, label="Height", elem_id=f"{task}-height")
    return SizeControls(width, height)


@dataclass
class TilingControls:
    mode: gr.Radio
    tile: gr.Slider
    overlap: gr.Slider
    budget: gr.Number

    def options(self, data: dict) -> TilingOptions:
        overlap = checked_number("tile overlap", data[self.overlap], 0, MAX_SIDE, integer=True)
        budget = checked_number("the memory budget (MB)", data[self.budget], 1, MAX_BUDGET_MB, integer=True)
        return TilingOptions(str(data[self.mode]), checked_number("tile size", data[self.tile], 0, MAX_SIDE, integer=True),
                             overlap if overlap > 0 else -1, budget)

    @property
    def components(self) -> set:
        return {self.mode, self.tile, self.overlap, self.budget}


def tiling_controls(studio: Studio, task: str) -> TilingControls:
    """Large canvases: whether to sample (and decode) in tiles, their size and overlap, and the memory budget."""
    with gr.Accordion("Large canvas: tiling", open=False):
        mode = gr.Radio(list(TILING_MODES), value="auto", label="Tiling", elem_id=f"{task}-tiling-mode",
                        info="auto: in tiles only when the whole canvas would exceed the memory budget")
        with gr.Row():
            tile = gr.Slider(0, 2048, value=0, step=8, label="Tile size (px)", info="0: the model's training size",
                             elem_id=f"{task}-tiling-tile")
            overlap = gr.Slider(0, 1024, value=0, step=8, label="Tile overlap (px)", info="0: a quarter of the tile",
                                elem_id=f"{task}-tiling-overlap")
        budget = gr.Number(value=studio.memory_budget_mb, precision=0, minimum=1, label="Memory budget (MB)",
                           elem_id=f"{task}-tiling-budget")
    return TilingControls(mode, tile, overlap, budget)


def native_size(studio: Studio, path: str | None) -> int:
    if not path:
        return 512
    config = studio.entry(path).preset.model
    return config.latent_size * config.downsampling_factor


# --- the output area -----------------------------------------------------------------------------------


@dataclass
class OutputArea:
    preview: gr.Image
    gallery: gr.Gallery
    parameters: gr.Textbox
    status: gr.Markdown
    images: gr.State  # the paths shown in the gallery, newest first
    selected: gr.State  # the path of the picked image
    last_seed: gr.State  # the first seed of the last finished batch
    send: dict[str, gr.Button]  # "Send to <tab>" buttons by tab id


TAB_TITLES = {"txt2img": "Text to image", "inpaint": "Inpainting", "upscale": "Upscaling", "layout": "Layout",
              "semantic": "Semantic synthesis"}


def output_area(prefix: str, send_to: tuple[str, ...]) -> OutputArea:
    preview = gr.Image(label="Live preview", type="pil", interactive=False, height=256, elem_classes="live-preview",
                       elem_id=f"{prefix}-preview", buttons=[])
    status = gr.Markdown("", elem_classes="status", elem_id=f"{prefix}-status")
    gallery = gr.Gallery(label="Results", columns=4, height=320, object_fit="contain", elem_id=f"{prefix}-gallery",
                         elem_classes="results-gallery", interactive=False)
    parameters = gr.Textbox(label="Parameters of the selected image", lines=3, interactive=False, buttons=["copy"],
                            elem_id=f"{prefix}-parameters")
    with gr.Row():
        send = {tab: gr.Button(f"Send to {TAB_TITLES[tab].lower()}", size="sm", elem_id=f"{prefix}-send-to-{tab}")
                for tab in send_to}
    images, selected, last_seed = gr.State([]), gr.State(None), gr.State(None)

    def pick(paths, evt: gr.SelectData):
        path = paths[evt.index] if paths and 0 <= evt.index < len(paths) else None
        return path, read_parameters_text(path)

    gallery.select(pick, images, [selected, parameters], queue=False)
    return OutputArea(preview, gallery, parameters, status, images, selected, last_seed, send)


def connect_seed(controls: SamplingControls, area: OutputArea) -> None:
    """"Reuse last" puts the last finished batch's seed in the seed box."""
    controls.reuse_seed.click(lambda last: -1 if last is None else last, area.last_seed, controls.seed, queue=False)


def read_parameters_text(path: str | None) -> str:
    if not path:
        return ""
    with Image.open(path) as image:
        return getattr(image, "text", {}).get("parameters", "")


def run_batches(
    studio: Studio,
    area: OutputArea,
    loaded,
    stop,
    batch_count,
    base_seed: int,
    one_batch: Callable[[int, Callable, Callable], tuple[list[Path], list[str]]],
    previous: list[str],
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


def save_result(studio: Studio, result, extra: dict, attachments: dict | None = None) -> tuple[list[Path], list[str]]:
    """What a batch returns to ``run_batches``: the paths of its saved images (each with its
    parameters, the studio's record ``extra`` and ``attachments``), and the task's notices."""
    paths = [studio.writer.save(image, text, seed, extra, attachments)
             for image, seed, text in zip(result.images, result.seeds, result.parameters)]
    return paths, result.notices


# --- restoring parameters from a PNG -------------------------------------------------------------------


def restore_box(prefix: str, what: str = "settings") -> gr.File:
    return gr.File(label=f"Drop a studio PNG here to restore its {what}", file_types=[".png"], height=90,
                   elem_id=f"{prefix}-restore")


def restored_values(path: str | None, prompt: gr.Textbox, negative: gr.Textbox | None, controls: SamplingControls,
                    width: gr.Slider | None = None, height: gr.Slider | None = None) -> tuple[dict, object]:
    """Control updates from a dropped PNG's parameters, and the parsed record (for tab-specific fields)."""
    if not path:
        return {}, None
    restored = read_restore(path)
    f = restored.fields
    updates: dict = {prompt: f.get("Prompt", "")}
    if negative is not None:
        updates[negative] = f.get("Negative prompt", "")
    for key, component, kind in (("Steps", controls.steps, int), ("Eta DDIM", controls.eta, float), ("Seed", controls.seed, int),
                                 ("CFG scale", controls.scale, float)):
        value = restored.number(key, kind)
        if component is not None and value is not None:
            updates[component] = value
    if restored.size and width is not None and height is not None:
        updates[width], updates[height] = restored.size
    return updates, restored


def batch_request(prompt: str, negative: str, sampling: dict, width: int, height: int, batch_size: int, boxes=(),
                  **more) -> GenerationRequest:
    """A request from a tab's values; ``more`` carries the other fields (regions, tiling)."""
    return GenerationRequest(prompt=prompt, negative_prompt=negative, width=width, height=height,
                             batch_size=checked_number("batch size", batch_size, 1, MAX_BATCH, integer=True),
                             boxes=tuple(boxes), **sampling, **more)


# --- wiring a tab's generation -------------------------------------------------------------------------


def connect_generation(studio: Studio, handler, inputs: set, *, model: ModelMenu, generate: gr.Button, stop: gr.Button,
                       sampling: SamplingControls, output: OutputArea, size: SizeControls | None = None,
                       submit: gr.Textbox | None = None) -> None:
    """The events every generating tab has: generate (and Enter in ``submit``) through the shared
    "generate" queue, stop, seed reuse, and a new model's size and sampler defaults."""
    outputs = [output.preview, output.status, output.gallery, output.images, output.selected, output.parameters,
               output.last_seed]
    # API names follow the buttons' ids ("txt2img-generate" -> /txt2img_generate), so that scripts
    # (gradio_client) can drive each tab; Enter in the prompt is the same event, unnamed.
    prefix = generate.elem_id.removesuffix("-generate")
    events = dict(fn=handler, inputs=inputs, outputs=outputs, concurrency_id="generate")
    generate.click(**events, api_name=f"{prefix}_generate")
    if submit is not None:
        submit.submit(**events, api_name=False)
    stop.click(stopper(studio), None, None, queue=False, api_name=f"{prefix}_stop")
    connect_seed(sampling, output)
    targets = [*([size.width, size.height] if size else []), sampling.steps, sampling.eta, *([sampling.scale] if sampling.scale else [])]
    model.dropdown.change(model_changed(studio, sampling, size), [model.dropdown, sampling.preset], targets, queue=False)


def stopper(studio: Studio):
    def stop(request: gr.Request):
        studio.stop_flag(request.session_hash).set()

    return stop


def model_changed(studio: Studio, sampling: SamplingControls, size: SizeControls | None):
    """On a new model: its training size, and its sampler defaults when the preset menu says so."""

    @friendly
    def changed(path, preset_name):
        if not path:
            return [gr.update()] * (2 * (size is not None) + 2 + (sampling.scale is not None))
        entry = studio.entry(path)
        native = native_size(studio, path)
        step = entry.preset.model.size_multiple
        sizes = [gr.update(value=native, step=step, minimum=step)] * 2 if size is not None else []
        if preset_name == MODEL_DEFAULT:
            defaults = model_defaults(sampling, entry)
        else:
            defaults = [gr.update()] * (2 + (sampling.scale is not None))
        return [*sizes, *defaults]

    return changed
