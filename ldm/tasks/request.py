"""Generation requests: every user-facing parameter validated up front, with messages that teach."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

from ldm.addons.tags import extract_lora_tags

from ldm.sampling.lcm import ORIGINAL_STEPS as LCM_STEPS
from ldm.sampling.samplers import SAMPLERS
from ldm.sampling.sigmas import SCHEDULES
from ldm.text.prompt_syntax import check_emphasis, parse_emphasis, prompt_schedule

MAX_STEPS = 1000
MAX_SIDE = 4096
MAX_BATCH = 16
MAX_SCALE = 50.0
MAX_S_NOISE = 2.0
MAX_SEED = 2**32 - 1
MAX_REGIONS = 16
MAX_BUDGET_MB = 1 << 20
TILING_MODES = ("auto", "always", "off")
DEFAULT_BUDGET_MB = 2048


@dataclass(frozen=True)
class TilingOptions:
    """``mode``: "auto" tiles when the whole canvas would exceed ``budget_mb``, "always" tiles any
    canvas larger than a tile, "off" never tiles. ``tile`` and ``overlap`` are in pixels; a tile of 0
    is the model's training size, an overlap of -1 a quarter of the tile."""

    mode: str = "auto"
    tile: int = 0
    overlap: int = -1
    budget_mb: int = DEFAULT_BUDGET_MB


@dataclass(frozen=True)
class RegionPrompt:
    """A prompt for one box (x0, y0, x1, y1, normalised to [0, 1]); ``strength`` in (0, 1] is how far
    it replaces the global prompt inside the box; an empty negative prompt takes the global one."""

    prompt: str
    box: tuple[float, float, float, float]
    negative_prompt: str = ""
    strength: float = 1.0


@dataclass(frozen=True)
class SizeConditioningOptions:
    """SDXL's size conditioning (other models take none): sizes are (height, width) in pixels, None for
    the size of the image generated; the crop is (top, left). The defaults are AUTOMATIC1111's: original
    and target size the image's, crop 0, 0; the refiner's aesthetic score 6.0, its negative prompt's 2.5."""

    original_size: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 50
    scale: float = 7.5
    eta: float = 0.0
    sampler: str = "DDIM"  # a name of ldm.sampling.samplers.SAMPLERS
    schedule: str = "Automatic"  # a name of ldm.sampling.sigmas.SCHEDULES; "Automatic": the sampler's own
    s_noise: float = 1.0  # the scale of the noise the ancestral and SDE samplers add
    seed: int = -1  # -1: a random seed, chosen when the request is resolved
    width: int = 512
    height: int = 512
    batch_size: int = 1
    boxes: tuple = ()  # layout: (label, x0, y0, x1, y1) with coordinates normalised to [0, 1]
    regions: tuple[RegionPrompt, ...] = ()
    tiling: TilingOptions = TilingOptions()
    emphasis: str = "Original"  # how prompt weights are applied: ldm.models.clip.EMPHASIS_MODES
    lora_dirs: tuple[Path, ...] = ()  # where the prompts' <lora:NAME> tags are looked up (ldm.addons.library)
    embedding_dirs: tuple[Path, ...] = ()  # where the textual-inversion embeddings the prompts name are (ldm.addons.embeddings)
    size_conditioning: SizeConditioningOptions = SizeConditioningOptions()  # SDXL's ADM vector

    def prompts(self) -> list[str]:
        """Every prompt of the request: the prompt, the negative prompt, then each region's."""
        return [self.prompt, self.negative_prompt, *(p for r in self.regions for p in (r.prompt, r.negative_prompt))]


