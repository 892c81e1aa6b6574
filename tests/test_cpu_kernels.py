"""Our C++ kernels (ldm/kernels/cpu_kernels.py): the Winograd data transforms against float64 written
out here, and what happens where the kernels cannot be built. The attention kernel's numbers are in
tests/test_cpu_attention.py, whole Winograd convolutions in tests/test_winograd.py."""

from __future__ import annotations

import argparse
import logging
import subprocess

import pytest
import torch
import torch.nn.functional as F

import ldm.kernels.cpu_kernels as cpu_kernels
from ldm.devices import cpu_has_avx512_bf16
from ldm.kernels.cpu_attention import set_attention_kernel
from ldm.kernels.paths import SpeedPaths
from ldm.kernels.winograd import INPUT_TRANSFORM, MIN_CHANNELS, OUTPUT_TRANSFORM, Conv3x3, set_winograd
from ldm.models.attention import CrossAttention
from ldm.options import add_device_arguments

pytestmark = pytest.mark.kernels

needs_avx512_bf16 = pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="the kernels need a CPU with AVX512-BF16")


@pytest.fixture(scope="module")
def kernels():
    assert cpu_kernels.load_cpu_kernels(), "our CPU kernels did not build (see the warning above)"
    return torch.ops.ldm


def blocks_of(x: torch.Tensor) -> torch.Tensor:
    """(16, tiles, C) float64: the 4x4 blocks of the zero-padded image at every 2x2 output tile."""
    b, c, h, w = x.shape
    padded = F.pad(x.double(), (1, 1 + w % 2, 1, 1 + h % 2))
    blocks = padded.unfold(2, 4, 2).unfold(3, 4, 2)  # (B, C, th, tw, 4, 4)
    return blocks.permute(4, 5, 0, 2, 3, 1).reshape(16, -1, c)


@needs_avx512_bf16
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 32, 8, 8), (1, 20, 7, 9), (1, 3, 1, 1), (3, 48, 5, 2)])
def test_the_input_transform_is_bt_d_b_of_every_padded_block(kernels, dtype, shape):
    b, c, h, w = shape
    x = torch.randn(shape).to(dtype)
    th, tw = (h + 1) // 2, (w + 1) // 2
    v = kernels.winograd_input(x.permute(0, 2, 3, 1).contiguous(), th, tw)
    expected = torch.einsum("kj,jtc->ktc", INPUT_TRANSFORM, blocks_of(x))
    assert v.shape == (16, b * th * tw, c) and v.dtype == dtype
    # computed in fp32 and rounded once: within half a unit in the last place of the result
    ulp = 2e-7 if dtype == torch.float32 else 8e-3
    assert ((v.double() - expected).abs() <= ulp * expected.abs() + 1e-6).all()


