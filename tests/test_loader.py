"""Strict loading of original-layout files: EMA selection, extra and missing keys, dtypes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer

from ldm.checkpoints import io as ckpt_io
from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.loader import ema_key, load_model
from ldm.text import clip_tokenizer as tokenizers
from ldm.text import lookup
from ldm.text.lookup import TokenizerNotFoundError
from tests.builders import sd2, sd_v1
from tests.helpers import same_bits

UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.fixture(scope="module")
def tiny_ema(tmp_path_factory):
    return sd_v1.write(tmp_path_factory.mktemp("ema"), ema=True)


def test_ema_key_drops_the_dots_as_litema_does():
    assert ema_key("model.diffusion_model.input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"


def test_ema_weights_are_used_when_present_and_can_be_declined(tiny_ema):
    path, tokenizer, preset = tiny_ema.path, tiny_ema.tokenizer_dir, tiny_ema.preset
    raw = load_file(str(path))
    auto = load_model(path, preset=preset, tokenizer_dir=tokenizer)
    assert auto.report.used_ema
    torch.testing.assert_close(auto.model.state_dict()[UNET_KEY], raw[ema_key(UNET_KEY)], rtol=0, atol=0)
    plain = load_model(path, preset=preset, tokenizer_dir=tokenizer, ema=False)
    assert not plain.report.used_ema
    torch.testing.assert_close(plain.model.state_dict()[UNET_KEY], raw[UNET_KEY], rtol=0, atol=0)
    assert "model_ema.decay" in plain.report.ignored


def test_asking_for_ema_in_a_file_without_it_is_an_error(tiny_sd_v1):
    with pytest.raises(CheckpointError, match="EMA"):
        tiny_sd_v1.load(ema=True)


def _rewrite(path, change):
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))


def test_a_missing_weight_is_reported_with_the_file_and_the_part(tmp_path):
    files = sd_v1.write(tmp_path)  # its own copy: the test changes it
    path, tokenizer, preset = files.path, files.tokenizer_dir, files.preset
    _rewrite(path, lambda s: s.pop("first_stage_model.decoder.conv_out.weight"))
    with pytest.raises(CheckpointError) as error:
        load_model(path, preset=preset, tokenizer_dir=tokenizer)
    assert str(path) in str(error.value)
    assert "first_stage_model.decoder.conv_out.weight" in str(error.value)


def test_an_unexpected_tensor_is_refused_not_silently_dropped(tmp_path):
    files = sd_v1.write(tmp_path)  # its own copy: the test changes it
    path, tokenizer, preset = files.path, files.tokenizer_dir, files.preset
    _rewrite(path, lambda s: s.update({"lora_unet_down.alpha": torch.ones(1)}))
    with pytest.raises(CheckpointError, match="lora_unet_down.alpha"):
        load_model(path, preset=preset, tokenizer_dir=tokenizer)


def test_a_wrong_shape_is_reported(tmp_path):
    files = sd_v1.write(tmp_path)  # its own copy: the test changes it
    path, tokenizer, preset = files.path, files.tokenizer_dir, files.preset
    _rewrite(path, lambda s: s.update({UNET_KEY: torch.zeros(32, 9, 3, 3)}))
    with pytest.raises(CheckpointError, match=r"\[32, 9, 3, 3\]"):
        load_model(path, preset=preset, tokenizer_dir=tokenizer)


def test_a_half_precision_file_loads_at_the_requested_dtype(tmp_path):
    files = sd_v1.write(tmp_path)  # its own copy: the test changes it
    path, tokenizer, preset = files.path, files.tokenizer_dir, files.preset
    _rewrite(path, lambda s: s.update({k: v.half() for k, v in s.items()}))
    loaded = load_model(path, preset=preset, tokenizer_dir=tokenizer, dtype=torch.float32)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert loaded.model.dtype == torch.float32


def test_a_ckpt_with_a_nested_state_dict_loads_like_the_safetensors(tmp_path):
    files = sd_v1.write(tmp_path)  # its own copy: the test changes it
    path, tokenizer, preset = files.path, files.tokenizer_dir, files.preset
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(path)), "global_step": 470000}, ckpt)
    a = load_model(path, preset=preset, tokenizer_dir=tokenizer).model.state_dict()
    b = load_model(ckpt, preset=preset, tokenizer_dir=tokenizer).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_another_family_names_the_file(tiny_sd_v1):
    with pytest.raises(CheckpointError, match=str(tiny_sd_v1.path)):
        load_model(tiny_sd_v1.path, tokenizer_dir=tiny_sd_v1.tokenizer_dir)  # detection: the tiny layout is no registered family


def test_an_sd2_layout_file_loads_strictly_and_finds_its_tokenizer_as_v1_does(tmp_path, monkeypatch):
    """The OpenCLIP tower's keys load with no renaming; its CLIP BPE tokenizer is looked up like SD v1's
    (here: the tokenizer/ folder beside the file), and the same error names the fix when there is none."""
    files = sd2.write(tmp_path)  # its own copy: the test removes its tokenizer
    path, tokenizer = files.path, files.tokenizer_dir
    loaded = load_model(path, preset=files.preset)
    raw = load_file(str(path))
    key = "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight"  # the unused last block loads too
    assert torch.equal(loaded.model.state_dict()[key], raw[key])
    assert loaded.model.cond_stage_model.tokenizer.get_vocab() == CLIPTokenizer.from_pretrained(str(tokenizer)).get_vocab()

    monkeypatch.setattr(lookup, "hub_cached_folder", lambda hub_repo, files: None)
    monkeypatch.setattr(tokenizers, "_open_clip_bpe_file", lambda: None)
    shutil.rmtree(tokenizer)
    with pytest.raises(TokenizerNotFoundError, match="SD v1 and v2 checkpoints do not contain one"):
        load_model(path, preset=files.preset)


# ---------------------------------------------------------------- reading one tensor at a time


@pytest.fixture(scope="module")
def tiny_ema_files(tiny_ema, tmp_path_factory):
    """The EMA file as (format, stored dtype) -> path: safetensors and a Lightning-style .ckpt, fp32 and fp16."""
    folder, raw = tmp_path_factory.mktemp("formats"), load_file(str(tiny_ema.path))
    files = {}
    for name, stored in (("fp32", torch.float32), ("fp16", torch.float16)):
        state = {k: v.to(stored) if v.is_floating_point() else v for k, v in raw.items()}
        files["safetensors", name] = folder / f"tiny-{name}.safetensors"
        save_file(state, str(files["safetensors", name]))
        files["ckpt", name] = folder / f"tiny-{name}.ckpt"
        torch.save({"state_dict": state, "global_step": 470000}, files["ckpt", name])
    return files


def full_read(path) -> dict[str, torch.Tensor]:
    """The whole file in memory, by the libraries themselves: what the loader once converted from."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("use_ema", [True, False], ids=["ema", "plain"])
