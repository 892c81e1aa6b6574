"""What a checkpoint (a file or a diffusers folder) or preset is: its family, its parts, and every key with its shape."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ldm.checkpoints.detect import detect, file_prediction
from ldm.checkpoints.diffusers_folder import open_folder, read_folder_shapes
from ldm.checkpoints.io import read_key_shapes_and_metadata
from ldm.checkpoints.loader import EMA_PREFIX, build_model
from ldm.checkpoints.presets import ModelPreset, find_preset, list_presets


@dataclass(frozen=True)
class InspectReport:
    target: str
    preset: ModelPreset
    shapes: dict[str, tuple[int, ...]]
    metadata: dict
    notice: str = ""

    def describe(self) -> str:
        groups: dict[str, int] = {}
        for key, shape in self.shapes.items():
            part = "model_ema" if key.startswith(EMA_PREFIX) else key.split(".")[0]
            count = 1
            for d in shape:
                count *= d
            groups[part] = groups.get(part, 0) + count
        lines = [
            f"{self.target}",
            f"  family: {self.preset.family} (preset {self.preset.name})",
            f"  {self.preset.description}",
            f"  tensors: {len(self.shapes)}",
        ]
        lines += [f"  {part}: {count / 1e6:.1f} M values" for part, count in sorted(groups.items())]
        lines += [f"  {k}: {v}" for k, v in self.metadata.items()]
        if self.notice:
            lines.append(f"  note: {self.notice}")
        return "\n".join(lines)


def inspect_target(target: str) -> InspectReport:
    path = Path(target)
    if path.is_file() and path.suffix not in (".yaml", ".yml"):
        shapes, metadata = read_key_shapes_and_metadata(path)
        detection = detect(shapes, list_presets(), path, file_prediction(path, metadata))
        return InspectReport(str(path), detection.preset, dict(shapes), metadata, detection.notice)
    if path.is_dir():  # its tensors under the original keys, and what its model_index and scheduler say
        folder = open_folder(path)
        shapes = read_folder_shapes(path)
        detection = detect(shapes, list_presets(), path, folder.prediction)
        return InspectReport(str(path), detection.preset, shapes, folder.metadata(), detection.notice)
    preset = find_preset(target)
    model = build_model(preset.model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return InspectReport(f"preset {preset.name} ({preset.source})", preset, shapes, {})
