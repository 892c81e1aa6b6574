"""Numerics of the LDM VQ autoencoder (the first stage of inpainting_big, bsr_sr and the other LDM-VQ-f4
models) against an independent implementation: tiny files in the original layout, with and without
the decoder's and encoder's mid attention (inpainting_big's ``attn_type: none``), converted to
diffusers' ``VQModel`` by diffusers' own VAE converter, compared at fp32 to 1e-4.

What is compared is what the original ``VQModelInterface`` does: ``encode`` returns the
pre-quantisation latent ``quant_conv(encoder(x))``; ``decode`` quantises to the nearest codebook entry
first, then ``post_quant_conv`` and the decoder (diffusers' ``VQModel.decode`` with its default
``force_not_quantize=False``).
"""

from __future__ import annotations

import pytest
import torch

from ldm.checkpoints.io import read_state_dict
from tests.builders import ldm_image
from tests.helpers import TOL

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module", params=[False, True], ids=["no-mid-attention", "mid-attention"])
def pair(request, tmp_path_factory):
    """(our loaded model, diffusers' VQModel) from one tiny file."""
    mid_attention = request.param
    files = ldm_image.write(tmp_path_factory.mktemp("vq"), seed=7, kind="sr" if mid_attention else "inpainting")
    ours = files.load().model
    assert ours.config.first_stage.mid_attention == mid_attention
    return ours, ldm_image.diffusers_vq(read_state_dict(files.path), mid_attention)


def images(seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, 24, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def test_encode_is_the_pre_quantisation_latent(pair):
    ours, vq = pair
    x = images()
    expected = vq.encode(x).latents
    got = ours.first_stage_model.encode(x)
    assert got.shape == (2, 3, 12, 16)
    assert (got - expected).abs().max() < TOL
    assert (ours.encode_first_stage(x) - expected).abs().max() < TOL  # scale_factor 1, no sampling for VQ
    codebook = vq.quantize.embedding.weight
    distances = torch.cdist(got.permute(0, 2, 3, 1).reshape(-1, 3), codebook)
    assert distances.min(dim=1).values.min() > 1e-3, "the latent should not be snapped to codes already"


@torch.no_grad()
def test_decode_quantises_to_the_nearest_code_first(pair):
    ours, vq = pair
    h = vq.encode(images(1)).latents
    expected = vq.decode(h).sample
    assert (ours.first_stage_model.decode(h) - expected).abs().max() < TOL
    assert (ours.decode_first_stage(h) - expected).abs().max() < TOL
    unquantised = vq.decode(h, force_not_quantize=True).sample
    assert (unquantised - expected).abs().max() > 100 * TOL, "quantisation should change the image"
    codes = torch.cdist(h.permute(0, 2, 3, 1).reshape(-1, 3), vq.quantize.embedding.weight).argmin(1)
    assert codes.unique().numel() > 4, "the test latents should use several codebook entries"


@torch.no_grad()
def test_an_arbitrary_latent_decodes_the_same(pair):
    ours, vq = pair
    z = torch.randn(1, 3, 10, 6, generator=torch.Generator().manual_seed(5))
    assert (ours.first_stage_model.decode(z) - vq.decode(z).sample).abs().max() < TOL
