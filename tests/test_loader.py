"""Strict loading of original-layout files: EMA selection, extra and missing keys, dtypes."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer

from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.loader import ema_key, load_model
from ldm.text import clip_tokenizer as tokenizers
from ldm.text import lookup
from ldm.text.lookup import TokenizerNotFoundError
from tests.builders import sd2, sd_v1

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
