"""The AUTOMATIC1111-compatible API over raw HTTP: the response shapes the clients read (each test
cites what its client reads, from shared/reference/a1111-api.md §3 and §5), logins, limits, errors
as AUTOMATIC1111's body, a studio user beside an API client, and request bodies from hypothesis
that must each be a 4xx with a message. Embedded default models, 64 px, a few steps."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.api_server import make_engine, serving

SMALL = {"width": 64, "height": 64, "steps": 3}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def server(outputs):
    with serving(make_engine(outputs), max_body=2 << 20) as running:
        yield running


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def assert_error_body(response, status: int | tuple) -> dict:
    """AUTOMATIC1111's error body with a message."""
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, response.text
    body = response.json()
    assert set(body) == {"error", "detail", "body", "errors"}
    assert isinstance(body["detail"], str) and body["detail"]
    return body


def test_open_webui_reads(server):
    """Open WebUI: GET /options.sd_model_checkpoint on every generation; a model switch posts the whole
    GET dict back; GET /sd-models title and model_name; POST /txt2img {prompt, batch_size, width, height,
    steps, negative_prompt}, reading res["images"] and res["info"]; it sends `authorization: ''` when no
    auth is set."""
    headers = {"authorization": ""}
    options = requests.get(f"{server.api}/options", headers=headers).json()
    models = requests.get(f"{server.api}/sd-models", headers=headers).json()
    assert options["sd_model_checkpoint"] == models[0]["title"] and models[0]["model_name"] == "default-txt2img"
    reply = requests.post(f"{server.api}/options", json=options, headers=headers)
    assert reply.status_code == 200 and reply.json() is None
    res = requests.post(f"{server.api}/txt2img", headers=headers,
                        json={"prompt": "a red circle", "negative_prompt": "blue", "batch_size": 2, **SMALL}).json()
    assert len(res["images"]) == 2 and all("," not in i for i in res["images"])  # raw base64, no data: prefix
    for encoded in res["images"]:
        assert Image.open(io.BytesIO(base64.b64decode(encoded))).size == (64, 64)
    info = json.loads(res["info"])  # a JSON string, as AUTOMATIC1111
    assert info["all_seeds"] == [info["seed"], info["seed"] + 1] and info["negative_prompt"] == "blue"
    assert info["width"] == 64 and info["height"] == 64 and len(info["infotexts"]) == 2


def test_sillytavern_reads(server, outputs):
    """SillyTavern: GET /upscalers and /latent-upscale-modes (name), /sd-vae, /samplers and /schedulers
    (name), /sd-models (title); after a model switch it polls /progress until progress == 0 and
    state.job_count == 0; it forwards its whole body to /txt2img (its own url, auth, clip_skip,
    override_settings, save_images: true) and reads data.images[0]; it always sends
    `Authorization: Basic b64("")`."""
    headers = {"Authorization": "Basic " + base64.b64encode(b"").decode()}
    get = lambda path: requests.get(f"{server.api}/{path}", headers=headers).json()
    assert "default-upscale" in [u["name"] for u in get("upscalers")]
    assert "Latent (bicubic)" in [m["name"] for m in get("latent-upscale-modes")] and get("sd-vae") == []
    assert "Euler a" in [s["name"] for s in get("samplers")] and "karras" in [s["name"] for s in get("schedulers")]
    progress = get("progress")
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0
    body = {"url": "http://127.0.0.1:7860", "auth": "", "clip_skip": 1, "prompt": "a cat", "seed": 11,
            "sampler_name": "DPM++ 2M", "scheduler": "Karras", "save_images": True, "enable_hr": False,
            "hr_upscaler": "Latent", "override_settings": {"CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic",
                                                            "sd_model_checkpoint": get("sd-models")[0]["title"]},
            "override_settings_restore_afterwards": True, **SMALL}
    before = set(outputs.rglob("*.png"))
    data = requests.post(f"{server.api}/txt2img", json=body, headers=headers).json()
    image = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
    assert "Seed: 11" in image.text["parameters"] and "Schedule type: Karras" in image.text["parameters"]
    saved = set(outputs.rglob("*.png")) - before
    assert len(saved) == 1 and next(iter(saved)).name.endswith("-11.png")  # save_images: true, as the tabs save