@pytest.mark.parametrize("stored, dtype", [("fp16", torch.bfloat16), ("fp32", torch.bfloat16), ("fp32", torch.float32)])
@pytest.mark.parametrize("kind", ["safetensors", "ckpt"])
def test_the_streamed_load_is_bit_identical_to_converting_a_full_read(tiny_ema, tiny_ema_files, kind, stored, dtype,
                                                                        use_ema):
    path = tiny_ema_files[kind, stored]
    loaded = load_model(path, preset=tiny_ema.preset, tokenizer_dir=tiny_ema.tokenizer_dir, dtype=dtype, ema=use_ema)
    raw = full_read(path)
    assert loaded.report.used_ema == use_ema
    for key, tensor in loaded.model.state_dict().items():
        source = ema_key(key) if use_ema and key.startswith("model.diffusion_model.") else key
        expected = raw[source].to(dtype) if raw[source].is_floating_point() else raw[source]
        assert same_bits(tensor, expected), key


@pytest.mark.parametrize("kind", ["safetensors", "ckpt"])
def test_only_the_chosen_copy_of_each_weight_is_read(tiny_ema, tiny_ema_files, kind, monkeypatch):
    """EMA copies that are not used are never read, nor the plain UNet weights when the EMA copy is; the
    rest of the file is read once (an EMA file's decay and counter are ignored entries, so never read)."""
    read = []
    real_read = ckpt_io._read_tensor

    def counting_read(path, key, *args):
        read.append(key)
        return real_read(path, key, *args)

    monkeypatch.setattr(ckpt_io, "_read_tensor", counting_read)
    path, keys = tiny_ema_files[kind, "fp16"], set(full_read(tiny_ema_files[kind, "fp16"]))
    for use_ema in (True, False):
        read.clear()
        loaded = load_model(path, preset=tiny_ema.preset, tokenizer_dir=tiny_ema.tokenizer_dir, ema=use_ema)
        expected = {ema_key(k) if use_ema and k.startswith("model.diffusion_model.") else k
                    for k in loaded.model.state_dict()}
        assert sorted(read) == sorted(expected), use_ema  # each once, and nothing else
        assert expected < keys


