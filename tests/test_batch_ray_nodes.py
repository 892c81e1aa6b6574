"""A batch on a two-node local Ray cluster (``ray.cluster_utils.Cluster``, all on 127.0.0.1): a node
killed mid-batch loses its renderer and the jobs it held; they are rendered again on a node that
takes its place, and every job is written exactly once."""

from __future__ import annotations

import json
from importlib.util import find_spec

import psutil
import pytest

from ldm.batch.jobs import expand, grid_from_values, model_facts
from ldm.batch.render import LoadOptions
from ldm.batch.run import run_batch
from tests.test_batch_ray import RAY_ENVIRONMENT, own_children, stop_started_since

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(find_spec("ray") is None,
                                 reason="Ray is an optional extra: pip install -r requirements-ray.txt")]

# a dead node is noticed within about 1.5 s instead of Ray's default of 30 s or so
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                      "health_check_failure_threshold": 3}


@pytest.fixture
def two_nodes(monkeypatch):
    """A head with no CPUs (so no renderer runs there) and two nodes of one CPU each; every process of
    the cluster stopped after the test."""
    for key, value in RAY_ENVIRONMENT.items():
        monkeypatch.setenv(key, value)
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.fail("another test left this process connected to Ray")
    before = own_children()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "_system_config": FAST_HEALTH_CHECKS})
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, configure_logging=False)
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
        killed = stop_started_since(before)
    assert not killed, f"Ray left processes {killed} running after its shutdown"


def test_killing_a_node_mid_batch_still_renders_every_job_exactly_once(two_nodes, tmp_path):
    from ldm.distributed.batch import ray_backend

    cluster, nodes = two_nodes
    jobs = expand(grid_from_values({"prompts": ["a red circle", "a blue square"], "seeds": "0-3", "steps": 2}),
                  {"default": model_facts("default")})
    before_kill: set[int] = set()  # the processes alive when the node died

    def kill_a_node_after_the_first_picture(result):
        if not before_kill:  # both renderers hold jobs now: two each at the start, one more per finished job
            before_kill.update(p.pid for p in psutil.Process().children(recursive=True))
            cluster.remove_node(nodes[1], allow_graceful=False)
            cluster.add_node(num_cpus=1)

    report = run_batch(jobs, tmp_path, ray_backend(LoadOptions(device="cpu", dtype="fp32"), workers=2),
                       on_result=kill_a_node_after_the_first_picture)
    assert before_kill and not report.failed
    assert sorted(report.rendered) == sorted(job.id for job in jobs)  # each job once: no repeats, none missing
    assert sorted(p.stem for p in tmp_path.glob("*.png")) == sorted(job.id for job in jobs)
    pids = {int(json.loads(p.read_text())["worker"].rsplit(":", 1)[1]) for p in tmp_path.glob("*.json")}
    assert pids - before_kill  # some jobs were rendered by the renderer restarted after the kill