def test_enable_hr_runs_the_hires_fix(server):
    """text-generation-webui and SillyTavern send enable_hr, hr_scale, hr_upscaler and denoising_strength:
    the image comes back at hr_scale times the size, with A1111's hires fields in its infotext."""
    body = {"prompt": "a red circle", "seed": 4, "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent (bicubic)",
            "hr_second_pass_steps": 2, "denoising_strength": 0.6, **SMALL}
    data = requests.post(f"{server.api}/txt2img", json=body).json()
    image = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
    assert image.size == (2 * SMALL["width"], 2 * SMALL["height"])
    info = json.loads(data["info"])
    text = info["infotexts"][0]
    assert "Hires upscale: 2" in text and "Hires upscaler: Latent (bicubic)" in text and "Denoising strength: 0.6" in text
    assert not any("enable_hr" in n for n in info["notices"])
    bad = requests.post(f"{server.api}/txt2img", json={**body, "hr_upscaler": "R-ESRGAN 4x+"})
    assert "hr_upscaler 'R-ESRGAN 4x+' is not known" in assert_error_body(bad, 422)["detail"]
    far = requests.post(f"{server.api}/txt2img", json={**body, "hr_scale": 9})
    assert "hr_scale must be between 1 and 4" in assert_error_body(far, 422)["detail"]


def test_no_save_without_save_images_and_legacy_names(server, outputs):
    """LibreChat sends sampler_index "DPM++ 2M Karras" (a fused name of AUTOMATIC1111 up to 1.8); an
    unknown sampler runs the default one, as AUTOMATIC1111, with a notice."""
    before = set(outputs.rglob("*.png"))
    res = requests.post(f"{server.api}/txt2img", json={"prompt": "x", "sampler_index": "DPM++ 2M Karras", **SMALL}).json()
    info = json.loads(res["info"])
    assert info["sampler_name"] == "DPM++ 2M" and "Schedule type: Karras" in info["infotexts"][0]
    other = json.loads(requests.post(f"{server.api}/txt2img", json={"sampler_name": "DPM fast", **SMALL}).json()["info"])
    assert other["sampler_name"] == "Euler" and any("DPM fast" in n for n in other["notices"])
    assert set(outputs.rglob("*.png")) == before


def test_openoutpaint_img2img_with_data_urls(server):
    """openOutpaint sends init_images and mask as canvas.toDataURL() data URLs and reads
    JSON.parse(data.info).all_seeds. An RGBA mask is read by its alpha, white (opaque) = redraw."""
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    alpha = np.zeros((64, 64), np.uint8)
    alpha[16:48, 16:48] = 255
    mask = Image.fromarray(np.dstack([np.zeros((64, 64, 3), np.uint8), alpha]), "RGBA")
    body = {"init_images": ["data:image/png;base64," + png_b64(picture)], "mask": "data:image/png;base64," + png_b64(mask),
            "mask_blur": 0, "inpaint_full_res": False, "inpainting_fill": 2, "denoising_strength": 1, "seed": 4, **SMALL}
    res = requests.post(f"{server.api}/img2img", json=body).json()
    assert json.loads(res["info"])["all_seeds"] == [4]
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(res["images"][0]))).convert("RGB"))
    keep = alpha == 0
    assert np.array_equal(out[keep], np.asarray(picture)[keep])
    inverted = requests.post(f"{server.api}/img2img", json={**body, "inpainting_mask_invert": 1}).json()
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(inverted["images"][0]))).convert("RGB"))
    assert np.array_equal(out[~keep], np.asarray(picture)[~keep])
    for bad, field in (({"mask_blur": -1}, "mask_blur"), ({"denoising_strength": float("nan")}, "denoising_strength"),
                       ({"inpaint_full_res_padding": 10**6}, "inpaint_full_res_padding")):
        reply = requests.post(f"{server.api}/img2img", data=json.dumps({**body, **bad}), headers={"content-type": "application/json"})
        assert assert_error_body(reply, 422)["detail"].startswith(field)
    # A1111's default masked request (inpainting_fill 0 "fill", strength 0.75) redraws from the masked
    # content; each fill mode is written as A1111 writes "Masked content" ("original" left out).
    for fill, written in ((0, "Masked content: fill"), (1, None), (3, "Masked content: latent nothing")):
        partial = requests.post(f"{server.api}/img2img", json={**body, "inpainting_fill": fill,
                                                                "denoising_strength": 0.4}).json()
        info = json.loads(partial["info"])
        assert "Denoising strength: 0.4" in info["infotexts"][0] and not info["notices"]
        if written:
            assert written in info["infotexts"][0]
        else:
            assert "Masked content" not in info["infotexts"][0]
        out = np.asarray(Image.open(io.BytesIO(base64.b64decode(partial["images"][0]))).convert("RGB"))
        assert np.array_equal(out[keep], np.asarray(picture)[keep])
    unknown = requests.post(f"{server.api}/img2img", json={**body, "inpainting_fill": 4})
    assert "inpainting_fill must be 0 (fill), 1 (original)" in assert_error_body(unknown, 422)["detail"]


