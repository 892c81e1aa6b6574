"""Layout: draw, drag and resize labelled boxes on a canvas, with an optional global prompt. A
layout-conditioned model turns each box into layout tokens (a class token and two grid corners);
any other text model (or any model, when asked) takes each box's label as a region prompt, fused
with the global prompt (MultiDiffusion), on canvases of any size. LDM's layout2img model reads
class ids (its class-name table was not released) and no prompt: a hint under the menu says so
when it is chosen, and its boxes are always layout tokens."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import numpy as np
from gradio_image_annotation import image_annotator
from PIL import Image, ImageDraw

from ldm.checkpoints.presets import find_preset
from ldm.tasks import layout as task
from ldm.tasks.layout import layout
from ldm.tasks.request import regions_from_boxes
from ui.controls import (
    ModelMenu,
    OutputArea,
    SamplingControls,
    SizeControls,
    TilingControls,
    generate_buttons,
    model_menu,
    output_area,
    sampling_controls,
    size_controls,
    tiling_controls,
)
from ui.addons import AddonsPanel, addons_panel
from ui.errors import friendly
from ui.generation import Job, batch_request, connect_generation, generation_handler
from ui.outputs import Restore, read_restore, restore_box
from ui.services import Studio

TAB = "layout"
TITLE = "Layout"
SEND_TO = ("img2img", "inpaint", "upscale")
CANVAS_SIDE = 512  # the drawing canvas's longer side, in screen pixels; boxes are kept normalised
LABELS_FROM = "default-txt2img"  # the canvas's label list: the classes of this preset's vocabulary


@dataclass
class LayoutTab:
    model: ModelMenu
    canvas: image_annotator
    prompt: gr.Textbox
    negative: gr.Textbox
    addons: AddonsPanel
    sampling: SamplingControls
    size: SizeControls
    tiling: TilingControls
    boxes_as: gr.Radio
    regions: gr.Dataframe
    batch_size: gr.Slider
    generate: gr.Button
    stop: gr.Button
    restore: gr.File
    output: OutputArea


def blank_canvas(width: int, height: int) -> np.ndarray:
    """A light canvas with the aspect of the output and a faint 3x3 grid (the world's nine places)."""
    scale = CANVAS_SIDE / max(width, height)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    image = Image.new("RGB", (w, h), (236, 236, 236))
    draw = ImageDraw.Draw(image)
    for i in (1, 2):
        draw.line([(w * i / 3, 0), (w * i / 3, h)], fill=(210, 210, 210), width=1)
        draw.line([(0, h * i / 3), (w, h * i / 3)], fill=(210, 210, 210), width=1)
    return np.asarray(image)


NATIVE, REGIONS = "layout tokens where the model takes them", "region prompts"


def layout_info(studio: Studio) -> str:
    names = [e.name for e in studio.entries_for(TAB) if task.takes_layout_tokens(e.preset.model)]
    native = ", ".join(names) if names else "none installed"
    return (f"models with layout conditioning: {native}. On other models (Stable Diffusion...) each box's label is "
            "the prompt of its region: type any text as a label. Layout-only models (LDM layout2img) take class "
            "ids as labels.")


def model_hint(studio: Studio, path: str | None) -> str:
    """What the chosen model makes of the boxes and the prompt, when it differs from the usual."""
    try:
        entry = studio.entry(path) if path else None
    except ValueError:  # a file gone since the last scan: the menu's own check reports it
        entry = None
    ids = task.class_ids(entry.preset.model) if entry is not None and entry.preset is not None else None
    if ids is None:
        return ""
    return (f"**{entry.name}** reads class ids, not names: label each box with a whole number from 0 to "
            f"{ids.largest} (the model's class-name table was not released), at most {ids.boxes} "
            "boxes. It generates from the layout alone: the global and negative prompts are not used and the boxes "
            "are always layout tokens. Guidance does not apply (the model had no unconditional training): "
            "keep the scale at 1.")


def build(studio: Studio, titles: dict[str, str]) -> LayoutTab:
    with gr.Row():
        with gr.Column(scale=5):
            model = model_menu(studio, TAB, info=layout_info(studio))
            hint = gr.Markdown(model_hint(studio, model.dropdown.value), elem_id=f"{TAB}-model-hint")
            labels = task.class_names(find_preset(LABELS_FROM).model)
            canvas = image_annotator({"image": blank_canvas(64, 64), "boxes": []}, label_list=labels, image_type="numpy",
                                     label="Layout: drag on the canvas to draw a box, then name it; drag boxes to move or resize",
                                     sources=[], height=CANVAS_SIDE + 40, box_min_size=6, show_clear_button=False,
                                     elem_id="layout-canvas")
            prompt = gr.Textbox(label="Global prompt (optional)", lines=1, info="Ctrl+Enter generates", elem_id=f"{TAB}-prompt")
            negative = gr.Textbox(label="Negative prompt", lines=1)
            addons = addons_panel(studio, TAB, prompt, model.dropdown)
            with gr.Row():
                generate, stop = generate_buttons(TAB, "Generate from layout")
                clear = gr.Button("Clear boxes")
            sampling = sampling_controls(studio, TAB)
            with gr.Row():
                boxes_as = gr.Radio([NATIVE, REGIONS], value=NATIVE, label="Boxes are", elem_id=f"{TAB}-boxes-as")
            regions = gr.Dataframe(headers=REGION_HEADERS, datatype=["str", "str", "number"], type="array", value=[],
                                   static_columns=[0], interactive=True, label="Region prompts: each box's own negative "
                                   "prompt and strength (how far its prompt replaces the global prompt in the box, 0 to 1)",
                                   elem_id=f"{TAB}-regions")
            size = size_controls(studio, TAB)
            tiling = tiling_controls(studio, TAB)
            batch_size = gr.Slider(1, 16, value=1, step=1, label="Batch size")
            restore = restore_box(TAB, "layout and settings")
        with gr.Column(scale=6):
            output = output_area(TAB, {name: titles[name] for name in SEND_TO})
    tab = LayoutTab(model=model, canvas=canvas, prompt=prompt, negative=negative, addons=addons, sampling=sampling, size=size, tiling=tiling,
                    boxes_as=boxes_as, regions=regions, batch_size=batch_size, generate=generate, stop=stop, restore=restore,
                    output=output)
    wire(studio, tab)
    model.dropdown.change(lambda path: model_hint(studio, path), model.dropdown, hint, queue=False)
    clear.click(lambda w, h: {"image": blank_canvas(int(w), int(h)), "boxes": []}, [size.width, size.height], canvas, queue=False)
    return tab


def canvas_boxes(value: dict | None) -> tuple:
    """The canvas's boxes as (label, x0, y0, x1, y1) normalised to [0, 1]."""
    if not value:
        return ()
    if not isinstance(value, dict) or not isinstance(value.get("boxes") or [], list):
        raise ValueError("the layout canvas sent no usable value; press Clear boxes and draw them again")
    image = value.get("image")
    if image is None:
        return ()
    h, w = (image.shape[:2] if isinstance(image, np.ndarray) else (getattr(image, "height", 0), getattr(image, "width", 0)))
    if not (h and w):
        raise ValueError("the layout canvas has no picture; press Clear boxes")
    boxes = []
    for i, box in enumerate(value.get("boxes") or []):
        try:
            x0, x1 = sorted((float(box["xmin"]) / w, float(box["xmax"]) / w))
            y0, y1 = sorted((float(box["ymin"]) / h, float(box["ymax"]) / h))
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"box {i + 1} has no usable corners (xmin, ymin, xmax, ymax); draw it again") from None
        label = str(box.get("label") or "").strip()
        if not label:
            raise ValueError("every box needs a label (a class such as 'red circle', or a class id such as 7 for "
                             "LDM's layout2img); click a box to name it")
        boxes.append((label, max(0.0, x0), max(0.0, y0), min(1.0, x1), min(1.0, y1)))
    return tuple(boxes)