@needs_avx512_bf16
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 32, 8, 8), (1, 20, 7, 9), (1, 3, 1, 1), (3, 48, 5, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_the_output_transform_is_at_m_a_plus_bias_cropped_to_the_image(kernels, dtype, shape, bias):
    b, o, h, w = shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    m = torch.randn(16, b * th * tw, o).to(dtype)
    bias_values = torch.randn(o).to(dtype) if bias else None
    y = kernels.winograd_output(m, bias_values, b, h, w)
    tiles = torch.einsum("pk,ktc->ptc", OUTPUT_TRANSFORM, m.double())  # (4, tiles, O), p = 2 * row + column
    full = tiles.view(2, 2, b, th, tw, o).permute(2, 3, 0, 4, 1, 5).reshape(b, 2 * th, 2 * tw, o)
    expected = full[:, :h, :w] + (0 if bias_values is None else bias_values.double())
    assert y.shape == (b, h, w, o) and y.dtype == dtype
    ulp = 2e-7 if dtype == torch.float32 else 8e-3
    assert ((y.double() - expected).abs() <= ulp * expected.abs() + 1e-6).all()


@needs_avx512_bf16
def test_the_transforms_refuse_what_they_cannot_read(kernels):
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.winograd_input(torch.zeros(1, 4, 4, 8, dtype=torch.float16), 2, 2)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernels.winograd_input(torch.zeros(1, 8, 4, 4).permute(0, 2, 3, 1), 2, 2)
    with pytest.raises(RuntimeError, match="image size"):
        kernels.winograd_output(torch.zeros(16, 3, 8), None, 1, 4, 4)


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """A CPU that can use the kernels, and an empty cache for them."""
    monkeypatch.setattr(cpu_kernels, "cpu_has_avx512_bf16", lambda: True)
    monkeypatch.setattr(cpu_kernels, "KERNEL_CACHE", tmp_path / "kernels")
    cpu_kernels.load_cpu_kernels.cache_clear()
    yield tmp_path / "kernels"
    cpu_kernels.load_cpu_kernels.cache_clear()


def test_without_a_compiler_the_model_keeps_torchs_kernels_with_a_warning(monkeypatch, caplog, fresh_cache):
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda tool: None)
    layer = CrossAttention(32, None, heads=2, dim_head=16)
    conv = Conv3x3(MIN_CHANNELS, MIN_CHANNELS)
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert set_attention_kernel(layer, True) == 0 and layer.bf16_kernel is False
        assert set_winograd(conv, True) == 1 and conv.winograd and not conv.transform_kernels
    assert "needs a C++ compiler" in caplog.text and "apt-get install g++" in caplog.text
    assert caplog.text.count("WARNING") == 1  # said once per process


def test_a_failed_build_keeps_torchs_kernels_and_names_the_library(monkeypatch, caplog, fresh_cache, tmp_path):
    if cpu_kernels.shutil.which("c++") is None:
        pytest.skip("needs a compiler to fail a build")
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "SOURCES", [broken, *cpu_kernels.SOURCES])  # the others still compiling
    compilers = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            compilers.append(self)

    monkeypatch.setattr(cpu_kernels.subprocess, "Popen", Recorded)
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert cpu_kernels.load_cpu_kernels() is False
    assert len(compilers) == 3 and all(c.poll() is not None for c in compilers)  # none writes into the cache later
    assert "failed" in caplog.text and str(fresh_cache) in caplog.text and "broken.cpp" in caplog.text
    assert not list(fresh_cache.iterdir())  # no half-written library or object left to load


@needs_avx512_bf16
def test_a_built_library_is_loaded_without_building_again_and_a_changed_source_is_a_new_library(monkeypatch, tmp_path):
    assert cpu_kernels.load_cpu_kernels()  # built here or by an earlier process
    cpu_kernels.load_cpu_kernels.cache_clear()

    def build(*args):
        raise AssertionError("built again")

    monkeypatch.setattr(cpu_kernels, "build", build)
    try:
        assert cpu_kernels.load_cpu_kernels()
    finally:
        cpu_kernels.load_cpu_kernels.cache_clear()
    first = cpu_kernels.library_path()
    extra = tmp_path / "extra.cpp"
    extra.write_text("// a change\n")
    monkeypatch.setattr(cpu_kernels, "SOURCES", [*cpu_kernels.SOURCES, extra])
    assert cpu_kernels.library_path() != first  # the name's digest covers every source


def test_no_cpu_kernels_is_an_option_of_the_studio_and_the_cli_and_builds_nothing(monkeypatch, fresh_cache):
    parser = argparse.ArgumentParser()
    add_device_arguments(parser)
    assert SpeedPaths.from_arguments(parser.parse_args([])).cpu_kernels
    assert not SpeedPaths.from_arguments(parser.parse_args(["--no-cpu-kernels"])).cpu_kernels

    def build(*args):
        raise AssertionError("built")

    monkeypatch.setattr(cpu_kernels, "build", build)
    layer, conv = CrossAttention(32, None, heads=2, dim_head=16), Conv3x3(MIN_CHANNELS, MIN_CHANNELS)
    assert set_attention_kernel(layer, False) == 0 and set_winograd(conv, True, transform_kernels=False) == 1
    assert not layer.bf16_kernel and conv.winograd and not conv.transform_kernels