def test_void_posts_answer_json_and_lists(server):
    """webuiapi and the Photoshop plugin call .json() on every answer (§5.7)."""
    assert requests.post(f"{server.api}/interrupt").json() == {}
    assert requests.post(f"{server.api}/skip").json() is None
    for path in ("refresh-checkpoints", "refresh-loras", "refresh-embeddings"):
        reply = requests.post(f"{server.api}/{path}")
        assert reply.status_code == 200 and reply.json() is None
    assert requests.get(f"{server.api}/scripts").json() == {"txt2img": [], "img2img": []}
    assert requests.get(f"{server.api}/prompt-styles").json() == []
    assert requests.get(f"{server.api}/loras").json() == []
    assert requests.get(f"{server.api}/embeddings").json() == {"loaded": {}, "skipped": {}}
    memory = requests.get(f"{server.api}/memory").json()
    assert memory["ram"]["total"] > memory["ram"]["free"] > 0 and "cuda" in memory
    assert requests.get(f"{server.api}/cmd-flags").json() == {"api": True}
    assert requests.get(f"{server.url}/docs").status_code == 200
    assert "/sdapi/v1/txt2img" in requests.get(f"{server.url}/openapi.json").json()["paths"]


def test_options_keep_any_key_and_refuse_an_unknown_model(server):
    assert requests.post(f"{server.api}/options", json={"samples_format": "png", "my_own_key": [1, 2]}).json() is None
    assert requests.get(f"{server.api}/options").json()["my_own_key"] == [1, 2]
    body = assert_error_body(requests.post(f"{server.api}/options", json={"sd_model_checkpoint": "nope.ckpt"}), 422)
    assert "nope.ckpt" in body["detail"] and "default-txt2img.safetensors" in body["detail"]


def test_unload_and_reload_checkpoint(server):
    """text-generation-webui hands the GPU over with unload-checkpoint, then takes it back with reload-checkpoint."""
    models, path = server.engine.studio.models, server.engine.checkpoint
    requests.post(f"{server.api}/txt2img", json=SMALL)
    assert models.loaded(path) is not None
    assert requests.post(f"{server.api}/unload-checkpoint").json() == {}
    assert models.loaded(path) is None
    assert requests.post(f"{server.api}/reload-checkpoint").json() == {}
    assert models.loaded(path) is not None
    requests.post(f"{server.api}/unload-checkpoint")
    assert len(requests.post(f"{server.api}/txt2img", json=SMALL).json()["images"]) == 1  # loads again when used


def test_errors_are_4xx_with_a_message(server):
    api = server.api
    assert "init_images" in assert_error_body(requests.post(f"{api}/img2img", json={"prompt": "x"}), 400)["detail"]
    assert "URL" in assert_error_body(requests.post(f"{api}/img2img", json={"init_images": ["https://x.org/a.png"]}), 400)["detail"]
    assert "file path" in assert_error_body(requests.post(f"{api}/png-info", json={"image": "/etc/passwd"}), 400)["detail"]
    assert_error_body(requests.post(f"{api}/png-info", json={"image": "bm90IGFuIGltYWdl"}), 400)  # base64 of text
    assert_error_body(requests.post(f"{api}/png-info", json={}), 422)
    assert_error_body(requests.post(f"{api}/txt2img", data="{not json", headers={"content-type": "application/json"}), 422)
    assert "steps" in assert_error_body(requests.post(f"{api}/txt2img", json={"steps": 0}), 422)["detail"]
    assert "upscaler_1" in assert_error_body(requests.post(f"{api}/extra-single-image", json={
        "image": png_b64(Image.new("RGB", (8, 8))), "upscaler_1": "ESRGAN_4x"}), 422)["detail"]
    assert requests.get(f"{api}/no-such-route").status_code == 404