def _number(name: str, value, low: float, high: float, integer: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number from {low:g} to {high:g}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number from {low:g} to {high:g}, got {value}")
    if integer and value != int(value):
        raise ValueError(f"{name} must be a whole number, got {value}")
    if not low <= value <= high:
        # an int beyond a float's range (or too long to print) is named by its size
        shown = f"{value:g}" if isinstance(value, float) or abs(value) < 1e300 else f"a number of about 10^{int(value.bit_length() * 0.30103)}"
        raise ValueError(f"{name} must be between {low:g} and {high:g}, got {shown}")


def checked_number(name: str, value, low: float, high: float, integer: bool = False) -> int | float:
    """``value`` if it is a finite number from ``low`` to ``high`` (a whole one when ``integer``), as an
    int or a float; otherwise a ValueError naming ``name``, the value and the range."""
    _number(name, value, low, high, integer)
    return int(value) if integer else float(value)


def regions_from_boxes(boxes, details=()) -> tuple[RegionPrompt, ...]:
    """Layout boxes (label, x0, y0, x1, y1) as region prompts, each label the prompt of its box;
    ``details`` gives boxes, in order, a (negative prompt, strength) of their own (default: none, 1)."""
    details = list(details) + [("", 1.0)] * (len(boxes) - len(details))
    return tuple(RegionPrompt(label, (x0, y0, x1, y1), negative, strength)
                 for (label, x0, y0, x1, y1), (negative, strength) in zip(boxes, details))


def check_corners(name: str, corners) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) normalised to [0, 1], with x0 < x1 and y0 < y1."""
    if not isinstance(corners, (tuple, list)) or len(corners) != 4:
        raise ValueError(f"{name} must be (x0, y0, x1, y1), got {corners!r}")
    for axis, value in zip(("x0", "y0", "x1", "y1"), corners):
        _number(f"{name} {axis}", value, 0.0, 1.0)
    x0, y0, x1, y1 = corners
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"{name} has no area: it needs x0 < x1 and y0 < y1, got ({x0}, {y0}, {x1}, {y1})")
    return (float(x0), float(y0), float(x1), float(y1))


def check_box(index: int, box) -> tuple[str, float, float, float, float]:
    """A layout box (label, x0, y0, x1, y1), corners normalised to [0, 1], x0 < x1 and y0 < y1."""
    name = f"box {index + 1}"
    if not isinstance(box, (tuple, list)) or len(box) != 5 or not isinstance(box[0], str) or not box[0].strip():
        raise ValueError(f"{name} must be (label, x0, y0, x1, y1) with a non-empty label, got {box!r}")
    return (box[0].strip(), *check_corners(f"{name} ({box[0].strip()})", box[1:]))


def check_region(index: int, region) -> RegionPrompt:
    name = f"region {index + 1}"
    if not isinstance(region, RegionPrompt):
        raise ValueError(f"{name} must be a RegionPrompt(prompt, box), got {region!r}")
    if not isinstance(region.prompt, str) or not region.prompt.strip():
        raise ValueError(f"{name} needs a prompt")
    if not isinstance(region.negative_prompt, str):
        raise ValueError(f"{name}'s negative prompt must be text")
    box = check_corners(f"{name} box", region.box)
    _number(f"{name} strength", region.strength, 0.0, 1.0)
    if region.strength == 0:
        raise ValueError(f"{name} strength must be more than 0 (up to 1), got 0")
    return replace(region, box=box, strength=float(region.strength))


def check_tiling(tiling) -> TilingOptions:
    if not isinstance(tiling, TilingOptions):
        raise ValueError(f"tiling must be TilingOptions, got {tiling!r}")
    if tiling.mode not in TILING_MODES:
        raise ValueError(f"tiling mode must be one of {', '.join(TILING_MODES)}, got {tiling.mode!r}")
    _number("tile size", tiling.tile, 0, MAX_SIDE, integer=True)
    _number("tile overlap", tiling.overlap, -1, MAX_SIDE, integer=True)
    _number("memory budget (MB)", tiling.budget_mb, 1, MAX_BUDGET_MB, integer=True)
    return replace(tiling, tile=int(tiling.tile), overlap=int(tiling.overlap), budget_mb=int(tiling.budget_mb))


def check_size_conditioning(options) -> SizeConditioningOptions:
    if not isinstance(options, SizeConditioningOptions):
        raise ValueError(f"size_conditioning must be SizeConditioningOptions, got {options!r}")
    pairs = {"original size": (options.original_size, 1), "target size": (options.target_size, 1),
             "crop top-left": (options.crop_top_left, 0)}
    checked = []
    for name, (pair, low) in pairs.items():
        if pair is None and name != "crop top-left":
            checked.append(None)
            continue
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"{name} must be (height, width) in pixels{', or None for the image size' if low else ''}, got {pair!r}")
        checked.append(tuple(checked_number(f"{name} {axis}", v, low, 4 * MAX_SIDE, integer=True)
                             for axis, v in zip(("height", "width") if low else ("top", "left"), pair)))
    return SizeConditioningOptions(
        *checked, aesthetic_score=checked_number("aesthetic score", options.aesthetic_score, 0.0, 10.0),
        negative_aesthetic_score=checked_number("negative aesthetic score", options.negative_aesthetic_score, 0.0, 10.0))


def round_side(name: str, value: int, multiple: int, notices: list[str]) -> int:
    _number(name, value, 1, MAX_SIDE, integer=True)
    rounded = max(multiple, int(round(value / multiple)) * multiple)
    if rounded != value:
        notices.append(f"{name} {value} is not a multiple of {multiple}; using {rounded}")
    return rounded


def check_model(serves, loaded) -> None:
    """Refuse a model its task does not serve: ``serves(config)`` is None or says why not (a phrase
    after the model's name), and ``loaded`` has the model and its ``name``."""
    reason = serves(loaded.model.config)
    if reason is not None:
        raise ValueError(f"{loaded.name} {reason}")


def check_sampler(sampler, schedule, steps: int) -> None:
    """A known sampler and schedule, by name, and a number of steps the sampler's own timesteps have."""
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not known; use one of {', '.join(SAMPLERS)}")
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not known; use one of {', '.join(SCHEDULES)}")
    if sampler == "LCM" and schedule == "Automatic" and steps > LCM_STEPS:
        raise ValueError(f"LCM's own schedule has 1 to {LCM_STEPS} steps, got {steps}; use fewer steps or another "
                         "schedule")


def check_prompt_syntax(request: GenerationRequest, regions: tuple[RegionPrompt, ...]) -> None:
    """Every prompt's emphasis weights within range, at every step of its schedule (a
    ``PromptWeightError``, a ValueError naming the range, otherwise)."""
    prompts = [request.prompt, request.negative_prompt, *(p for r in regions for p in (r.prompt, r.negative_prompt))]
    for prompt in prompts:
        for entry in prompt_schedule(prompt, int(request.steps)):
            parse_emphasis(entry.text)


def resolve_request(request: GenerationRequest, size_multiple: int) -> tuple[GenerationRequest, list[str]]:
    """Check every field and return the request as it will run (sides rounded, seed chosen),
    with notices for what was changed. Raises ValueError naming the field, value and range."""
    if not isinstance(request.prompt, str) or not isinstance(request.negative_prompt, str):
        raise ValueError("prompt and negative prompt must be text")
    _number("steps", request.steps, 1, MAX_STEPS, integer=True)
    check_sampler(request.sampler, request.schedule, request.steps)
    _number("guidance scale", request.scale, 0.0, MAX_SCALE)
    _number("eta", request.eta, 0.0, 1.0)
    _number("s_noise (sigma noise)", request.s_noise, 0.0, MAX_S_NOISE)
    _number("batch size", request.batch_size, 1, MAX_BATCH, integer=True)
    _number("seed", request.seed, -1, MAX_SEED, integer=True)
    boxes = tuple(check_box(i, b) for i, b in enumerate(request.boxes))
    if len(request.regions) > MAX_REGIONS:
        raise ValueError(f"{len(request.regions)} region prompts given; at most {MAX_REGIONS} are allowed")
    regions = tuple(check_region(i, r) for i, r in enumerate(request.regions))
    for prompt in request.prompts():
        extract_lora_tags(prompt)  # a malformed <lora:...> tag is refused here, before any work
    tiling = check_tiling(request.tiling)
    size_conditioning = check_size_conditioning(request.size_conditioning)
    check_emphasis(request.emphasis)
    check_prompt_syntax(request, regions)
    notices: list[str] = []
    width = round_side("width", request.width, size_multiple, notices)
    height = round_side("height", request.height, size_multiple, notices)
    seed = random.randrange(MAX_SEED) if request.seed == -1 else int(request.seed)
    resolved = replace(
        request, steps=int(request.steps), scale=float(request.scale), eta=float(request.eta),
        s_noise=float(request.s_noise), width=width, height=height, seed=seed, batch_size=int(request.batch_size),
        boxes=boxes, regions=regions, tiling=tiling, size_conditioning=size_conditioning,
    )
    return resolved, notices
