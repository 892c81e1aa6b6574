"""Text to image: prompt, negative prompt, DDIM settings, size, batches; live preview and gallery."""

from __future__ import annotations

from dataclasses import dataclass, replace

import gradio as gr

from ldm.tasks.txt2img import txt2img
from ui.errors import friendly
from ui.services import Studio
from ui.widgets import (
    ModelMenu,
    OutputArea,
    SamplingControls,
    SizeControls,
    TilingControls,
    batch_request,
    chosen_model,
    connect_generation,
    model_menu,
    output_area,
    restore_box,
    restored_values,
    run_batches,
    sampling_controls,
    save_result,
    size_controls,
    tiling_controls,
)

TAB = "txt2img"


@dataclass
class Txt2ImgTab:
    model: ModelMenu
    prompt: gr.Textbox
    negative: gr.Textbox
    sampling: SamplingControls
    size: SizeControls
    tiling: TilingControls
    batch_count: gr.Slider
    batch_size: gr.Slider
    generate: gr.Button
    stop: gr.Button
    restore: gr.File
    output: OutputArea


def build(studio: Studio) -> Txt2ImgTab:
    with gr.Row():
        with gr.Column(scale=5):
            model = model_menu(studio, TAB)
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle in the top left and a small blue square at the bottom",
                                info="Ctrl+Enter generates", elem_id=f"{TAB}-prompt")
            negative = gr.Textbox(label="Negative prompt", lines=1, placeholder="what the image should not have")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_classes="generate-button", elem_id=f"{TAB}-generate")
                stop = gr.Button("Stop", variant="stop", elem_classes="stop-button", elem_id=f"{TAB}-stop")
            sampling = sampling_controls(studio, TAB)
            size = size_controls(studio, TAB)
            tiling = tiling_controls(studio, TAB)
            with gr.Row():
                batch_count = gr.Slider(1, 16, value=1, step=1, label="Batch count", info="batches one after another",
                                        elem_id="txt2img-batch-count")
                batch_size = gr.Slider(1, 16, value=1, step=1, label="Batch size", info="images per batch",
                                       elem_id="txt2img-batch-size")
            restore = restore_box(TAB)
        with gr.Column(scale=6):
            output = output_area(TAB, send_to=("inpaint", "upscale", "layout"))
    tab = Txt2ImgTab(model, prompt, negative, sampling, size, tiling, batch_count, batch_size, generate, stop, restore, output)
    wire(studio, tab)
    return tab


def wire(studio: Studio, tab: Txt2ImgTab) -> None:
    sampling, out = tab.sampling, tab.output
    inputs = {tab.model.dropdown, tab.prompt, tab.negative, sampling.steps, sampling.scale, sampling.eta, sampling.seed,
              tab.size.width, tab.size.height, tab.batch_count, tab.batch_size, out.images, *tab.tiling.components}

    @friendly
    def generate(data: dict, request: gr.Request, progress=gr.Progress()):
        loaded = chosen_model(studio, data[tab.model.dropdown], TAB)
        base = batch_request(data[tab.prompt], data[tab.negative], sampling.values(data), data[tab.size.width],
                             data[tab.size.height], data[tab.batch_size], tiling=tab.tiling.options(data))

        def one_batch(seed, callback, should_stop):
            result = txt2img(loaded, replace(base, seed=seed), callback=callback, should_stop=should_stop)
            extra = {"task": TAB, "model": loaded.name}
            return save_result(studio, result, extra)

        yield from run_batches(studio, out, loaded, studio.stop_flag(request.session_hash), data[tab.batch_count],
                               base.seed, one_batch, data[out.images], progress)

    connect_generation(studio, generate, inputs, model=tab.model, generate=tab.generate, stop=tab.stop, sampling=sampling,
                       output=out, size=tab.size, submit=tab.prompt)

    @friendly
    def restore(path):
        updates, _ = restored_values(path, tab.prompt, tab.negative, sampling, tab.size.width, tab.size.height)
        return updates

    tab.restore.upload(restore, tab.restore, [tab.prompt, tab.negative, sampling.steps, sampling.eta, sampling.seed, sampling.scale,
                                              tab.size.width, tab.size.height], queue=False)


