"""Text to image: prompt, negative prompt, sampling settings, size, batches, the hires fix (``ui.hires``);
live preview and gallery."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ldm.tasks.txt2img import txt2img
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
from ui.hires import HiresControls, hires_controls, hires_job, rescan_upscalers
from ui.outputs import Restore, restore_box
from ui.services import Studio

TAB = "txt2img"
TITLE = "Text to image"
SEND_TO = ("img2img", "inpaint", "upscale", "layout")


@dataclass
class Txt2ImgTab:
    model: ModelMenu
    prompt: gr.Textbox
    negative: gr.Textbox
    addons: AddonsPanel
    sampling: SamplingControls
    size: SizeControls
    tiling: TilingControls
    batch_count: gr.Slider
    batch_size: gr.Slider
    hires: HiresControls
    generate: gr.Button
    stop: gr.Button
    restore: gr.File
    output: OutputArea


def build(studio: Studio, titles: dict[str, str]) -> Txt2ImgTab:
    with gr.Row():
        with gr.Column(scale=5):
            model = model_menu(studio, TAB)
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle in the top left and a small blue square at the bottom",
                                info="Ctrl+Enter generates", elem_id=f"{TAB}-prompt")
            negative = gr.Textbox(label="Negative prompt", lines=1, placeholder="what the image should not have")
            addons = addons_panel(studio, TAB, prompt, model.dropdown)
            with gr.Row():
                generate, stop = generate_buttons(TAB)
            sampling = sampling_controls(studio, TAB)
            size = size_controls(studio, TAB)
            tiling = tiling_controls(studio, TAB)
            with gr.Row():
                batch_count = gr.Slider(1, 16, value=1, step=1, label="Batch count", info="batches one after another",
                                        elem_id="txt2img-batch-count")
                batch_size = gr.Slider(1, 16, value=1, step=1, label="Batch size", info="images per batch",
                                       elem_id="txt2img-batch-size")
            hires = hires_controls(studio, TAB)  # made after the batch sliders: the API's new inputs come last
            restore = restore_box(TAB)
        with gr.Column(scale=6):
            output = output_area(TAB, {name: titles[name] for name in SEND_TO})
    tab = Txt2ImgTab(model=model, prompt=prompt, negative=negative, addons=addons, sampling=sampling, size=size, tiling=tiling,
                     batch_count=batch_count, batch_size=batch_size, hires=hires, generate=generate, stop=stop, restore=restore,
                     output=output)
    wire(studio, tab)
    return tab


def handler(studio: Studio, tab: Txt2ImgTab):
    """The generate event's handler (``ui.generation.generation_handler``) with this tab's request."""

    def prepare(data: dict, loaded) -> Job:
        request = batch_request(data[tab.prompt], data[tab.negative], tab.sampling.values(data), data[tab.size.width],
                                data[tab.size.height], data[tab.batch_size], tiling=tab.tiling.options(data))
        hires = tab.hires.options(data)
        if hires is not None:
            return Job(request, hires_job(studio, loaded, hires))
        return Job(request, lambda r, callback, should_stop: txt2img(loaded, r, callback=callback, should_stop=should_stop))

    return generation_handler(studio, TAB, tab.model, tab.output, prepare, batch_count=tab.batch_count)


def wire(studio: Studio, tab: Txt2ImgTab) -> None:
    inputs = {tab.prompt, tab.negative, tab.size.width, tab.size.height, tab.batch_count, tab.batch_size, *tab.tiling.components,
              *tab.hires.components}
    connect_generation(studio, handler(studio, tab), inputs, model=tab.model, generate=tab.generate, stop=tab.stop,
                       sampling=tab.sampling, output=tab.output, size=tab.size, submit=tab.prompt)
    restored = Restore(tab.prompt, tab.negative, tab.sampling, tab.size.width, tab.size.height, studio.lora_dirs)

    @friendly
    def restore(path):
        updates, found = restored.updates(path)
        return {**updates, **({} if found is None else tab.hires.restore_updates(studio, found.fields))}

    tab.restore.upload(restore, tab.restore, [*restored.components, *tab.hires.components], queue=False)
    tab.model.refresh.click(rescan_upscalers(studio), None, tab.hires.upscaler, queue=False, api_name=False)
