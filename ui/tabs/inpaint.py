"""Inpainting: paint a mask over an image with a brush (size, eraser and undo are in the editor's
toolbar), feather its edge, optionally work only around the mask; the unmasked pixels come out
exactly as they went in. The mask and the input image are saved next to each result. A model without a
text stage (LDM's inpainting_big) fills from the image alone: its prompt boxes are disabled."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import numpy as np
from PIL import Image

from ldm.tasks import txt2img
from ldm.tasks.images import as_rgb
from ldm.tasks.inpaint import MAX_FEATHER, MAX_PADDING, InpaintOptions, inpaint
from ldm.tasks.request import checked_number
from ui.controls import ModelMenu, OutputArea, SamplingControls, generate_buttons, model_menu, output_area, sampling_controls
from ui.addons import AddonsPanel, addons_panel
from ui.errors import friendly
from ui.generation import Job, batch_request, connect_generation, generation_handler
from ui.outputs import Restore, restore_box
from ui.services import Studio

TAB = "inpaint"
TITLE = "Inpainting"
SEND_TO = ("img2img", "inpaint", "upscale", "layout")
PROMPT_PLACEHOLDER = "what to paint in the masked area"
NO_PROMPT = "this model takes no prompt: the fill follows the image around the mask"
BRUSH = gr.Brush(default_size=12, colors=["#ffffff"], default_color="#ffffff", color_mode="fixed")


@dataclass
class InpaintTab:
    model: ModelMenu
    editor: gr.ImageMask
    prompt: gr.Textbox
    negative: gr.Textbox
    addons: AddonsPanel
    feather: gr.Slider
    only_masked: gr.Checkbox
    padding: gr.Slider
    sampling: SamplingControls
    batch_size: gr.Slider
    generate: gr.Button
    stop: gr.Button
    restore: gr.File
    output: OutputArea


def build(studio: Studio, titles: dict[str, str]) -> InpaintTab:
    with gr.Row():
        with gr.Column(scale=5):
            model = model_menu(studio, TAB, info="inpainting models (e.g. the default, SD 2 inpainting, LDM inpainting_big) "
                                                 "fill natively; any other model inpaints by latent blending")
            editor = gr.ImageMask(label="Image and mask: paint over what to replace", type="pil", image_mode="RGBA",
                                  sources=["upload", "clipboard"], brush=BRUSH, eraser=gr.Eraser(default_size=12),
                                  layers=False, height=420, elem_id="inpaint-editor")
            text = takes_prompt(studio, model.dropdown.value)
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder=PROMPT_PLACEHOLDER if text else NO_PROMPT,
                                info="Ctrl+Enter generates", interactive=text, elem_id=f"{TAB}-prompt")
            negative = gr.Textbox(label="Negative prompt", lines=1, interactive=text)
            addons = addons_panel(studio, TAB, prompt, model.dropdown)
            with gr.Row():
                generate, stop = generate_buttons(TAB, "Inpaint")
            with gr.Row():
                feather = gr.Slider(0, 64, value=0, step=1, label="Feather mask edge (px)",
                                    info="the fill fades in over this width inside the mask", elem_id="inpaint-feather")
                only_masked = gr.Checkbox(False, label="Inpaint only the masked area",
                                          info="crop around the mask, work at the model's resolution, stitch back",
                                          elem_id="inpaint-only-masked")
                padding = gr.Slider(0, 256, value=32, step=4, label="Padding around the mask (px)", elem_id="inpaint-padding")
            sampling = sampling_controls(studio, TAB)
            batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size")
            restore = restore_box(TAB)
        with gr.Column(scale=6):
            output = output_area(TAB, {name: titles[name] for name in SEND_TO})
    tab = InpaintTab(model=model, editor=editor, prompt=prompt, negative=negative, addons=addons, feather=feather, only_masked=only_masked,
                     padding=padding, sampling=sampling, batch_size=batch_size, generate=generate, stop=stop, restore=restore,
                     output=output)
    wire(studio, tab)
    return tab


def takes_prompt(studio: Studio, path: str | None) -> bool:
    """Whether the chosen model reads a prompt (LDM's inpainting_big has no text stage)."""
    if not path:
        return True
    preset = studio.entry(path).preset
    return preset is None or txt2img.serves(preset.model) is None


def prompt_boxes(studio: Studio, tab: InpaintTab):
    """On a new model: the prompt boxes are enabled for a text model, disabled (and say why) otherwise."""

    @friendly
    def changed(path):
        text = takes_prompt(studio, path)
        return {tab.prompt: gr.update(interactive=text, placeholder=PROMPT_PLACEHOLDER if text else NO_PROMPT),
                tab.negative: gr.update(interactive=text)}

    return changed


def editor_parts(value: dict | None) -> tuple[Image.Image, Image.Image]:
    """(image, mask) from the editor: the mask is white wherever any brush layer has paint."""
    if not isinstance(value, dict) or not isinstance(value.get("background"), Image.Image):
        raise ValueError("no image: upload one, or send one here from another tab")
    background = as_rgb(value["background"])  # transparency over white, not black
    painted = np.zeros((background.height, background.width), dtype=bool)
    for layer in value.get("layers") or []:
        if layer is not None:
            painted |= np.asarray(layer.convert("RGBA").resize(background.size))[..., 3] > 0
    if not painted.any():
        raise ValueError("the mask is empty: paint over the part of the image to replace")
    return background, Image.fromarray(painted.astype(np.uint8) * 255)


def handler(studio: Studio, tab: InpaintTab):
    """The generate event's handler (``ui.generation.generation_handler``) with this tab's request."""

    def prepare(data: dict, loaded) -> Job:
        image, mask = editor_parts(data[tab.editor])
        options = InpaintOptions(checked_number("mask feather", data[tab.feather], 0, MAX_FEATHER, integer=True),
                                 bool(data[tab.only_masked]),
                                 checked_number("masked area padding", data[tab.padding], 0, MAX_PADDING, integer=True))
        request = batch_request(data[tab.prompt], data[tab.negative], tab.sampling.values(data), image.width, image.height,
                                data[tab.batch_size])
        record = {"mask": {"feather": options.feather, "only_masked": options.only_masked, "padding": options.padding,
                           "coverage": round(float(np.asarray(mask).mean() / 255), 4)}}
        return Job(request, lambda r, callback, should_stop: inpaint(loaded, r, image, mask, options=options, callback=callback,
                                                                     should_stop=should_stop),
                   record, {"mask": mask, "input": image})

    return generation_handler(studio, TAB, tab.model, tab.output, prepare)


def wire(studio: Studio, tab: InpaintTab) -> None:
    inputs = {tab.editor, tab.prompt, tab.negative, tab.feather, tab.only_masked, tab.padding, tab.batch_size}
    connect_generation(studio, handler(studio, tab), inputs, model=tab.model, generate=tab.generate, stop=tab.stop,
                       sampling=tab.sampling, output=tab.output)
    tab.model.dropdown.change(prompt_boxes(studio, tab), tab.model.dropdown, [tab.prompt, tab.negative], queue=False)
    restored = Restore(tab.prompt, tab.negative, tab.sampling, lora_dirs=studio.lora_dirs)
    mask_settings = {"feather": tab.feather, "only_masked": tab.only_masked, "padding": tab.padding}

    @friendly
    def restore(path):
        updates, found = restored.updates(path)
        mask = found.extra.get("mask", {}) if found else {}
        updates.update({component: mask[key] for key, component in mask_settings.items() if key in mask})
        return updates

    tab.restore.upload(restore, tab.restore, [*restored.components, *mask_settings.values()], queue=False)


def receive(tab: InpaintTab):
    """What "Send to inpainting" sets: the image as the editor's background (no mask yet) and the prompt."""

    def apply(path: str, prompt: str):
        image = Image.open(path).convert("RGB")
        return {tab.editor: {"background": image, "layers": [], "composite": image}, tab.prompt: prompt}

    return apply, [tab.editor, tab.prompt]
