"""The faster code paths give the numbers of the plain ones: half-precision GroupNorm on the CPU,
channels-last models, and the training autocast switch."""

import pytest
import torch
import torch.nn.functional as F

from ldm.checkpoints.loader import build_model
from ldm.devices import cpu_has_bf16, training_autocast
from ldm.models.attention import GroupNorm32, SpatialTransformer, memory_format_of


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_group_norm_on_the_cpu_equals_the_float32_round_trip(dtype):
    torch.manual_seed(0)
    norm = GroupNorm32(32, 64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    norm = norm.to(dtype)
    x = (torch.randn(2, 64, 12, 12) * 3 + 1).to(dtype)
    reference = F.group_norm(x.float(), 32, norm.weight.float(), norm.bias.float(), norm.eps).to(dtype)
    out = norm(x)
    assert out.dtype == dtype
    # the same float32 result, rounded once: at most one unit in the last place apart
    ulp = torch.finfo(dtype).eps * reference.float().abs().clamp_min(1.0)
    assert ((out.float() - reference.float()).abs() <= ulp).all()


def test_spatial_transformer_keeps_the_memory_format_of_its_input():
    torch.manual_seed(0)
    block = SpatialTransformer(64, heads=2, dim_head=32, depth=1, context_dim=16).eval()
    x = torch.randn(2, 64, 6, 5)
    context = torch.randn(2, 7, 16)
    with torch.no_grad():
        plain = block(x, context)
        last = block(x.contiguous(memory_format=torch.channels_last), context)
    assert plain.is_contiguous()
    assert memory_format_of(last) == torch.channels_last
    torch.testing.assert_close(last, plain, rtol=1e-5, atol=1e-5)


def test_a_channels_last_unet_gives_the_contiguous_unet_output():
    from tests.tiny_sd import tiny_preset

    torch.manual_seed(0)
    model = build_model(tiny_preset(100).model, device="cpu").eval()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, 32)
    with torch.no_grad():
        for p in model.parameters():  # the zero-initialised output layers would make the check empty
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
        plain = model.unet(x, t, context=context)
        model = model.to(memory_format=torch.channels_last)
        last = model.unet(x.contiguous(memory_format=torch.channels_last), t, context=context)
    assert plain.abs().mean() > 1e-3
    torch.testing.assert_close(last, plain, rtol=1e-4, atol=1e-5)


def test_training_autocast_is_bf16_only_when_asked_and_names_bad_values():
    cpu = torch.device("cpu")
    for off in (None, "none"):
        with training_autocast(cpu, off):
            assert not torch.is_autocast_enabled("cpu")
    with training_autocast(cpu, "bf16"):  # only where the CPU has bf16 units; float32 elsewhere
        assert torch.is_autocast_enabled("cpu") == cpu_has_bf16()
        if cpu_has_bf16():
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="autocast 'fp8' is not supported; use bf16 or none"):
        training_autocast(cpu, "fp8")
