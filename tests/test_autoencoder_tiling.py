"""The tiled autoencoder equals the whole-image one: GroupNorm statistics of the whole image, zero
padding only at the image's edges, and resnet outputs written over their inputs band by band."""

from __future__ import annotations

import pytest
import torch

from ldm.models.autoencoder import Autoencoder, AutoencoderConfig
from ldm.models.autoencoder_tiling import tiled_decode, tiled_encode

CONFIGS = {
    # attention in the middle and at the lowest level, blocks that change width and blocks that do not
    "kl": AutoencoderConfig("kl", embed_dim=4, z_channels=4, ch=16, ch_mult=(1, 2, 2), num_res_blocks=2,
                            attn_resolutions=(8,), resolution=32, norm_groups=8),
    # the LDM inpainting first stage: VQ with no attention in the middle
    "vq": AutoencoderConfig("vq", embed_dim=3, z_channels=3, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                            mid_attention=False, n_embed=32, resolution=32, norm_groups=8),
}


def random_autoencoder(config: AutoencoderConfig) -> Autoencoder:
    torch.manual_seed(0)
    model = Autoencoder(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # GroupNorm affine parameters away from 1 and 0, so that they matter
                p.add_(0.2 * torch.randn_like(p))
    return model


def smooth_images(height: int, width: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.stack([x, torch.sin(3 * y), x * y])[None] + 0.05 * torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("tile", [8, 16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_tiled_encode_and_decode_equal_the_whole_image(kind, tile, layout):
    model = random_autoencoder(CONFIGS[kind]).to(memory_format=layout)  # channels-last: the CPU default for wide models
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
    model = random_autoencoder(CONFIGS["kl"])
    with torch.no_grad():
        z = model.encode(smooth_images(32, 32)).mean
        whole = model.decode(z)
        left, right = model.decode(z[..., :4]), model.decode(z[..., 4:])
    assert (torch.cat([left, right], dim=-1) - whole).abs().max() > 1e-2


def test_the_latent_given_is_left_as_it_was():
    model = random_autoencoder(CONFIGS["kl"])
    z = torch.randn(1, 4, 10, 14, generator=torch.Generator().manual_seed(2))
    before = z.clone()
    with torch.no_grad():
        tiled_decode(model, z, 8)
    assert torch.equal(z, before)
