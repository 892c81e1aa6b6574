"""Model presets: YAML files in ``presets/models/`` read with OmegaConf into typed configs.

Config flows one way: YAML -> ``ModelPreset`` (validated here, at the boundary) -> constructor
arguments. A preset names an architecture, the key shapes that detect it in a checkpoint, and the
sampler defaults it was published with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.models.autoencoder import AutoencoderConfig
from ldm.models.clip import CLIPTextEncoderConfig, OpenCLIPTextEncoderConfig
from ldm.models.latent_diffusion import FirstStageConditionerConfig, LatentDiffusionConfig, NoiseAugmentationConfig
from ldm.models.ldm_bert import TransformerEmbedderConfig
from ldm.models.sdxl_conditioner import SDXLConditionerConfig
from ldm.models.spatial_rescaler import SpatialRescalerConfig
from ldm.models.unet import UNetConfig
from ldm.sampling.denoiser import PARAMETERIZATIONS
from ldm.sampling.samplers import SAMPLERS
from ldm.sampling.schedules import ScheduleConfig
from ldm.sampling.sigmas import SCHEDULES

PRESET_DIR = Path(__file__).resolve().parents[2] / "presets" / "models"
DEFAULT_WEIGHTS_DIR = PRESET_DIR.parents[1] / "weights" / "default"


def default_model_path(name: str) -> Path:
    """The shipped file of an embedded default model, e.g. ``default-txt2img``."""
    return DEFAULT_WEIGHTS_DIR / f"{name}.safetensors"


# The embedded model a task uses when none is named: "txt2img" (also layout and inpainting), "upscale".
DEFAULT_MODELS = {task: default_model_path(f"default-{task}") for task in ("txt2img", "upscale")}
UNSTATED = "unstated"  # in detect_prediction: a file whose metadata states no prediction type
COND_STAGE_KINDS = {
    "clip": CLIPTextEncoderConfig,
    "open_clip": OpenCLIPTextEncoderConfig,
    "transformer": TransformerEmbedderConfig,
    "first_stage": FirstStageConditionerConfig,  # the original's __is_first_stage__ (LDM inpainting_big)
    "spatial_rescaler": SpatialRescalerConfig,
    "sdxl": SDXLConditionerConfig,  # sgm's GeneralConditioner: text encoders ``clip`` and ``open_clip``, the ADM vector
}


@dataclass(frozen=True)
class SamplerDefaults:
    steps: int = 50
    scale: float = 7.5
    eta: float = 0.0
    sampler: str = "DDIM"  # a name of ldm.sampling.samplers.SAMPLERS; the original models' is DDIM
    schedule: str = "Automatic"  # a name of ldm.sampling.sigmas.SCHEDULES


def _sampler_defaults(raw: dict[str, Any], where: str) -> SamplerDefaults:
    defaults = _typed(SamplerDefaults, raw, where)
    if defaults.sampler not in SAMPLERS:
        raise ValueError(f"{where}: sampler {defaults.sampler!r} is not known; use one of {', '.join(SAMPLERS)}")
    if defaults.schedule not in SCHEDULES:
        raise ValueError(f"{where}: schedule {defaults.schedule!r} is not known; use one of {', '.join(SCHEDULES)}")
    return defaults


@dataclass(frozen=True)
class ModelPreset:
    name: str
    family: str
    description: str
    model: LatentDiffusionConfig
    detect: dict[str, tuple[int, ...]]  # key -> required shape
    sampler: SamplerDefaults
    source: Path
    # The prediction types a file may state (in its metadata) to be detected as this preset;
    # "unstated" admits files that state none. Default: the preset's own parameterization, or unstated.
    detect_prediction: tuple[str, ...] = ()
    # A preset with no ``detect`` section of its own whose files hold exactly the same tensors as the
    # named preset (e.g. a fine-tune at another training size): a file detected as that preset is
    # this one when an original config beside it says so, and the detection notice names it.
    variant_of: str = ""


def _typed(cls, values: dict[str, Any], where: str):
    """Build dataclass ``cls`` from a mapping, turning lists into tuples and naming unknown keys."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(fields))}")
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**converted)
    except TypeError as error:
        raise ValueError(f"{where}: {error}") from None