REGION_HEADERS = ["Box", "Negative prompt", "Strength"]


def is_region_table(rows) -> bool:
    return isinstance(rows, (list, tuple)) and all(isinstance(row, (list, tuple)) for row in rows)


def canvas_regions(value, rows):
    """The region table after a change on the canvas: new rows when boxes were added, removed or
    renamed; ``gr.skip()`` (the table stays as the user edited it) when the same boxes only moved,
    or while a box just drawn has no name yet. A table that is not rows is rebuilt from the boxes."""
    try:
        boxes = canvas_boxes(value)
    except ValueError:  # a box just drawn, not named yet: its row comes with its name
        return gr.skip()
    rows = rows if is_region_table(rows) else None
    if [str(r[0]).strip() for r in rows or [] if r and str(r[0]).strip()] == [b[0] for b in boxes]:
        return gr.skip()
    return region_rows(boxes, rows)


def region_rows(boxes: tuple, rows) -> list[list]:
    """The region table for ``boxes``: a box keeps the negative prompt and strength it had (matched
    by label, in order), a new box starts with none and 1."""
    rows = [] if rows is None else rows
    if not is_region_table(rows):
        raise ValueError(f"the region table must be rows of [{', '.join(REGION_HEADERS)}], got {rows!r:.80}")
    kept: dict[str, list] = {}
    for row in rows:
        if row and str(row[0]).strip():
            kept.setdefault(str(row[0]).strip(), []).append(list(row[1:3]) + ["", 1.0][len(row[1:3]):])
    table = []
    for label, *_ in boxes:
        negative, strength = (kept.get(label) or [["", 1.0]]).pop(0)
        table.append([label, "" if negative is None else str(negative), strength])
    return table


