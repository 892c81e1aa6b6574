"""Text to image's "Hires fix" section (``ldm.tasks.hires``): closed by default, off until its box is
ticked. The upscaler menu lists the latent modes and Lanczos by AUTOMATIC1111's names, then the
catalog's upscaling models (by path, shown by their labels). A dropped PNG's hires fields set it
(``restore_updates``), and turn it off when the PNG has none."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from ldm.sampling.steps import Callback
from ldm.tasks.hires import MAX_HIRES_SCALE, UPSCALERS, HiresOptions, hires_fix, read_hires
from ldm.tasks.request import MAX_SIDE, GenerationRequest
from ldm.tasks.result import GenerationResult
from ui.generation import chosen_model
from ui.services import Studio


def upscaler_choices(studio: Studio) -> list[tuple[str, str]]:
    """The built-in upscalers by name, then the catalog's upscaling models by path."""
    return [(name, name) for name in UPSCALERS] + [(e.label(), str(e.path)) for e in studio.entries_for("upscale")]


def rescan_upscalers(studio: Studio):
    """The upscaler menu's handler of the model menu's Rescan button (which scans in its own event,
    perhaps after this one: this one scans too)."""

    def rescan():
        studio.catalog(refresh=True)
        return gr.update(choices=upscaler_choices(studio))

    return rescan


@dataclass
class HiresControls:
    enable: gr.Checkbox
    scale: gr.Slider
    width: gr.Slider
    height: gr.Slider
    upscaler: gr.Dropdown
    steps: gr.Slider
    strength: gr.Slider

    @property
    def components(self) -> list:
        return [self.enable, self.scale, self.width, self.height, self.upscaler, self.steps, self.strength]

    def options(self, data: dict) -> HiresOptions | None:
        """The options of the section's values (the upscaler as chosen: a name, or a model's path), None
        while it is off; checked by ``hires_fix``."""
        if not data[self.enable]:
            return None
        return HiresOptions(scale=data[self.scale], width=data[self.width], height=data[self.height],
                            upscaler=data[self.upscaler], steps=data[self.steps], strength=data[self.strength])

    def restore_updates(self, studio: Studio, fields: dict[str, str]) -> dict:
        """The section set from a PNG's parsed parameters: on with its hires fields, off without. An
        upscaling model is found in the catalog by its name; one that is not there leaves the menu, with
        a warning."""
        options = read_hires(fields)
        if options is None:
            return {self.enable: False}
        updates = {self.enable: True, self.scale: options.scale, self.width: options.width, self.height: options.height,
                   self.steps: options.steps, self.strength: options.strength}
        value = upscaler_value(studio, options.upscaler)
        if value is None:
            gr.Warning(f"the hires upscaler {options.upscaler!r} is not a latent mode, Lanczos or an upscaling model in "
                       "the model folders; the upscaler menu was not restored")
        else:
            updates[self.upscaler] = value
        return updates


def upscaler_value(studio: Studio, name: str) -> str | None:
    """The menu's value for an upscaler written in a PNG: the name itself, or the path of the catalog's
    upscaling model of that name."""
    if name in UPSCALERS:
        return name
    paths = [str(e.path) for e in studio.entries_for("upscale") if (e.path.name if e.path.is_dir() else e.path.stem) == name]
    return paths[0] if paths else None


def hires_controls(studio: Studio, task: str) -> HiresControls:
    """The section: the box that turns it on, the factor or target size, the upscaler, the second pass."""
    with gr.Accordion("Hires fix", open=False, elem_id=f"{task}-hires"):
        enable = gr.Checkbox(False, label="Hires fix", elem_id=f"{task}-hires-enable",
                             info="generate at the size above, upscale, then redraw at the larger size with the same seed")
        with gr.Row():
            scale = gr.Slider(1, MAX_HIRES_SCALE, value=2.0, step=0.05, label="Upscale by", elem_id=f"{task}-hires-scale")
            upscaler = gr.Dropdown(upscaler_choices(studio), value=UPSCALERS[0], label="Upscaler",
                                   info="latent: fast; Lanczos or an upscaling model: through the pictures",
                                   elem_id=f"{task}-hires-upscaler")
        with gr.Row():
            width = gr.Slider(0, MAX_SIDE, value=0, step=8, label="Resize width to", info="0: by the factor",
                              elem_id=f"{task}-hires-width")
            height = gr.Slider(0, MAX_SIDE, value=0, step=8, label="Resize height to", info="0: by the factor",
                               elem_id=f"{task}-hires-height")
        with gr.Row():
            steps = gr.Slider(0, 150, value=0, step=1, label="Hires steps", info="0: as many as the first pass",
                              elem_id=f"{task}-hires-steps")
            strength = gr.Slider(0, 1, value=0.7, step=0.01, label="Denoising strength",
                                 info="0 keeps the upscaled image, 1 redraws it", elem_id=f"{task}-hires-strength")
    return HiresControls(enable, scale, width, height, upscaler, steps, strength)


def hires_job(studio: Studio, loaded, options: HiresOptions) -> Callable[[GenerationRequest, Callback, Callable], GenerationResult]:
    """What the generate button runs with the section on: ``hires_fix``, with the chosen upscaling model
    (loaded here, and held by its lock while it runs) where the menu names one."""
    if options.upscaler in UPSCALERS:
        return lambda r, callback, should_stop: hires_fix(loaded, r, options, callback=callback, should_stop=should_stop)
    path = options.upscaler
    if not isinstance(path, str) or not path:
        raise ValueError(f"choose a hires upscaler: one of {', '.join(UPSCALERS)}, or an upscaling model")
    upscaler = chosen_model(studio, path, "upscale")
    named = HiresOptions(**{**options.__dict__, "upscaler": upscaler.name})

    def run(request, callback, should_stop):
        with studio.models.lock(path):
            return hires_fix(loaded, request, named, upscaler=upscaler, callback=callback, should_stop=should_stop)

    return run