def test_limits_refuse_large_bodies_and_bombs_without_decoding(server):
    body = assert_error_body(requests.post(f"{server.api}/png-info", data=b'{"image": "' + b"A" * (3 << 20) + b'"}',
                                           headers={"content-type": "application/json"}), 413)
    assert "bytes" in body["detail"]
    # A PNG whose header claims 100000 x 100000 pixels: refused by its header, never unpacked.
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    started = time.monotonic()
    body = assert_error_body(requests.post(f"{server.api}/img2img", json={"init_images": [base64.b64encode(bomb).decode()]}), 413)
    assert "too large" in body["detail"] and "10000000000 pixels" in body["detail"] and time.monotonic() - started < 5
    # One under PIL's own limit but over ours is refused by its header size too.
    big = bomb.replace(struct.pack(">II", 100000, 100000), struct.pack(">II", 9000, 1000))
    big = big[:8] + chunk(b"IHDR", struct.pack(">IIBBBBB", 9000, 1000, 8, 2, 0, 0, 0)) + big[8 + 25:]
    body = assert_error_body(requests.post(f"{server.api}/png-info", json={"image": base64.b64encode(big).decode()}), 413)
    assert "9000x1000" in body["detail"]


def test_logins(outputs):
    engine = make_engine(outputs)
    with serving(engine, logins=[("ann", "secret"), ("bob", "pw2")]) as running:
        url = f"{running.api}/sd-models"
        missing = requests.get(url)
        assert_error_body(missing, 401)
        assert missing.headers["www-authenticate"] == "Basic"
        assert_error_body(requests.get(url, auth=("ann", "wrong")), 401)
        assert_error_body(requests.post(f"{running.api}/txt2img", json=SMALL, auth=("eve", "secret")), 401)
        assert requests.get(url, auth=("ann", "secret")).status_code == 200
        assert requests.get(url, auth=("bob", "pw2")).status_code == 200
    with serving(engine) as running:  # no logins: any Authorization header is ignored
        assert requests.get(f"{running.api}/sd-models", auth=("any", "thing")).status_code == 200


def test_a_studio_user_and_an_api_client_see_no_cross_talk(server):
    """A studio generation holds its model's lock (ui.generation.run_batches): an API job waits for it,
    says so in /progress, and neither side's stop reaches the other."""
    engine = server.engine
    studio = engine.studio
    lock = studio.models.lock(engine.checkpoint)
    studio_stop = studio.stop_flag("a studio session")
    done: dict = {}
    lock.acquire()
    try:
        worker = threading.Thread(target=lambda: done.update(r=requests.post(f"{server.api}/txt2img", json={"seed": 2, **SMALL})))
        worker.start()
        deadline = time.monotonic() + 20
        while "Waiting" not in (requests.get(f"{server.api}/progress").json()["textinfo"] or ""):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        studio_stop.set()  # the studio user presses Stop: the API job is not theirs
        assert not engine.interrupt_flag.is_set()
    finally:
        lock.release()
    worker.join(timeout=60)
    assert done["r"].status_code == 200 and json.loads(done["r"].json()["info"])["notices"] == []
    studio_stop.clear()
    requests.post(f"{server.api}/interrupt")  # an API interrupt leaves the studio's flag alone
    assert not studio_stop.is_set()


