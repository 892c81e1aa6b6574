"""Load a checkpoint: detect -> registry -> strict load -> report.

The model is built on the meta device (no random initialisation), the file's tensors are assigned
to it with ``strict=True``, and every key that is not a weight of the model must be one the
original training code is known to write (schedule buffers, EMA copies, logvar); anything else is
an error that names the file.

The weights are chosen and checked from the file's keys and shapes alone; then each chosen tensor is
read, converted to the requested device and dtype, and its file copy dropped before the next is read,
so that loading needs little more memory than the loaded weights (EMA copies not chosen are never read).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch

from ldm.checkpoints.detect import detect_file
from ldm.checkpoints.diffusers_folder import check_against_preset, fill_unused, open_folder, read_folder_state, unused_text_keys
from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.io import LazyState, open_state_dict
from ldm.checkpoints.loaded import LoadedModel, LoadReport
from ldm.checkpoints.presets import PRESET_DIR, ModelPreset, find_preset, list_presets
from ldm.devices import free_memory_mb
from ldm.kernels.memory_format import choose_memory_format
from ldm.kernels.paths import SpeedPaths, set_speed_paths
from ldm.models.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from ldm.models.sdxl_conditioner import SDXLConditionerConfig
from ldm.tasks.planning import own_size_estimate_mb
from ldm.text.lookup import tokenizer_for

log = logging.getLogger(__name__)

# Persistent buffers that DDPM.register_schedule writes, unprefixed, into every original checkpoint.
SCHEDULE_BUFFERS = frozenset(
    "betas alphas_cumprod alphas_cumprod_prev sqrt_alphas_cumprod sqrt_one_minus_alphas_cumprod "
    "log_one_minus_alphas_cumprod sqrt_recip_alphas_cumprod sqrt_recipm1_alphas_cumprod posterior_variance "
    "posterior_log_variance_clipped posterior_mean_coef1 posterior_mean_coef2 logvar".split()
)
KNOWN_EXTRA_SUFFIXES = ("embeddings.position_ids",)  # saved by transformers 4.x before it became non-persistent
# sgm's DiscreteDenoiser (SDXL) registers its sigma table as a buffer of the DiffusionEngine; the schedule is the preset's.
DENOISER_BUFFERS = frozenset({"denoiser.sigmas"})
EMA_PREFIX = "model_ema."
LOW_SCALE_PREFIX = "low_scale_model."  # the x4 upscaler's noise augmentation registers the schedule buffers again


def ema_key(key: str) -> str:
    """``model.diffusion_model.a.0.b`` -> ``model_ema.diffusion_modela0b`` (LitEma drops the dots)."""
    return EMA_PREFIX + key[len("model.") :].replace(".", "")


def unused_file_keys(config: LatentDiffusionConfig) -> set[str]:
    """Tensors a single file may lack that sampling never reads, filled with zeros and named in the report:
    the bigG's ``logit_scale`` of SDXL (some fine-tunes and merges leave it out)."""
    return unused_text_keys(config) if isinstance(config.cond_stage, SDXLConditionerConfig) else set()


def build_model(config: LatentDiffusionConfig, device: str | torch.device = "meta") -> LatentDiffusion:
    with torch.device(device):
        return LatentDiffusion(config)


def _is_known_extra(key: str) -> bool:
    return (key.removeprefix(LOW_SCALE_PREFIX) in SCHEDULE_BUFFERS or key in DENOISER_BUFFERS or key.startswith(EMA_PREFIX)
            or key.endswith(KNOWN_EXTRA_SUFFIXES))


FIRST_STAGE_PREFIX, COND_STAGE_PREFIX = "first_stage_model.", "cond_stage_model."


def check_first_stage_copies(state: Mapping[str, torch.Tensor], source: Path) -> set[str]:
    """The ``cond_stage_model.*`` keys of a model whose conditioning stage is its first stage
    (``__is_first_stage__``): the original registers the module twice, so a file may hold each first
    stage tensor again under the conditioning stage's name. Each must be an exact copy (of a file read
    lazily, each pair is read here, one pair at a time)."""
    copies = {k for k in state if k.startswith(COND_STAGE_PREFIX)}
    for key in sorted(copies):
        twin = FIRST_STAGE_PREFIX + key.removeprefix(COND_STAGE_PREFIX)
        if twin not in state:
            raise CheckpointError(f"{source}: {key} has no counterpart {twin}; this model's conditioning stage is its "
                                  "first stage, so cond_stage_model.* may only repeat first_stage_model.* tensors")
        copy, original = state[key], state[twin]
        if copy.shape != original.shape or not torch.equal(copy, original):
            raise CheckpointError(f"{source}: {key} differs from {twin}; this model's conditioning stage is its first "
                                  "stage, so the two copies must be identical (the file may be a merge or damaged)")
    return copies


class Selection(NamedTuple):
    sources: dict[str, str]  # each weight of the model -> the file's key it is read from
    used_ema: bool
    ignored: tuple[str, ...]  # the file's keys that are no weight of the model


