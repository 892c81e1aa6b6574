"""Pinned pictures: every family's task, with the features that touch the sampler (eta noise,
batches, inpainting by blending, region prompts, tiled canvases), gives the same pixels and the
same parameters text as when the pins were recorded (before the structure change of issue 25).

Each case's picture is compared with ``tests/fixtures/golden/<case>.png`` and its parameters text
with ``tests/fixtures/golden/parameters.json``. On the machine kind the pins were recorded on (its
CPU model, thread count and torch version are in that file) the pixels must be identical; elsewhere float
rounding may differ, and they must agree within a few levels.

Record the pins again (only when a change of the numbers is intended, and say why in the commit):
``LDM_STUDIO_RECORD_GOLDEN=1 ./launch.sh test tests/test_golden_images.py``.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.checkpoints.loader import load_model
from ldm.checkpoints.presets import DEFAULT_MODELS
from ldm.tasks.inpaint import inpaint
from ldm.tasks.layout import layout
from ldm.tasks.request import GenerationRequest, RegionPrompt, TilingOptions
from ldm.tasks.semantic import semantic
from ldm.tasks.txt2img import txt2img
from ldm.tasks.upscale import InputTiles, upscale
from tests.builders.semantic import label_map
from tests.helpers import picture, square_mask

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
RECORD = os.environ.get("LDM_STUDIO_RECORD_GOLDEN") == "1"
STEPS = 4


def machine() -> dict:
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": model, "machine": platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__.split("+")[0]}


FAMILIES = {"sd-v1": "tiny_sd_v1", "sd-v2-v": "tiny_sd2_v", "sd-v2-inpainting": "tiny_sd2_inpainting", "sd-x4": "tiny_x4",
            "default-hybrid": "tiny_default_hybrid", "default-upscale": "tiny_default_upscale",
            "ldm-kl-text": "tiny_ldm_kl_text", "ldm-vq-text": "tiny_ldm_vq_text", "ldm-layout": "tiny_ldm_layout",
            "ldm-inpainting": "tiny_ldm_inpainting", "ldm-sr": "tiny_ldm_sr", "ldm-semantic": "tiny_semantic"}


@pytest.fixture(scope="module")
def families(request):
    """name -> LoadedModel: each family's shared tiny file (``tests/conftest.py``) loaded the normal way
    (CPU, fp32), and the shipped default models."""
    made = {name: request.getfixturevalue(fixture).load() for name, fixture in FAMILIES.items()}
    made["shipped-txt2img"] = load_model(DEFAULT_MODELS["txt2img"])
    made["shipped-upscale"] = load_model(DEFAULT_MODELS["upscale"])
    return made


def request(**fields) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a red circle", "steps": STEPS, "scale": 3.0, "seed": 5, "width": 32,
                                "height": 32, **fields})


CASES = {
    "sd-v1": ("sd-v1", lambda m: txt2img(m, request())),
    "sd-v1-eta-batch": ("sd-v1", lambda m: txt2img(m, request(eta=0.5, batch_size=2, negative_prompt="blue"))),
    "sd-v1-blend-inpaint": ("sd-v1", lambda m: inpaint(m, request(eta=0.3), picture(32), square_mask(32))),
    "sd-v1-regions": ("sd-v1", lambda m: txt2img(m, request(width=48, regions=(
        RegionPrompt("a blue square", (0.0, 0.0, 0.5, 1.0)), RegionPrompt("a cat", (0.4, 0.2, 1.0, 0.8), "dog", 0.7))))),
    "sd-v1-tiled": ("sd-v1", lambda m: txt2img(m, request(width=64, height=48, tiling=TilingOptions("always", 32, 8)))),
    "sd-v2-v": ("sd-v2-v", lambda m: txt2img(m, request(eta=0.2))),
    "sd-v2-inpainting": ("sd-v2-inpainting", lambda m: inpaint(m, request(), picture(32, 1), square_mask(32))),
    "sd-v2-inpainting-txt2img": ("sd-v2-inpainting", lambda m: txt2img(m, request())),
    "sd-x4": ("sd-x4", lambda m: upscale(m, picture(8, 2), request(scale=2.0), noise_level=30)),
    "default-hybrid-layout": ("default-hybrid", lambda m: layout(m, request(boxes=(("red circle", 0.1, 0.1, 0.6, 0.7),)))),
    "default-hybrid-inpaint": ("default-hybrid", lambda m: inpaint(m, request(eta=0.4), picture(32, 3), square_mask(32))),
    "default-upscale-tiled": ("default-upscale", lambda m: upscale(m, picture(24, 4), request(scale=1.0),
                                                                   tiles=InputTiles(16, 4))),
    "ldm-kl-text": ("ldm-kl-text", lambda m: txt2img(m, request(prompt="a photo of a cat"))),
    "ldm-vq-text": ("ldm-vq-text", lambda m: txt2img(m, request(prompt="a red house", eta=1.0))),
    "ldm-layout": ("ldm-layout", lambda m: layout(m, request(prompt="", scale=1.0, boxes=(("7", 0.1, 0.1, 0.6, 0.7),)))),
    "ldm-inpainting": ("ldm-inpainting", lambda m: inpaint(m, request(prompt="", scale=1.0), picture(32, 5), square_mask(32))),
    "ldm-sr": ("ldm-sr", lambda m: upscale(m, picture(8, 6), request(scale=1.0))),
    "ldm-semantic": ("ldm-semantic", lambda m: semantic(m, label_map((32, 32)), request(scale=1.0, eta=1.0))),
    "shipped-txt2img": ("shipped-txt2img", lambda m: txt2img(m, request(prompt="a red circle in the top left", steps=10,
                                                                        width=64, height=64))),
    "shipped-upscale": ("shipped-upscale", lambda m: upscale(m, picture(16, 7), request(steps=10, scale=1.0))),
}


def pinned_parameters() -> dict:
    path = GOLDEN / "parameters.json"
    return json.loads(path.read_text()) if path.is_file() else {"machine": machine(), "cases": {}}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pictures_and_parameters_are_as_pinned(families, case):
    name, run = CASES[case]
    result = run(families[name])
    pins = pinned_parameters()
    if RECORD:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(result.images):
            image.save(GOLDEN / f"{case}-{i}.png")
        pins["machine"] = machine()
        pins["cases"][case] = result.parameters
        (GOLDEN / "parameters.json").write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
        pytest.skip("recorded")
    assert result.parameters == pins["cases"][case]
    same_machine = pins["machine"] == machine()
    for i, image in enumerate(result.images):
        got = np.asarray(image).astype(np.int16)
        want = np.asarray(Image.open(GOLDEN / f"{case}-{i}.png").convert("RGB")).astype(np.int16)
        assert got.shape == want.shape
        difference = np.abs(got - want)
        if same_machine:
            assert difference.max() == 0, f"{case} image {i}: {np.count_nonzero(difference)} values differ, by up to {difference.max()}"
        else:
            assert difference.max() <= 4 and difference.mean() <= 0.5, f"{case} image {i}: differs by up to {difference.max()}"
