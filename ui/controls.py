"""Controls that several tabs share: the model menu, the generate and stop buttons, the sampling
settings, the image size, the tiling section and the output area. Each group is a dataclass of named
components; handlers take the values as a ``{component: value}`` mapping (Gradio's set-of-inputs
form) and read them by name, and every update is a dict keyed by component."""

from __future__ import annotations

import math
from dataclasses import dataclass

import gradio as gr

from ldm.sampling.samplers import SAMPLERS
from ldm.sampling.sigmas import SCHEDULES
from ldm.tasks.request import (
    MAX_BUDGET_MB,
    MAX_S_NOISE,
    MAX_SCALE,
    MAX_SEED,
    MAX_SIDE,
    TILING_MODES,
    TilingOptions,
    checked_number,
)
from ldm.text.prompt_syntax import EMPHASIS_MODES
from ui.outputs import read_parameters_text
from ui.services import Studio

MODEL_DEFAULT = "Model default"


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
        return {dropdown: gr.update(choices=choices, value=value), problems: unusable_files(studio)}

    refresh.click(rescan, dropdown, [dropdown, problems], queue=False)
    return ModelMenu(dropdown, refresh, problems)


def unusable_files(studio: Studio) -> str:
    """The files that cannot be used, and the notices of those loaded on an assumption (SD 2.x v or eps)."""
    lines = [f"- `{e.path.name}` cannot be used: {e.problem}" for e in studio.catalog() if e.preset is None]
    lines += [f"- `{e.path.name}`: {e.notice}" for e in studio.catalog() if e.preset is not None and e.notice]
    return "\n".join(lines)


def model_choices(studio: Studio, task: str) -> list[tuple[str, str]]:
    return [(e.label(), str(e.path)) for e in studio.entries_for(task)]


# --- generate and stop -----------------------------------------------------------------------------


def generate_buttons(prefix: str, label: str = "Generate") -> tuple[gr.Button, gr.Button]:
    """The primary button (``<prefix>-generate``: Ctrl+Enter presses it, its API name follows it) and Stop."""
    generate = gr.Button(label, variant="primary", elem_classes="generate-button", elem_id=f"{prefix}-generate")
    stop = gr.Button("Stop", variant="stop", elem_classes="stop-button", elem_id=f"{prefix}-stop")
    return generate, stop


# --- sampling settings --------------------------------------------------------------------------------


@dataclass
class SamplingControls:
    preset: gr.Dropdown
    sampler: gr.Dropdown
    schedule: gr.Dropdown
    steps: gr.Slider
    scale: gr.Slider | None
    eta: gr.Slider
    s_noise: gr.Slider
    seed: gr.Number
    random_seed: gr.Button
    reuse_seed: gr.Button
    emphasis: gr.Dropdown | None = None  # on the tabs with a prompt

    @property
    def components(self) -> set:
        """The inputs a generation reads."""
        return {self.sampler, self.schedule, self.steps, self.eta, self.s_noise, self.seed,
                *([self.scale] if self.scale is not None else []), *([self.emphasis] if self.emphasis is not None else [])}

    @property
    def settings(self) -> list:
        """The controls a preset or a model's defaults set."""
        return [self.sampler, self.schedule, self.steps, self.eta, *([self.scale] if self.scale is not None else [])]

    def values(self, data: dict) -> dict:
        # checked, with the other fields, by resolve_request
        out = {"sampler": data[self.sampler], "schedule": data[self.schedule], "steps": data[self.steps],
               "eta": data[self.eta], "s_noise": data[self.s_noise], "seed": seed_value(data[self.seed])}
        if self.scale is not None:
            out["scale"] = data[self.scale]
        if self.emphasis is not None:
            out["emphasis"] = data[self.emphasis]
        return out

    def defaults(self, sampler: str, schedule: str, steps: int, eta: float, scale: float | None) -> dict:
        """Updates that set the controls (the guidance scale where the tab has one and ``scale`` is given)."""
        updates = {self.sampler: sampler, self.schedule: schedule, self.steps: steps, self.eta: eta}
        if self.scale is not None and scale is not None:
            updates[self.scale] = scale
        return updates

    def noise_controls(self, sampler: str) -> dict:
        """Eta and s_noise enabled for a sampler that takes them, and saying what they do there."""
        known = SAMPLERS.get(sampler)
        takes_eta = known is not None and known.eta_field is not None
        takes_s_noise = known is not None and known.s_noise
        return {self.eta: gr.update(interactive=takes_eta, info=eta_info(sampler)),
                self.s_noise: gr.update(interactive=takes_s_noise, info=s_noise_info(sampler))}


def picked_sampler(name: str):
    """The eta a sampler picked by hand starts with: its default (0 for DDIM, 1 for the ancestral and
    SDE samplers; unused by the others)."""
    return SAMPLERS[name].eta_default if name in SAMPLERS else gr.skip()


def s_noise_info(sampler: str) -> str:
    known = SAMPLERS.get(sampler)
    if known is None or not known.s_noise:
        return f"not used by {sampler}"
    return "scale of the noise the sampler adds at each step; 1 is the usual"


def eta_info(sampler: str) -> str:
    known = SAMPLERS.get(sampler)
    if known is None or known.eta_field is None:
        return f"not used by {sampler}"
    if known.eta_field == "Eta DDIM":
        return "0: deterministic DDIM, 1: DDPM-like"
    return "noise added at each step: 1 full (the default), 0 none (the deterministic solver)"


