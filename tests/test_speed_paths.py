"""The faster code paths give the numbers of the plain ones: half-precision GroupNorm on the CPU,
channels-last models, the in-place GEGLU, and the training autocast switch; the kept-memory setting."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm.checkpoints.loader import build_model
from ldm.devices import cpu_has_bf16, keep_freed_memory, training_autocast
from ldm.kernels.memory_format import choose_memory_format, memory_format_of
from ldm.kernels import paths
from ldm.kernels.paths import SpeedPaths
from ldm.kernels.winograd import Conv3x3
from ldm.models.attention import GEGLU, GroupNorm32, SpatialTransformer
from tests.builders import sd_v1


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
    torch.manual_seed(0)
    model = build_model(sd_v1.make_preset(100).model, device="cpu").eval()
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


def test_the_memory_format_is_channels_last_on_the_cpu_for_wide_models_and_names_bad_values():
    cpu = torch.device("cpu")
    assert choose_memory_format("auto", cpu, 320) == torch.channels_last  # SD's width: faster
    assert choose_memory_format("auto", cpu, 64) == torch.contiguous_format  # the default model: slower
    assert choose_memory_format(None, torch.device("cuda"), 320) == torch.contiguous_format
    assert choose_memory_format("contiguous", cpu, 320) == torch.contiguous_format
    assert choose_memory_format("channels_last", cpu, 64) == torch.channels_last
    with pytest.raises(ValueError, match="memory format 'nhwc' is not supported; use auto, channels_last, contiguous"):
        choose_memory_format("nhwc", cpu, 320)


def test_a_channels_last_load_generates_the_contiguous_load_image(tiny_sd_v1):
    from ldm.tasks.request import GenerationRequest
    from ldm.tasks.txt2img import txt2img

    plain, last = (tiny_sd_v1.load(memory_format=f)
                   for f in ("contiguous", "channels_last"))
    conv = last.model.model.diffusion_model.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    request = GenerationRequest("a red house", steps=4, scale=5.0, seed=3, width=32, height=32)
    a, b = (np.asarray(txt2img(m, request).images[0]).astype(int) for m in (plain, last))
    assert np.abs(a - b).max() <= 1  # the same numbers up to summation order


@pytest.mark.slow  # the first call compiles
def test_a_compiled_unet_keeps_its_names_and_gives_the_eager_numbers(tiny_sd_v1, tmp_path, monkeypatch):
    import torch._dynamo

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    eager, compiled = (tiny_sd_v1.load(speed=SpeedPaths(compile=c))
                       for c in (False, True))
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())  # the checkpoint contract
    flags = {part: {m.winograd for m in getattr(compiled.model, part).modules() if isinstance(m, Conv3x3)}
             for part in ("model", "first_stage_model")}
    assert flags == {"model": {False}, "first_stage_model": {True}}  # the compiler picks the UNet's kernels only
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, 32)
    torch._dynamo.reset()
    with torch.no_grad():
        expected = eager.model.unet(x, t, context=context)
        got = compiled.model.unet(x, t, context=context)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it really was compiled
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_compiling_on_a_cpu_without_a_cpp_compiler_says_what_to_install(monkeypatch):
    from ldm.kernels import paths

    monkeypatch.setattr(paths.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match=r"needs a C\+\+ compiler.*apt-get install g\+\+.*without --compile"):
        paths.compile_unet(torch.nn.Linear(2, 2), torch.device("cpu"))


def test_the_in_place_geglu_of_sampling_gives_the_training_numbers_and_training_still_backpropagates():
    torch.manual_seed(0)
    geglu = GEGLU(16, 32)
    x = torch.randn(2, 10, 16)
    trained = geglu(x)  # grad enabled: the out-of-place path
    trained.square().sum().backward()
    assert geglu.proj.weight.grad is not None and geglu.proj.weight.grad.abs().sum() > 0
    with torch.inference_mode():
        sampled = geglu(x)
    assert torch.allclose(sampled, trained.detach(), atol=1e-6, rtol=0)
    assert sampled.shape == (2, 10, 32)


ROOT = Path(__file__).resolve().parents[1]
KEEPING_CHECK = """
import torch
from ldm.devices import free_memory_mb, heap_info, keep_freed_memory, resident_mb, reusing_freed_memory
assert keep_freed_memory(torch.device("cpu"))
block, count, large = 16 * 2**20, 8, 96 * 2**20
with reusing_freed_memory():
    mapped = heap_info().hblkhd
    tensor = torch.empty(large // 4).fill_(1)  # above 32 MB: mapped alone, so the heap never holds it
    assert heap_info().hblkhd - mapped >= large, "a large block not mapped alone"
    del tensor
    tensors = [torch.empty(block // 4).fill_(1) for _ in range(count)]
    held = heap_info()
    assert held.hblkhd - mapped < block, "blocks under 32 MB mapped alone"
    before = free_memory_mb(torch.device("cpu"))
    del tensors
    assert heap_info().fordblks - held.fordblks >= 0.99 * block * count, "not freed into the heap"
    # and counted as free by the memory check of large canvases (system figures move: a loose bound)
    assert free_memory_mb(torch.device("cpu")) - before > 0.5 * block * count / 2**20, "not counted as free"
    resident = resident_mb()
assert resident - resident_mb() > 0.9 * block * count / 2**20, "not handed back when sampling ends"
"""


def run_fresh(script: str) -> None:
    """``script`` in a fresh process: glibc serves a block from any free heap chunk that fits, whatever
    its threshold, so what earlier tests freed would decide where a block goes."""
    env = {k: v for k, v in os.environ.items() if k != "LDM_STUDIO_MALLOC"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_sampling_keeps_freed_blocks_under_32_mb_maps_larger_ones_alone_and_hands_back_after(monkeypatch):
    assert not keep_freed_memory(torch.device("cuda"))  # a GPU's memory is torch's own business
    monkeypatch.setenv("LDM_STUDIO_MALLOC", "system")
    assert not keep_freed_memory(torch.device("cpu"))
    run_fresh(KEEPING_CHECK)


RETURNING_CHECK = """
import torch
from ldm.devices import heap_info, keep_freed_memory, returning_freed_memory, reusing_freed_memory
assert keep_freed_memory(torch.device("cpu"))
size = 8 * 2**20  # under glibc's 32 MB threshold, over the tiled autoencoder's 4 MB
with returning_freed_memory():
    mapped = heap_info().hblkhd
    tensor = torch.empty(size // 4).fill_(1)
    assert heap_info().hblkhd - mapped >= size, "not mapped alone"
    del tensor
    assert heap_info().hblkhd - mapped < size, "not returned as it is freed"
with reusing_freed_memory(), returning_freed_memory():  # a sampler on another thread keeps its blocks
    mapped = heap_info().hblkhd
    tensor = torch.empty(size // 4).fill_(1)
    assert heap_info().hblkhd - mapped < size, "mapped alone while a sampler keeps blocks"
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_the_tiled_autoencoder_maps_its_blocks_from_4_mb_alone():
    run_fresh(RETURNING_CHECK)


@pytest.mark.parametrize("amx", [True, False])
def test_on_a_cpu_with_amx_bf16_takes_torchs_kernels_and_says_so_once(tiny_sd_v1, monkeypatch, caplog, amx):
    monkeypatch.setattr(paths, "cpu_has_amx", lambda: amx)
    paths.say_once.cache_clear()
    cpu, asked = torch.device("cpu"), SpeedPaths()
    fitted, notice = paths.fitted_paths(asked, cpu, torch.bfloat16)
    assert (fitted.winograd, fitted.cpu_kernels, notice is not None) == ((False, False, True) if amx else (True, True, False))
    assert paths.fitted_paths(asked, cpu, torch.float32) == (asked, None)  # fp32 is not AMX's: Winograd pays there
    assert paths.fitted_paths(asked, torch.device("cuda"), torch.bfloat16) == (asked, None)
    assert paths.fitted_paths(SpeedPaths(winograd=False, cpu_kernels=False), cpu, torch.bfloat16)[1] is None  # nothing to turn off
    with caplog.at_level(logging.WARNING, logger="ldm.kernels.paths"):
        for _ in range(2):
            model = tiny_sd_v1.load(dtype=torch.bfloat16).model
    said = [r.getMessage() for r in caplog.records if r.name == "ldm.kernels.paths"]
    assert said == ([paths.AMX_NOTICE] if amx else [])
    convs = [m for m in model.modules() if isinstance(m, Conv3x3)]
    assert convs and all(conv.winograd != amx for conv in convs)

def test_winograd_turns_itself_off_where_its_kernels_and_a_generation_do_not_fit_and_says_so(tiny_sd_v1, monkeypatch, caplog):
    from ldm.kernels import winograd
    from ldm.kernels.winograd import Conv3x3, winograd_kernel_bytes
    from ldm.tasks.planning import own_size_estimate_mb

    monkeypatch.setattr(winograd, "MIN_CHANNELS", 8)  # the tiny model's layers count as wide
    paths.say_once.cache_clear()
    model = tiny_sd_v1.load().model  # fp32: every paying layer keeps its kernel
    kernel_layers = [m for m in model.modules() if isinstance(m, Conv3x3) and winograd.winograd_can_pay(m)]
    kernels_mb = winograd_kernel_bytes(model) / 2**20
    assert kernels_mb == pytest.approx(sum(16 / 9 * m.weight.numel() * 4 for m in kernel_layers) / 2**20)
    assert all(m._transformed is not None for m in kernel_layers)
    reserve = own_size_estimate_mb(model)
    assert reserve > 0
    cpu = torch.device("cpu")
    roomy = (kernels_mb + reserve) / 0.9 + 1
    with caplog.at_level(logging.WARNING, logger="ldm.kernels.paths"):
        paths.set_speed_paths(model, cpu, SpeedPaths(), free_mb=roomy, reserve_mb=reserve)
        assert all(m.winograd and m._transformed is not None for m in kernel_layers)
        assert not [r for r in caplog.records if "Winograd's transformed kernels" in r.getMessage()]
        paths.set_speed_paths(model, cpu, SpeedPaths(), free_mb=roomy - 2, reserve_mb=reserve)
    assert all(not m.winograd and m._transformed is None for m in kernel_layers), "the kernels were kept"
    said = [r.getMessage() for r in caplog.records if "Winograd's transformed kernels" in r.getMessage()]
    assert len(said) == 1 and f"{roomy - 2:,.0f} MB of memory that is free" in said[0]
    # turned off by hand, nothing is said; an unknown free memory keeps it on
    assert paths.winograd_fits(model, SpeedPaths(winograd=False), 0.0, reserve) == (SpeedPaths(winograd=False), None)
    assert paths.winograd_fits(model, SpeedPaths(), None, reserve) == (SpeedPaths(), None)
