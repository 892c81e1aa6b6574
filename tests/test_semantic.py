"""LDM semantic synthesis (semantic_synthesis256 / 512): the presets' key contract, detection of the two
models that hold the same tensors, the SpatialRescaler against a hand computation, the task, the CLI
and the studio tab, on a tiny random model in the original key layout (``tests.builders.semantic``).

There is no diffusers implementation of this model (diffusers converts none of LDM's concat models
with a SpatialRescaler), so there is no parity test: the conditioner is checked against the
original's arithmetic written out by hand, and the rest is the shared UNet, VQ first stage and DDIM
that the other parity tests cover.
"""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.checkpoints.detect import detect
from ldm.checkpoints.loader import build_model
from ldm.checkpoints.original_config import original_config
from ldm.checkpoints.presets import find_preset, list_presets, preset_from_dict
from ldm.cli import main
from ldm.models.spatial_rescaler import SpatialRescaler, SpatialRescalerConfig
from ldm.tasks.parameters import read_png_parameters
from ldm.tasks.registry import tasks_for
from ldm.tasks.request import GenerationRequest, TilingOptions
from ldm.tasks.semantic import semantic
from tests.builders.semantic import CLASSES, label_map, preset_dict

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ("semantic_synthesis256", "semantic_synthesis512")
REQUEST = GenerationRequest("", steps=3, eta=1.0, seed=11)


def reference_shapes(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads((FIXTURES / f"{name}.json").read_text()).items()}


# --- presets and detection ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_the_presets_build_exactly_the_original_keys_and_shapes(name):
    model = build_model(find_preset(name).model)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == reference_shapes(name)
    attention = sorted({k.rsplit(".", 2)[0] for k in model.state_dict() if k.endswith("qkv.weight")})
    assert attention == ["model.diffusion_model.middle_block.1"]  # [32, 16, 8] are never reached


def test_both_models_are_semantic_only_and_their_files_hold_the_same_tensors():
    low, high = (find_preset(n) for n in NAMES)
    assert reference_shapes(NAMES[0]) == reference_shapes(NAMES[1])
    assert high.variant_of == low.name and not high.detect and low.detect
    assert (low.model.latent_size, high.model.latent_size) == (64, 128)
    assert dataclasses.replace(high.model, latent_size=64) == low.model  # nothing else differs
    assert tasks_for(low.model) == ("semantic",) == tasks_for(high.model)


def test_every_variant_names_a_detected_preset_with_the_same_tensors():
    presets = {p.name: p for p in list_presets()}
    for preset in presets.values():
        if preset.variant_of:
            base = presets[preset.variant_of]
            assert base.detect, f"{preset.name} is a variant of {base.name}, which nothing detects"
            shapes = lambda p: {k: tuple(v.shape) for k, v in build_model(p.model).state_dict().items()}  # noqa: E731
            assert shapes(preset) == shapes(base)


def test_a_file_that_says_nothing_is_the_256_model_with_a_notice_naming_the_512_one(tmp_path):
    found = detect(reference_shapes(NAMES[0]), list_presets(), tmp_path / "landscapes.ckpt")
    assert found.preset.name == "semantic_synthesis256"
    assert "--preset semantic_synthesis512" in found.notice and "landscapes.yaml" in found.notice


@pytest.mark.parametrize(("image_size", "expected"), [(64, "semantic_synthesis256"), (128, "semantic_synthesis512")])
def test_the_original_config_beside_the_file_picks_the_model(tmp_path, image_size, expected):
    original = OmegaConf.to_yaml(original_config(find_preset(NAMES[0]).model))  # in the structure of LDM's config.yaml
    assert original.count("image_size: 64") == 2  # the model's and its UNet's
    (tmp_path / "landscapes.yaml").write_text(original.replace("image_size: 64", f"image_size: {image_size}"))
    found = detect(reference_shapes(NAMES[0]), list_presets(), tmp_path / "landscapes.ckpt")
    assert found.preset.name == expected and found.notice == ""


def test_a_config_beside_with_another_size_keeps_the_notice(tmp_path):
    (tmp_path / "landscapes.yaml").write_text("model:\n  params:\n    image_size: 96\n")
    found = detect(reference_shapes(NAMES[0]), list_presets(), tmp_path / "landscapes.ckpt")
    assert found.preset.name == "semantic_synthesis256" and "semantic_synthesis512" in found.notice


def test_a_variant_may_not_have_a_detect_section_of_its_own():
    raw = dict(preset_dict(), variant_of="semantic_synthesis256",
               detect={"cond_stage_model.channel_mapper.weight": [3, CLASSES, 1, 1]})
    with pytest.raises(ValueError, match="no detect section"):
        preset_from_dict(raw, Path("bad.yaml"))


def test_the_concat_channels_are_checked_against_the_conditioner():
    raw = preset_dict()
    raw["model"]["cond_stage"] = dict(raw["model"]["cond_stage"], out_channels=4)
    with pytest.raises(ValueError, match="in_channels is 6"):
        preset_from_dict(raw, Path("bad.yaml"))
    raw["model"]["cond_stage"] = dict(raw["model"]["cond_stage"], out_channels=3, n_stages=3)
    with pytest.raises(ValueError, match="reduces the segmentation 8x"):
        preset_from_dict(raw, Path("bad.yaml"))