def test_skip_ends_the_batch_and_the_job_goes_on(server):
    done: dict = {}
    worker = threading.Thread(target=lambda: done.update(r=requests.post(f"{server.api}/txt2img", json={
        "seed": 20, "n_iter": 2, "width": 64, "height": 64, "steps": 300}).json()))
    worker.start()
    deadline = time.monotonic() + 30
    while requests.get(f"{server.api}/progress").json()["state"]["sampling_step"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    requests.post(f"{server.api}/skip")
    while (state := requests.get(f"{server.api}/progress").json()["state"])["job_no"] != 1 or state["sampling_step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    requests.post(f"{server.api}/interrupt")
    worker.join(timeout=60)
    info = json.loads(done["r"]["info"])
    assert info["all_seeds"] == [20, 21] and len(done["r"]["images"]) == 2
    assert [n.split(" after")[0] for n in info["notices"]] == ["batch skipped", "batch interrupted"]


@pytest.fixture(scope="module")
def studio_with_api(outputs):
    """`python app.py --api --api-auth ann:pw`: the studio's page and the API on one port."""
    import app
    from tests.helpers import free_port

    engine = make_engine(outputs)
    port = free_port()
    served = app.launch(engine.studio, "127.0.0.1", port, block=False, api=engine, api_logins=[("ann", "pw")])
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        served.close()


def test_the_studio_serves_the_api_with_api(studio_with_api):
    base, _ = studio_with_api
    assert requests.get(base).status_code == 200
    assert requests.get(f"{base}/sdapi/v1/options").status_code == 401
    assert requests.get(f"{base}/sdapi/v1/options", auth=("ann", "pw")).json()["sd_model_checkpoint"]
    assert requests.get(f"{base}/docs").status_code == 200


def test_a_studio_user_beside_an_api_client(studio_with_api):
    """A studio session (through the page's own endpoint) and an API client on one model: the API job
    waits for the studio's, an API interrupt ends only the API's job, the studio's Stop only its own."""
    from ui.client import StudioClient

    base, engine = studio_with_api
    api, auth = f"{base}/sdapi/v1", ("ann", "pw")
    user = StudioClient(base)
    lock = engine.studio.models.lock(engine.checkpoint)
    long_job = user.submit("txt2img", Prompt="a studio job", Seed=5, Steps=150, Width=128, Height=128)
    deadline = time.monotonic() + 60
    while not lock.locked():
        assert time.monotonic() < deadline and not long_job.done()
        time.sleep(0.1)
    done: dict = {}
    worker = threading.Thread(target=lambda: done.update(r=requests.post(f"{api}/txt2img", json={"seed": 2, **SMALL}, auth=auth)))
    worker.start()
    while "Waiting" not in (requests.get(f"{api}/progress", auth=auth).json()["textinfo"] or ""):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert requests.post(f"{api}/interrupt", auth=auth).json() == {}
    worker.join(timeout=30)
    info = json.loads(done["r"].json()["info"])
    assert done["r"].json()["images"] == [] and info["notices"] == ["interrupted while waiting for the model: nothing was generated"]
    time.sleep(0.5)
    assert not long_job.done()  # the studio's job goes on
    user.stop("txt2img")
    assert long_job.result()[1].startswith("Stopped after")
    # The model is free again: the API generates, and the studio's stop flag did not reach it.
    res = requests.post(f"{api}/txt2img", json={"seed": 3, **SMALL}, auth=auth).json()
    assert len(res["images"]) == 1 and json.loads(res["info"])["notices"] == []


BAD_VALUES = {
    "steps": [0, -5, 10**12, 1.5, "x", None, [], float("nan")],
    "width": [0, -64, 10**9, "wide", float("nan"), 64.5],
    "cfg_scale": [float("nan"), float("inf"), -1, 1e308, "seven", {}],
    "batch_size": [0, 17, 10**20, "two"],
    "n_iter": [0, 100, -1],
    "seed": [-2, 2**40, "s", 10**400],
    "sampler_name": [123, [], {}],
    "prompt": [123, {}, ["a"]],
    "eta": [float("nan"), 2.0, -1],
    "s_noise": [5.0, float("nan")],
    "denoising_strength": [float("nan"), -0.5, 1.5, "half"],
}
GOOD_VALUES = st.fixed_dictionaries({}, optional={"prompt": st.text(max_size=20), "seed": st.integers(-1, 1000),
                                                  "unknown_key": st.text(max_size=5), "sampler_name": st.sampled_from(["Euler", "DDIM"])})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(endpoint=st.sampled_from(["txt2img", "img2img"]), field=st.sampled_from(sorted(BAD_VALUES)), data=st.data(),
       good=GOOD_VALUES)
def test_property_bad_bodies_are_4xx_with_a_message(server, endpoint, field, data, good):
    """Wrong types, NaN, infinities, huge numbers, missing and bad images: never a 500, never a generation."""
    value = data.draw(st.sampled_from(BAD_VALUES[field]))
    if field == "denoising_strength" and endpoint == "txt2img":
        field, value = "steps", 0  # txt2img does not use its denoising strength without the hires fix
    body = {**SMALL, **good, field: value}
    if endpoint == "img2img":
        body["init_images"] = data.draw(st.sampled_from([[png_b64(Image.new("RGB", (64, 64)))], ["not base64!"],
                                                         [""], [], None, ["data:image/png,raw"]]))
        mask = data.draw(st.sampled_from([None, "bad mask", png_b64(Image.new("L", (64, 64), 255))]))
        if mask is not None:
            body["mask"] = mask
    text = json.dumps(body, allow_nan=True)  # NaN and Infinity as Python's json writes them
    reply = requests.post(f"{server.api}/{endpoint}", data=text, headers={"content-type": "application/json"})
    assert_error_body(reply, (400, 413, 422))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.none(), st.integers(), st.text(max_size=10), st.lists(st.integers(), max_size=3),
                      st.dictionaries(st.sampled_from(["image", "imageList", "upscaler_1", "upscaling_resize", "resize_mode"]),
                                      st.one_of(st.none(), st.integers(-10, 10**6), st.text(max_size=8), st.floats()),
                                      max_size=3)))
