"""Fidelity of the embedded default model on held-out scenes (``python -m ldm eval``).

Every figure comes from generating from captions, layouts and masks of scenes that training never
saw (``ldm.data.batches.HELD_OUT_SEED`` onwards) and scoring the images with the deterministic
detector of ``ldm.data.detector``:

- autoencoder: PSNR of the reconstruction (posterior mean) of held-out scenes;
- caption adherence: share of captions whose every object is found with its colour, shape and place,
  with two partial shares of the named objects (colour, shape and place; colour and place);
- layout: mean IoU between the requested boxes and the detected ones;
- inpainting: one object's box is masked and the caption asks for the scene; success when the
  unmasked pixels are unchanged and that object is found, with its colour and shape, inside the box;
- super-resolution: PSNR of the 4x upscale of a 16x16 scene against the 64x64 render, beside bicubic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ldm.checkpoints.loaded import LoadedModel
from ldm.checkpoints.loader import load_model
from ldm.checkpoints.presets import default_model_path
from ldm.data.batches import HELD_OUT_SEED
from ldm.data.detector import detect
from ldm.data.scoring import caption_score, coloured_in_place, layout_iou, psnr
from ldm.data.world import render, scene_from_seed
from ldm.sampling.samplers import get_sampler, resolve_schedule
from ldm.tasks.images import from_pil, to_pil
from ldm.tasks.inpaint import inpaint
from ldm.tasks.request import GenerationRequest
from ldm.tasks.txt2img import txt2img
from ldm.tasks.upscale import upscale

DEFAULT_TXT2IMG = default_model_path("default-txt2img")
DEFAULT_UPSCALE = default_model_path("default-upscale")
SIZE = 64


@dataclass(frozen=True)
class EvalSettings:
    count: int = 100
    steps: int = 20
    scale: float = 4.0
    sampler: str = "DDIM"  # a name of ldm.sampling.samplers.SAMPLERS, at its default eta
    schedule: str = "Automatic"

    def request(self, prompt: str, **fields) -> GenerationRequest:
        eta = get_sampler(self.sampler).eta_default
        return GenerationRequest(prompt, **{"steps": self.steps, "scale": self.scale, "sampler": self.sampler,
                                            "schedule": self.schedule, "eta": eta, **fields})


def held_out_scenes(count: int, offset: int = 0):
    return [scene_from_seed(HELD_OUT_SEED + offset + i) for i in range(count)]


def autoencoder_psnr(loaded: LoadedModel, count: int) -> float:
    values = []
    with torch.inference_mode():
        for scene in held_out_scenes(count):
            image = render(scene, SIZE)
            x = from_pil(image)
            posterior = loaded.model.first_stage_model.encode(x)
            values.append(psnr(np.asarray(image), np.asarray(to_pil(loaded.model.first_stage_model.decode(posterior.mean))[0])))
    return float(np.mean(values))


def _generate(loaded: LoadedModel, settings: EvalSettings, seed: int, prompt: str = "", boxes=()) -> np.ndarray:
    request = settings.request(prompt, seed=seed, width=SIZE, height=SIZE, boxes=tuple(boxes))
    return np.asarray(txt2img(loaded, request).images[0])


def caption_measures(loaded: LoadedModel, settings: EvalSettings) -> dict[str, float]:
    """Caption adherence, and two partial measures from the same images that show progress long
    before whole captions hold: the share of named objects found with their colour, shape and place,
    and the share found with their colour in their place (any shape)."""
    adherent, found, coloured, named = [], 0, 0, 0
    for i, scene in enumerate(held_out_scenes(settings.count, offset=10_000)):
        detections = detect(_generate(loaded, settings, i, prompt=scene.caption))
        score = caption_score(scene, detections)
        adherent.append(score.all_correct)
        found += score.objects_found
        coloured += coloured_in_place(scene, detections)
        named += score.objects
    return {
        "caption_adherence": float(np.mean(adherent)),
        "caption_objects_found": found / named,
        "caption_colour_in_place": coloured / named,
    }


def layout_mean_iou(loaded: LoadedModel, settings: EvalSettings) -> float:
    scenes = held_out_scenes(settings.count, offset=20_000)
    return float(np.mean([layout_iou(s, detect(_generate(loaded, settings, i, boxes=s.boxes))) for i, s in enumerate(scenes)]))


def inpainting_rate(loaded: LoadedModel, settings: EvalSettings) -> tuple[float, bool]:
    """(share of masked regions holding the asked object, whether every unmasked pixel was kept)."""
    successes, kept = [], True
    for i, scene in enumerate(held_out_scenes(settings.count, offset=30_000)):
        image = render(scene, SIZE)
        target = scene.objects[0]
        x0, y0, x1, y1 = (round(v * SIZE) for v in target.box)
        pad = 3
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        mask[max(0, y0 - pad) : y1 + pad, max(0, x0 - pad) : x1 + pad] = 255
        request = settings.request(scene.caption, seed=i, width=SIZE, height=SIZE)
        out = np.asarray(inpaint(loaded, request, image, Image.fromarray(mask)).images[0])
        kept &= bool(np.array_equal(out[mask == 0], np.asarray(image)[mask == 0]))
        found = [
            d for d in detect(out)
            if d.colour == target.colour and d.shape == target.shape
            and mask[min(SIZE - 1, int((d.box[1] + d.box[3]) / 2 * SIZE)), min(SIZE - 1, int((d.box[0] + d.box[2]) / 2 * SIZE))]
        ]
        successes.append(bool(found))
    return float(np.mean(successes)), kept


def super_resolution_psnr(loaded: LoadedModel, settings: EvalSettings) -> tuple[float, float]:
    """(model PSNR, bicubic PSNR) of 16 -> 64 upscales of held-out scenes."""
    ours, bicubic = [], []
    for i, scene in enumerate(held_out_scenes(settings.count, offset=40_000)):
        high = render(scene, SIZE)
        low = render(scene, SIZE // 4)
        request = settings.request("", scale=1.0, seed=i)
        ours.append(psnr(np.asarray(high), np.asarray(upscale(loaded, low, request).images[0])))
        bicubic.append(psnr(np.asarray(high), np.asarray(low.resize((SIZE, SIZE), Image.Resampling.BICUBIC))))
    return float(np.mean(ours)), float(np.mean(bicubic))


def evaluate_default(count: int = 100, steps: int = 20, sampler: str = "DDIM", schedule: str = "Automatic") -> dict:
    settings = EvalSettings(count=count, steps=steps, sampler=sampler, schedule=schedule)
    txt = load_model(DEFAULT_TXT2IMG)
    figures: dict[str, float] = {"autoencoder_psnr_db": autoencoder_psnr(txt, count)}
    figures.update(caption_measures(txt, settings))
    figures["layout_mean_iou"] = layout_mean_iou(txt, settings)
    figures["inpainting_success"], kept = inpainting_rate(txt, settings)
    figures["inpainting_unmasked_identical"] = float(kept)
    if DEFAULT_UPSCALE.is_file():
        figures["sr_psnr_db"], figures["bicubic_psnr_db"] = super_resolution_psnr(load_model(DEFAULT_UPSCALE), settings)
    figures.update(samples_per_task=count, steps=steps, sampler=sampler, schedule=resolve_schedule(sampler, schedule))
    return figures


TARGETS = {
    "autoencoder_psnr_db": ">= 32 dB",
    "caption_adherence": ">= 0.90",
    "caption_objects_found": "(partial: objects with colour, shape and place)",
    "caption_colour_in_place": "(partial: objects with colour and place)",
    "layout_mean_iou": ">= 0.75",
    "inpainting_success": ">= 0.85",
    "inpainting_unmasked_identical": "= 1",
    "sr_psnr_db": ">= bicubic + 3 dB",
    "bicubic_psnr_db": "(baseline)",
}


def format_table(figures: dict[str, float]) -> str:
    lines = ["| measure | value | target |", "|---|---|---|"]
    for key, target in TARGETS.items():
        if key in figures:
            lines.append(f"| {key} | {figures[key]:.3f} | {target} |")
    lines.append(f"\n{figures.get('samples_per_task')} held-out samples per task, {figures.get('steps')} steps of "
                 f"{figures.get('sampler')} ({figures.get('schedule')})")
    return "\n".join(lines)
