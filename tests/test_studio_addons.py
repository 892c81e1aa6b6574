"""The studio's Add-ons list and Emphasis menu without a browser: search, click to insert, rescan, the
note on empty folders, the warning for a restored prompt's missing LoRAs, and the emphasis from the
menu to the request and back from a PNG."""

from __future__ import annotations

import types

import gradio as gr
import pytest
from PIL import Image

import app
from ldm.addons.listing import AddonEntry
from ldm.sampling.steps import SamplingCancelled
from ldm.addons.lora import lora_hash
from ldm.tasks.parameters import format_parameters, lora_fields, parse_parameters, save_png
from ldm.tasks.result import GenerationResult
from tests.builders.lora import random_lora, write
from ui import addons
from ui.tabs import txt2img as txt2img_tab

UNET_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
TITLES = {"img2img": "Image to image", "inpaint": "Inpainting", "upscale": "Upscaling", "layout": "Layout"}


def lora(folder, name, width=768, rank=4):
    return write(folder / f"{name}.safetensors", random_lora({UNET_K: (32, width)}, rank))


@pytest.fixture
def studio(tmp_path):
    folder = tmp_path / "loras"
    lora(folder, "InkWash")
    lora(folder, "watercolor", width=1024, rank=8)
    (folder / "broken.safetensors").write_bytes(b"junk")
    studio = app.make_studio(app.parse_args(["--outputs", str(tmp_path / "out"), "--device", "cpu", "--dtype", "fp32",
                                             "--lora-dir", str(folder)]))
    studio.lora_folder = folder
    return studio


@pytest.fixture
def tab(studio):
    with gr.Blocks():
        return txt2img_tab.build(studio, TITLES)


def click(row: int):
    return types.SimpleNamespace(index=[row, 0], row_value=None)


def test_the_list_shows_each_file_and_a_search_keeps_the_names_that_contain_it(studio, tab):
    shown = addons.listing(studio, "")
    assert [r[0] for r in shown.rows] == ["broken", "InkWash", "watercolor"] and shown.note == ""
    ink = shown.rows[1]
    assert ink[1:5] == ["LoRA", "SD 1", 4, round((studio.lora_folder / "InkWash.safetensors").stat().st_size / 1e6, 1)]
    assert shown.rows[0][5].startswith("cannot be read: ")
    found = addons.shower(studio, tab.addons)("INK")
    assert [r[0] for r in found[tab.addons.table]["value"]] == ["InkWash"] and found[tab.addons.shown] == ["<lora:InkWash:1>"]
    none = addons.shower(studio, tab.addons)("oil")
    assert none[tab.addons.table]["value"] == [] and none[tab.addons.table]["visible"] and "oil" in none[tab.addons.note]


def test_an_entry_for_another_family_says_so():
    entry = AddonEntry("lora", "watercolor", None, 2_000_000, "SD 2", 8, ("LoRA",))
    assert addons.row(entry, "SD 1") == ["watercolor", "LoRA", "SD 2", 8, 2.0, "made for SD 2; this model is SD 1"]
    assert addons.row(entry, "SD 2")[5] == "" and addons.row(entry, None)[5] == ""
    assert addons.row(AddonEntry("embedding", "bad-hands", None, 0), None)[:3] == ["bad-hands", "Embedding", "unknown"]


def test_a_click_on_a_row_adds_its_tag_to_the_prompt(studio, tab):
    pick = addons.picker()
    texts = addons.listing(studio, "").texts
    assert pick("a cat", texts, click(1)) == "a cat <lora:InkWash:1>"
    assert pick("", texts, click(2)) == "<lora:watercolor:1>"
    assert pick("a cat <lora:InkWash:1>", texts, click(1)) == "a cat <lora:InkWash:1>"  # not twice
    assert pick("<lora:InkWash:0.4> a cat", texts, click(1)) == "<lora:InkWash:0.4> a cat"  # at any weight
    assert pick("a cat, ", texts, click(1)) == "a cat, <lora:InkWash:1>"
    assert isinstance(pick("a cat", texts, click(7)), type(gr.skip()))
    assert addons.insert("a cat", "bad-hands") == "a cat bad-hands"  # an embedding's text is its name


def test_rescan_reads_the_folders_again(studio, tab):
    lora(studio.lora_folder, "charcoal")
    assert "charcoal" not in [r[0] for r in addons.shower(studio, tab.addons)("")[tab.addons.table]["value"]]  # read once
    rows = addons.shower(studio, tab.addons, refresh=True)("")[tab.addons.table]["value"]
    assert "charcoal" in [r[0] for r in rows]


def test_empty_folders_say_where_to_put_files(tmp_path):
    studio = app.make_studio(app.parse_args(["--outputs", str(tmp_path / "out"), "--device", "cpu",
                                             "--lora-dir", str(tmp_path / "empty")]))
    studio.addons = lambda refresh=False: []  # the project's own models/Lora may hold files
    shown = addons.listing(studio, "")
    assert shown.rows == [] and not shown.any and "No add-ons found" in shown.note
    assert str(tmp_path / "empty") in shown.note and all(f"`{f}`" in shown.note for f in studio.lora_dirs())


def studio_png(path, text: str):
    return save_png(Image.new("RGB", (8, 8)), path, text)