def test_property_bad_extras_and_png_info_bodies(server, body):
    for endpoint in ("extra-single-image", "extra-batch-images", "png-info", "options"):
        reply = requests.post(f"{server.api}/{endpoint}", data=json.dumps(body, allow_nan=True),
                              headers={"content-type": "application/json"})
        if endpoint == "options" and isinstance(body, dict):
            assert reply.status_code == 200  # every key is accepted and kept
        else:
            assert_error_body(reply, (400, 413, 422))


def test_extra_batch_images_and_sizes(server):
    """extra-batch-images takes imageList [{data, name}] (raw base64 or data URLs) and answers {html_info, images}."""
    first = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 30, 3), np.uint8))
    second = Image.new("RGBA", (10, 10), (255, 0, 0, 128))
    body = {"imageList": [{"data": png_b64(first), "name": "a"}, {"data": "data:image/png;base64," + png_b64(second), "name": "b"}],
            "upscaler_1": "Nearest", "upscaling_resize": 2, "gfpgan_visibility": 0.5}
    res = requests.post(f"{server.api}/extra-batch-images", json=body).json()
    sizes = [Image.open(io.BytesIO(base64.b64decode(i))).size for i in res["images"]]
    assert sizes == [(60, 40), (20, 20)] and "face restoration" in res["html_info"]
    cropped = requests.post(f"{server.api}/extra-single-image", json={
        "image": png_b64(first), "upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 16,
        "upscaling_resize_h": 16, "upscaling_crop": True}).json()
    assert Image.open(io.BytesIO(base64.b64decode(cropped["image"]))).size == (16, 16)
    assert "cfg_scale" in assert_error_body(requests.post(f"{server.api}/txt2img", json={"cfg_scale": 99}), 422)["detail"]


def test_flags():
    import app

    args = app.parse_args(["--nowebui", "--api-auth", "ann:pw1,bob:pw2", "--auth", "cat:pw3"])
    assert args.port == 7861 and args.api_logins == [("ann", "pw1"), ("bob", "pw2"), ("cat", "pw3")]
    assert app.parse_args(["--api", "--auth", "cat:pw3"]).api_logins == [("cat", "pw3")]  # the studio's login asked of the API
    assert app.parse_args(["--api"]).port == 7860 and app.parse_args(["--api"]).host == "127.0.0.1"
    with pytest.raises(SystemExit):
        app.parse_args(["--api-auth", "nocolon"])


def test_nowebui_serves_the_api_alone(tmp_path):
    """`python app.py --nowebui`: the API and its docs, no studio page."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import free_port

    port = free_port()
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen([sys.executable, "app.py", "--nowebui", "--port", str(port), "--outputs", str(tmp_path),
                                "--device", "cpu"], cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                options = requests.get(f"{base}/sdapi/v1/options", timeout=2)
                break
            except requests.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.3)
        assert options.json()["sd_model_checkpoint"] == "default-txt2img.safetensors"
        assert requests.get(f"{base}/docs").status_code == 200
        assert requests.get(base).status_code == 404
    finally:
        process.terminate()
        process.wait(timeout=20)