# --- the conditioner ---------------------------------------------------------------------------------


def test_the_spatial_rescaler_is_bilinear_halving_twice_then_a_1x1_map():
    config = SpatialRescalerConfig(n_stages=2, in_channels=5, out_channels=3)
    rescaler = SpatialRescaler(config)
    torch.nn.init.normal_(rescaler.channel_mapper.weight, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 5, 8, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # By hand: bilinear x0.5 with align_corners False samples at 2i + 0.5, the mean of each 2x2 block.
    expected = x
    for _ in range(2):
        expected = (expected[..., 0::2, 0::2] + expected[..., 1::2, 0::2] + expected[..., 0::2, 1::2]
                    + expected[..., 1::2, 1::2]) / 4
    expected = torch.einsum("oc,bchw->bohw", rescaler.channel_mapper.weight[:, :, 0, 0].double(), expected)
    assert list(rescaler.state_dict()) == ["channel_mapper.weight"]
    got = rescaler.double()(x)
    assert got.shape == (1, 3, 2, 3)
    assert torch.allclose(got, expected, atol=1e-12)


def test_class_indices_give_what_their_one_hot_map_gives():
    rescaler = SpatialRescaler(SpatialRescalerConfig(n_stages=2, in_channels=CLASSES, out_channels=3))
    labels = torch.from_numpy(np.asarray(label_map((20, 12)), dtype=np.int64))[None]
    one_hot = torch.nn.functional.one_hot(labels, CLASSES).permute(0, 3, 1, 2).float()
    assert torch.allclose(rescaler.encode_labels(labels), rescaler(one_hot), atol=1e-6)


# --- the task ----------------------------------------------------------------------------------------


def test_the_picture_has_the_maps_size_and_each_seed_gives_the_same_picture(loaded_semantic):
    loaded = loaded_semantic
    segmentation = label_map((48, 32))
    first = semantic(loaded, segmentation, REQUEST)
    again = semantic(loaded, segmentation, REQUEST)
    other = semantic(loaded, segmentation, dataclasses.replace(REQUEST, seed=12))
    assert first.images[0].size == (48, 32) and first.notices == []
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))
    assert not np.array_equal(np.asarray(first.images[0]), np.asarray(other.images[0]))
    assert "Seed: 11" in first.parameters[0] and "Size: 48x32" in first.parameters[0]


def test_the_picture_follows_the_map(loaded_semantic):
    loaded = loaded_semantic
    plain = np.zeros((32, 32), dtype=np.uint8)
    striped = plain.copy()
    striped[:, 16:] = CLASSES - 1
    a, b = (semantic(loaded, Image.fromarray(m, mode="L"), REQUEST).images[0] for m in (plain, striped))
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_a_palette_map_reads_its_indices_and_odd_sizes_are_rounded_with_a_notice(loaded_semantic):
    loaded = loaded_semantic
    palette = label_map((40, 32)).convert("P")  # an L image converted keeps each value as its index
    result = semantic(loaded, palette, REQUEST)
    assert result.images[0].size == (32, 32)  # 40 rounds to 32 (2.5 multiples of 16, rounded to even)
    assert any("not a multiple of 16" in n for n in result.notices)
    assert any("nearest neighbour" in n for n in result.notices)


def test_a_map_larger_than_a_tile_is_denoised_in_tiles_that_each_see_their_part_of_the_map(loaded_semantic):
    loaded = loaded_semantic
    tiled = dataclasses.replace(REQUEST, tiling=TilingOptions("always", 32, 8))
    segmentation = label_map((64, 48))
    result = semantic(loaded, segmentation, tiled)
    assert result.images[0].size == (64, 48) and result.notices  # the notice says how it was tiled
    flipped = semantic(loaded, segmentation.transpose(Image.FLIP_LEFT_RIGHT), tiled)
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(flipped.images[0]))


def test_a_class_out_of_range_is_refused_naming_the_largest_allowed(loaded_semantic):
    loaded = loaded_semantic
    labels = np.zeros((16, 16), dtype=np.uint8)
    labels[3, 3] = CLASSES
    with pytest.raises(ValueError, match=f"holds class {CLASSES}.*largest allowed class index is {CLASSES - 1}"):
        semantic(loaded, Image.fromarray(labels, mode="L"), REQUEST)


def test_an_rgb_picture_is_refused_as_a_label_map(loaded_semantic):
    loaded = loaded_semantic
    with pytest.raises(ValueError, match="mode L or P"):
        semantic(loaded, Image.new("RGB", (16, 16)), REQUEST)


def test_a_model_that_takes_no_map_is_refused():
    other = types.SimpleNamespace(model=types.SimpleNamespace(config=types.SimpleNamespace(concat_input="none")),
                                  name="a text model")
    with pytest.raises(ValueError, match="a text model is not a semantic synthesis model"):
        semantic(other, label_map(), REQUEST)


