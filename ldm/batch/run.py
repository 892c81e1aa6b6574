"""Running a batch: the jobs not yet in the output folder go to a backend, which yields each job's
result as it finishes (in this process: ``in_process``; over Ray: ``ldm.distributed.batch``); every
result is written as it arrives, once per job."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ldm.batch.jobs import BatchJob
from ldm.batch.outputs import commit, pending
from ldm.batch.render import LoadOptions, RenderedJob, Renderer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobFailure:
    """A job a backend gave up on (after its retries); a rerun tries it again."""

    id: str
    message: str


Backend = Callable[[list[BatchJob]], Iterator["RenderedJob | JobFailure"]]


@dataclass
class BatchReport:
    total: int
    skipped: int  # already in the folder
    rendered: list[str] = field(default_factory=list)  # ids, in the order they were written
    failed: dict[str, str] = field(default_factory=dict)  # id -> why
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return len(self.rendered) / self.seconds if self.seconds > 0 else 0.0


def in_process(options: LoadOptions = LoadOptions()) -> Backend:
    """Jobs rendered one after another by one ``Renderer`` in this process; an error stops the batch."""

    def render_all(jobs: list[BatchJob]) -> Iterator[RenderedJob]:
        renderer = Renderer(options)
        for job in jobs:
            yield renderer.render(job)

    return render_all


def run_batch(jobs: Iterable[BatchJob], out: str | Path, backend: Backend,
              on_result: Callable[[RenderedJob | JobFailure], None] | None = None) -> BatchReport:
    """Render the jobs missing from ``out`` with ``backend``, writing each as it arrives. ``on_result``
    is called after each job is written (or has failed). A result for a job already written (a backend
    that ran a job twice) is not written again."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = list(jobs)
    todo = pending(jobs, out)
    report = BatchReport(total=len(jobs), skipped=len(jobs) - len(todo))
    wanted = {job.id for job in todo}
    start = time.perf_counter()
    if todo:
        for result in backend(todo):
            if result.id not in wanted:
                log.warning("job %s came back twice; its first result is kept", result.id)
                continue
            wanted.discard(result.id)
            if isinstance(result, JobFailure):
                report.failed[result.id] = result.message
            else:
                commit(out, result)
                report.rendered.append(result.id)
            if on_result is not None:
                on_result(result)
    report.seconds = time.perf_counter() - start
    for job_id in wanted:
        report.failed.setdefault(job_id, "the backend returned no result")
    return report