# Run in a child process: its peak resident set (VmHWM) before and after reading a file's tensors and converting
# them to bfloat16, as JSON. "streamed": the loader's way; "whole": the whole file in memory first (the control).
# Not ru_maxrss: a child's ru_maxrss starts at the peak of the process that started it (the kernel carries the
# forked memory's peak over exec), here pytest's; VmHWM is the peak of the child's own memory.
PEAK_CHILD = """
import json, re, sys
import torch
from ldm.checkpoints.io import open_state_dict, read_state_dict
from ldm.checkpoints.loader import read_weights

def peak_kib():
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\\s*(\\d+) kB", status.read()).group(1))

path, how = sys.argv[1], sys.argv[2]
before = peak_kib()
if how == "streamed":
    state = open_state_dict(path)
    weights = read_weights(state, {key: key for key in state}, "cpu", torch.bfloat16)
else:
    state = read_state_dict(path)
    weights = {key: tensor.to(torch.bfloat16) for key, tensor in state.items()}
print(json.dumps({"before": before, "after": peak_kib(), "bytes": sum(t.nbytes for t in weights.values())}))
"""
needs_proc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc/self/status")


def load_peak_growth(path, how: str) -> tuple[int, int]:
    """(bytes the child's peak resident set grew by while reading, bytes of the converted tensors)."""
    done = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(path), how], capture_output=True, text=True,
                          check=True, timeout=120)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return (figures["after"] - figures["before"]) * 1024, figures["bytes"]


@pytest.fixture(scope="module")
def fp16_files(tmp_path_factory):
    """256 MiB of float16 in 64 tensors of 4 MiB, as .safetensors and as .ckpt."""
    folder = tmp_path_factory.mktemp("peak")
    state = {f"block.{i}.weight": torch.full((1024, 2048), float(i), dtype=torch.float16) for i in range(64)}
    save_file(state, str(folder / "big.safetensors"))
    torch.save(state, folder / "big.ckpt")
    return {"safetensors": folder / "big.safetensors", "ckpt": folder / "big.ckpt"}


@needs_proc
@pytest.mark.parametrize("kind", ["safetensors", "ckpt"])
def test_the_file_and_its_converted_copy_never_coexist(fp16_files, kind):
    """The peak of a fresh process reading a file and converting it, tensor by tensor, stays near the size of
    the converted tensors (here the file's size): the file's copy is never held whole beside them."""
    growth, converted = load_peak_growth(fp16_files[kind], "streamed")
    assert converted == 256 * 2**20
    assert 0.8 * converted < growth < 1.05 * converted + 24 * 2**20  # the part buffer is 16 MiB


@needs_proc
def test_the_peak_measurement_sees_a_whole_file_copy(fp16_files):
    """Control: reading the whole file first and then converting peaks at both copies, which the bound refuses."""
    growth, converted = load_peak_growth(fp16_files["safetensors"], "whole")
    assert growth > 1.7 * converted
