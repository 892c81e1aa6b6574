"""Image to image: a picture (uploaded, pasted or sent from another tab's gallery) is re-drawn under
the prompt, keeping as much of it as the denoising strength leaves. In sketch mode the colour strokes
drawn on it with the brush are laid over the picture before it is encoded, so they steer the colours
and shapes of the result; with sketch mode off the strokes are ignored. The input picture (and the
strokes, when used) are saved next to each result; a dropped PNG restores the strength, resize mode
and step mode with the usual settings."""

from __future__ import annotations

from dataclasses import dataclass, replace

import gradio as gr
from PIL import Image

from ldm.sampling.strength import STEP_MODES
from ldm.tasks.images import as_rgb
from ldm.tasks.img2img import RESIZE_MODES, Img2ImgOptions, apply_sketch, check_picture, img2img, picture_size
from ldm.tasks.request import MAX_SIDE, checked_number
from ui.addons import AddonsPanel, addons_panel
from ui.controls import (
    ModelMenu,
    OutputArea,
    SamplingControls,
    SizeControls,
    generate_buttons,
    model_menu,
    output_area,
    sampling_controls,
)
from ui.errors import friendly
from ui.generation import Job, batch_request, connect_generation, generation_handler
from ui.outputs import Restore, Restored, restore_box
from ui.services import Studio

TAB = "img2img"
TITLE = "Image to image"
SEND_TO = ("img2img", "inpaint", "upscale", "layout")
COLOURS = ["#d62828", "#f77f00", "#fcbf49", "#2a9d8f", "#1d4ed8", "#7b2cbf", "#ffffff", "#000000"]
BRUSH = gr.Brush(default_size=8, colors=COLOURS, default_color=COLOURS[0], color_mode="defaults")  # with a colour picker


@dataclass
class Img2ImgTab:
    model: ModelMenu
    editor: gr.ImageEditor
    sketch: gr.Checkbox
    prompt: gr.Textbox
    negative: gr.Textbox
    addons: AddonsPanel
    strength: gr.Slider
    resize_mode: gr.Radio
    step_mode: gr.Radio
    size: SizeControls
    sampling: SamplingControls
    batch_count: gr.Slider
    batch_size: gr.Slider
    generate: gr.Button
    stop: gr.Button
    restore: gr.File
    output: OutputArea


def build(studio: Studio, titles: dict[str, str]) -> Img2ImgTab:
    with gr.Row():
        with gr.Column(scale=5):
            model = model_menu(studio, TAB, info="any text-to-image model; a native inpainting model (the default) "
                                                 "takes the whole picture as its mask")
            editor = gr.ImageEditor(label="Image (draw colour strokes on it in sketch mode)", type="pil", image_mode="RGBA",
                                    sources=["upload", "clipboard"], brush=BRUSH, eraser=gr.Eraser(default_size=8),
                                    layers=False, format="png", height=420, elem_id="img2img-editor")
            sketch = gr.Checkbox(False, label="Sketch", elem_id="img2img-sketch",
                                 info="on: the brush strokes are blended into the picture before denoising; "
                                      "off: the strokes are ignored and only the picture is used")
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="what the picture should become",
                                info="Ctrl+Enter generates", elem_id=f"{TAB}-prompt")
            negative = gr.Textbox(label="Negative prompt", lines=1, placeholder="what the image should not have")
            addons = addons_panel(studio, TAB, prompt, model.dropdown)
            with gr.Row():
                generate, stop = generate_buttons(TAB)
            strength = gr.Slider(0, 1, value=Img2ImgOptions.strength, step=0.01, label="Denoising strength",
                                 info="0 keeps the picture, 1 redraws it: how far down the schedule it is noised",
                                 elem_id="img2img-strength")
            with gr.Row():
                resize_mode = gr.Radio(list(RESIZE_MODES), value=RESIZE_MODES[0], label="Resize mode",
                                       info="how the picture meets another width and height", elem_id="img2img-resize-mode")
                step_mode = gr.Radio(list(STEP_MODES), value=STEP_MODES[0], label="Img2img steps",
                                     info="Strength x steps: runs strength x Steps of them (diffusers); Exact steps: "
                                          "runs exactly Steps (AUTOMATIC1111)", elem_id="img2img-step-mode")
            with gr.Row():
                width = gr.Slider(0, MAX_SIDE, value=0, step=8, label="Width", elem_id="img2img-width",
                                  info="0: the picture's own size; one side alone keeps its shape")
                height = gr.Slider(0, MAX_SIDE, value=0, step=8, label="Height", elem_id="img2img-height")
            sampling = sampling_controls(studio, TAB)
            with gr.Row():
                batch_count = gr.Slider(1, 16, value=1, step=1, label="Batch count", info="batches one after another",
                                        elem_id="img2img-batch-count")
                batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size", info="images per batch",
                                       elem_id="img2img-batch-size")
            restore = restore_box(TAB)
        with gr.Column(scale=6):
            output = output_area(TAB, {name: titles[name] for name in SEND_TO})
    tab = Img2ImgTab(model=model, editor=editor, sketch=sketch, prompt=prompt, negative=negative, addons=addons,
                     strength=strength, resize_mode=resize_mode, step_mode=step_mode, size=SizeControls(width, height),
                     sampling=sampling, batch_count=batch_count, batch_size=batch_size, generate=generate, stop=stop,
                     restore=restore, output=output)
    wire(studio, tab)
    return tab


