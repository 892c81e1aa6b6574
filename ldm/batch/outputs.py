"""A batch's folder: ``ID.png`` and its sidecar ``ID.json`` per job, each written atomically (a
temporary file, then a rename), the sidecar last. A job is done when both are there, so a batch that
stopped anywhere (a crash, Ctrl-C, a killed machine) resumes by rendering the jobs without them."""

from __future__ import annotations

import json
from pathlib import Path

from ldm.batch.jobs import BatchJob
from ldm.batch.render import RenderedJob
from ldm.tasks.parameters import write_atomically


def png_path(out: Path, job_id: str) -> Path:
    return out / f"{job_id}.png"


def sidecar_path(out: Path, job_id: str) -> Path:
    return out / f"{job_id}.json"


def is_done(out: Path, job: BatchJob) -> bool:
    return sidecar_path(out, job.id).is_file() and png_path(out, job.id).is_file()


def pending(jobs: list[BatchJob], out: Path) -> list[BatchJob]:
    """The jobs whose picture or sidecar is missing from ``out``."""
    return [job for job in jobs if not is_done(out, job)]


def commit(out: Path, rendered: RenderedJob) -> None:
    """The picture, then the sidecar that marks the job done."""
    write_atomically(png_path(out, rendered.id), rendered.png)
    write_atomically(sidecar_path(out, rendered.id), (json.dumps(rendered.sidecar, indent=1) + "\n").encode())