def box_fields(loaded, boxes: tuple, boxes_as: str, rows) -> dict:
    """The request's ``boxes`` (layout tokens) or ``regions`` (each label the prompt of its box, with the
    negative prompt and strength of its row in the region table), as the task decides for the
    "Boxes are" choice (``ldm.tasks.layout.as_layout_tokens``)."""
    if task.as_layout_tokens(loaded.model.config, boxes_as == NATIVE):
        return {"boxes": boxes}
    return {"regions": regions_from_boxes(boxes, region_details(boxes, rows))}


def region_details(boxes: tuple, rows) -> list[tuple[str, float]]:
    """Each box's (negative prompt, strength) from the region table, checked."""
    return task.check_details(boxes, [(negative, strength) for _, negative, strength in region_rows(boxes, rows)])


def canvas_value(width: int, height: int, boxes) -> dict:
    image = blank_canvas(width, height)
    h, w = image.shape[:2]
    return {"image": image, "boxes": [{"label": b[0], "xmin": b[1] * w, "ymin": b[2] * h, "xmax": b[3] * w, "ymax": b[4] * h}
                                      for b in boxes]}


def handler(studio: Studio, tab: LayoutTab):
    """The generate event's handler (``ui.generation.generation_handler``) with this tab's request."""

    def prepare(data: dict, loaded) -> Job:
        boxes = canvas_boxes(data[tab.canvas])
        if not boxes:
            raise ValueError("no boxes: drag on the canvas to draw one, then give it a label")
        request = batch_request(data[tab.prompt], data[tab.negative], tab.sampling.values(data), data[tab.size.width],
                                data[tab.size.height], data[tab.batch_size], tiling=tab.tiling.options(data),
                                **box_fields(loaded, boxes, data[tab.boxes_as], data[tab.regions]))
        record = {"boxes": [{"label": b[0], "box": [round(v, 4) for v in b[1:]]} for b in boxes],
                  "regions": [[r.prompt, r.negative_prompt, r.strength] for r in request.regions]}
        return Job(request, lambda r, callback, should_stop: layout(loaded, r, callback=callback, should_stop=should_stop),
                   record)

    return generation_handler(studio, TAB, tab.model, tab.output, prepare)


def wire(studio: Studio, tab: LayoutTab) -> None:
    inputs = {tab.canvas, tab.prompt, tab.negative, tab.size.width, tab.size.height, tab.batch_size, tab.boxes_as, tab.regions,
              *tab.tiling.components}
    connect_generation(studio, handler(studio, tab), inputs, model=tab.model, generate=tab.generate, stop=tab.stop,
                       sampling=tab.sampling, output=tab.output, size=tab.size, submit=tab.prompt)

    def reshape(width, height, value):
        """A new output size gives the canvas the new aspect, keeping the boxes where they were."""
        try:
            boxes = canvas_boxes(value)
        except ValueError:
            boxes = ()
        return canvas_value(int(width), int(height), boxes)

    tab.size.width.release(reshape, [tab.size.width, tab.size.height, tab.canvas], tab.canvas, queue=False)
    tab.size.height.release(reshape, [tab.size.width, tab.size.height, tab.canvas], tab.canvas, queue=False)

    tab.canvas.change(canvas_regions, [tab.canvas, tab.regions], tab.regions, queue=False)

    restored = Restore(tab.prompt, tab.negative, tab.sampling, tab.size.width, tab.size.height, studio.lora_dirs)

    @friendly
    def restore(path, width, height):
        updates, found = restored.updates(path)
        w, h = found.size if found and found.size else (int(width), int(height))
        updates.update(restored_layout(tab, found.extra if found else {}, w, h))
        return updates

    tab.restore.upload(restore, [tab.restore, tab.size.width, tab.size.height],
                       [*restored.components, tab.canvas, tab.regions, tab.boxes_as], queue=False)


def restored_layout(tab: LayoutTab, extra: dict, width: int, height: int) -> dict:
    """The canvas, region table and box mode a saved picture was made with."""
    boxes = [(b["label"], *b["box"]) for b in (extra.get("boxes") or [])]
    regions = extra.get("regions") or []
    updates = {tab.canvas: canvas_value(width, height, boxes), tab.regions: region_rows(tuple(boxes), regions)}
    if regions:
        updates[tab.boxes_as] = REGIONS
    return updates


def receive(tab: LayoutTab):
    """"Send to layout": the picture's boxes (when it was made from a layout) and prompt, at its size."""

    def apply(path: str, prompt: str):
        restored = read_restore(path)
        width, height = Image.open(path).size
        return {**restored_layout(tab, restored.extra, width, height), tab.prompt: prompt, tab.size.width: width,
                tab.size.height: height}

    return apply, [tab.canvas, tab.regions, tab.boxes_as, tab.prompt, tab.size.width, tab.size.height]
