"""Upscaling: 4x with a latent-diffusion super-resolution model, in overlapping tiles for large inputs."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
from PIL import Image

from ldm.tasks.request import GenerationRequest, checked_number
from ldm.tasks.upscale import DEFAULT_NOISE_LEVEL, MAX_INPUT_SIDE, MAX_TILE, InputTiles, check_noise_level, upscale
from ui.controls import ModelMenu, OutputArea, SamplingControls, generate_buttons, model_menu, output_area, sampling_controls
from ui.addons import AddonsPanel, addons_panel
from ui.generation import Job, connect_generation, generation_handler
from ui.services import Studio

TAB = "upscale"
TITLE = "Upscaling"
SEND_TO = ("img2img", "inpaint", "layout")
MAX_NOISE_LEVEL = 350  # the SD x4 upscaler's max_noise_level; the engine checks each model's own


@dataclass
class UpscaleTab:
    model: ModelMenu
    image: gr.Image
    sampling: SamplingControls
    prompt: gr.Textbox
    negative: gr.Textbox
    addons: AddonsPanel
    noise_level: gr.Slider
    tile: gr.Slider
    overlap: gr.Slider
    generate: gr.Button
    stop: gr.Button
    output: OutputArea


def build(studio: Studio, titles: dict[str, str]) -> UpscaleTab:
    with gr.Row():
        with gr.Column(scale=5):
            model = model_menu(studio, TAB, info="latent-diffusion super-resolution models (the default, LDM bsr_sr, SD x4)")
            # image_mode None: the file's own mode reaches the engine, which reads any (ldm.tasks.images)
            image = gr.Image(label=f"Image to upscale (up to {MAX_INPUT_SIDE} px a side)", type="pil", image_mode=None,
                             sources=["upload", "clipboard"], height=320, elem_id="upscale-input")
            with gr.Row():
                generate, stop = generate_buttons(TAB, "Upscale 4x")
            sampling = sampling_controls(studio, TAB, steps=20, scale=1.0)
            with gr.Accordion("Text-guided upscalers (SD x4)", open=False):
                prompt = gr.Textbox(label="Prompt", placeholder="what the picture shows", lines=2, elem_id=f"{TAB}-prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1, elem_id=f"{TAB}-negative")
                addons = addons_panel(studio, TAB, prompt, model.dropdown)
                noise_level = gr.Slider(0, MAX_NOISE_LEVEL, value=DEFAULT_NOISE_LEVEL, step=1, label="Noise level",
                                        info="noise added to the input first: higher lets the prompt invent more detail, "
                                        "lower stays closer to the input", elem_id=f"{TAB}-noise-level")
                gr.Markdown("Upscalers without text (the default model, LDM's bsr_sr) ignore these and the guidance scale.")
            with gr.Row():
                tile = gr.Slider(0, MAX_TILE, value=128, step=16, label="Tile size (input px)", info="0: the whole image at once", elem_id="upscale-tile")
                overlap = gr.Slider(0, 128, value=16, step=4, label="Tile overlap (input px)", info="tiles blend across it", elem_id="upscale-overlap")
        with gr.Column(scale=6):
            output = output_area(TAB, {name: titles[name] for name in SEND_TO})
    tab = UpscaleTab(model=model, image=image, sampling=sampling, prompt=prompt, negative=negative, addons=addons,
                     noise_level=noise_level, tile=tile, overlap=overlap, generate=generate, stop=stop, output=output)
    wire(studio, tab)
    return tab


def handler(studio: Studio, tab: UpscaleTab):
    """The generate event's handler (``ui.generation.generation_handler``) with this tab's request."""

    def prepare(data: dict, loaded) -> Job:
        image: Image.Image | None = data[tab.image]
        if not isinstance(image, Image.Image):
            raise ValueError("no image: upload one, or send one here from another tab")
        tiles = InputTiles(checked_number("tile size", data[tab.tile], 0, MAX_TILE, integer=True),
                           checked_number("tile overlap", data[tab.overlap], 0, MAX_TILE, integer=True))
        request = GenerationRequest(data[tab.prompt], data[tab.negative], **tab.sampling.values(data))
        noise_level = check_noise_level(loaded.model, data[tab.noise_level])  # 0 for models without noise augmentation
        record = {"tiles": {"tile": tiles.tile, "overlap": tiles.overlap}, "noise_level": noise_level}
        return Job(request, lambda r, callback, should_stop: upscale(loaded, image, r, tiles=tiles, noise_level=noise_level,
                                                                     callback=callback, should_stop=should_stop),
                   record, {"input": image})

    return generation_handler(studio, TAB, tab.model, tab.output, prepare)


def wire(studio: Studio, tab: UpscaleTab) -> None:
    inputs = {tab.image, tab.prompt, tab.negative, tab.noise_level, tab.tile, tab.overlap}
    connect_generation(studio, handler(studio, tab), inputs, model=tab.model, generate=tab.generate, stop=tab.stop,
                       sampling=tab.sampling, output=tab.output)


def receive(tab: UpscaleTab):
    def apply(path: str, prompt: str):
        return {tab.image: Image.open(path).convert("RGB")}

    return apply, [tab.image]
