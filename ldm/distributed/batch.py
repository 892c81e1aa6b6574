"""Batch jobs fanned out over Ray Core: a pool of renderer actors (``ldm.batch.render.Renderer``, each
loading its model once), two jobs in flight per actor, results taken in the order they finish.

Retries: an actor that dies (its process killed, its machine gone) is restarted, on another node if
need be, and the jobs it held are run again, up to ``retries`` times each; a job that fails for good is
reported and left for a rerun. The driver writes every result (``ldm.batch.run``), once per job, so a
job Ray ran twice still gives one file.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import replace

from ldm.batch.jobs import BatchJob
from ldm.batch.render import LoadOptions, RenderedJob, Renderer
from ldm.batch.run import Backend, JobFailure
from ldm.distributed.cluster import import_ray

log = logging.getLogger(__name__)

IN_FLIGHT = 2  # jobs queued per actor: one rendering, one waiting, so an actor never idles between jobs


def pool_shape(resources: dict, options: LoadOptions, cpus_per_worker: int, workers: int | None) -> tuple[int, dict]:
    """How many renderer actors, and the resources of each: one GPU each where the cluster has GPUs
    (and the device is not the CPU), else ``cpus_per_worker`` CPUs each (torch's threads)."""
    gpus = int(resources.get("GPU", 0))
    if gpus and options.device != "cpu":
        return workers or gpus, {"num_gpus": 1, "num_cpus": 1}
    cpus = int(resources.get("CPU", 1))
    return workers or max(1, cpus // cpus_per_worker), {"num_cpus": cpus_per_worker}


def ray_backend(options: LoadOptions = LoadOptions(), *, workers: int | None = None, cpus_per_worker: int = 1,
                retries: int = 3, renderer: type[Renderer] = Renderer, renderer_args: tuple = ()) -> Backend:
    """A backend for ``ldm.batch.run.run_batch`` on the Ray cluster this process is connected to
    (``ldm.distributed.cluster.connected``). ``renderer(options, *renderer_args)`` is built in each actor."""
    if cpus_per_worker < 1 or (workers is not None and workers < 1) or retries < 0:
        raise ValueError(f"workers ({workers}) and CPUs per worker ({cpus_per_worker}) must be at least 1 and retries "
                         f"({retries}) at least 0")

    def render_all(jobs: list[BatchJob]) -> Iterator[RenderedJob | JobFailure]:
        ray = import_ray()
        count, resources = pool_shape(ray.cluster_resources(), options, cpus_per_worker, workers)
        count = min(count, len(jobs))
        threads = options.threads or resources["num_cpus"]
        actor_class = ray.remote(renderer).options(max_restarts=-1, max_task_retries=retries, **resources)
        actors = [actor_class.remote(replace(options, threads=threads), *renderer_args) for _ in range(count)]
        log.info("%d renderer actors, each with %s", count, resources)
        try:
            yield from _drain(ray, actors, deque(jobs))
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)

    return render_all


def _drain(ray, actors: list, queue: deque) -> Iterator[RenderedJob | JobFailure]:
    """Keep ``IN_FLIGHT`` jobs on each actor until ``queue`` is empty; yield each result as it comes."""
    in_flight: dict = {}  # ObjectRef -> (actor, job)

    def submit(actor) -> None:
        if queue:
            job = queue.popleft()
            in_flight[actor.render.remote(job)] = (actor, job)

    for _ in range(IN_FLIGHT):
        for actor in actors:
            submit(actor)
    while in_flight:
        (ref,), _ = ray.wait(list(in_flight), num_returns=1)
        actor, job = in_flight.pop(ref)
        try:
            yield ray.get(ref)
        except ray.exceptions.RayTaskError as error:  # the renderer raised: the job is wrong, not the machine
            yield JobFailure(job.id, _cause(error))
        except ray.exceptions.RayError as error:  # the actor died more often than the retries allow
            log.warning("job %s failed after its retries: %s", job.id, error)
            yield JobFailure(job.id, f"its worker died more often than the retries allow ({type(error).__name__})")
        submit(actor)


def _cause(error) -> str:
    cause = getattr(error, "cause", None)
    return str(cause) if cause is not None else str(error).splitlines()[-1]
