"""The default model's three stages, run from the command line (``python -m ldm train STAGE``), and
the export of trained weights to ``weights/default/`` in the original checkpoint layout.

A stage resumes from its training state in the work folder; without one it starts from the shipped
weights when they fit (same architecture and, for the diffusion stages, the same autoencoder), so
training can go on across machines that only have the repository; otherwise from scratch."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm.checkpoints.io import open_state_dict
from ldm.checkpoints.presets import PRESET_DIR, default_model_path
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.train.common import read_recipe, same_shapes, same_tensors

log = logging.getLogger(__name__)

RECIPES = PRESET_DIR.parent / "train"


def shipped_weights(name: str, prefix: str) -> dict[str, torch.Tensor] | None:
    """The tensors under ``prefix`` of a shipped default file, in float32, or None when absent."""
    path = default_model_path(name)
    if not path.is_file():
        return None
    state = open_state_dict(path)  # only the tensors under prefix are read, each converted as it is read
    return {k[len(prefix) :]: state.read(k, dtype=torch.float32) for k in state if k.startswith(prefix)}


def autoencoder_weights(work_dir: Path) -> dict[str, torch.Tensor]:
    """The stage-1 autoencoder: from its training state, else from the shipped default model."""
    state = work_dir / "autoencoder-state.pt"
    if state.exists():
        return torch.load(state, map_location="cpu", weights_only=True)["model"]
    shipped = shipped_weights("default-txt2img", "first_stage_model.")
    if shipped is None:
        raise ValueError(f"{state} is missing: train the autoencoder first (python -m ldm train autoencoder)")
    log.info("using the shipped default model's autoencoder")
    return shipped


def export(model: LatentDiffusion, name: str) -> Path:
    """Write the model as an original-layout single file (fp16) and record its latent scale in its preset."""
    path = default_model_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "trained_by": "LDM Studio (python -m ldm train)"})
    set_preset_scale(PRESET_DIR / f"{name}.yaml", model.config.scale_factor)
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def set_preset_scale(preset: Path, value: float) -> None:
    text = preset.read_text()
    updated, count = re.subn(r"(?m)^(\s*scale_factor:)\s*[^#\n]*", rf"\g<1> {value:.6f} ", text, count=1)
    if count != 1:
        raise ValueError(f"{preset} has no scale_factor line to update")
    preset.write_text(updated)


def model_name(recipe: Path) -> str:
    return read_recipe(recipe)["preset"]


def stage_of(recipe: Path) -> str:
    """"autoencoder" for a stage-1 recipe, else the recipe's task ("txt2img" or "upscale")."""
    if not recipe.is_file():
        raise ValueError(f"{recipe}: no such training recipe (see presets/train/)")
    raw = read_recipe(recipe)
    stage = "autoencoder" if "autoencoder" in raw else raw.get("task")
    if stage not in ("autoencoder", "txt2img", "upscale"):
        raise ValueError(f"{recipe}: a recipe has an 'autoencoder' section or a task of txt2img or upscale")
    return stage


def train_stage(stage: str | None, work_dir: Path, steps: int | None = None, device: str = "cpu",
                recipe: str | Path | None = None, from_scratch: bool = False, workers: int = 0) -> None:
    """Train one stage from its recipe (by default ``presets/train/default-<stage>.yaml``).
    ``from_scratch`` ignores the shipped weights, so the recipe is reproduced as written (a training
    state in ``work_dir`` is still resumed); ``workers`` processes draw the training scenes ahead."""
    if recipe is not None:
        stage = stage_of(Path(recipe))
    recipe = Path(recipe) if recipe is not None else RECIPES / f"default-{stage}.yaml"
    if stage == "autoencoder":
        from ldm.models.autoencoder import Autoencoder
        from ldm.train.autoencoder import recipe_config, train_autoencoder

        shipped = None if from_scratch else shipped_weights("default-txt2img", "first_stage_model.")
        fits = shipped is not None and same_shapes(shipped, Autoencoder(recipe_config(recipe)).state_dict())
        if shipped is not None and not fits:
            log.info("the shipped autoencoder has another architecture than the recipe: training from scratch")
        train_autoencoder(recipe, work_dir, steps, device, init=shipped if fits else None, workers=workers)
        return
    from ldm.train.diffusion import train_diffusion

    autoencoder = autoencoder_weights(work_dir)
    init = None if from_scratch else shipped_weights(f"default-{stage}", "")
    if init is not None and not same_tensors({k[len("first_stage_model.") :]: v for k, v in init.items()
                                              if k.startswith("first_stage_model.")}, autoencoder):
        log.info("the shipped %s model was trained over another autoencoder: training from scratch", stage)
        init = None
    model = train_diffusion(recipe, work_dir, autoencoder, steps, device, init, workers)
    export(model, model_name(recipe))
