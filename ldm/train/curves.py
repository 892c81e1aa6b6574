"""Loss curves: each training stage keeps its loss history in its training state and draws it to a PNG
(log-scale loss against step) every time it saves, with PIL only."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
WIDTH, HEIGHT, MARGIN = 720, 420, 56


def smooth(values: list[float], window: int) -> list[float]:
    """Running mean over the previous ``window`` values."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(history: dict[str, list[tuple[int, float]]], path: str | Path, title: str) -> Path:
    """Draw each named series of (step, loss) as a smoothed line on a log axis; returns ``path``."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    series = {name: [(s, v) for s, v in points if v > 0 and math.isfinite(v)] for name, points in history.items()}
    series = {name: points for name, points in series.items() if points}
    draw.text((MARGIN, 12), title, fill="black")
    if not series:
        image.save(path)
        return Path(path)
    steps = [s for points in series.values() for s, _ in points]
    logs = [math.log10(v) for points in series.values() for _, v in points]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = math.floor(min(logs) * 2) / 2, math.ceil(max(logs) * 2) / 2 + 1e-9
    to_x = lambda s: MARGIN + (s - x0) / (x1 - x0) * (WIDTH - 2 * MARGIN)  # noqa: E731
    to_y = lambda v: HEIGHT - MARGIN - (math.log10(v) - y0) / (y1 - y0) * (HEIGHT - 2 * MARGIN)  # noqa: E731
    draw.rectangle([MARGIN, MARGIN, WIDTH - MARGIN, HEIGHT - MARGIN], outline="black")
    tick = y0
    while tick <= y1:
        y = to_y(10**tick)
        draw.line([MARGIN, y, WIDTH - MARGIN, y], fill=(225, 225, 225))
        draw.text((4, y - 6), f"{10**tick:.3g}", fill="black")
        tick += 0.5
    for frac in (0, 0.25, 0.5, 0.75, 1):
        s = x0 + frac * (x1 - x0)
        draw.text((to_x(s) - 12, HEIGHT - MARGIN + 6), f"{int(s)}", fill="black")
    draw.text((WIDTH // 2 - 12, HEIGHT - 22), "step", fill="black")
    for i, (name, points) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        values = smooth([v for _, v in points], max(1, len(points) // 50))
        draw.line([(to_x(s), to_y(v)) for (s, _), v in zip(points, values)], fill=colour, width=2)
        draw.text((WIDTH - MARGIN - 150, MARGIN + 8 + 14 * i), name, fill=colour)
    image.save(path)
    return Path(path)


class LossLog:
    """A stage's loss history, kept as JSON next to its training state (``<name>-losses.json``) and
    drawn to ``<name>-losses.png`` at every save. Resuming at step N drops entries after N."""

    def __init__(self, work_dir: str | Path, name: str, start: int):
        self.json_path = Path(work_dir) / f"{name}-losses.json"
        self.png_path = self.json_path.with_suffix(".png")
        self.title = f"{name} training loss"
        self.history: dict[str, list[tuple[int, float]]] = {}
        if start and self.json_path.exists():
            loaded = json.loads(self.json_path.read_text())
            self.history = {k: [(int(s), float(v)) for s, v in points if s <= start] for k, points in loaded.items()}

    def add(self, step: int, **values: float) -> None:
        for name, value in values.items():
            self.history.setdefault(name, []).append((step, float(value)))

    def save(self) -> None:
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(self.history))
        plot_losses(self.history, self.png_path, self.title)
