"""Batch jobs: a grid (prompts x seeds x samplers x guidance x models, from a YAML file or the command
line's options) expanded into text-to-image jobs, each checked as a request up front and named by a
hash of its parameters, so that the same job always has the same file name.

A job's name hashes what decides its pixels: the prompts, seed, sampler, schedule, eta, guidance,
steps, size and the model's content hash (not its path: a moved file keeps its jobs' names).
"""

from __future__ import annotations

import hashlib
import json
from argparse import ArgumentTypeError
from dataclasses import asdict, dataclass, fields, replace
from itertools import product
from pathlib import Path

from ldm.checkpoints.loaded import model_hash
from ldm.checkpoints.loader import resolve_preset
from ldm.checkpoints.presets import DEFAULT_MODELS, SamplerDefaults
from ldm.options import named, sampler_name
from ldm.sampling.samplers import SAMPLERS, get_sampler
from ldm.sampling.sigmas import SCHEDULES
from ldm.tasks.request import MAX_SEED, GenerationRequest, resolve_request

MAX_JOBS = 1_000_000
NAME_VERSION = 1  # bumped when what a job's name hashes changes
DEFAULT_MODEL = "default"  # in a grid's models: the embedded default text-to-image model


@dataclass(frozen=True)
class BatchJob:
    """One image. ``model`` is where the checkpoint is (an absolute path every renderer must see);
    ``model_hash`` is ``ldm.checkpoints.loaded.model_hash`` of it, which the renderer checks."""

    prompt: str
    negative: str
    seed: int
    sampler: str
    schedule: str
    eta: float
    scale: float
    steps: int
    width: int
    height: int
    model_hash: str
    model: str

    def identity(self) -> dict:
        """Every parameter but the model's path."""
        return {k: v for k, v in asdict(self).items() if k != "model"}

    @property
    def id(self) -> str:
        text = json.dumps({"version": NAME_VERSION, **self.identity()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def request(self) -> GenerationRequest:
        return GenerationRequest(prompt=self.prompt, negative_prompt=self.negative, steps=self.steps, scale=self.scale,
                                 eta=self.eta, sampler=self.sampler, schedule=self.schedule, seed=self.seed,
                                 width=self.width, height=self.height)


@dataclass(frozen=True)
class Grid:
    """What a grid file or the options ask for; None: the model preset's default (for the size: the
    model's training size)."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    samplers: tuple[str | None, ...] = (None,)
    guidance: tuple[float | None, ...] = (None,)
    models: tuple[str, ...] = (DEFAULT_MODEL,)
    negative: str = ""
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    schedule: str | None = None
    eta: float | None = None

    @property
    def count(self) -> int:
        return len(self.prompts) * len(self.seeds) * len(self.samplers) * len(self.guidance) * len(self.models)


GRID_KEYS = tuple(f.name for f in fields(Grid))
LIST_KEYS = ("prompts", "seeds", "samplers", "guidance", "models")
GRID_HELP = ("a YAML mapping: prompts (a list of text; required), seeds (whole numbers, or ranges such as '0-99'), "
             "samplers, guidance and models (lists; models are checkpoint paths, relative to the grid file, or "
             "'default'), and single values negative, steps, width, height, schedule, eta")


@dataclass(frozen=True)
class ModelFacts:
    """What jobs need of a model without loading its weights: read from its header and preset."""

    path: Path
    hash: str
    defaults: SamplerDefaults
    size: int  # the training size in pixels
    size_multiple: int


def read_prompts_file(path: str | Path) -> tuple[str, ...]:
    """One prompt a line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; expected one prompt a line") from None
    except OSError as error:
        raise ValueError(f"{path}: cannot read the prompts ({error.strerror or error})") from None
    prompts = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not prompts:
        raise ValueError(f"{path}: no prompts; expected one prompt a line (blank lines and lines starting with # "
                         "are skipped)")
    return prompts


def parse_seeds(value, where: str = "seeds") -> tuple[int, ...]:
    """Seeds from a whole number, a text such as '0-9' or '1,5,7-9', or a list of either; each from 0 to
    MAX_SEED, in order, without repeats."""
    items = value if isinstance(value, list) else [value]
    expected = f"{where} must be whole numbers from 0 to {MAX_SEED} or ranges such as '0-99' (e.g. [1, 2] or '1,5,7-9')"
    seeds: list[int] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise ValueError(f"{expected}, got {item!r}")
        for part in ([str(item)] if isinstance(item, int) else item.split(",")):
            seeds.extend(_seed_range(part.strip(), expected))
    if not seeds:
        raise ValueError(f"{expected}; none given")
    return tuple(dict.fromkeys(seeds))


def _seed_range(text: str, expected: str) -> range:
    low, dash, high = text.partition("-")
    try:
        first, last = int(low), int(high if dash else low)
    except ValueError:
        raise ValueError(f"{expected}, got {text!r}") from None
    if not 0 <= first <= last <= MAX_SEED:
        raise ValueError(f"{expected}, got {text!r}" + (" (a range runs from low to high)" if first > last else ""))
    return range(first, last + 1)


def read_grid(path: str | Path, options: dict | None = None) -> Grid:
    """A grid YAML file (``GRID_HELP``), every key checked and named in its error; model paths are
    resolved against the file's folder. ``options``: more grid keys (the command line's), each of which
    the file must not set too."""
    path = Path(path)
    raw = read_grid_values(path)
    clash = sorted(set(raw) & set(options or {}))
    if clash:
        raise ValueError(f"{path} sets {', '.join(clash)} and the options set it too; give each setting once")
    try:
        grid = grid_from_values(raw, base=path.parent)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return replace(grid, **{key: getattr(grid_from_values(options), key) for key in options or {}})


def read_grid_values(path: Path) -> dict:
    """A grid file's mapping, its keys checked (its values are checked by ``grid_from_values``)."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"{path}: cannot read the grid ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; expected {GRID_HELP}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ValueError(f"{path}: not valid YAML{where} ({problem}); expected {GRID_HELP}") from None
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else f"a {type(raw).__name__}"
        raise ValueError(f"{path}: expected {GRID_HELP}; got {got}")
    unknown = sorted(str(k) for k in raw if k not in GRID_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(GRID_KEYS)}")
    if "prompts" not in raw:
        raise ValueError(f"{path}: 'prompts' is required (a list of text); expected {GRID_HELP}")
    return raw


def grid_from_values(values: dict, base: Path = Path(".")) -> Grid:
    """A Grid from a mapping of ``GRID_KEYS`` (a parsed grid file, or the options): lists where a list
    is expected (a single value is a list of one), each value checked."""
    checked = {}
    for key, value in values.items():
        if key in LIST_KEYS and key != "seeds":
            items = value if isinstance(value, list) else [value]
            if not items:
                raise ValueError(f"'{key}' is empty; give at least one value or leave the key out")
            checked[key] = tuple(_LIST_CHECKS[key](item, base) for item in items)
        elif key == "seeds":
            checked[key] = parse_seeds(value, "'seeds'")
        else:
            checked[key] = _SINGLE_CHECKS[key](value)
    return Grid(**checked)


def _text(key: str):
    def check(value, *_):
        if not isinstance(value, str) or (key == "prompts" and not value.strip()):
            what = "non-empty text" if key == "prompts" else "text"
            raise ValueError(f"'{key}' must be {what}, got {value!r}")
        return value.strip() if key == "prompts" else value
    return check


def _whole(key: str, low: int):
    def check(value, *_):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"'{key}' must be a whole number of at least {low}, got {value!r}")
        return value
    return check


def _number(key: str):
    def check(value, *_):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"'{key}' must be a number (or a list of numbers, where a list is allowed), got {value!r}")
        return float(value)
    return check


def _sampler(value, *_) -> str:
    try:
        name = sampler_name(value) if isinstance(value, str) else value
    except ArgumentTypeError as error:  # an old fused name, "DPM++ 2M Karras"
        raise ValueError(f"'samplers': {error} (in a grid: the schedule key)") from None
    if name not in SAMPLERS:
        raise ValueError(f"'samplers': {value!r} is not a sampler; use one of {', '.join(SAMPLERS)}")
    return name


def _schedule(value) -> str:
    name = named(tuple(SCHEDULES))(value) if isinstance(value, str) else value
    if name not in SCHEDULES:
        raise ValueError(f"'schedule': {value!r} is not a schedule; use one of {', '.join(SCHEDULES)}")
    return name


def _model(value, base: Path) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'models' must be checkpoint paths (text) or '{DEFAULT_MODEL}', got {value!r}")
    if value == DEFAULT_MODEL:
        return value
    path = (base / Path(value).expanduser()).resolve()
    if not path.exists():
        raise ValueError(f"model {value!r} not found (looked at {path}); models are checkpoint files or diffusers "
                         f"folders, relative to the grid file's folder, or '{DEFAULT_MODEL}'")
    return str(path)


_LIST_CHECKS = {"prompts": _text("prompts"), "samplers": _sampler, "guidance": _number("guidance"), "models": _model}
_SINGLE_CHECKS = {"negative": _text("negative"), "steps": _whole("steps", 1), "width": _whole("width", 1),
                  "height": _whole("height", 1), "schedule": _schedule, "eta": _number("eta")}


def model_path(name: str) -> Path:
    """A grid's model as a path: the embedded default model for ``DEFAULT_MODEL``."""
    if name != DEFAULT_MODEL:
        return Path(name)
    path = Path(DEFAULT_MODELS["txt2img"]).resolve()
    if not path.is_file():
        raise ValueError(f"the embedded default model {path} is missing; name a checkpoint in 'models' or --model")
    return path


def model_facts(name: str, preset=None) -> ModelFacts:
    """A model's hash, sampler defaults and sizes, from its header and preset (no weights read), and a
    ValueError for a model that cannot generate from a prompt."""
    from ldm.tasks.txt2img import serves

    path = model_path(name)
    chosen = resolve_preset(path, preset)
    reason = serves(chosen.model)
    if reason is not None:
        raise ValueError(f"{path.name} {reason}")
    config = chosen.model
    return ModelFacts(path, model_hash(path), chosen.sampler, config.latent_size * config.downsampling_factor,
                      config.size_multiple)


def expand(grid: Grid, facts: dict[str, ModelFacts]) -> list[BatchJob]:
    """Every job of ``grid``, in the order models, prompts, seeds, samplers, guidance; each checked
    as the request it runs (``resolve_request``), its sides rounded as the request rounds them.
    ``facts`` holds a ``ModelFacts`` for each of ``grid.models``."""
    if grid.count > MAX_JOBS:
        raise ValueError(f"the grid makes {grid.count} jobs; at most {MAX_JOBS} are allowed in one batch")
    jobs: list[BatchJob] = []
    for name in grid.models:
        model = facts[name]
        for prompt, seed, sampler, scale in product(grid.prompts, grid.seeds, grid.samplers, grid.guidance):
            jobs.append(_checked(_job(grid, model, prompt, seed, sampler, scale), model))
    return list({job.id: job for job in jobs}.values())  # a job asked for twice is rendered once


def _job(grid: Grid, model: ModelFacts, prompt: str, seed: int, sampler: str | None, scale: float | None) -> BatchJob:
    defaults = model.defaults
    chosen = sampler or defaults.sampler
    own = chosen == defaults.sampler
    eta = grid.eta if grid.eta is not None else defaults.eta if own else get_sampler(chosen).eta_default
    schedule = grid.schedule or (defaults.schedule if own else "Automatic")
    return BatchJob(prompt=prompt, negative=grid.negative, seed=seed, sampler=chosen, schedule=schedule, eta=float(eta),
                    scale=float(scale if scale is not None else defaults.scale), steps=grid.steps or defaults.steps,
                    width=grid.width or model.size, height=grid.height or model.size, model_hash=model.hash,
                    model=str(model.path))


def _checked(job: BatchJob, model: ModelFacts) -> BatchJob:
    try:
        resolved, _ = resolve_request(job.request(), model.size_multiple)
    except ValueError as error:
        raise ValueError(f"job {job.prompt!r} (seed {job.seed}, {job.sampler}, guidance {job.scale:g}): {error}") from None
    return replace(job, width=resolved.width, height=resolved.height)

