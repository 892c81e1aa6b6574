"""Winograd 3x3 convolutions (ldm.kernels.winograd): the direct convolution's numbers, taken only where
it pays (sampling on a CPU, wide layers, fp32 on small images), kernels that follow the weights, and
a UNet that samples the same with it on or off."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ldm.kernels.winograd as winograd
from ldm.checkpoints.loader import build_model
from ldm.devices import cpu_has_avx512_bf16
from ldm.kernels.cpu_kernels import load_cpu_kernels
from ldm.kernels.paths import SpeedPaths
from ldm.kernels.winograd import MIN_CHANNELS, Conv3x3, set_winograd, winograd_conv3x3, winograd_weight
from ldm.tasks.request import GenerationRequest
from ldm.tasks.txt2img import txt2img
from tests.builders import sd_v1


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.double() - reference).abs().max() / reference.abs().max()).item()


def conv_case(cin, cout, h, w, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cin, h, w, generator=g)
    weight = torch.randn(cout, cin, 3, 3, generator=g) / (3 * cin**0.5)
    b = torch.randn(cout, generator=g) if bias else None
    reference = F.conv2d(x.double(), weight.double(), None if b is None else b.double(), padding=1)
    return x, weight, b, reference


# the data transforms through torch's operations, and through our C++ kernels where the CPU has them
TRANSFORMS = [False, pytest.param(True, marks=[pytest.mark.kernels,
                                                pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="needs AVX512-BF16")])]


@pytest.fixture(params=TRANSFORMS, ids=["torch-transforms", "our-transforms"])
def transform_kernels(request):
    if request.param:
        assert load_cpu_kernels(), "our CPU kernels did not build (see the warning above)"
    return request.param


@pytest.mark.parametrize("h, w", [(8, 8), (7, 9), (5, 4), (1, 1)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cin, cout", [(32, 24), (20, 48)])  # whole vectors of 16 channels, and not
def test_winograd_gives_the_convolution_of_every_image_size_in_fp32(h, w, bias, cin, cout, transform_kernels):
    x, weight, b, reference = conv_case(cin, cout, h, w, bias)
    out = winograd_conv3x3(x, winograd_weight(weight), b, transform_kernels)
    direct = F.conv2d(x, weight, b, padding=1)
    assert out.shape == reference.shape
    # as close to the float64 result as the direct kernel (both about 1e-6 of the largest value)
    assert relative_error(out, reference) < max(3 * relative_error(direct, reference), 1e-6)


def test_winograd_in_bf16_stays_within_a_few_roundings_of_the_direct_kernel(transform_kernels):
    x, weight, b, reference = conv_case(64, 48, 12, 10)
    x, weight, b = x.bfloat16(), weight.bfloat16(), b.bfloat16()
    out = winograd_conv3x3(x, winograd_weight(weight), b, transform_kernels)
    assert out.dtype == torch.bfloat16
    direct = relative_error(F.conv2d(x, weight, b, padding=1), reference)
    assert relative_error(out, reference) < 4 * direct  # measured: 2 to 3 times


def count_winograd_calls(monkeypatch) -> list:
    calls = []
    original = winograd.winograd_conv3x3

    def counted(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(winograd, "winograd_conv3x3", counted)
    return calls


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_a_wide_layer_samples_through_winograd_in_its_input_memory_format(monkeypatch, layout):
    calls = count_winograd_calls(monkeypatch)
    conv = Conv3x3(MIN_CHANNELS, MIN_CHANNELS)
    x, _, _, _ = conv_case(MIN_CHANNELS, 1, 6, 5)
    x = x.contiguous(memory_format=layout)
    with torch.no_grad():
        out = conv(x)
        direct = F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert calls == [x.shape]
    assert out.is_contiguous(memory_format=layout)
    torch.testing.assert_close(out, direct, rtol=0, atol=1e-5)


def test_training_narrow_layers_and_large_fp32_images_run_the_direct_convolution(monkeypatch):
    calls = count_winograd_calls(monkeypatch)
    wide, narrow = Conv3x3(MIN_CHANNELS, MIN_CHANNELS), Conv3x3(MIN_CHANNELS // 2, MIN_CHANNELS)
    small = torch.randn(1, MIN_CHANNELS, 4, 4, requires_grad=True)
    out = wide(small)  # gradient enabled: training
    out.sum().backward()
    assert small.grad is not None and wide.weight.grad is not None
    side = int(winograd.FP32_MAX_PIXELS**0.5) + 1
    with torch.no_grad():
        large = torch.randn(1, MIN_CHANNELS, side, side)
        assert torch.equal(wide(large), F.conv2d(large, wide.weight, wide.bias, padding=1))
        narrow(torch.randn(1, MIN_CHANNELS // 2, 4, 4))
        assert not calls
        wide.bfloat16()(large.bfloat16())  # bf16 is faster through Winograd at every size
    assert calls == [large.shape]


def test_the_kept_kernel_follows_casts_and_weight_changes_and_adds_no_keys():
    conv = Conv3x3(MIN_CHANNELS, MIN_CHANNELS)
    assert set(conv.state_dict()) == {"weight", "bias"}
    x = torch.randn(1, MIN_CHANNELS, 4, 4)
    with torch.no_grad():
        conv(x)
        first = conv.transformed_weight()
        conv.weight.mul_(2)  # in place: same storage, new version
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), rtol=0, atol=1e-5)
        assert conv.transformed_weight() is not first
        conv.bfloat16()
        assert conv.transformed_weight().dtype == torch.bfloat16
    assert set(conv.state_dict()) == {"weight", "bias"}


def test_set_winograd_makes_the_kernels_at_load_and_frees_them_when_off():
    model = torch.nn.Sequential(Conv3x3(MIN_CHANNELS, MIN_CHANNELS), Conv3x3(8, MIN_CHANNELS))
    assert set_winograd(model, True) == 1  # the narrow layer never uses one
    assert model[0]._transformed is not None and model[1]._transformed is None
    assert model[0].transform_kernels == cpu_has_avx512_bf16()  # our C++ transforms where the CPU has them
    assert set_winograd(model, False) == 0
    assert model[0]._transformed is None and not model[0].winograd and not model[0].transform_kernels
    set_winograd(model, True, transform_kernels=False)
    assert model[0].winograd and not model[0].transform_kernels


def test_a_layer_on_our_transforms_gives_torchs_numbers_whole_and_unpadded(transform_kernels, monkeypatch):
    """The same layer through either transform path: fp32 results agree to rounding, bf16 within a
    rounding of the output (the transforms round once in fp32 either way; the bias is added before
    rounding in ours, after in torch's)."""
    calls = []
    if transform_kernels:
        op = torch.ops.ldm.winograd_input
        monkeypatch.setattr(torch.ops.ldm, "winograd_input", lambda *a: calls.append(1) or op(*a))
    conv = Conv3x3(MIN_CHANNELS, MIN_CHANNELS)
    set_winograd(conv, True, transform_kernels)
    x = torch.randn(1, MIN_CHANNELS, 9, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            conv.to(dtype)
            conv.transform_kernels = transform_kernels  # a cast keeps the flag
            reference = F.conv2d(x.to(dtype).double(), conv.weight.double(), conv.bias.double(), padding=1)
            for out, expected in ((conv(x.to(dtype)), reference), (conv.unpadded(x.to(dtype)), reference[..., 1:-1, 1:-1])):
                assert out.dtype == dtype and out.shape == expected.shape
                assert relative_error(out, expected) < tolerance
    assert len(calls) == (4 if transform_kernels else 0)


def test_a_model_generates_the_same_image_with_winograd_on_or_off(tiny_sd_v1, monkeypatch):
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 8)  # the tiny model's layers count as wide
    calls = count_winograd_calls(monkeypatch)
    on, off = (tiny_sd_v1.load(speed=SpeedPaths(winograd=w)) for w in (True, False))
    convs = {w: [m for m in loaded.model.modules() if isinstance(m, Conv3x3)] for w, loaded in ((True, on), (False, off))}
    assert any(m._transformed is not None for m in convs[True])  # made at load
    assert not any(m.winograd or m._transformed is not None for m in convs[False])
    request = GenerationRequest("a red house", steps=4, scale=5.0, seed=3, width=32, height=32)
    fast = np.asarray(txt2img(on, request).images[0]).astype(int)
    assert calls
    calls.clear()
    direct = np.asarray(txt2img(off, request).images[0]).astype(int)
    assert not calls
    assert np.abs(fast - direct).max() <= 1  # the same numbers up to summation order


def test_the_unet_builds_its_3x3_layers_as_winograd_capable_with_the_checkpoint_names():
    from ldm.checkpoints.presets import find_preset

    unet = build_model(find_preset("v1-inference").model, device="meta").model.diffusion_model
    names = {name for name, m in unet.named_modules() if isinstance(m, Conv3x3)}
    assert {"input_blocks.0.0", "input_blocks.1.0.in_layers.2", "input_blocks.1.0.out_layers.3",
            "output_blocks.2.1.conv", "out.2"} <= names
    assert "input_blocks.3.0.op" not in names  # stride 2 stays a plain convolution


def test_the_autoencoder_builds_its_3x3_layers_as_winograd_capable_with_the_checkpoint_names():
    from ldm.checkpoints.presets import find_preset

    vae = build_model(find_preset("v1-inference").model, device="meta").first_stage_model
    names = {name for name, m in vae.named_modules() if isinstance(m, Conv3x3)}
    assert {"encoder.conv_in", "encoder.down.0.block.0.conv1", "encoder.mid.block_2.conv2", "decoder.conv_in",
            "decoder.up.3.block.2.conv2", "decoder.up.1.upsample.conv", "decoder.conv_out"} <= names
    assert "encoder.down.0.downsample.conv" not in names  # stride 2, unpadded: a plain convolution


@pytest.mark.parametrize("h, w", [(6, 5), (9, 8)])
def test_the_unpadded_convolution_of_a_tile_with_its_halo(monkeypatch, h, w):
    calls = count_winograd_calls(monkeypatch)
    conv = Conv3x3(MIN_CHANNELS, MIN_CHANNELS)
    x, _, _, _ = conv_case(MIN_CHANNELS, 1, h, w)
    with torch.no_grad():
        reference = F.conv2d(x.double(), conv.weight.double(), conv.bias.double())
        fast = conv.unpadded(x)
        conv.winograd = False
        direct = conv.unpadded(x)
    assert calls == [x.shape]
    assert fast.shape == direct.shape == (2, MIN_CHANNELS, h - 2, w - 2)
    assert relative_error(fast, reference) < max(3 * relative_error(direct, reference), 1e-6)


def test_the_autoencoder_decodes_whole_and_tiled_through_winograd_with_the_direct_numbers(monkeypatch):
    from ldm.models.autoencoder_tiling import tiled_decode
    from tests.helpers import AUTOENCODER_CONFIGS, random_autoencoder

    monkeypatch.setattr(winograd, "MIN_CHANNELS", 16)  # the tiny autoencoder's layers count as wide
    calls = count_winograd_calls(monkeypatch)
    model = random_autoencoder(AUTOENCODER_CONFIGS["kl"])
    z = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        set_winograd(model, False)
        direct = model.decode(z)
        assert not calls
        set_winograd(model, True)
        whole = model.decode(z)
        assert calls
        calls.clear()
        tiled = tiled_decode(model, z, 4)
        assert calls  # the tiles' convolutions too
    scale = direct.abs().max()
    assert (whole - direct).abs().max() < 1e-4 * scale
    assert (tiled - direct).abs().max() < 1e-4 * scale


def test_a_compiled_unet_never_makes_winograd_kernels_and_the_autoencoder_keeps_them(monkeypatch):
    import ldm.kernels.paths as paths

    monkeypatch.setattr(winograd, "MIN_CHANNELS", 8)  # the tiny model's layers count as wide
    compiled, made = [], []
    monkeypatch.setattr(paths, "compile_unet", lambda unet, device: compiled.append(unet))
    transformed_weight = Conv3x3.transformed_weight
    monkeypatch.setattr(Conv3x3, "transformed_weight", lambda conv: made.append(conv) or transformed_weight(conv))
    model = build_model(sd_v1.make_preset(50).model, device="cpu")
    paths.set_speed_paths(model, torch.device("cpu"), SpeedPaths(compile=True))
    unet_convs = {m for m in model.unet.modules() if isinstance(m, Conv3x3)}
    assert compiled == [model.unet]
    assert made and not unet_convs & set(made)  # the autoencoder's only: none made and then thrown away
