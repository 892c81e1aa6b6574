"""The inpainting tab's Outpaint mode: how far to extend the picture on each side, what the new border
starts from, the soft seam and the denoising strength, and a preview of the extended canvas that
follows the sliders before anything is generated (``ldm.tasks.outpaint``). No mask is painted in this
mode: the border is the mask."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
from PIL import Image

from ldm.tasks.outpaint import FILL_MODES, MAX_MASK_BLUR, SIDES, OutpaintOptions, options_from_fields, outpaint_preview
from ldm.tasks.request import checked_number

MODES = ("Inpaint", "Outpaint")
MAX_EXTENSION = 1024  # px a side in the sliders; the canvas limit (MAX_SIDE) is checked on the whole
FILL_INFO = ("fill: blurred copies of the picture; original: its edges stretched; latent noise / latent nothing: "
             "the border's latent set to noise / zero")


@dataclass
class OutpaintControls:
    group: gr.Group
    left: gr.Slider
    right: gr.Slider
    top: gr.Slider
    bottom: gr.Slider
    fill: gr.Radio
    mask_blur: gr.Slider
    strength: gr.Slider
    preview: gr.Image

    @property
    def settings(self) -> list:
        """The controls that decide the options, in ``OutpaintOptions`` order."""
        return [self.left, self.right, self.top, self.bottom, self.fill, self.mask_blur, self.strength]

    def options(self, data: dict) -> OutpaintOptions:
        """The options of the event's values (``data`` by component), each checked under its name."""
        sides = {side: checked_number(f"{side} extension", data[getattr(self, side)], 0, MAX_EXTENSION, integer=True)
                 for side in SIDES}
        return OutpaintOptions(**sides, fill=data[self.fill],
                               mask_blur=checked_number("mask blur", data[self.mask_blur], 0, MAX_MASK_BLUR, integer=True),
                               strength=checked_number("denoising strength", data[self.strength], 0.0, 1.0))


def outpaint_controls(prefix: str, visible: bool = False) -> OutpaintControls:
    """The Outpaint mode's controls, built where the caller is (hidden until the mode is chosen)."""
    with gr.Group(visible=visible) as group:
        with gr.Row():
            sliders = {side: gr.Slider(0, MAX_EXTENSION, value=64 if side in ("left", "right") else 0, step=8,
                                       label=f"Extend {side} (px)", elem_id=f"{prefix}-outpaint-{side}")
                       for side in SIDES}
        with gr.Row():
            fill = gr.Radio(list(FILL_MODES), value=FILL_MODES[0], label="Masked content", info=FILL_INFO,
                            elem_id=f"{prefix}-outpaint-fill")
        with gr.Row():
            mask_blur = gr.Slider(0, MAX_MASK_BLUR, value=8, step=1, label="Mask blur (px)",
                                  info="the seam: how far into the picture the model redraws its edge (the picture "
                                       "itself comes back unchanged)", elem_id=f"{prefix}-outpaint-mask-blur")
            strength = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="Denoising strength",
                                 info="1 draws the border anew; lower keeps more of the masked content",
                                 elem_id=f"{prefix}-outpaint-strength")
        preview = gr.Image(label="Extended canvas", type="pil", interactive=False, height=260, format="png",
                           elem_id=f"{prefix}-outpaint-preview")
    return OutpaintControls(group, sliders["left"], sliders["right"], sliders["top"], sliders["bottom"], fill, mask_blur,
                            strength, preview)


def preview_update(picture: Image.Image | None, values: list) -> dict:
    """The preview's update for a picture (None: none yet) and the controls' values: the pre-filled
    canvas with its size in the label, or no picture and the reason in the label."""
    if picture is None:
        return gr.update(value=None, label="Extended canvas: upload a picture")
    left, right, top, bottom, fill, blur, strength = values
    try:
        options = OutpaintOptions(int(left), int(right), int(top), int(bottom), fill, int(blur), float(strength))
        canvas = outpaint_preview(picture, options)
    except ValueError as error:
        return gr.update(value=None, label=f"Extended canvas: {error}")
    return gr.update(value=canvas, label=f"Extended canvas: {canvas.width}x{canvas.height} (the picture "
                                         f"{picture.width}x{picture.height} in place)")


def restored(controls: OutpaintControls, fields: dict[str, str]) -> dict:
    """Control updates from a parameters text's outpaint fields (``options_from_fields``); empty for
    a PNG that was not outpainted."""
    if "Outpaint" not in fields:
        return {}
    try:
        found = options_from_fields(fields)
    except ValueError as error:
        gr.Warning(f"{error}; the outpaint settings were not restored")
        return {}
    names = ["left", "right", "top", "bottom", "fill", "mask_blur", "strength"]
    return {component: found[name] for name, component in zip(names, controls.settings) if name in found}
