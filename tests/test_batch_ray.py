"""python -m ldm batch over Ray on this CPU: one local cluster (127.0.0.1, token auth off, no usage
statistics) for the module, every process it started stopped at the end. A batch gives the pictures
that --ray none gives, a rerun renders none, and a renderer that dies on its first attempt is retried."""

from __future__ import annotations

import json
import os
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from ldm.batch.jobs import expand, grid_from_values, model_facts
from ldm.batch.render import LoadOptions, Renderer
from ldm.batch.run import run_batch
from ldm.cli import main
from tests.helpers import batch_args

pytestmark = [pytest.mark.ray, pytest.mark.skipif(find_spec("ray") is None,
                                                  reason="Ray is an optional extra: pip install -r requirements-ray.txt")]

RAY_ENVIRONMENT = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def own_children() -> set[int]:
    return {process.pid for process in psutil.Process().children(recursive=True)}


def stop_started_since(before: set[int]) -> list[int]:
    """Wait for this process's children that were not among ``before`` (Ray's, after its shutdown) to
    end, and kill any still running after 10 s; the pids that had to be killed."""
    _, alive = psutil.wait_procs([p for p in psutil.Process().children(recursive=True) if p.pid not in before],
                                 timeout=10)
    for process in alive:
        process.kill()
    psutil.wait_procs(alive, timeout=5)
    return [process.pid for process in alive]


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for this module; every process it started is gone after it."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in RAY_ENVIRONMENT.items():
            patch.setenv(key, value)  # read when ray is imported, so before it
        import ray

        before = own_children()
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
        try:
            yield ray
        finally:
            ray.shutdown()
            killed = stop_started_since(before)
        assert not killed, f"Ray left processes {killed} running after its shutdown"


@pytest.fixture(scope="module")
def over_ray(ray_cluster, batch_prompts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ray")
    assert main(batch_args(batch_prompts, out, "--ray", "local")) == 0  # joins the module's cluster
    return out


def test_a_batch_of_two_prompts_by_three_seeds_gives_six_files_and_a_rerun_none(over_ray, batch_prompts, capsys):
    assert len(list(over_ray.glob("*.png"))) == 6 and len(list(over_ray.glob("*.json"))) == 6
    capsys.readouterr()
    assert main(batch_args(batch_prompts, over_ray, "--ray", "local")) == 0
    assert "0 rendered, 6 already there, 0 failed" in capsys.readouterr().out


def test_ray_gives_the_pictures_of_ray_none(over_ray, batch_in_process):
    names = sorted(p.name for p in batch_in_process.glob("*.png"))
    assert names == sorted(p.name for p in over_ray.glob("*.png"))  # the same jobs, the same names
    for name in names:
        here = np.asarray(Image.open(batch_in_process / name), dtype=np.int16)
        there = np.asarray(Image.open(over_ray / name), dtype=np.int16)
        assert np.abs(here - there).max() <= 2, name  # 1 torch thread per actor, 2 in process


class DiesOnFirstAttempt(Renderer):
    """Kills its own worker process the first time it is given job ``victim`` (a marker file remembers
    the attempt, across the restart)."""

    def __init__(self, options: LoadOptions, marker: str, victim: str):
        super().__init__(options)
        self.marker, self.victim = Path(marker), victim

    def render(self, job):
        if job.id == self.victim and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)
        return super().render(job)


def test_a_worker_that_dies_on_its_first_attempt_is_retried(ray_cluster, tmp_path):
    from ldm.distributed.batch import ray_backend

    jobs = expand(grid_from_values({"prompts": ["a red circle"], "seeds": [7, 8, 9], "steps": 2}),
                  {"default": model_facts("default")})
    marker = tmp_path / "died"
    backend = ray_backend(LoadOptions(device="cpu", dtype="fp32"), retries=2, renderer=DiesOnFirstAttempt,
                          renderer_args=(str(marker), jobs[1].id))
    report = run_batch(jobs, tmp_path / "out", backend)
    assert marker.exists()  # the worker did die
    assert sorted(report.rendered) == sorted(job.id for job in jobs) and not report.failed
    worker = json.loads((tmp_path / "out" / f"{jobs[1].id}.json").read_text())["worker"]
    assert not worker.endswith(f":{marker.read_text()}")  # rendered by the restarted worker


def test_a_job_the_renderer_refuses_is_reported_not_retried_forever(ray_cluster, tmp_path):
    from dataclasses import replace

    from ldm.distributed.batch import ray_backend

    jobs = expand(grid_from_values({"prompts": ["a red circle"], "seeds": [1], "steps": 2}),
                  {"default": model_facts("default")})
    wrong = replace(jobs[0], model_hash="0000000000")  # the file at that path is not the one planned
    report = run_batch([wrong], tmp_path, ray_backend(LoadOptions(device="cpu", dtype="fp32")))
    assert report.rendered == [] and "not the batch's 0000000000" in report.failed[wrong.id]
    assert not list(tmp_path.glob("*.png"))

