"""The procedural scene world the default model is trained on.

A scene is a background and one to four objects, each a coloured shape of a size at one of nine
places (a 3x3 grid: top left ... bottom right), with a caption written from templates in plain
English and the list of object boxes. Scenes are drawn from a seeded ``numpy`` generator, so a seed
gives the same scene, and rendered at any resolution with anti-aliasing (drawn larger, then reduced).

Background colours are muted and object colours saturated (or white and black), so objects stand
apart from every background; the detector in ``ldm.data.detector`` relies on that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 25),
    "orange": (250, 135, 20),
    "purple": (145, 45, 200),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star", "ring")
SIZES = {"small": 0.17, "large": 0.29}  # object extent as a fraction of the image side
# Grid cells (column, row) and the words that name them.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}  # fmt: skip
POSITION_PHRASES = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}  # fmt: skip
BACKGROUND_KINDS = ("plain", "gradient", "texture")
MUTED = [(150, 150, 150), (176, 164, 142), (122, 140, 152), (156, 172, 150), (186, 176, 196), (104, 110, 118)]
SKIES = [(150, 176, 198), (176, 186, 204), (190, 172, 160)]
GROUNDS = [(120, 132, 100), (140, 120, 96), (110, 116, 124)]
SUPERSAMPLE = 4
MAX_OBJECTS = 4


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    position: str
    cx: float  # centre, normalised to [0, 1]
    cy: float

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1), normalised."""
        half = SIZES[self.size] / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)


@dataclass(frozen=True)
class Background:
    kind: str
    colours: tuple[tuple[int, int, int], ...]
    seed: int  # for the texture


@dataclass(frozen=True)
class Scene:
    background: Background
    objects: tuple[SceneObject, ...]
    caption: str

    @property
    def boxes(self) -> list[tuple[str, float, float, float, float]]:
        return [(o.label, *o.box) for o in self.objects]


def cell_centre(position: str) -> tuple[float, float]:
    col, row = POSITIONS[position]
    return (col + 0.5) / 3, (row + 0.5) / 3


def sample_background(rng: np.random.Generator) -> Background:
    kind = BACKGROUND_KINDS[rng.integers(len(BACKGROUND_KINDS))]
    if kind == "gradient":
        colours = (SKIES[rng.integers(len(SKIES))], GROUNDS[rng.integers(len(GROUNDS))])
    else:
        first = rng.integers(len(MUTED))
        second = (first + 1 + rng.integers(len(MUTED) - 1)) % len(MUTED)
        colours = (MUTED[first], MUTED[second])
    return Background(kind, colours, int(rng.integers(2**31)))


def sample_objects(rng: np.random.Generator, count: int) -> tuple[SceneObject, ...]:
    """``count`` objects in distinct grid cells, jittered a little inside their cell."""
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    names = list(POSITIONS)
    objects = []
    for cell in cells:
        size = list(SIZES)[rng.integers(len(SIZES))]
        slack = (1 / 3 - SIZES[size]) / 2 * 0.8
        cx, cy = cell_centre(names[cell])
        objects.append(
            SceneObject(
                colour=list(COLOURS)[rng.integers(len(COLOURS))],
                shape=SHAPES[rng.integers(len(SHAPES))],
                size=size,
                position=names[cell],
                cx=cx + rng.uniform(-slack, slack),
                cy=cy + rng.uniform(-slack, slack),
            )
        )
    return tuple(objects)


def describe(obj: SceneObject, with_size: bool) -> str:
    words = f"{obj.size} {obj.colour}" if with_size else obj.colour
    article = "an" if words[0] in "aeiou" else "a"
    return f"{article} {words} {obj.shape} {POSITION_PHRASES[obj.position]}"


def write_caption(objects: tuple[SceneObject, ...], rng: np.random.Generator) -> str:
    parts = [describe(o, with_size=bool(rng.integers(2))) for o in objects]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def sample_scene(rng: np.random.Generator, max_objects: int = MAX_OBJECTS) -> Scene:
    objects = sample_objects(rng, int(rng.integers(1, max_objects + 1)))
    return Scene(sample_background(rng), objects, write_caption(objects, rng))


