"""Semantic synthesis: a segmentation map (one class index a pixel) to a picture, with LDM's semantic
synthesis models (``concat_input: segmentation``).

The map is one-hot encoded at its own size, rescaled by the model's conditioning stage to the latent
size (f = 4) and concatenated after the latent, [x, c], at every step of the sampler. There is no text and
no unconditional branch, so no guidance. The model is convolutional: maps larger than its training
size work (the 512 model was fine-tuned for larger landscapes), denoised in tiles when the canvas
would exceed the memory budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from ldm.checkpoints.loaded import LoadedModel
from ldm.models.latent_diffusion import LatentDiffusionConfig
from ldm.sampling.steps import Callback
from ldm.tasks.generate import decode, sample
from ldm.tasks.images import to_pil
from ldm.tasks.parameters import parameters_text
from ldm.tasks.planning import canvas_notices
from ldm.tasks.request import GenerationRequest, check_model, resolve_request
from ldm.tasks.result import GenerationResult

NAME = "semantic"
LABEL_MODES = ("L", "P")  # 8-bit greys and palette images: each pixel's value is its class index


def serves(config: LatentDiffusionConfig) -> str | None:
    """None for a semantic synthesis model (one that concatenates a segmentation map)."""
    if config.concat_input != "segmentation":
        return "is not a semantic synthesis model (it does not take a segmentation map)"
    return None


def class_count(loaded: LoadedModel) -> int:
    """How many classes the model's segmentation maps may use (indices 0 to count - 1)."""
    return loaded.model.config.cond_stage.in_channels


def read_label_map(image: Image.Image, classes: int) -> np.ndarray:
    """An 8-bit label map (mode L, or P whose palette indices are the labels) as class indices
    (H, W), each checked to be below ``classes``."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    if image.mode not in LABEL_MODES:
        raise ValueError(f"a segmentation map must be an 8-bit label image (mode L or P) whose pixel values are class "
                         f"indices 0 to {classes - 1}; got a {image.mode} image. Save the label map as a greyscale PNG.")
    labels = np.asarray(image, dtype=np.uint8)
    top = int(labels.max()) if labels.size else 0
    if top >= classes:
        raise ValueError(f"the segmentation map holds class {top}, but this model knows {classes} classes: the largest "
                         f"allowed class index is {classes - 1}")
    return labels


def resize_labels(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    """A label map at another size by nearest neighbour (classes are never blended)."""
    if labels.shape == (height, width):
        return labels
    return np.asarray(Image.fromarray(labels, mode="L").resize((width, height), Image.NEAREST))


def semantic(
    loaded: LoadedModel,
    segmentation: Image.Image,
    request: GenerationRequest,
    *,
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """A picture of the segmentation map's size (rounded to the model's size multiple, with a notice)
    from each seed of the batch. Uses request.steps, eta, seed and batch size; prompts, guidance scale,
    width and height are not used (the size is the map's)."""
    check_model(serves, loaded)
    model = loaded.model
    labels = read_label_map(segmentation, class_count(loaded))
    height, width = labels.shape
    request = replace(request, prompt="", negative_prompt="", scale=1.0, boxes=(), regions=(), width=width, height=height)
    request, notices = resolve_request(request, model.config.size_multiple)
    if (request.width, request.height) != (width, height):
        notices.append(f"the segmentation map ({width}x{height}) is resized by nearest neighbour to "
                       f"{request.width}x{request.height}, the picture's size")
        labels = resize_labels(labels, request.width, request.height)
    seeds = [request.seed + i for i in range(request.batch_size)]
    with torch.inference_mode():
        concat = model.segmentation_concat(torch.from_numpy(labels.astype(np.int64))[None])
        latents = sample(model, request, concat=concat, callback=callback, should_stop=should_stop)
        images = to_pil(decode(model, latents, replace(request.tiling, mode="auto")))
    present = sorted(int(c) for c in np.unique(labels))
    fields = {"Segmentation classes": " ".join(str(c) for c in present)}
    return GenerationResult(images, seeds, [parameters_text(request, s, loaded, fields, guided=False) for s in seeds],
                            notices + canvas_notices(model, request))
