"""Semantic synthesis: a picture from a label map, with LDM's semantic synthesis models.

The map is a PNG whose pixel values are class indices (0 to 181 for LDM's landscape models); the
picture has its size. There is no prompt and no guidance. The studio ships no such model: when none
is in the model folders, the tab says how to add one.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import numpy as np
from PIL import Image

from ldm.tasks.request import GenerationRequest
from ldm.tasks.semantic import LABEL_MODES, semantic
from ui.controls import ModelMenu, OutputArea, SamplingControls, generate_buttons, model_menu, output_area, sampling_controls
from ui.errors import friendly
from ui.generation import Job, connect_generation, generation_handler
from ui.services import Studio

TAB = "semantic"
TITLE = "Semantic synthesis"
SEND_TO = ("img2img", "inpaint", "upscale")
NO_MODEL = (
    "**No semantic synthesis model is installed.** Download LDM's landscape model (`semantic_synthesis256.zip`, or "
    "`semantic_synthesis.zip` for the one fine-tuned at 512x512, from the CompVis latent-diffusion model zoo), "
    "put its `model.ckpt` (renamed as you like) in `weights/` or in a folder given to the studio with "
    "`--models-dir`, and press ↻ Rescan. Put its `config.yaml` beside it under the same name "
    "(`landscapes512.ckpt` + `landscapes512.yaml`) to have the 512 model recognised as such."
)


@dataclass
class SemanticTab:
    model: ModelMenu
    no_model: gr.Markdown
    segmentation: gr.File
    preview: gr.Image
    sampling: SamplingControls
    generate: gr.Button
    stop: gr.Button
    output: OutputArea


def no_model_note(studio: Studio, refresh: bool = False) -> str:
    """What the tab says above its controls: how to add a model when there is none."""
    studio.catalog(refresh=refresh)
    return "" if studio.entries_for(TAB) else NO_MODEL


def open_label_map(path: str | None) -> Image.Image:
    if not path:
        raise ValueError("no segmentation map: upload a label map (an 8-bit greyscale PNG of class indices)")
    with Image.open(path) as image:
        image.load()
        return image.copy()


def label_colours(image: Image.Image) -> Image.Image:
    """A label map in distinct colours, to see its regions (class k gets the same colour everywhere)."""
    if image.mode not in LABEL_MODES:
        return image.convert("RGB")
    labels = np.asarray(image, dtype=np.uint8)
    palette = np.random.default_rng(0).integers(40, 256, (256, 3), dtype=np.uint8)
    return Image.fromarray(palette[labels])


def build(studio: Studio, titles: dict[str, str]) -> SemanticTab:
    with gr.Row():
        with gr.Column(scale=5):
            model = model_menu(studio, TAB, info="LDM semantic synthesis models (landscapes from label maps)")
            no_model = gr.Markdown(no_model_note(studio), elem_id=f"{TAB}-no-model")
            segmentation = gr.File(label="Segmentation map: PNG whose pixel values are class indices (0-181)",
                                   file_types=[".png"], height=90, elem_id=f"{TAB}-segmentation")
            preview = gr.Image(label="Its regions", type="pil", interactive=False, height=240, elem_id=f"{TAB}-map-preview")
            with gr.Row():
                generate, stop = generate_buttons(TAB)
            sampling = sampling_controls(studio, TAB, steps=100, scale=None, eta=1.0, emphasis=False)
            gr.Markdown("The picture has the map's size (rounded to a multiple of 16); larger maps than the training "
                        "size work, the model being convolutional. No prompt and no guidance.")
        with gr.Column(scale=6):
            output = output_area(TAB, {name: titles[name] for name in SEND_TO})
    tab = SemanticTab(model=model, no_model=no_model, segmentation=segmentation, preview=preview, sampling=sampling,
                      generate=generate, stop=stop, output=output)
    wire(studio, tab)
    return tab


def handler(studio: Studio, tab: SemanticTab):
    """The generate event's handler (``ui.generation.generation_handler``) with this tab's request."""

    def prepare(data: dict, loaded) -> Job:
        label_map = open_label_map(data[tab.segmentation])
        request = GenerationRequest("", **tab.sampling.values(data))
        return Job(request, lambda r, callback, should_stop: semantic(loaded, label_map, r, callback=callback,
                                                                      should_stop=should_stop),
                   attachments={"segmentation": label_map})

    return generation_handler(studio, TAB, tab.model, tab.output, prepare)


def wire(studio: Studio, tab: SemanticTab) -> None:
    connect_generation(studio, handler(studio, tab), {tab.segmentation}, model=tab.model, generate=tab.generate,
                       stop=tab.stop, sampling=tab.sampling, output=tab.output)
    # The menu's own rescan runs beside this one; each reads the folders afresh (a header read a file).
    tab.model.refresh.click(lambda: no_model_note(studio, refresh=True), None, tab.no_model, queue=False)

    @friendly
    def show(path):
        return None if not path else label_colours(open_label_map(path))

    tab.segmentation.change(show, tab.segmentation, tab.preview, queue=False)