def seed_value(value) -> int:
    """The seed box's value: empty is -1 (a random seed), text is read as a number, then checked."""
    if value is None or value == "":
        return -1
    allowed = f"seed must be a whole number from 0 to {MAX_SEED}, or -1 for a random one; got {value!r}"
    try:
        seed = float(value)
    except (TypeError, ValueError):
        raise ValueError(allowed) from None
    if not math.isfinite(seed):
        raise ValueError(allowed)
    return int(checked_number("seed", seed, -1, MAX_SEED, integer=True))


def sampling_controls(studio: Studio, prefix: str, steps: int = 20, scale: float | None = 4.0, eta: float = 0.0,
                      emphasis: bool = True) -> SamplingControls:
    """The sampling settings of a tab; ``emphasis``: the Emphasis menu, on the tabs with a prompt."""
    presets = studio.sampler_presets
    preset = gr.Dropdown([MODEL_DEFAULT, *(p.name for p in presets)], value=MODEL_DEFAULT, label="Sampler preset",
                         info="sampler, schedule and steps from presets/samplers/, or the model's own",
                         elem_id=f"{prefix}-sampler-preset")
    with gr.Row():
        sampler_menu = gr.Dropdown(list(SAMPLERS), value="DDIM", label="Sampler", elem_id=f"{prefix}-sampler",
                                   info="DDIM: the original models' own; DPM++ 2M: AUTOMATIC1111's default")
        schedule = gr.Dropdown(list(SCHEDULES), value="Automatic", label="Schedule type", elem_id=f"{prefix}-schedule",
                               info="Automatic: the sampler's own (Karras for DPM++ 2M)")
        emphasis_menu = None if not emphasis else gr.Dropdown(
            list(EMPHASIS_MODES), value=EMPHASIS_MODES[0], label="Emphasis", elem_id=f"{prefix}-emphasis",
            info="how (word:1.2) weights apply: Original keeps the prompt's mean, No norm only multiplies")
    with gr.Row():
        steps_slider = gr.Slider(1, 150, value=steps, step=1, label="Steps", elem_id=f"{prefix}-steps")
        scale_slider = None if scale is None else gr.Slider(0, MAX_SCALE, value=scale, step=0.5, label="Guidance scale (CFG)",
                                                            info="1: no guidance", elem_id=f"{prefix}-scale")
        eta_slider = gr.Slider(0, 1, value=eta, step=0.05, label="Eta", info=eta_info("DDIM"), elem_id=f"{prefix}-eta")
        s_noise = gr.Slider(0, MAX_S_NOISE, value=1.0, step=0.01, label="Sigma noise", info=s_noise_info("DDIM"),
                            interactive=False, elem_id=f"{prefix}-s-noise")
    with gr.Row(equal_height=True):
        seed = gr.Number(-1, label="Seed", info="-1: a new random seed each time", precision=0, minimum=-1, maximum=MAX_SEED,
                         scale=6, elem_id=f"{prefix}-seed")
        random_seed = gr.Button("Random", scale=1, min_width=80, elem_id=f"{prefix}-random-seed")
        reuse_seed = gr.Button("Reuse last", scale=1, min_width=80, elem_id=f"{prefix}-reuse-seed")
    controls = SamplingControls(preset, sampler_menu, schedule, steps_slider, scale_slider, eta_slider, s_noise, seed,
                                random_seed, reuse_seed, emphasis_menu)
    random_seed.click(lambda: -1, None, seed, queue=False)
    by_name = {p.name: p for p in presets}

    def apply_preset(name):
        chosen = by_name.get(name)
        return {} if chosen is None else controls.defaults(chosen.sampler, chosen.schedule, chosen.steps, chosen.eta,
                                                           chosen.scale)

    preset.change(apply_preset, preset, controls.settings, queue=False)
    # A sampler picked by hand brings its default eta; whoever sets it (a preset, a restored PNG, a
    # model's defaults) leaves eta and s_noise enabled where it takes them.
    sampler_menu.input(picked_sampler, sampler_menu, eta_slider, queue=False)
    sampler_menu.change(controls.noise_controls, sampler_menu, [eta_slider, s_noise], queue=False)
    return controls


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


def native_size(studio: Studio, path: str | None) -> int:
    if not path:
        return 512
    config = studio.entry(path).preset.model
    return config.latent_size * config.downsampling_factor


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

    @property
    def components(self) -> list:
        """What a generation updates, in the order of the generate endpoint's outputs."""
        return [self.preview, self.status, self.gallery, self.images, self.selected, self.parameters, self.last_seed]


def output_area(prefix: str, send_to: dict[str, str]) -> OutputArea:
    """The preview, status, gallery and parameters of a tab; ``send_to`` maps tab ids to their titles."""
    preview = gr.Image(label="Live preview", type="pil", interactive=False, height=256, elem_classes="live-preview",
                       elem_id=f"{prefix}-preview", buttons=[])
    status = gr.Markdown("", elem_classes="status", elem_id=f"{prefix}-status")
    gallery = gr.Gallery(label="Results", columns=4, height=320, object_fit="contain", elem_id=f"{prefix}-gallery",
                         elem_classes="results-gallery", interactive=False)
    parameters = gr.Textbox(label="Parameters of the selected image", lines=3, interactive=False, buttons=["copy"],
                            elem_id=f"{prefix}-parameters")
    with gr.Row():
        send = {tab: gr.Button(f"Send to {title.lower()}", size="sm", elem_id=f"{prefix}-send-to-{tab}")
                for tab, title in send_to.items()}
    images, selected, last_seed = gr.State([]), gr.State(None), gr.State(None)

    def pick(paths, evt: gr.SelectData):
        path = paths[evt.index] if paths and 0 <= evt.index < len(paths) else None
        return {selected: path, parameters: read_parameters_text(path)}

    gallery.select(pick, images, [selected, parameters], queue=False)
    return OutputArea(preview, gallery, parameters, status, images, selected, last_seed, send)