def test_restoring_a_prompt_with_a_missing_lora_warns_and_keeps_the_tags(studio, tab, tmp_path):
    restore = txt2img_tab.Restore(tab.prompt, tab.negative, tab.sampling, tab.size.width, tab.size.height, studio.lora_dirs)
    text = ("a cat <lora:InkWash:0.8> <lora:gone:1>\nNegative prompt: <lora:lost:1> blur\n"
            "Steps: 3, Sampler: DDIM, CFG scale: 4, Seed: 5, Size: 64x64, Lora hashes: \"InkWash: 0123456789ab\"")
    with pytest.warns(UserWarning, match=r"not in the LoRA folders: gone, lost \(searched .*loras"):
        updates, _ = restore.updates(studio_png(tmp_path / "a.png", text))
    assert updates[tab.prompt] == "a cat <lora:InkWash:0.8> <lora:gone:1>" and updates[tab.negative] == "<lora:lost:1> blur"


def page_values(tab, values: dict) -> dict:
    components = [tab.model.dropdown, tab.prompt, tab.negative, tab.size.width, tab.size.height, tab.batch_count,
                  tab.batch_size, *tab.tiling.components, *tab.sampling.components, *tab.hires.components]
    data = {c: "" if isinstance(c, gr.Textbox) and c.value is None else c.value for c in components}
    return {**data, tab.output.images: [], **values}


def generate(studio, tab, data) -> list[dict]:
    return list(txt2img_tab.handler(studio, tab)(data, types.SimpleNamespace(session_hash="s"), progress=lambda *a, **k: None))


def test_the_parameters_of_a_picked_image_show_its_lora_hashes(studio, tab, monkeypatch):
    def fake_txt2img(loaded, request, callback=None, should_stop=None):  # the engine's own "Lora hashes" field
        text = format_parameters(request.prompt, "", {"Steps": request.steps, "Seed": request.seed, **lora_fields(request)})
        return GenerationResult([Image.new("RGB", (8, 8))], [request.seed], [text])

    monkeypatch.setattr(txt2img_tab, "txt2img", fake_txt2img)
    updates = generate(studio, tab, page_values(tab, {tab.prompt: "a cat <lora:InkWash:0.7>"}))
    fields = parse_parameters(updates[-1][tab.output.parameters])
    assert fields["Lora hashes"] == f"InkWash: {lora_hash(studio.lora_folder / 'InkWash.safetensors')}"


def test_the_emphasis_menu_reaches_the_request_and_is_restored(studio, tab, tmp_path, monkeypatch):
    assert tab.sampling.emphasis.value == "Original" and [c[0] for c in tab.sampling.emphasis.choices] == ["Original", "No norm"]
    seen = []

    def fake_txt2img(loaded, request, callback=None, should_stop=None):
        seen.append(request)
        raise SamplingCancelled(0, 1)

    monkeypatch.setattr(txt2img_tab, "txt2img", fake_txt2img)
    generate(studio, tab, page_values(tab, {tab.prompt: "a (red:1.3) circle", tab.sampling.emphasis: "No norm"}))
    assert seen[0].emphasis == "No norm"

    restore = txt2img_tab.Restore(tab.prompt, tab.negative, tab.sampling, tab.size.width, tab.size.height)
    assert tab.sampling.emphasis in restore.components
    head = "a (red:1.3) circle\nSteps: 3, Sampler: DDIM, CFG scale: 4, Seed: 5, Size: 64x64"
    updates, _ = restore.updates(studio_png(tmp_path / "b.png", head + ", Emphasis: No norm"))
    assert updates[tab.sampling.emphasis] == "No norm"
    updates, _ = restore.updates(studio_png(tmp_path / "c.png", head))  # written only when not the default
    assert updates[tab.sampling.emphasis] == "Original"
    with pytest.warns(UserWarning, match="emphasis 'Loud' is not known"):
        updates, _ = restore.updates(studio_png(tmp_path / "d.png", head + ", Emphasis: Loud"))
    assert tab.sampling.emphasis not in updates


def test_the_tabs_with_a_prompt_have_the_list_and_the_menu_and_semantic_has_neither(studio):
    from ui.studio import TABS

    for name, module in TABS.items():
        with gr.Blocks():
            built = module.build(studio, {n: m.TITLE for n, m in TABS.items()})
        has_prompt = hasattr(built, "prompt")
        assert hasattr(built, "addons") == has_prompt, name
        assert (built.sampling.emphasis is not None) == has_prompt, name


def test_embeddings_are_listed_after_the_loras_and_a_click_adds_the_name_as_a_word(tmp_path):
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": torch.randn(3, 768)}, str(folder / "ink.safetensors"))
    (folder / "broken.pt").write_bytes(b"junk")
    lora(tmp_path / "loras", "InkWash")
    studio = app.make_studio(app.parse_args(["--outputs", str(tmp_path / "out"), "--device", "cpu", "--lora-dir",
                                             str(tmp_path / "loras"), "--embeddings-dir", str(folder)]))
    shown = addons.listing(studio, "ink")
    assert [r[:3] for r in shown.rows] == [["InkWash", "LoRA", "SD 1"], ["ink", "Embedding (3 vectors)", "SD 1"]]
    assert shown.texts == ["<lora:InkWash:1>", "ink"]
    broken = addons.listing(studio, "broken").rows
    assert len(broken) == 1 and broken[0][5]  # listed with its problem
    assert folder in studio.addon_folders()["embedding"]
    pick = addons.picker()
    assert pick("pink flowers", shown.texts, click(1)) == "pink flowers ink"  # "pink" is not the word "ink"
    assert pick("flowers, ink", shown.texts, click(1)) == "flowers, ink"
