"""The scene detector and the scores built on it, against rendered scenes of the procedural world."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from PIL import Image

from ldm.data import world
from ldm.data.detector import Detection, detect, label_components
from ldm.data.scoring import (
    CaptionScore,
    box_iou,
    caption_adherence,
    caption_score,
    coloured_in_place,
    layout_iou,
    match_objects,
    psnr,
)
from ldm.data.world import MUTED, Background, Scene, SceneObject, cell_centre

SEEDS = range(20_000, 20_200)  # the detector's thresholds were calibrated on seeds 1000-1299


@dataclasses.dataclass(frozen=True)
class Tally:
    objects: float  # share of objects found with the right colour, shape and place
    scenes: float  # share of scenes whose caption holds
    layout_iou: float  # mean over scenes
    extra: float  # detections of a colour that no object has in that cell, per object


def tally(images, scenes) -> Tally:
    found = objects = adherent = extra = 0
    ious = []
    for image, scene in zip(images, scenes):
        detections = detect(image)
        score = caption_score(scene, detections)
        found, objects, adherent = found + score.objects_found, objects + score.objects, adherent + score.all_correct
        ious.append(layout_iou(scene, detections))
        asked = {(o.colour, o.position) for o in scene.objects}
        extra += sum((d.colour, d.position) not in asked for d in detections)
    return Tally(found / objects, adherent / len(scenes), float(np.mean(ious)), extra / objects)


def blur_and_noise(image: np.ndarray, seed: int) -> np.ndarray:
    """What a generator might make of a render: a 2x bilinear down-up resample and noise of 8 / 255."""
    size = image.shape[0]
    small = Image.fromarray(image).resize((size // 2, size // 2), Image.Resampling.BILINEAR)
    blurred = np.asarray(small.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64)
    noisy = blurred + np.random.default_rng(seed).normal(0.0, 8.0, blurred.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def renders() -> tuple[np.ndarray, list[Scene]]:
    return world.render_batch(SEEDS, 64)


# --- detection on renders ------------------------------------------------------------------


def test_rendered_scenes_at_64_px_are_recovered(renders):
    result = tally(*renders)  # measured: objects 1.0, scenes 1.0, layout IoU 0.947, extra 0
    assert result.objects >= 0.99
    assert result.scenes >= 0.97
    assert result.layout_iou >= 0.9
    assert result.extra <= 0.01


def test_blurred_noisy_renders_still_mostly_hold(renders):
    images, scenes = renders
    degraded = [blur_and_noise(image, seed) for image, seed in zip(images, SEEDS)]
    result = tally(degraded, scenes)  # measured: objects 0.982, scenes 0.955, layout IoU 0.912, extra 0
    assert result.objects >= 0.96
    assert result.scenes >= 0.9
    assert result.layout_iou >= 0.88
    assert result.extra <= 0.01


@pytest.mark.parametrize(("size", "count"), [(128, 12), (256, 4)])
def test_larger_renders_are_recovered(size, count):
    images, scenes = world.render_batch(SEEDS[:count], size)
    result = tally(images, scenes)
    assert result.scenes == 1.0
    assert result.layout_iou >= 0.93
    assert result.extra == 0


def test_blank_backgrounds_give_no_detections():
    rng = np.random.default_rng(7)
    backgrounds = [world.sample_background(rng) for _ in range(24)]
    backgrounds += [Background(kind, (MUTED[4], MUTED[5]), 3) for kind in ("plain", "texture")]  # lightest, darkest
    assert {b.kind for b in backgrounds} == set(world.BACKGROUND_KINDS)
    for index, background in enumerate(backgrounds):
        image = np.asarray(world.render(Scene(background, (), ""), 64))
        assert detect(image) == [], background
        assert detect(blur_and_noise(image, index)) == [], background


@pytest.mark.parametrize(
    ("colour", "shape", "size", "position"),
    [
        ("red", "circle", "small", "top left"),
        ("green", "square", "large", "top right"),
        ("blue", "triangle", "large", "center"),
        ("yellow", "star", "small", "bottom left"),
        ("white", "ring", "large", "bottom right"),
        ("black", "star", "large", "left"),
        ("purple", "ring", "small", "top"),
        ("orange", "triangle", "small", "bottom"),
    ],
)
def test_one_rendered_shape_gives_exactly_that_detection(colour, shape, size, position):
    obj = SceneObject(colour, shape, size, position, *cell_centre(position))
    scene = Scene(Background("plain", (MUTED[0], MUTED[1]), 0), (obj,), "")
    [found] = detect(world.render(scene, 64))  # a PIL image goes in as it is
    assert (found.colour, found.shape, found.position) == (colour, shape, position)
    assert box_iou(found.box, obj.box) >= 0.9


def test_a_painted_square_is_measured_to_the_pixel():
    image = np.full((64, 64, 3), 150, dtype=np.uint8)
    image[10:22, 30:42] = world.COLOURS["green"]  # 12 x 12 pixels, drawn without world.render
    [found] = detect(image)
    assert (found.colour, found.shape, found.position) == ("green", "square", "top")
    assert found.extent == (30 / 64, 10 / 64, 42 / 64, 22 / 64)
    assert found.area_fraction == pytest.approx(144 / 64**2)
    half = 6 / 0.88  # the world insets a square by 0.12 of the half side of the box it is drawn in
    assert found.box == pytest.approx(((36 - half) / 64, (16 - half) / 64, (36 + half) / 64, (16 + half) / 64))


def test_touching_objects_of_one_colour_are_told_apart():
    slack = (1 / 3 - world.SIZES["large"]) / 2 * 0.8  # the most world.sample_objects jitters a large object
    (lx, ly), (cx, cy) = cell_centre("left"), cell_centre("center")
    objects = (
        SceneObject("red", "circle", "large", "left", lx + slack, ly),
        SceneObject("red", "circle", "large", "center", cx - slack, cy),
    )  # half a pixel apart at 64 px, so blur joins them
    scene = Scene(Background("plain", (MUTED[0], MUTED[1]), 0), objects, "")
    image = blur_and_noise(np.asarray(world.render(scene, 64)), 0)
    assert caption_adherence(scene, detect(image))
    assert len(detect(image)) == 2


def test_detect_refuses_what_is_not_an_rgb_uint8_image():
    with pytest.raises(ValueError, match="RGB uint8"):
        detect(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="RGB uint8"):
        detect(np.zeros((8, 8), dtype=np.uint8))


def test_label_components_follows_its_connectivity():
    diagonal = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=bool)
    assert label_components(diagonal, 8)[1] == 1
    assert label_components(diagonal, 4)[1] == 3
    ring = np.ones((5, 5), dtype=bool)
    ring[1:4, 1:4] = False
    labels, count = label_components(ring)
    assert count == 1 and (labels > 0).sum() == 16
    inside, holes = label_components(~ring, 4)
    assert holes == 1 and (inside > 0).sum() == 9
    with pytest.raises(ValueError, match="connectivity"):
        label_components(ring, 6)


# --- scoring -------------------------------------------------------------------------------


def test_box_iou_on_hand_computed_boxes():
    assert box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert box_iou((0, 0, 2, 2), (1, 0, 3, 2)) == pytest.approx(2 / 6)
    assert box_iou((0, 0, 4, 4), (1, 1, 3, 3)) == pytest.approx(4 / 16)
    assert box_iou((0, 0, 1, 1), (1, 0, 2, 1)) == 0.0  # sharing an edge
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    with pytest.raises(ValueError, match="x0 <= x1"):
        box_iou((1, 0, 0, 1), (0, 0, 1, 1))


def place(colour: str, shape: str, position: str) -> SceneObject:
    return SceneObject(colour, shape, "large", position, *cell_centre(position))


def seen(obj: SceneObject) -> Detection:
    """A detection of exactly the object."""
    return Detection(obj.colour, obj.shape, obj.box, obj.position, 0.05, obj.box)


CAPTIONED = Scene(
    Background("plain", (MUTED[0], MUTED[1]), 0),
    (place("red", "circle", "top left"), place("blue", "square", "center")),
    "a red circle in the top left and a blue square in the center",
)


def test_caption_holds_when_every_object_is_seen_in_its_place():
    detections = [seen(o) for o in CAPTIONED.objects] + [seen(place("green", "star", "bottom"))]  # one extra
    assert caption_adherence(CAPTIONED, detections)
    assert caption_score(CAPTIONED, detections) == CaptionScore(True, 2, 2)
    assert layout_iou(CAPTIONED, detections) == 1.0


@pytest.mark.parametrize(
    "wrong",
    [
        {"colour": "orange"},
        {"shape": "ring"},
        {"position": "right", "box": place("blue", "square", "right").box},
    ],
    ids=["colour", "shape", "position"],
)
def test_caption_fails_on_a_wrong_colour_shape_or_position(wrong):
    red, blue = CAPTIONED.objects
    detections = [seen(red), dataclasses.replace(seen(blue), **wrong)]
    assert not caption_adherence(CAPTIONED, detections)
    assert caption_score(CAPTIONED, detections) == CaptionScore(False, 1, 2)


def test_caption_fails_on_a_missing_object_and_its_layout_scores_zero():
    red, _ = CAPTIONED.objects
    assert not caption_adherence(CAPTIONED, [seen(red)])
    assert caption_score(CAPTIONED, [seen(red)]).fraction == 0.5
    assert layout_iou(CAPTIONED, [seen(red)]) == 0.5
    assert caption_score(CAPTIONED, []) == CaptionScore(False, 0, 2)


def test_layout_iou_of_a_box_shifted_by_half_its_side_is_a_third():
    red, blue = CAPTIONED.objects
    side = blue.box[2] - blue.box[0]
    x0, y0, x1, y1 = blue.box
    shifted = dataclasses.replace(seen(blue), box=(x0 + side / 2, y0, x1 + side / 2, y1))
    assert layout_iou(CAPTIONED, [seen(red), shifted]) == pytest.approx((1 + 1 / 3) / 2)
    with pytest.raises(ValueError, match="at least one object"):
        layout_iou(Scene(CAPTIONED.background, (), ""), [])


def test_match_objects_pairs_the_nearest_distinct_detections():
    left, top = place("red", "circle", "top left"), place("red", "circle", "top")
    scene = dataclasses.replace(CAPTIONED, objects=(left, top))
    only_top = seen(top)
    assert match_objects(scene.objects, [only_top]) == [(left, None), (top, only_top)]
    both = [seen(top), seen(left)]
    assert match_objects(scene.objects, both) == [(left, both[1]), (top, both[0])]
    wrong_shape = dataclasses.replace(seen(left), shape="ring")
    assert match_objects(scene.objects, [wrong_shape]) == [(left, None), (top, None)]


def test_psnr_follows_its_formula():
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    assert psnr(a, a) == math.inf
    b = np.full((4, 4, 3), 51, dtype=np.uint8)  # 0.2 everywhere: mse 0.04
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / 0.04))
    assert psnr(a, b.astype(np.float64) / 255) == pytest.approx(psnr(a, b))
    c = a.copy()
    c[0, 0, 0] = 255  # one value of 48 off by the full range
    assert psnr(a, c) == pytest.approx(10 * math.log10(48))
    with pytest.raises(ValueError, match="one shape"):
        psnr(a, a[:2])
    with pytest.raises(ValueError, match="uint8 or float"):
        psnr(a.astype(np.int32), a)


@pytest.mark.parametrize(
    "wrong, expected",
    [({}, 2), ({"shape": "ring"}, 2), ({"colour": "orange"}, 1), ({"position": "right", "box": place("blue", "square", "right").box}, 1)],
    ids=["right", "shape", "colour", "position"],
)
def test_coloured_in_place_counts_objects_whose_colour_is_in_their_cell_whatever_the_shape(wrong, expected):
    red, blue = CAPTIONED.objects
    assert coloured_in_place(CAPTIONED, [seen(red), dataclasses.replace(seen(blue), **wrong)]) == expected