def select_weights(
    state: Mapping[str, torch.Tensor], expected: set[str], ema: bool | None, source: Path, *, first_stage_copies: bool = False
) -> Selection:
    """Which of a file's entries give the model's weights, EMA copies swapped in when wanted (``ema=None``:
    when present); from the keys alone. Unknown extra keys raise. With ``first_stage_copies``,
    ``cond_stage_model.*`` copies of the first stage are checked (read) and ignored."""
    ema_keys = {k: ema_key(k) for k in expected if k.startswith("model.diffusion_model.")}
    has_ema = bool(ema_keys) and all(v in state for v in ema_keys.values())
    if ema and not has_ema:
        raise CheckpointError(f"{source}: EMA weights were asked for but the file has no complete EMA copy")
    use_ema = has_ema if ema is None else bool(ema)
    sources = {k: k for k in state if k in expected}
    if use_ema:
        sources.update(ema_keys)
    extra = sorted(k for k in state if k not in expected)
    copies = check_first_stage_copies(state, source) if first_stage_copies else set()
    unexpected = [k for k in extra if not _is_known_extra(k) and k not in copies]
    if unexpected:
        raise CheckpointError(
            f"{source}: {len(unexpected)} tensors do not belong to this model, e.g. {', '.join(unexpected[:3])}. "
            "The file may be of another family or a merge of several; strict loading refuses it."
        )
    return Selection(sources, use_ema, tuple(extra))


def _check_complete(shapes: dict[str, tuple[int, ...]], expected: dict[str, torch.Tensor], preset: ModelPreset,
                    source: Path) -> None:
    """``shapes``: each chosen weight's shape in the file."""
    missing = sorted(set(expected) - set(shapes))
    if missing:
        parts = sorted({k.split(".")[0] for k in missing})
        raise CheckpointError(
            f"{source}: {len(missing)} weights of the {preset.name} model are missing "
            f"(in {', '.join(parts)}), e.g. {', '.join(missing[:3])}"
        )
    wrong = [(k, shape, tuple(expected[k].shape)) for k, shape in shapes.items() if shape != tuple(expected[k].shape)]
    if wrong:
        k, got, want = wrong[0]
        raise CheckpointError(f"{source}: {len(wrong)} tensors have the wrong shape, e.g. {k} is {list(got)}, expected {list(want)}")


def read_weights(state: LazyState, sources: dict[str, str], device: str | torch.device,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Each weight read from its source entry onto ``device`` in ``dtype`` (floating point only), one at a time
    and converted as it is read (``LazyState.read``), so that the file's copy of the model never exists beside
    the converted one. The entries read are popped from ``state``."""
    stored = state.dtypes
    return {key: state.pop(source, device, dtype if stored[source].is_floating_point else None)
            for key, source in sources.items()}


def resolve_preset(path: Path, preset: str | Path | ModelPreset | None) -> ModelPreset:
    if isinstance(preset, ModelPreset):
        return preset
    if preset is not None:
        return find_preset(preset)
    detection = detect_file(path, list_presets())
    if detection.notice:
        log.warning("%s", detection.notice)
    return detection.preset


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    preset: str | Path | ModelPreset | None = None,
    ema: bool | None = None,
    tokenizer_dir: str | Path | None = None,
    memory_format: str = "contiguous",
    speed: SpeedPaths = SpeedPaths(),
) -> LoadedModel:
    """Detect, build, strictly load and report. ``memory_format``: "contiguous", "channels_last" or
    "auto" (the faster one for this model on ``device``: ``ldm.kernels.memory_format``).
    ``speed``: the faster sampling paths to use where they apply (``ldm.kernels.paths.SpeedPaths``; all but
    compiling by default)."""
    path = Path(path)
    chosen = resolve_preset(path, preset)
    model = build_model(chosen.model)
    expected = model.state_dict()
    folder = path.is_dir()  # a diffusers folder (one without model_index.json is refused by name)
    filled = ()
    if folder:  # its schedules must be the preset's; its own tokenizer unless one is given
        check_against_preset(path, chosen.model, chosen.name)
        tokenizer_dir = tokenizer_dir or open_folder(path).tokenizer_dir
        tensors = read_folder_state(path)  # read whole: its key maps reshape some tensors
        filled = fill_unused(tensors, expected, chosen.model)
        state = LazyState(path, tensors)
    else:
        state = open_state_dict(path)
        filled = tuple(sorted(k for k in unused_file_keys(chosen.model) if k in expected and k not in state))
    selection = select_weights(state, set(expected), ema, path, first_stage_copies=chosen.model.first_stage_conditions)
    shapes = state.shapes
    needed = expected if folder else {k: v for k, v in expected.items() if k not in filled}
    _check_complete({key: shapes[source] for key, source in selection.sources.items()}, needed, chosen, path)
    weights = read_weights(state, selection.sources, device, dtype)
    del state
    if not folder:  # a folder's were filled in its tensors before reading
        weights.update({k: torch.zeros(expected[k].shape, device=device, dtype=dtype) for k in filled})
    model.load_state_dict(weights, strict=True, assign=True)
    count = len(weights) - len(filled)
    del weights
    if model.encodes_tokens:  # text and layout encoders; not a spatial conditioner
        model.cond_stage_model.init_non_persistent_buffers()
        model.cond_stage_model.tokenizer = tokenizer_for(model.cond_stage_model, path, tokenizer_dir, preset_name=chosen.name,
                                                         vocabulary_root=PRESET_DIR.parent)
    layout = choose_memory_format(memory_format, torch.device(device), chosen.model.unet.model_channels)
    model = model.to(device=device, dtype=dtype, memory_format=layout).eval().requires_grad_(False)
    # Winograd's kernels only where they leave room for a generation beside them
    set_speed_paths(model, torch.device(device), speed, free_mb=free_memory_mb(torch.device(device)),
                    reserve_mb=own_size_estimate_mb(model))
    report = LoadReport(chosen.name, selection.used_ema, selection.ignored, count, filled)
    log.info("%s: %s", path, report.summary())
    return LoadedModel(model, chosen, path, report, torch.device(device), dtype)