def _model_config(raw: dict[str, Any], where: str) -> LatentDiffusionConfig:
    raw = dict(raw)
    unet = _typed(UNetConfig, raw.pop("unet"), f"{where} model.unet")
    first_stage = _typed(AutoencoderConfig, raw.pop("first_stage"), f"{where} model.first_stage")
    schedule = _typed(ScheduleConfig, raw.pop("schedule", {}), f"{where} model.schedule")
    cond_raw = raw.pop("cond_stage", None)
    cond_stage = None
    if cond_raw is not None:
        cond_raw = dict(cond_raw)
        kind = cond_raw.pop("kind", None)
        if kind not in COND_STAGE_KINDS:
            raise ValueError(f"{where}: cond_stage kind {kind!r} is not known; use one of {', '.join(COND_STAGE_KINDS)}")
        if kind == "sdxl":
            cond_raw = _sdxl_encoders(cond_raw, f"{where} model.cond_stage")
        cond_stage = _typed(COND_STAGE_KINDS[kind], cond_raw, f"{where} model.cond_stage")
    augmentation_raw = raw.pop("noise_augmentation", None)
    augmentation = None
    if augmentation_raw is not None:
        augmentation_raw = dict(augmentation_raw)
        augmentation_schedule = _typed(ScheduleConfig, augmentation_raw.pop("schedule", {}), f"{where} model.noise_augmentation.schedule")
        augmentation = _typed(NoiseAugmentationConfig, dict(augmentation_raw, schedule=augmentation_schedule),
                              f"{where} model.noise_augmentation")
    return _typed(
        LatentDiffusionConfig,
        dict(raw, unet=unet, first_stage=first_stage, schedule=schedule, cond_stage=cond_stage,
             noise_augmentation=augmentation),
        f"{where} model",
    )


def _sdxl_encoders(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """An SDXL conditioner's ``clip`` and ``open_clip`` sections as their typed configs."""
    encoders = {"clip": CLIPTextEncoderConfig, "open_clip": OpenCLIPTextEncoderConfig}
    return {k: _typed(encoders[k], v, f"{where}.{k}") if k in encoders and v is not None else v for k, v in raw.items()}


def _detect_prediction(raw: Any, model: LatentDiffusionConfig, where: str) -> tuple[str, ...]:
    if raw is None:
        return (model.parameterization, UNSTATED)
    allowed = (*PARAMETERIZATIONS, UNSTATED)
    values = tuple(str(v) for v in raw) if isinstance(raw, list) else ()
    if not values or any(v not in allowed for v in values):
        raise ValueError(f"{where}: detect_prediction must be a list of {', '.join(allowed)}; got {raw!r}")
    return values


def preset_from_dict(raw: dict[str, Any], source: Path) -> ModelPreset:
    where = str(source)
    missing = [k for k in ("name", "model") if k not in raw]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
    detect = {str(k): tuple(int(d) for d in v) for k, v in (raw.get("detect") or {}).items()}
    model = _model_config(raw["model"], where)
    return ModelPreset(
        name=str(raw["name"]),
        family=str(raw.get("family", raw["name"])),
        description=str(raw.get("description", "")),
        model=model,
        detect=detect,
        sampler=_sampler_defaults(raw.get("sampler") or {}, f"{where} sampler"),
        source=source,
        detect_prediction=_detect_prediction(raw.get("detect_prediction"), model, where),
        variant_of=_variant_of(raw.get("variant_of"), detect, where),
    )


def _variant_of(raw: Any, detect: dict, where: str) -> str:
    if raw is None:
        return ""
    if not isinstance(raw, str) or not raw:
        raise ValueError(f"{where}: variant_of must name a preset, got {raw!r}")
    if detect:
        raise ValueError(f"{where}: a variant_of preset is detected through {raw}; it takes no detect section of its own")
    return raw


def read_preset(path: str | Path) -> ModelPreset:
    path = Path(path)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OSError, OmegaConfBaseException) as error:
        raise ValueError(f"cannot read model preset {path}: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a model preset must be a mapping at the top level")
    return preset_from_dict(raw, path)


def list_presets(folder: Path = PRESET_DIR) -> list[ModelPreset]:
    return [read_preset(p) for p in sorted(folder.glob("*.yaml"))]


def find_preset(name_or_path: str | Path, folder: Path = PRESET_DIR) -> ModelPreset:
    """A preset by name (``v1-inference``) or by the path of a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return read_preset(path)
    candidate = folder / f"{name_or_path}.yaml"
    if candidate.exists():
        return read_preset(candidate)
    known = ", ".join(p.stem for p in sorted(folder.glob("*.yaml")))
    raise ValueError(f"no model preset named {str(name_or_path)!r}; known presets: {known}")
