"""The engine's modules build the other original layouts too: the legacy AttentionBlock UNets of
LDM (bsr_sr, inpainting_big with ResBlock up/down-sampling), the x4 upscaler's class-embedded UNet
with cross-attention in place of self-attention, and the VQ-f4 autoencoder with and without mid
attention. Keys and shapes are compared with the original models' (tests/fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ldm.models.attention import AttentionBlock
from ldm.models.autoencoder import Autoencoder, AutoencoderConfig
from ldm.models.unet import UNetConfig, UNetModel

FIXTURES = Path(__file__).parent / "fixtures"
VQ_F4 = dict(kind="vq", embed_dim=3, n_embed=8192, z_channels=3, ch=128, ch_mult=(1, 2, 4))
CASES = {
    "bsr_sr": (
        UNetConfig(in_channels=6, out_channels=3, model_channels=160, attention_resolutions=(16, 8), num_res_blocks=2,
                   channel_mult=(1, 2, 2, 4), head_dim=32),
        AutoencoderConfig(**VQ_F4),
    ),
    "inpainting_big": (
        UNetConfig(in_channels=7, out_channels=3, model_channels=256, attention_resolutions=(8, 4, 2), num_res_blocks=2,
                   channel_mult=(1, 2, 3, 4), num_heads=8, resblock_updown=True),
        AutoencoderConfig(**VQ_F4, mid_attention=False),
    ),
    "x4-upscaling": (
        UNetConfig(in_channels=7, out_channels=4, model_channels=256, attention_resolutions=(2, 4, 8), num_res_blocks=2,
                   channel_mult=(1, 2, 2, 4), num_heads=8, use_spatial_transformer=True, context_dim=1024,
                   use_linear_in_transformer=True, num_classes=1000, disable_self_attentions=(True, True, True, False)),
        AutoencoderConfig(kind="kl", embed_dim=4, z_channels=4, ch_mult=(1, 2, 4)),
    ),
}


def shapes(module: torch.nn.Module, prefix: str) -> dict[str, list[int]]:
    return {prefix + k: list(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_unet_and_first_stage_keys_match_the_original(name):
    unet_config, first_config = CASES[name]
    reference = json.loads((FIXTURES / f"{name}.json").read_text())
    with torch.device("meta"):
        ours = shapes(UNetModel(unet_config), "model.diffusion_model.") | shapes(Autoencoder(first_config), "first_stage_model.")
    wanted = {k: v for k, v in reference.items() if k.startswith(("model.diffusion_model.", "first_stage_model."))}
    assert ours == wanted


def test_x4_attn1_is_cross_attention_where_self_attention_is_disabled():
    with torch.device("meta"):
        state = UNetModel(CASES["x4-upscaling"][0]).state_dict()
    assert list(state["input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"].shape) == [512, 1024]
    assert list(state["middle_block.1.transformer_blocks.0.attn1.to_k.weight"].shape) == [1024, 1024]


def test_legacy_attention_reads_qkv_per_head():
    torch.manual_seed(0)
    block = AttentionBlock(channels=64, heads=4).eval()
    torch.nn.init.normal_(block.proj_out.weight)
    x = torch.randn(2, 64, 3, 5)
    with torch.no_grad():
        got = block(x)
        # by hand: qkv channels are [q, k, v] for head 0, then for head 1, ...; scale 1/sqrt(d)
        qkv = block.qkv(block.norm(x.reshape(2, 64, 15)))  # (B, 3C, T)
        heads = []
        for h in range(4):
            q, k, v = qkv[:, h * 48 : (h + 1) * 48].split(16, dim=1)
            weights = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / 16**0.5, dim=-1)
            heads.append(torch.einsum("bts,bcs->bct", weights, v))
        expected = x + block.proj_out(torch.cat(heads, dim=1)).reshape(2, 64, 3, 5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_class_embedding_changes_the_prediction():
    config = UNetConfig(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=(), num_res_blocks=1,
                        channel_mult=(1, 2), num_heads=4, num_classes=10)
    torch.manual_seed(0)
    unet = UNetModel(config).eval()
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([10])
    with torch.no_grad():
        assert not torch.allclose(unet(x, t, y=torch.tensor([1])), unet(x, t, y=torch.tensor([2])))
    with pytest.raises(ValueError, match="class-conditional"):
        unet(x, t)


def test_vq_encode_returns_pre_quantisation_latents_and_decode_quantises():
    torch.manual_seed(0)
    config = AutoencoderConfig(kind="vq", embed_dim=3, n_embed=16, z_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1)
    model = Autoencoder(config).eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        h = model.encode(x)
        codebook = model.quantize.embedding.weight
        flat = h.permute(0, 2, 3, 1).reshape(-1, 3)
        assert not any(torch.isclose(flat, c).all(dim=1).any() for c in codebook)  # not snapped to codes
        nearest = codebook[torch.cdist(flat, codebook).argmin(1)].reshape(1, 8, 8, 3).permute(0, 3, 1, 2)
        torch.testing.assert_close(model.decode(h), model.decode(nearest))
        assert model.decode(h).shape == (1, 3, 16, 16)


def test_kl_downsampling_pads_right_and_bottom_only():
    config = AutoencoderConfig(kind="kl", embed_dim=4, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1)
    down = Autoencoder(config).encoder.down[0].downsample
    x = torch.zeros(1, 32, 4, 4)
    x[0, 0, 0, 0] = 1.0  # the top-left pixel of one channel
    with torch.no_grad():
        torch.nn.init.zeros_(down.conv.weight)
        torch.nn.init.zeros_(down.conv.bias)
        down.conv.weight[:, :, 0, 0] = 1.0  # the kernel's top-left tap
        out = down(x)
    # with (0, 1, 0, 1) padding the first output's top-left tap sits on the input's top-left pixel
    assert out.shape[-2:] == (2, 2) and out[0, 0, 0, 0].item() == 1.0
