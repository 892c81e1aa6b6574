"""SDXL's presets build exactly the original checkpoints' keys and shapes (on the meta device: no memory).

The base model's UNet and first stage are pinned to the reference key list of sd_xl_base_1.0
(``fixtures/sd_xl_base.json``, 1,928 tensors); its text towers to the layer names of CLIP ViT-L/14
and OpenCLIP ViT-bigG/14 under sgm's ``conditioner.embedders.N`` prefixes.

There is no key list of the refiner here, so its contract is derived from its config
(``configs/sd_xl_refiner.yaml``) and stated tensor by tensor below: model_channels 384 and
channel_mult [1, 2, 4, 4] give the widths 384/768/1536/1536; attention_resolutions [4, 2] put
transformers at levels 1 and 2 only, that is input_blocks 4, 5, 7, 8, the middle block and
output_blocks 3..8, each of transformer_depth 4 (ComfyUI writes the same as [0, 0, 4, 4, 4, 4, 0, 0]);
context_dim 1280, adm_in_channels 2560 into label_emb of 4 x 384; the single text tower is the bigG at
``conditioner.embedders.0``; the first stage is the base's. Its UNet's parameter count is the one the
layer formulas give for that config (2,259,526,660, ``samplers-sdxl.md`` B3).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ldm.checkpoints.loader import build_model
from ldm.checkpoints.presets import find_preset
from tests.helpers import clip_vit_l14_text_keys, open_clip_text_keys

FIXTURES = Path(__file__).parent / "fixtures"
UNET = "model.diffusion_model."


def key_shapes(name: str) -> dict[str, list[int]]:
    model = build_model(find_preset(name).model)
    assert next(model.parameters()).is_meta
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def parameters(keys: dict[str, list[int]], prefix: str) -> int:
    total = 0
    for key, shape in keys.items():
        if key.startswith(prefix):
            n = 1
            for d in shape:
                n *= d
            total += n
    return total


@pytest.fixture(scope="module")
def base():
    return key_shapes("sd_xl_base")


@pytest.fixture(scope="module")
def refiner():
    return key_shapes("sd_xl_refiner")


def test_sdxl_base_unet_and_first_stage_match_the_reference_keys_exactly(base):
    reference = json.loads((FIXTURES / "sd_xl_base.json").read_text())
    assert len(reference) == 1928
    ours = {k: v for k, v in base.items() if not k.startswith("conditioner.")}
    assert sorted(set(reference) - set(ours)) == []
    assert sorted(set(ours) - set(reference)) == []
    assert {k: v for k, v in ours.items() if reference[k] != v} == {}
    assert parameters(ours, UNET) == 2_567_463_684


def test_sdxl_base_text_towers_are_clip_vit_l_and_open_clip_bigg(base):
    ours = {k: v for k, v in base.items() if k.startswith("conditioner.")}
    expected = clip_vit_l14_text_keys("conditioner.embedders.0.")
    expected.update(open_clip_text_keys("conditioner.embedders.1.model.", 1280, 32))
    assert ours == expected
    assert parameters(ours, "conditioner.embedders.0.") == 123_060_480
    assert parameters(ours, "conditioner.embedders.1.") == 694_659_840 + 1  # + the scalar logit_scale


def test_sdxl_base_transformer_depths_are_0_2_10_and_10_in_the_middle(base):
    def depth(block: str) -> int:
        found = {int(m.group(1)) for k in base if (m := re.match(re.escape(UNET + block) + r"\.1\.transformer_blocks\.(\d+)\.", k))}
        return max(found) + 1 if found else 0

    assert [depth(f"input_blocks.{i}") for i in range(1, 9)] == [0, 0, 0, 2, 2, 0, 10, 10]
    assert depth("middle_block") == 10
    assert [depth(f"output_blocks.{i}") for i in range(9)] == [10, 10, 10, 2, 2, 2, 0, 0, 0]


def test_sdxl_refiner_keys_follow_from_its_config(refiner):
    base_first_stage = {k: v for k, v in json.loads((FIXTURES / "sd_xl_base.json").read_text()).items()
                        if k.startswith("first_stage_model.")}
    assert {k: v for k, v in refiner.items() if k.startswith("first_stage_model.")} == base_first_stage
    assert {k: v for k, v in refiner.items() if k.startswith("conditioner.")} == \
        open_clip_text_keys("conditioner.embedders.0.model.", 1280, 32)
    assert refiner[UNET + "input_blocks.0.0.weight"] == [384, 4, 3, 3]
    assert refiner[UNET + "label_emb.0.0.weight"] == [1536, 2560]
    assert refiner[UNET + "time_embed.0.weight"] == [1536, 384]
    attention = sorted({m.group(1) for k in refiner if (m := re.match(re.escape(UNET) + r"(\w+\.\d+|middle_block)\.1\.transformer_blocks", k))},
                       key=lambda s: (s.split(".")[0], int(s.split(".")[1]) if "." in s else 0))
    assert attention == ["input_blocks.4", "input_blocks.5", "input_blocks.7", "input_blocks.8", "middle_block",
                         *(f"output_blocks.{i}" for i in range(3, 9))]
    widths = {"input_blocks.4": 768, "input_blocks.7": 1536, "middle_block": 1536, "output_blocks.3": 1536, "output_blocks.8": 768}
    for block, width in widths.items():
        p = f"{UNET}{block}.1."
        assert refiner[p + "proj_in.weight"] == [width, width]  # linear projections
        assert refiner[p + "transformer_blocks.3.attn2.to_k.weight"] == [width, 1280]
        assert p + "transformer_blocks.4.attn1.to_q.weight" not in refiner
    assert max(int(k.split(".")[3]) for k in refiner if k.startswith(UNET + "output_blocks.")) == 11
    assert parameters(refiner, UNET) == 2_259_526_660


def test_sdxl_presets_scale_and_condition_as_the_original_configs():
    base, refiner = find_preset("sd_xl_base").model, find_preset("sd_xl_refiner").model
    assert base.scale_factor == refiner.scale_factor == 0.13025
    assert (base.cond_stage.context_dim, base.cond_stage.adm_channels) == (2048, 2816)
    assert (refiner.cond_stage.context_dim, refiner.cond_stage.adm_channels) == (1280, 2560)
    assert base.cond_stage.vector_inputs == ("original_size", "crop_coords_top_left", "target_size")
    assert refiner.cond_stage.vector_inputs == ("original_size", "crop_coords_top_left", "aesthetic_score")
    assert (base.cond_stage.clip.layer, base.cond_stage.open_clip.layer, base.cond_stage.open_clip.final_norm) == \
        ("penultimate", "penultimate", False)
