"""Upscaling: 4x with a latent-diffusion super-resolution model, in overlapping tiles for large inputs."""

from __future__ import annotations

from dataclasses import dataclass, replace

import gradio as gr
from PIL import Image

from ldm.tasks.request import GenerationRequest
from ldm.tasks.upscale import MAX_INPUT_SIDE, MAX_TILE, TileOptions, upscale
from ui.errors import friendly
from ui.services import Studio
from ui.widgets import (
    ModelMenu,
    OutputArea,
    SamplingControls,
    chosen_model,
    connect_generation,
    model_menu,
    output_area,
    run_batches,
    sampling_controls,
)

TAB = "upscale"


@dataclass
class UpscaleTab:
    model: ModelMenu
    image: gr.Image
    sampling: SamplingControls
    tile: gr.Slider
    overlap: gr.Slider
    generate: gr.Button
    stop: gr.Button
    output: OutputArea


def build(studio: Studio) -> UpscaleTab:
    with gr.Row():
        with gr.Column(scale=5):
            model = model_menu(studio, TAB, info="latent-diffusion super-resolution models")
            # image_mode None: the file's own mode reaches the engine, which reads any (ldm.tasks.images)
            image = gr.Image(label=f"Image to upscale (up to {MAX_INPUT_SIDE} px a side)", type="pil", image_mode=None,
                             sources=["upload", "clipboard"], height=320, elem_id="upscale-input")
            with gr.Row():
                generate = gr.Button("Upscale 4x", variant="primary", elem_classes="generate-button", elem_id=f"{TAB}-generate")
                stop = gr.Button("Stop", variant="stop", elem_classes="stop-button", elem_id=f"{TAB}-stop")
            sampling = sampling_controls(studio, TAB, steps=20, scale=None)
            with gr.Row():
                tile = gr.Slider(0, MAX_TILE, value=128, step=16, label="Tile size (input px)", info="0: the whole image at once", elem_id="upscale-tile")
                overlap = gr.Slider(0, 128, value=16, step=4, label="Tile overlap (input px)", info="tiles blend across it", elem_id="upscale-overlap")
        with gr.Column(scale=6):
            output = output_area(TAB, send_to=("inpaint", "layout"))
    tab = UpscaleTab(model, image, sampling, tile, overlap, generate, stop, output)
    wire(studio, tab)
    return tab


def wire(studio: Studio, tab: UpscaleTab) -> None:
    sampling, out = tab.sampling, tab.output
    inputs = {tab.model.dropdown, tab.image, sampling.steps, sampling.eta, sampling.seed, tab.tile, tab.overlap, out.images}

    @friendly
    def generate(data: dict, request: gr.Request, progress=gr.Progress()):
        loaded = chosen_model(studio, data[tab.model.dropdown], TAB)
        image: Image.Image | None = data[tab.image]
        if image is None:
            raise ValueError("no image: upload one, or send one here from another tab")
        tiles = TileOptions(int(data[tab.tile]), int(data[tab.overlap]))
        base = GenerationRequest("", **sampling.values(data))

        def one_batch(seed, callback, should_stop):
            result = upscale(loaded, image, replace(base, seed=seed), tiles=tiles, callback=callback, should_stop=should_stop)
            extra = {"task": TAB, "model": loaded.name, "tiles": {"tile": tiles.tile, "overlap": tiles.overlap}}
            paths = [studio.writer.save(picture, text, s, extra, {"input": image})
                     for picture, s, text in zip(result.images, result.seeds, result.parameters)]
            return paths, result.notices

        yield from run_batches(studio, out, loaded, studio.stop_flag(request.session_hash), 1, base.seed, one_batch,
                               data[out.images], progress)

    connect_generation(studio, generate, inputs, model=tab.model, generate=tab.generate, stop=tab.stop, sampling=sampling,
                       output=out)


def receive(tab: UpscaleTab):
    def apply(path: str, prompt: str):
        return {tab.image: Image.open(path).convert("RGB")}

    return apply, [tab.image]
