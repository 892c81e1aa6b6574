"""The running studio under load, driven as scripts drive it (gradio_client, one client per user):
eight clients at once, each with several requests, get exactly their own images; Stop stops only
its own session's job; a fault inside one job is reported to that user and the server goes on
serving; memory comes back to its level after the burst. Uses the embedded default model."""

from __future__ import annotations

import gc
import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

import app
from ldm.tasks.request import GenerationRequest
from ldm.tasks.txt2img import txt2img
from ui.client import StudioClient

pytestmark = pytest.mark.browser

CLIENTS = 8
REQUESTS_EACH = 3
STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    port = free_port()
    args = app.parse_args(["--outputs", str(tmp_path_factory.mktemp("outputs")), "--port", str(port), "--concurrency", "2"])
    studio = app.make_studio(args)
    server = app.launch(studio, args.host, port, args.concurrency, block=False)
    yield studio, f"http://127.0.0.1:{port}/"
    server.close()


class Tab:
    """One user of one tab."""

    def __init__(self, url: str, tab: str = "txt2img"):
        self.client, self.tab = StudioClient(url), tab

    def generate(self, prompt: str, seed: int, steps: int = STEPS):
        return self.client.generate(self.tab, Prompt=prompt, Seed=seed, Steps=steps)

    def submit(self, prompt: str, seed: int, steps: int, **more):
        return self.client.submit(self.tab, Prompt=prompt, Seed=seed, Steps=steps, **more)

    def stop(self):
        self.client.stop(self.tab)


def image_path(entry) -> str:
    image = entry["image"]
    return image if isinstance(image, str) else image["path"]


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def engine_image(studio, prompt: str, seed: int) -> np.ndarray:
    loaded = studio.models.get(studio.default_for("txt2img"))
    request = GenerationRequest(prompt=prompt, steps=STEPS, scale=4.0, seed=seed, width=64, height=64)
    with studio.models.lock(loaded.path):
        return np.asarray(txt2img(loaded, request).images[0])


def test_eight_clients_at_once_each_get_their_own_images_and_memory_settles(served):
    studio, url = served
    Tab(url).generate("a red circle", 1)  # warm: the first request builds caches that stay
    gc.collect()
    baseline = rss_mb()
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow circle in the top left",
               "a small blue circle", "a large red square at the bottom", "a green circle on the right", "a yellow triangle"]

    def user(i: int) -> list[tuple[str, int, tuple]]:
        tab = Tab(url)
        return [(prompts[i], 1000 * i + r, tab.generate(prompts[i], 1000 * i + r)) for r in range(REQUESTS_EACH)]

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [r for rs in pool.map(user, range(CLIENTS)) for r in rs]
    assert len(results) == CLIENTS * REQUESTS_EACH
    for prompt, seed, (status, gallery, parameters) in results:
        assert status.startswith("saved "), status
        assert parameters.startswith(prompt + "\n") and f"Seed: {seed}," in parameters
        # the client's own session: its gallery holds only its own images, newest first
        assert len(gallery) == seed % 1000 + 1
    for prompt, seed, (_, gallery, _) in results[:: REQUESTS_EACH + 1]:  # a sample, against the engine alone
        np.testing.assert_array_equal(pixels(image_path(gallery[0])), engine_image(studio, prompt, seed))
    gc.collect()
    grown = rss_mb() - baseline
    assert grown < 150, f"memory grew by {grown:.0f} MB over the burst"


def wait_for_progress(job, timeout: float = 60) -> None:
    """Until the job has streamed a step."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        outputs = job.outputs()
        if outputs and "step" in str(outputs[-1][1]):
            return
        time.sleep(0.1)
    raise AssertionError(f"no progress within {timeout} s: {job.status()}")


def test_stop_stops_only_its_own_sessions_job(served):
    _, url = served
    long_user, other_user, waiting_user = Tab(url), Tab(url), Tab(url)
    long_job = long_user.submit("a red circle", 7, steps=150, Width=128, Height=128)  # about 0.1 s a step
    wait_for_progress(long_job)
    queued = waiting_user.submit("a blue square", 8, steps=STEPS)  # waits for the model's lock
    other_user.stop()  # another session's stop: the long job goes on
    time.sleep(1.0)
    assert not long_job.done()
    long_user.stop()
    status = long_job.result()[1]
    assert re.fullmatch(r"Stopped after \d+ of \d+ steps; finished images are kept\.", status), status
    assert queued.result()[1].startswith("saved ")


def test_a_fault_inside_a_job_is_reported_to_its_user_and_the_server_goes_on(served, monkeypatch):
    _, url = served
    import ui.tabs.txt2img as tab_module

    real = tab_module.txt2img

    def faulty(loaded, request, **kwargs):
        if request.prompt == "boom":
            raise RuntimeError("injected fault")
        return real(loaded, request, **kwargs)

    monkeypatch.setattr(tab_module, "txt2img", faulty)
    victim, bystander = Tab(url), Tab(url)
    with ThreadPoolExecutor(2) as pool:
        failed = pool.submit(victim.generate, "boom", 3)
        fine = pool.submit(bystander.generate, "a red circle", 4)
        with pytest.raises(Exception, match=r"Generation failed \(RuntimeError\); the studio.s log has the details"):
            failed.result()
        assert fine.result()[0].startswith("saved ")
    assert victim.generate("a green circle", 5)[0].startswith("saved ")  # the same user goes on too


def test_the_script_client_names_unknown_tabs_and_inputs(served):
    _, url = served
    client = StudioClient(url)
    with pytest.raises(ValueError, match="no tab 'paint'; tabs: .*inpaint.*txt2img"):
        client.generate("paint", Prompt="x")
    with pytest.raises(ValueError, match="the txt2img tab has no input 'Promt'; its inputs: Model, Prompt"):
        client.generate("txt2img", Promt="x")
