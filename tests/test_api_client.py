"""The API driven by the real client most tools are built on: the PyPI ``webuiapi`` package (a test
dependency), against a running server with the embedded default models, at 64 px and a few steps."""

from __future__ import annotations

import base64
import io
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

webuiapi = pytest.importorskip("webuiapi")

from ldm.checkpoints.presets import DEFAULT_MODELS
from tests.api_server import make_engine, serving

SMALL = {"width": 64, "height": 64, "steps": 3, "cfg_scale": 4.0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")  # a second model to switch to: the default one under another name
    shutil.copyfile(DEFAULT_MODELS["txt2img"], models / "second.safetensors")
    with serving(make_engine(tmp_path_factory.mktemp("outputs"), models)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=3)


@pytest.fixture(scope="module")
def generated(client):
    return client.txt2img(prompt="a red circle", seed=7, sampler_name="Euler a", **SMALL)


def test_models_and_switching(client, server):
    titles = [m["title"] for m in client.get_sd_models()]
    assert titles == ["default-txt2img.safetensors", "second.safetensors"]
    assert client.util_get_current_model() == titles[0]
    client.util_set_model("second")  # by its name, matched to the title as webuiapi does
    assert client.get_options()["sd_model_checkpoint"] == "second.safetensors"
    second = next(e.path for e in server.engine.checkpoints() if e.name == "second")
    assert server.engine.studio.models.loaded(second) is not None  # loaded before the switch returned
    assert client.txt2img(prompt="x", **SMALL).info["sd_model_name"] == "second"
    client.util_set_model("default-txt2img")
    assert client.util_get_current_model() == titles[0]
    # A request's override_settings picks the model for that request only (SillyTavern does this).
    once = client.txt2img(prompt="x", override_settings={"sd_model_checkpoint": "second.safetensors"}, **SMALL)
    assert once.info["sd_model_name"] == "second" and client.util_get_current_model() == titles[0]


def test_txt2img_and_png_info(client, generated):
    assert generated.image.size == (64, 64)
    info = generated.info
    assert info["all_seeds"] == [7] and info["seed"] == 7
    assert info["sampler_name"] == "Euler a" and info["steps"] == 3 and info["sd_model_name"] == "default-txt2img"
    assert "Seed: 7" in info["infotexts"][0] and "Sampler: Euler a" in info["infotexts"][0]
    assert generated.parameters["prompt"] == "a red circle"
    read = client.png_info(generated.image)
    assert read.info == info["infotexts"][0]
    again = client.txt2img(prompt="a red circle", seed=7, sampler_name="Euler a", **SMALL)
    assert np.array_equal(np.asarray(again.image), np.asarray(generated.image))  # the seed reproduces the image


def test_img2img_without_mask(client, generated):
    result = client.img2img(images=[generated.image], prompt="a blue square", denoising_strength=0.5, seed=3, **SMALL)
    assert result.image.size == (64, 64)
    assert result.info["denoising_strength"] == 0.5 and "Denoising strength: 0.5" in result.info["infotexts"][0]
    assert result.parameters["init_images"] is None  # not echoed back, as AUTOMATIC1111


def test_img2img_with_mask_keeps_unmasked_pixels(client, generated):
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255  # redraw the left half
    result = client.img2img(images=[generated.image], mask_image=Image.fromarray(mask), prompt="a blue square",
                            mask_blur=0, inpaint_full_res=False, denoising_strength=1.0, seed=3, **SMALL)
    before, after = np.asarray(generated.image.convert("RGB")), np.asarray(result.image.convert("RGB"))
    assert after.shape == before.shape
    assert np.array_equal(after[:, 32:], before[:, 32:])
    assert not np.array_equal(after[:, :32], before[:, :32])
    assert "Mask blur: 0" in result.info["infotexts"][0]


def test_samplers_and_upscalers(client):
    samplers = [s["name"] for s in client.get_samplers()]
    assert {"Euler a", "Euler", "DDIM", "DPM++ 2M"} <= set(samplers)
    assert [s["name"] for s in client.get_schedulers()][:3] == ["automatic", "uniform", "karras"]
    assert [u["name"] for u in client.get_upscalers()] == ["None", "Lanczos", "Nearest", "default-upscale"]


def test_extra_single_image_with_the_upscale_model(client, generated):
    small = generated.image.resize((32, 32))
    result = client.extra_single_image(small, upscaler_1="default-upscale", upscaling_resize=4)
    assert result.image.size == (128, 128)
    lanczos = client.extra_single_image(small, upscaler_1="Lanczos", upscaling_resize=2)
    assert np.array_equal(np.asarray(lanczos.image), np.asarray(small.resize((64, 64), Image.Resampling.LANCZOS)))


def test_progress_while_a_job_runs_then_interrupt(client):
    assert client.get_progress()["state"]["job_count"] == 0
    done: dict = {}

    def long_job():
        done["result"] = client.txt2img(prompt="a long job", seed=1, width=64, height=64, steps=400)

    worker = threading.Thread(target=long_job)
    started = time.monotonic()
    worker.start()
    seen = None
    while time.monotonic() - started < 60:
        progress = client.get_progress()
        if progress["state"]["sampling_step"] >= 2 and progress["current_image"]:
            seen = progress
            break
        time.sleep(0.2)
    assert seen is not None, "no progress reported while the job ran"
    assert 0 < seen["progress"] < 1 and seen["state"]["job_count"] == 1 and seen["state"]["sampling_steps"] == 400
    preview = Image.open(io.BytesIO(base64.b64decode(seen["current_image"])))  # raw base64 PNG, as AUTOMATIC1111
    assert preview.size == (64, 64)
    assert client.interrupt() == {}
    worker.join(timeout=60)
    result = done["result"]  # returns 200 with what it had, not an error
    assert len(result.images) == 1 and result.image.size == (64, 64)
    assert any("interrupted" in n for n in result.info["notices"])
    assert time.monotonic() - started < 60
    client.util_wait_for_ready(check_interval=0.2)  # progress 0 and no job once it ends
