"""The tiled autoencoder equals the whole-image one: GroupNorm statistics of the whole image, zero
padding only at the image's edges, and resnet outputs written over their inputs band by band."""

from __future__ import annotations

import pytest
import torch

from ldm.models.autoencoder_tiling import tiled_decode, tiled_encode
from tests.helpers import AUTOENCODER_CONFIGS, random_autoencoder


def smooth_images(height: int, width: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.stack([x, torch.sin(3 * y), x * y])[None] + 0.05 * torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", sorted(AUTOENCODER_CONFIGS))
@pytest.mark.parametrize("tile", [8, 16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_tiled_encode_and_decode_equal_the_whole_image(kind, tile, layout):
    model = random_autoencoder(AUTOENCODER_CONFIGS[kind]).to(memory_format=layout)  # channels-last: the CPU default for wide models
    images = smooth_images(40, 56)  # not a multiple of the tile: ragged last tiles and bands
    with torch.no_grad():
        whole, tiled = model.encode(images), tiled_encode(model, images, tile)
        whole_moments = torch.cat(whole, dim=1) if kind == "kl" else whole
        tiled_moments = torch.cat(tiled, dim=1) if kind == "kl" else tiled
        assert (tiled_moments - whole_moments).abs().max() < 1e-4 * whole_moments.abs().max()
        z = whole.mean if kind == "kl" else whole
        decoded_whole, decoded_tiled = model.decode(z), tiled_decode(model, z, tile)
    assert decoded_tiled.shape == decoded_whole.shape == (1, 3, 40, 56)
    assert (decoded_tiled - decoded_whole).abs().max() < 1e-4 * decoded_whole.abs().max()


def test_tiles_decoded_alone_would_differ_so_the_comparison_can_fail():
    model = random_autoencoder(AUTOENCODER_CONFIGS["kl"])
    with torch.no_grad():
        z = model.encode(smooth_images(32, 32)).mean
        whole = model.decode(z)
        left, right = model.decode(z[..., :4]), model.decode(z[..., 4:])
    assert (torch.cat([left, right], dim=-1) - whole).abs().max() > 1e-2


def test_the_latent_given_is_left_as_it_was():
    model = random_autoencoder(AUTOENCODER_CONFIGS["kl"])
    z = torch.randn(1, 4, 10, 14, generator=torch.Generator().manual_seed(2))
    before = z.clone()
    with torch.no_grad():
        tiled_decode(model, z, 8)
    assert torch.equal(z, before)
