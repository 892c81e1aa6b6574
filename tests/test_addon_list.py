"""The add-on list: LoRA files of the folders listed from their headers, with family, rank, type and
size; a file that cannot be read is listed with its problem."""

from __future__ import annotations

import torch

from ldm.addons.listing import AddonEntry, fits, list_loras, lora_family, model_family_name
from ldm.checkpoints.presets import find_preset
from tests.builders.lora import random_lora, write

TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
UNET_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"


def test_each_file_is_listed_with_its_family_rank_type_and_size(tmp_path):
    write(tmp_path / "ink.safetensors", random_lora({TE_Q: (768, 768), CONV: (32, 32, 3, 3)}, 4))
    write(tmp_path / "sub" / "Wide.safetensors", random_lora({UNET_K: (32, 1024)}, 8))  # SD 2 by its key width
    write(tmp_path / "stated.safetensors", random_lora({UNET_K: (32, 768)}, 2), {"ss_base_model_version": "sdxl_base_v1-0"})
    torch.save({"lora_unet_x.hada_w1_a": torch.zeros(4, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 4),
                "lora_unet_x.hada_w2_a": torch.zeros(4, 3), "lora_unet_x.hada_w2_b": torch.zeros(3, 4)}, tmp_path / "hada.pt")
    entries = {e.name: e for e in list_loras([tmp_path, tmp_path / "missing"])}
    assert list(entries) == ["hada", "ink", "stated", "Wide"]  # by name, any case
    ink = entries["ink"]
    assert (ink.kind, ink.family, ink.rank, ink.types, ink.problem) == ("lora", "SD 1", 4, ("LoCon",), None)
    assert ink.size == (tmp_path / "ink.safetensors").stat().st_size and ink.prompt_text == "<lora:ink:1>"
    assert (entries["Wide"].family, entries["Wide"].rank, entries["Wide"].types) == ("SD 2", 8, ("LoRA",))
    assert entries["stated"].family == "SDXL"  # the metadata wins over the shapes
    assert (entries["hada"].family, entries["hada"].rank, entries["hada"].types) == ("unknown", 3, ("LoHa",))


def test_an_unreadable_file_is_listed_with_its_problem_and_the_others_still_are(tmp_path):
    write(tmp_path / "good.safetensors", random_lora({UNET_K: (32, 768)}, 4))
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (tmp_path / "evil.pt").write_bytes(b"not a pickle at all")
    write(tmp_path / "checkpoint.safetensors", {"model.diffusion_model.out.2.weight": torch.zeros(4, 4)})
    entries = {e.name: e for e in list_loras([tmp_path])}
    assert entries["good"].problem is None and entries["good"].family == "SD 1"
    for name in ("broken", "evil", "checkpoint"):
        assert entries[name].problem and entries[name].rank is None, name
        assert str(tmp_path) not in entries[name].problem  # the list names the file
    assert "no LoRA tensors" in entries["checkpoint"].problem


def test_the_first_folder_that_holds_a_name_wins(tmp_path):
    first = write(tmp_path / "a" / "ink.safetensors", random_lora({UNET_K: (32, 768)}, 4))
    write(tmp_path / "b" / "ink.safetensors", random_lora({UNET_K: (32, 1024)}, 8))
    (entry,) = list_loras([tmp_path / "a", tmp_path / "b"])
    assert entry.path == first and entry.family == "SD 1"


def test_a_family_from_peft_text_keys_and_none_where_widths_disagree():
    peft = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": (4, 1024)}
    assert lora_family(peft, {}) == "SD 2"
    assert lora_family({f"{UNET_K}.lora_down.weight": (4, 768), f"{UNET_K}x.lora_down.weight": (4, 1024)}, {}) == "unknown"
    assert lora_family({"lora_te2_x.lora_down.weight": (4, 1280)}, {}) == "SDXL"
    assert lora_family({}, {"ss_v2": "True"}) == "SD 2"


def test_entries_are_matched_against_the_models_family():
    assert model_family_name(find_preset("v1-inference").model) == "SD 1"
    assert model_family_name(find_preset("v2-inference").model) == "SD 2"
    assert model_family_name(find_preset("default-txt2img").model) is None
    entry = AddonEntry("lora", "ink", None, 0, "SD 2")
    assert fits(entry, "SD 1") is False and fits(entry, "SD 2") is True and fits(entry, None) is None
    assert fits(AddonEntry("lora", "x", None, 0), "SD 1") is None