# --- the command line ----------------------------------------------------------------------------------


def test_the_cli_writes_a_png_of_the_maps_size_with_its_parameters(tiny_semantic, tmp_path, capsys):
    path, preset = tiny_semantic.path, tiny_semantic.preset
    label_map((32, 48)).save(tmp_path / "map.png")
    out = tmp_path / "out.png"
    code = main(["semantic", "--model", str(path), "--preset", str(preset.source), "--segmentation",
                 str(tmp_path / "map.png"), "--steps", "2", "--seed", "4", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    with Image.open(out) as image:
        assert image.size == (32, 48)
    fields = read_png_parameters(out)
    assert fields["Steps"] == "2" and fields["Seed"] == "4" and fields["Eta DDIM"] == "1.0"  # the preset's eta


def test_the_cli_names_a_missing_model_and_a_bad_class(tiny_semantic, tmp_path, capsys):
    path, preset = tiny_semantic.path, tiny_semantic.preset
    Image.fromarray(np.full((16, 16), 200, dtype=np.uint8), mode="L").save(tmp_path / "bad.png")
    assert main(["semantic", "--segmentation", str(tmp_path / "bad.png")]) == 2
    assert "no embedded model: pass --model" in capsys.readouterr().err
    assert main(["semantic", "--model", str(path), "--preset", str(preset.source), "--segmentation",
                 str(tmp_path / "bad.png"), "--out", str(tmp_path / "never.png")]) == 2
    assert f"largest allowed class index is {CLASSES - 1}" in capsys.readouterr().err
    assert not (tmp_path / "never.png").exists()


# --- the studio tab --------------------------------------------------------------------------------------


def studio_with(folders, monkeypatch, extra_presets=()):
    import ldm.checkpoints.catalog as catalog
    import ldm.checkpoints.loader as loader
    from ui.outputs import OutputWriter
    from ui.services import ModelCache, Studio

    presets = [*list_presets(), *extra_presets]
    monkeypatch.setattr(catalog, "list_presets", lambda: presets)
    monkeypatch.setattr(loader, "list_presets", lambda: presets)
    monkeypatch.setattr("ui.services.WEIGHTS_DIR", folders[0] / "no-weights-here")
    return Studio(folders, OutputWriter(folders[0] / "outputs"), ModelCache(torch.device("cpu"), torch.float32))


TITLES = {"img2img": "Image to image", "inpaint": "Inpainting", "upscale": "Upscaling"}


def build_tab(studio):
    import gradio as gr

    from ui.tabs import semantic as tab_module

    with gr.Blocks():
        return tab_module, tab_module.build(studio, TITLES)


def test_the_tab_says_how_to_add_a_model_when_there_is_none(tmp_path, monkeypatch):
    import gradio as gr

    studio = studio_with([tmp_path], monkeypatch)
    module, tab = build_tab(studio)
    assert "No semantic synthesis model" in module.no_model_note(studio) and "weights/" in module.no_model_note(studio)
    generate = module.handler(studio, tab)
    data = {tab.model.dropdown: None, tab.segmentation: None, tab.sampling.steps: 2, tab.sampling.eta: 1.0,
            tab.sampling.seed: 3, tab.output.images: []}
    with pytest.raises(gr.Error, match="(?i)no model for semantic is installed"):
        list(generate(data, types.SimpleNamespace(session_hash="s"), progress=lambda *a, **k: None))


def test_the_tab_generates_from_an_uploaded_map(tiny_semantic, tmp_path, monkeypatch):
    path, preset = tiny_semantic.path, tiny_semantic.preset
    detected = dataclasses.replace(preset, detect={"cond_stage_model.channel_mapper.weight": (3, CLASSES, 1, 1)})
    studio = studio_with([path.parent], monkeypatch, [detected])
    module, tab = build_tab(studio)
    assert module.no_model_note(studio) == ""
    assert [e.path for e in studio.entries_for("semantic")] == [path.resolve()]
    label_map((32, 32)).save(tmp_path / "map.png")
    assert module.label_colours(module.open_label_map(str(tmp_path / "map.png"))).mode == "RGB"
    generate = module.handler(studio, tab)
    data = {tab.model.dropdown: str(path.resolve()), tab.segmentation: str(tmp_path / "map.png"), tab.sampling.steps: 2,
            tab.sampling.eta: 1.0, tab.sampling.seed: 3, tab.sampling.sampler: "DPM++ SDE", tab.sampling.schedule: "Automatic",
            tab.sampling.s_noise: 1.0, tab.output.images: []}
    updates = list(generate(data, types.SimpleNamespace(session_hash="s"), progress=lambda *a, **k: None))
    (saved,) = updates[-1][tab.output.gallery]
    with Image.open(saved) as image:
        assert image.size == (32, 32)
    assert (Path(saved).parent / f"{Path(saved).stem}-segmentation.png").is_file()
    assert "Seed: 3" in updates[-1][tab.output.parameters]
    assert "Sampler: DPM++ SDE, Schedule type: Karras," in updates[-1][tab.output.parameters]
