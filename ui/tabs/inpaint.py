"""Inpainting: paint a mask over an image with a brush (size, eraser and undo are in the editor's
toolbar), feather its edge, optionally work only around the mask; the unmasked pixels come out
exactly as they went in. The mask and the input image are saved next to each result. A model without a
text stage (LDM's inpainting_big) fills from the image alone: its prompt boxes are disabled.
The Outpaint mode (``ui.outpaint``) extends the picture instead: no mask is painted, the new border is
drawn, and the extended canvas is previewed as the sliders move."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import numpy as np
from PIL import Image

from ldm.tasks import txt2img
from ldm.tasks.images import as_rgb
from ldm.tasks.inpaint import MAX_FEATHER, MAX_PADDING, InpaintOptions, inpaint
from ldm.tasks.masked import FILL_MODES
from ldm.tasks.outpaint import outpaint
from ldm.tasks.request import checked_number
from ui.controls import ModelMenu, OutputArea, SamplingControls, generate_buttons, model_menu, output_area, sampling_controls
from ui.addons import AddonsPanel, addons_panel
from ui.errors import friendly
from ui.generation import Job, batch_request, connect_generation, generation_handler
from ui.outpaint import MODES, OutpaintControls, outpaint_controls, preview_update, restored as outpaint_restored
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
    mode: gr.Radio
    prompt: gr.Textbox
    negative: gr.Textbox
    addons: AddonsPanel
    feather: gr.Slider
    only_masked: gr.Checkbox
    padding: gr.Slider
    fill: gr.Radio
    strength: gr.Slider
    mask_row: gr.Row
    content_row: gr.Row
    outpaint: OutpaintControls
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
            mode = gr.Radio(list(MODES), value=MODES[0], label="Mode", elem_id="inpaint-mode",
                            info="Outpaint: extend the picture on its sides; no mask to paint")
            text = takes_prompt(studio, model.dropdown.value)
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder=PROMPT_PLACEHOLDER if text else NO_PROMPT,
                                info="Ctrl+Enter generates", interactive=text, elem_id=f"{TAB}-prompt")
            negative = gr.Textbox(label="Negative prompt", lines=1, interactive=text)
            addons = addons_panel(studio, TAB, prompt, model.dropdown)
            with gr.Row():
                generate, stop = generate_buttons(TAB, "Inpaint")
            with gr.Row() as mask_row:
                feather = gr.Slider(0, 64, value=0, step=1, label="Feather mask edge (px)",
                                    info="the fill fades in over this width inside the mask", elem_id="inpaint-feather")
                only_masked = gr.Checkbox(False, label="Inpaint only the masked area",
                                          info="crop around the mask, work at the model's resolution, stitch back",
                                          elem_id="inpaint-only-masked")
                padding = gr.Slider(0, 256, value=32, step=4, label="Padding around the mask (px)", elem_id="inpaint-padding")
            with gr.Row() as content_row:
                fill = gr.Radio(list(FILL_MODES), value=InpaintOptions.fill, label="Masked content", elem_id="inpaint-fill",
                                info="what the masked part starts from: latent noise at strength 1 draws it anew; "
                                     "original at 0.3-0.6 retouches what is there; fill: blurred copies of its surroundings")
                strength = gr.Slider(0, 1, value=InpaintOptions.strength, step=0.01, label="Denoising strength",
                                     info="1 redraws the masked part; lower keeps more of its masked content",
                                     elem_id="inpaint-strength")
            outpainting = outpaint_controls(TAB)
            sampling = sampling_controls(studio, TAB)
            batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size")
            restore = restore_box(TAB)
        with gr.Column(scale=6):
            output = output_area(TAB, {name: titles[name] for name in SEND_TO})
    tab = InpaintTab(model=model, editor=editor, mode=mode, prompt=prompt, negative=negative, addons=addons, feather=feather, only_masked=only_masked,
                     padding=padding, fill=fill, strength=strength, mask_row=mask_row, content_row=content_row,
                     outpaint=outpainting, sampling=sampling, batch_size=batch_size, generate=generate, stop=stop, restore=restore,
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


def editor_image(value: dict | None) -> Image.Image:
    """The editor's picture (its background), transparency over white, not black."""
    if not isinstance(value, dict) or not isinstance(value.get("background"), Image.Image):
        raise ValueError("no image: upload one, or send one here from another tab")
    return as_rgb(value["background"])


