"""Sampler presets: named settings of steps, eta and (optionally) guidance in ``presets/samplers/``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.tasks.request import MAX_SCALE, MAX_STEPS

SAMPLER_PRESET_DIR = Path(__file__).resolve().parents[2] / "presets" / "samplers"


@dataclass(frozen=True)
class SamplerPreset:
    name: str
    description: str
    steps: int
    eta: float
    scale: float | None = None  # None: keep the model's (or the user's) guidance scale


def _check(raw: dict, where: Path) -> SamplerPreset:
    unknown = set(raw) - {"name", "description", "steps", "eta", "scale"}
    if unknown:
        raise ValueError(f"{where}: unknown sampler preset keys {sorted(unknown)}; allowed: name, description, steps, eta, scale")
    try:
        preset = SamplerPreset(str(raw["name"]), str(raw.get("description", "")), int(raw["steps"]), float(raw["eta"]),
                               None if raw.get("scale") is None else float(raw["scale"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{where}: a sampler preset needs name, steps and eta ({error})") from None
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
            raise ValueError(f"{path}: a sampler preset is a mapping of name, steps, eta")
        presets.append(_check(raw, path))
    return sorted(presets, key=lambda p: (p.steps, p.eta, p.name))
