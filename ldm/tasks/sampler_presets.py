"""Sampler presets: named settings of sampler, schedule, steps, eta and (optionally) guidance in
``presets/samplers/``. A preset that names no sampler is DDIM's; one that gives no eta takes its
sampler's default (1 for the ancestral and SDE samplers, 0 otherwise)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.sampling.samplers import SAMPLERS
from ldm.tasks.request import MAX_SCALE, MAX_STEPS, check_sampler

SAMPLER_PRESET_DIR = Path(__file__).resolve().parents[2] / "presets" / "samplers"
KEYS = ("name", "description", "sampler", "schedule", "steps", "eta", "scale")


@dataclass(frozen=True)
class SamplerPreset:
    name: str
    description: str
    steps: int
    eta: float
    scale: float | None = None  # None: keep the model's (or the user's) guidance scale
    sampler: str = "DDIM"  # a name of ldm.sampling.samplers.SAMPLERS
    schedule: str = "Automatic"  # a name of ldm.sampling.sigmas.SCHEDULES


def _check(raw: dict, where: Path) -> SamplerPreset:
    unknown = set(raw) - set(KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown sampler preset keys {sorted(unknown)}; allowed: {', '.join(KEYS)}")
    sampler, schedule = str(raw.get("sampler", "DDIM")), str(raw.get("schedule", "Automatic"))
    try:
        steps = int(raw["steps"])
        check_sampler(sampler, schedule, steps)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{where}: a sampler preset needs a name and steps, and a known sampler and schedule "
                         f"({error})") from None
    eta = raw.get("eta")
    try:
        preset = SamplerPreset(str(raw["name"]), str(raw.get("description", "")), steps,
                               SAMPLERS[sampler].eta_default if eta is None else float(eta),
                               None if raw.get("scale") is None else float(raw["scale"]), sampler, schedule)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{where}: a sampler preset needs name and steps, and numbers for eta and scale ({error})") from None
    if not 1 <= preset.steps <= MAX_STEPS or not 0.0 <= preset.eta <= 1.0:
        raise ValueError(f"{where}: steps must be 1 to {MAX_STEPS} and eta 0 to 1, got {preset.steps} and {preset.eta}")
    if preset.scale is not None and not 0.0 <= preset.scale <= MAX_SCALE:
        raise ValueError(f"{where}: scale must be 0 to {MAX_SCALE}, got {preset.scale}")
    return preset


def read_sampler_presets(folder: Path = SAMPLER_PRESET_DIR) -> list[SamplerPreset]:
    """The presets in ``folder``, fewest steps first."""
    presets = []
    for path in sorted(Path(folder).glob("*.yaml")):
        try:
            raw = OmegaConf.to_container(OmegaConf.load(path))
        except (OSError, OmegaConfBaseException) as error:
            raise ValueError(f"{path}: cannot read the sampler preset ({error})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a sampler preset is a mapping of name, sampler, schedule, steps, eta")
        presets.append(_check(raw, path))
    return sorted(presets, key=lambda p: (p.steps, p.eta, p.name))
