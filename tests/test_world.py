"""The procedural scene world: seeded, rendered at any size with anti-aliasing, captioned, boxed."""

from __future__ import annotations

import numpy as np
import pytest

from ldm.data.world import COLOURS, POSITION_PHRASES, POSITIONS, SHAPES, render, scene_from_seed


def test_a_seed_gives_the_same_scene_and_pixels():
    a, b = scene_from_seed(42), scene_from_seed(42)
    assert a == b
    assert np.array_equal(np.asarray(render(a, 64)), np.asarray(render(b, 64)))
    assert scene_from_seed(43) != a


@pytest.mark.parametrize("size", [32, 64, 200])
def test_scenes_render_at_any_size(size):
    image = render(scene_from_seed(5), size)
    assert image.size == (size, size) and image.mode == "RGB"


def test_edges_are_anti_aliased():
    scene = scene_from_seed(7)
    pixels = np.asarray(render(scene, 64)).reshape(-1, 3)
    palette = {tuple(c) for c in COLOURS.values()}
    background = {tuple(c) for c in scene.background.colours}
    # blended edge pixels: neither an object colour nor (for plain backgrounds) the background colour
    inbetween = [p for p in map(tuple, pixels) if p not in palette and p not in background]
    assert len(inbetween) > 20


def test_captions_name_every_object_with_colour_shape_and_place():
    seen_shapes, seen_colours, seen_counts = set(), set(), set()
    for seed in range(300):
        scene = scene_from_seed(seed)
        seen_counts.add(len(scene.objects))
        cells = [o.position for o in scene.objects]
        assert len(set(cells)) == len(cells), "objects share a grid cell"
        for obj in scene.objects:
            assert f"{obj.colour} {obj.shape} {POSITION_PHRASES[obj.position]}" in scene.caption
            seen_shapes.add(obj.shape)
            seen_colours.add(obj.colour)
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            col, row = POSITIONS[obj.position]
            assert col / 3 <= (x0 + x1) / 2 <= (col + 1) / 3 and row / 3 <= (y0 + y1) / 2 <= (row + 1) / 3
        assert " a orange" not in scene.caption and not scene.caption.startswith("a orange")
    assert seen_shapes == set(SHAPES) and seen_colours == set(COLOURS) and seen_counts == {1, 2, 3, 4}


def test_boxes_carry_labels_and_normalised_corners():
    scene = scene_from_seed(11)
    for (label, x0, y0, x1, y1), obj in zip(scene.boxes, scene.objects):
        assert label == f"{obj.colour} {obj.shape}"
        assert (x0, y0, x1, y1) == obj.box


def test_every_background_kind_appears():
    kinds = {scene_from_seed(s).background.kind for s in range(60)}
    assert kinds == {"plain", "gradient", "texture"}