def scene_from_seed(seed: int, max_objects: int = MAX_OBJECTS) -> Scene:
    return sample_scene(np.random.default_rng(seed), max_objects)



def vocabulary(grid: int) -> list[str]:
    """The tokens of the world's word-and-layout vocabulary (``presets/tokenizers/default-words.txt``
    holds them, one a line): specials, caption words, object classes, grid cells."""
    words = {"a", "an", "and", ",", "there", "is", "with"}
    words |= set(COLOURS) | set(SHAPES) | set(SIZES)
    for phrase in POSITION_PHRASES.values():
        words |= set(phrase.split())
    classes = [f"<class:{c} {s}>" for c in COLOURS for s in SHAPES]
    return ["<pad>", "<unk>", *sorted(words), *classes, *(f"<grid:{i}>" for i in range(grid * grid))]

def _background_array(background: Background, size: int) -> np.ndarray:
    a, b = (np.array(c, dtype=np.float32) for c in background.colours)
    if background.kind == "plain":
        return np.broadcast_to(a, (size, size, 3)).copy()
    ys = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    if background.kind == "gradient":  # sky over ground, horizon a little below the middle
        t = np.clip((ys - 0.45) / 0.25 + 0.5, 0, 1)
        return np.broadcast_to(a * (1 - t) + b * t, (size, size, 3)).copy()
    # texture: soft diagonal stripes of the two colours, at a seeded angle and frequency
    rng = np.random.default_rng(background.seed)
    angle, frequency = rng.uniform(0, math.pi), rng.uniform(3, 6)
    xs = np.linspace(0, 1, size, dtype=np.float32)[None, :, None]
    wave = 0.5 + 0.5 * np.sin(2 * math.pi * frequency * (xs * math.cos(angle) + ys * math.sin(angle)))
    return a * (1 - wave) + b * wave


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * math.sin(math.pi / 3), cy + r / 2), (cx - r * math.sin(math.pi / 3), cy + r / 2)]
    # five-pointed star: alternate outer and inner radius
    return [
        (cx + (r if k % 2 == 0 else 0.45 * r) * math.sin(k * math.pi / 5), cy - (r if k % 2 == 0 else 0.45 * r) * math.cos(k * math.pi / 5))
        for k in range(10)
    ]


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, size: int) -> None:
    colour = COLOURS[obj.colour]
    cx, cy, r = obj.cx * size, obj.cy * size, SIZES[obj.size] * size / 2
    bounds = [cx - r, cy - r, cx + r, cy + r]
    if obj.shape == "circle":
        draw.ellipse(bounds, fill=colour)
    elif obj.shape == "square":
        inset = r * 0.12
        draw.rectangle([cx - r + inset, cy - r + inset, cx + r - inset, cy + r - inset], fill=colour)
    elif obj.shape == "ring":
        draw.ellipse(bounds, outline=colour, width=max(1, round(r * 0.4)))
    else:
        draw.polygon(_shape_points(obj.shape, cx, cy + (r * 0.12 if obj.shape == "triangle" else 0), r), fill=colour)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB image of ``size`` x ``size``, anti-aliased."""
    big = size * SUPERSAMPLE
    canvas = Image.fromarray(np.clip(_background_array(scene.background, big), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        draw_object(draw, obj, big)
    return canvas.resize((size, size), Image.Resampling.BOX)


def render_batch(seeds, size: int = 64, max_objects: int = MAX_OBJECTS) -> tuple[np.ndarray, list[Scene]]:
    """(N, size, size, 3) uint8 images and their scenes for the given seeds."""
    scenes = [scene_from_seed(int(s), max_objects) for s in seeds]
    return np.stack([np.asarray(render(s, size)) for s in scenes]), scenes
