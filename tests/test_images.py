"""Pictures in unusual modes reach the tasks as the artist sees them: 16-bit greys scaled, not
clipped; transparency over white, not black; the first frame of an animation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ldm.tasks.images import as_rgb


def round_trip(image: Image.Image, format: str = "PNG", **kwargs) -> Image.Image:
    """The image as a file would give it back."""
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    buffer.seek(0)
    return Image.open(buffer)


def test_a_16_bit_grey_is_scaled_to_8_bits_not_clipped_to_white():
    ramp = np.linspace(0, 65535, 64 * 8).reshape(8, 64).astype(np.uint16)
    opened = round_trip(Image.fromarray(ramp))
    assert opened.mode.startswith("I")
    assert np.asarray(opened.convert("RGB")).mean() > 250  # what Pillow alone gives
    rgb = np.asarray(as_rgb(opened)).astype(int)
    assert rgb.shape == (8, 64, 3) and rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255
    assert abs(rgb.mean() - 127.5) < 2


def test_transparency_is_composited_over_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    for image in (rgba, round_trip(rgba.convert("LA")), round_trip(rgba.convert("P"), transparency=0)):
        rgb = as_rgb(image)
        assert rgb.mode == "RGB" and rgb.getpixel((3, 3)) == (255, 255, 255), image.mode
    assert as_rgb(rgba).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["CMYK", "L", "1", "P", "YCbCr", "F"])
def test_other_modes_become_rgb_of_the_same_size(mode):
    image = Image.new("RGB", (5, 3), (200, 100, 50)).convert(mode)
    rgb = as_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (5, 3)


def test_an_animation_gives_its_first_frame():
    frames = [Image.new("RGB", (4, 4), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    buffer.seek(0)
    animated = Image.open(buffer)
    animated.seek(1)
    assert as_rgb(animated).getpixel((0, 0))[0] > 200