def editor_parts(value: dict | None) -> tuple[Image.Image, Image.Image]:
    """(image, mask) from the editor: the mask is white wherever any brush layer has paint."""
    background = editor_image(value)
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
        if data.get(tab.mode) == "Outpaint":  # a caller that does not give the mode inpaints, as before it existed
            return outpaint_job(tab, data, loaded)
        image, mask = editor_parts(data[tab.editor])
        options = InpaintOptions(checked_number("mask feather", data[tab.feather], 0, MAX_FEATHER, integer=True),
                                 bool(data[tab.only_masked]),
                                 checked_number("masked area padding", data[tab.padding], 0, MAX_PADDING, integer=True),
                                 # a caller that gives neither draws the mask from noise, as before they existed
                                 checked_number("denoising strength", data.get(tab.strength, 1.0), 0.0, 1.0),
                                 data.get(tab.fill, InpaintOptions.fill))
        request = batch_request(data[tab.prompt], data[tab.negative], tab.sampling.values(data), image.width, image.height,
                                data[tab.batch_size])
        record = {"mask": {"feather": options.feather, "only_masked": options.only_masked, "padding": options.padding,
                           "strength": options.strength, "fill": options.fill, "coverage": round(float(np.asarray(mask).mean() / 255), 4)}}
        return Job(request, lambda r, callback, should_stop: inpaint(loaded, r, image, mask, options=options, callback=callback,
                                                                     should_stop=should_stop),
                   record, {"mask": mask, "input": image})

    return generation_handler(studio, TAB, tab.model, tab.output, prepare)


def outpaint_job(tab: InpaintTab, data: dict, loaded) -> Job:
    """The Outpaint mode's job: the editor's picture extended as the sliders say (no mask); the
    request's size is the extended canvas's. The input is saved beside each result."""
    image = editor_image(data[tab.editor])
    options = tab.outpaint.options(data).check(image.size)
    width, height = options.canvas_size(image.size)
    request = batch_request(data[tab.prompt], data[tab.negative], tab.sampling.values(data), width, height,
                            data[tab.batch_size])
    record = {"outpaint": {side: getattr(options, side) for side in ("left", "right", "top", "bottom")}
              | {"fill": options.fill, "mask_blur": options.mask_blur, "strength": options.strength}}
    return Job(request, lambda r, callback, should_stop: outpaint(loaded, r, image, options=options, callback=callback,
                                                                  should_stop=should_stop),
               record, {"input": image})


def wire_mode(tab: InpaintTab) -> None:
    """The mode shows its own controls and names the button; the preview follows the picture and the
    sliders while the Outpaint mode is on."""

    def switched(mode):
        out = mode == "Outpaint"
        return {tab.mask_row: gr.update(visible=not out), tab.content_row: gr.update(visible=not out),
                tab.outpaint.group: gr.update(visible=out),
                tab.generate: gr.update(value="Outpaint" if out else "Inpaint")}

    tab.mode.change(switched, tab.mode, [tab.mask_row, tab.content_row, tab.outpaint.group, tab.generate], queue=False)

    def preview(mode, value, *values):
        if mode != "Outpaint":
            return gr.update()
        picture = value.get("background") if isinstance(value, dict) else None
        return preview_update(as_rgb(picture) if isinstance(picture, Image.Image) else None, list(values))

    sources = [tab.mode, tab.editor, *tab.outpaint.settings]
    for source in sources:
        source.change(preview, sources, tab.outpaint.preview, queue=False, trigger_mode="always_last")


def wire(studio: Studio, tab: InpaintTab) -> None:
    inputs = {tab.editor, tab.prompt, tab.negative, tab.feather, tab.only_masked, tab.padding, tab.fill, tab.strength,
              tab.batch_size, tab.mode, *tab.outpaint.settings}
    connect_generation(studio, handler(studio, tab), inputs, model=tab.model, generate=tab.generate, stop=tab.stop,
                       sampling=tab.sampling, output=tab.output)
    tab.model.dropdown.change(prompt_boxes(studio, tab), tab.model.dropdown, [tab.prompt, tab.negative], queue=False)
    wire_mode(tab)
    restored = Restore(tab.prompt, tab.negative, tab.sampling, lora_dirs=studio.lora_dirs)
    mask_settings = {"feather": tab.feather, "only_masked": tab.only_masked, "padding": tab.padding, "fill": tab.fill,
                     "strength": tab.strength}

    @friendly
    def restore(path):
        updates, found = restored.updates(path)
        mask = found.extra.get("mask", {}) if found else {}
        updates.update({component: mask[key] for key, component in mask_settings.items() if key in mask})
        outpainted = outpaint_restored(tab.outpaint, found.fields) if found else {}
        if outpainted:
            updates.update(outpainted)
            updates[tab.mode] = "Outpaint"
        elif found:
            updates[tab.mode] = "Inpaint"
        return updates

    tab.restore.upload(restore, tab.restore, [*restored.components, *mask_settings.values(), tab.mode,
                                              *tab.outpaint.settings], queue=False)


def receive(tab: InpaintTab):
    """What "Send to inpainting" sets: the image as the editor's background (no mask yet) and the prompt."""

    def apply(path: str, prompt: str):
        image = Image.open(path).convert("RGB")
        return {tab.editor: {"background": image, "layers": [], "composite": image}, tab.prompt: prompt}

    return apply, [tab.editor, tab.prompt]