def editor_parts(value: dict | None, sketch: bool) -> tuple[Image.Image, Image.Image | None]:
    """(picture, strokes) from the editor: the picture as RGB (transparency over white), and in sketch
    mode every brush layer stacked into one RGBA layer at the picture's size (None when sketch mode is off)."""
    if not isinstance(value, dict) or not isinstance(value.get("background"), Image.Image):
        raise ValueError("no image: upload or paste one, or send one here from another tab's gallery")
    check_picture(value["background"])
    picture = as_rgb(value["background"])
    if not sketch:
        return picture, None
    strokes = Image.new("RGBA", picture.size, (0, 0, 0, 0))
    for layer in value.get("layers") or []:
        if isinstance(layer, Image.Image):
            layer = layer.convert("RGBA")
            strokes = Image.alpha_composite(strokes, layer if layer.size == picture.size else layer.resize(picture.size))
    return picture, strokes


def size_asked(picture: Image.Image, width, height) -> tuple[tuple[int, int], list[str]]:
    """The size to work at from the sliders (0: follow the picture), ``ldm.tasks.img2img.picture_size``."""
    width = checked_number("width", width, 0, MAX_SIDE, integer=True)
    height = checked_number("height", height, 0, MAX_SIDE, integer=True)
    return picture_size(picture, width, height)


def handler(studio: Studio, tab: Img2ImgTab):
    """The generate event's handler (``ui.generation.generation_handler``) with this tab's request."""

    def prepare(data: dict, loaded) -> Job:
        options = Img2ImgOptions(data[tab.strength], data[tab.resize_mode], data[tab.step_mode]).check()
        picture, strokes = editor_parts(data[tab.editor], bool(data[tab.sketch]))
        sketched = picture if strokes is None else apply_sketch(picture, strokes)  # no strokes: its message, before any work
        (width, height), size_notices = size_asked(picture, data[tab.size.width], data[tab.size.height])
        request = batch_request(data[tab.prompt], data[tab.negative], tab.sampling.values(data), width, height,
                                data[tab.batch_size])

        def run(r, callback, should_stop):
            result = img2img(loaded, r, sketched, options=options, callback=callback, should_stop=should_stop)
            return replace(result, notices=size_notices + result.notices)

        attachments = {"input": picture, **({"sketch": strokes} if strokes is not None else {})}
        record = {"img2img": {"sketch": strokes is not None, "input_size": list(picture.size)}}
        return Job(request, run, record, attachments)

    return generation_handler(studio, TAB, tab.model, tab.output, prepare, batch_count=tab.batch_count)


def img2img_updates(tab: Img2ImgTab, restored: Restored | None) -> dict:
    """The strength, resize mode and step mode of an image-to-image PNG ("Denoising strength", and
    "Resize mode" / "Img2img steps" where not the defaults); a PNG without a strength leaves them."""
    fields = restored.fields if restored else {}
    strength = restored.number("Denoising strength") if restored else None
    if strength is None:
        return {}
    updates = {}
    if 0 <= strength <= 1:
        updates[tab.strength] = strength
    else:
        gr.Warning(f"denoising strength {strength:g} is outside 0 to 1; it was not restored")
    for key, component, known in (("Resize mode", tab.resize_mode, RESIZE_MODES), ("Img2img steps", tab.step_mode, STEP_MODES)):
        value = fields.get(key, known[0]).strip()
        if value in known:
            updates[component] = value
        else:
            gr.Warning(f"{key.lower()} {value!r} is not known; use one of {', '.join(known)}; it was not restored")
    return updates


def restore_updates(tab: Img2ImgTab, restored: Restore, path: str | None) -> dict:
    """A dropped PNG's settings; its size only when it was made from a picture (it has a denoising
    strength): a text-to-image PNG's size says nothing of the picture in the editor, which keeps its own."""
    updates, found = restored.updates(path)
    mine = img2img_updates(tab, found)
    if tab.strength not in mine:
        updates.pop(tab.size.width, None)
        updates.pop(tab.size.height, None)
    return {**updates, **mine}


def wire(studio: Studio, tab: Img2ImgTab) -> None:
    inputs = {tab.editor, tab.sketch, tab.prompt, tab.negative, tab.strength, tab.resize_mode, tab.step_mode,
              tab.size.width, tab.size.height, tab.batch_count, tab.batch_size}
    connect_generation(studio, handler(studio, tab), inputs, model=tab.model, generate=tab.generate, stop=tab.stop,
                       sampling=tab.sampling, output=tab.output, submit=tab.prompt)
    restored = Restore(tab.prompt, tab.negative, tab.sampling, tab.size.width, tab.size.height, studio.lora_dirs)

    @friendly
    def restore(path):
        return restore_updates(tab, restored, path)

    tab.restore.upload(restore, tab.restore, [*restored.components, tab.strength, tab.resize_mode, tab.step_mode],
                       queue=False)


def receive(tab: Img2ImgTab):
    """What "Send to image to image" sets: the picture as the editor's background (no strokes) and the prompt."""

    def apply(path: str, prompt: str):
        image = Image.open(path).convert("RGB")
        return {tab.editor: {"background": image, "layers": [], "composite": image}, tab.prompt: prompt}

    return apply, [tab.editor, tab.prompt]
