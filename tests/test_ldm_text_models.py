"""CompVis LDM's text-to-image (txt2img-1p4B-eval, text2img256) and layout-to-image
(layout2img-openimages256) models: key contracts, detection, the bert-base-uncased tokenizer's lookup,
LDM's layout tokens, and generation from tiny original-layout files through the loader and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from PIL import Image

from ldm.checkpoints.detect import detect_file, detect_preset
from ldm.checkpoints.loader import SCHEDULE_BUFFERS, build_model, ema_key
from ldm.checkpoints.presets import find_preset, list_presets
from ldm.cli import main, read_boxes
from ldm.tasks.layout import layout, reads_class_ids, takes_layout_tokens
from ldm.tasks.parameters import read_png_parameters
from ldm.tasks.registry import tasks_for
from ldm.tasks.request import GenerationRequest
from ldm.tasks.txt2img import sample_latents, txt2img
from ldm.text.bert_tokenizer import BertPromptTokenizer, find_bert_tokenizer
from ldm.text.layout_tokens import LDMLayoutTokenizer
from ldm.text.lookup import TokenizerNotFoundError
from tests.builders import ldm_text

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ["txt2img-1p4B-eval", "text2img256", "layout2img-openimages256"]


def reference(name: str) -> dict[str, list[int]]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


# --- presets: keys, detection, capabilities -----------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_the_preset_builds_exactly_the_original_keys_and_shapes(name):
    ours = {k: list(v.shape) for k, v in build_model(find_preset(name).model).state_dict().items()}
    ref = reference(name)
    assert sorted(set(ref) - set(ours)) == []
    assert sorted(set(ours) - set(ref)) == []
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}


@pytest.mark.parametrize("name", NAMES)
def test_an_original_file_with_ema_copies_is_detected_as_its_preset(name):
    # LDM's default use_ema=True writes model_ema.* copies of the UNet; the schedule buffers are unprefixed.
    shapes = {k: tuple(v) for k, v in reference(name).items()}
    shapes.update({ema_key(k): v for k, v in list(shapes.items()) if k.startswith("model.diffusion_model.")})
    shapes.update({k: (1000,) for k in SCHEDULE_BUFFERS if k != "logvar"})
    assert detect_preset(shapes, list_presets(), f"{name}.ckpt").name == name


def test_the_presets_carry_the_original_configs_facts():
    large, small, layout = (find_preset(n) for n in NAMES)
    assert (large.model.scale_factor, large.model.schedule.linear_start, large.model.schedule.linear_end) == (0.18215, 0.00085, 0.012)
    assert (large.model.cond_stage.dim, large.model.cond_stage.depth, large.model.cond_stage.vocab) == (1280, 32, "bert-base-uncased")
    assert (small.model.first_stage.kind, small.model.latent_channels, small.model.unet.head_dim) == ("vq", 3, 32)
    assert (small.model.cond_stage.dim, small.model.cond_stage.depth) == (640, 32)
    cond = layout.model.cond_stage
    assert (cond.vocab_size, cond.max_seq_len, cond.dim, cond.depth, cond.max_objects, cond.grid) == (8192, 92, 512, 16, 30, 90)
    assert 3 * cond.max_objects + 2 == cond.max_seq_len
    assert layout.model.unet.transformer_depth == 3
    # Sampler defaults: LDM's txt2img script (scale 5, eta 0; 50 steps as its README), layout2img 200 DDIM steps, no guidance.
    assert (large.sampler.steps, large.sampler.scale, large.sampler.eta) == (50, 5.0, 0.0)
    assert small.sampler == large.sampler
    assert (layout.sampler.steps, layout.sampler.scale, layout.sampler.eta) == (200, 1.0, 0.0)


def test_the_text_models_serve_text_tasks_and_the_layout_model_only_the_layout_tab():
    for name in NAMES[:2]:
        assert tasks_for(find_preset(name).model) == ("txt2img", "img2img", "inpaint", "layout")
    config = find_preset("layout2img-openimages256").model
    assert tasks_for(config) == ("layout",) and takes_layout_tokens(config) and reads_class_ids(config)


def test_each_tiny_file_is_detected_as_its_tiny_preset(files):
    presets = list_presets() + [f.preset for f in files.values()]
    assert {name: detect_file(f.path, presets).preset.name for name, f in files.items()} == {n: n for n in files}


# --- bert-base-uncased tokenizer ----------------------------------------------


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    (tmp_path / "hub").mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def fake_bert_cache(hub: Path, words: list[str]) -> Path:
    repo = hub / "models--bert-base-uncased"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    return ldm_text.write_bert_vocab(repo / "snapshots" / "0123abcd", words)


def vocab_of(tokenizer: BertPromptTokenizer) -> set[str]:
    return set(tokenizer.tokenizer.get_vocab())


def test_lookup_order_dir_then_next_to_the_checkpoint_then_the_hf_cache(tmp_path, empty_hf_cache):
    checkpoint = tmp_path / "models" / "ldm.ckpt"
    fake_bert_cache(empty_hf_cache, ["cached"])
    assert "cached" in vocab_of(find_bert_tokenizer(checkpoint_path=checkpoint))
    ldm_text.write_bert_vocab(tmp_path / "models" / "ldm.tokenizer", ["stem"])
    assert "stem" in vocab_of(find_bert_tokenizer(checkpoint_path=checkpoint))
    ldm_text.write_bert_vocab(tmp_path / "models" / "tokenizer", ["sub"])
    assert "sub" in vocab_of(find_bert_tokenizer(checkpoint_path=checkpoint))
    ldm_text.write_bert_vocab(tmp_path / "models", ["beside"])
    assert "beside" in vocab_of(find_bert_tokenizer(checkpoint_path=checkpoint))
    explicit = ldm_text.write_bert_vocab(tmp_path / "mine", ["explicit"])
    assert "explicit" in vocab_of(find_bert_tokenizer(tokenizer_dir=explicit, checkpoint_path=checkpoint))


def test_a_folder_without_vocab_txt_given_explicitly_is_an_error(tmp_path, empty_hf_cache):
    (tmp_path / "empty").mkdir()
    ldm_text.write_bert_vocab(tmp_path, ["beside"])  # not used: the explicit folder is never skipped
    with pytest.raises(TokenizerNotFoundError, match=r"empty has no vocab\.txt"):
        find_bert_tokenizer(tokenizer_dir=tmp_path / "empty", checkpoint_path=tmp_path / "m.ckpt")


def test_with_nothing_found_the_error_names_the_places_searched_and_where_to_put_vocab_txt(tmp_path, empty_hf_cache):
    checkpoint = tmp_path / "models" / "ldm.ckpt"
    with pytest.raises(TokenizerNotFoundError) as error:
        find_bert_tokenizer(checkpoint_path=checkpoint)
    message = str(error.value)
    for place in (f"{tmp_path / 'models'}/", f"{tmp_path / 'models' / 'tokenizer'}/", f"{tmp_path / 'models' / 'ldm.tokenizer'}/",
                  "Hugging Face cache for bert-base-uncased"):
        assert place in message
    assert "put bert-base-uncased's vocab.txt" in message and f"in {tmp_path / 'models' / 'tokenizer'}/" in message
    assert "--tokenizer DIR" in message


def test_a_vocabulary_without_bert_specials_is_refused(tmp_path, empty_hf_cache):
    (tmp_path / "vocab.txt").write_text("a\nb\n[PAD]\n")
    with pytest.raises(ValueError, match=r"\[PAD\] is id 2, not 0"):
        find_bert_tokenizer(tokenizer_dir=tmp_path)


def test_prompts_become_cls_words_sep_padded_with_0_to_77(tmp_path):
    tokenizer = find_bert_tokenizer(tokenizer_dir=ldm_text.write_bert_vocab(tmp_path))
    ids = tokenizer.encode_batch(["A photo of Cats", ""])
    vocab = tokenizer.tokenizer.get_vocab()
    words = [vocab[w] for w in ("a", "photo", "of", "cat", "##s")]
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [vocab["[CLS]"], *words, vocab["[SEP]"]] and ids[0, 7:].eq(0).all()
    assert ids[1, :2].tolist() == [vocab["[CLS]"], vocab["[SEP]"]] and ids[1, 2:].eq(0).all()


def test_a_long_prompt_is_cut_to_77_tokens_with_a_notice(tmp_path):
    tokenizer = find_bert_tokenizer(tokenizer_dir=ldm_text.write_bert_vocab(tmp_path))
    long = "a red cat " * 30  # 90 tokens
    ids = tokenizer.encode_batch([long])
    assert ids.shape == (1, 77) and ids[0, -1] == tokenizer.tokenizer.get_vocab()["[SEP]"]
    (notice,) = tokenizer.notices([long, "a cat"])
    assert "90 tokens" in notice and "first 75" in notice
    assert tokenizer.notices(["a cat", ""]) == []


# --- LDM layout tokens ----------------------------------------------------------


def test_layout_tokens_follow_the_worked_example_with_class_ids_and_the_crop():
    # checkpoint-formats.md section 2: the box (x0, y0, w, h) = (0.25, 0.5, 0.5, 0.25) of class 7, occluded, with
    # 300 classes is [607, 3982, 6097, 8191 x 87, 0, 8099]. Here boxes give corners and the class id itself (607).
    tokenizer = LDMLayoutTokenizer()
    ids = tokenizer.encode([(607, 0.25, 0.5, 0.75, 0.75)])
    assert ids == [607, 3982, 6097] + [8191] * 87 + [0, 8099]
    assert len(ids) == 92 and tokenizer.length == 92


def test_layout_tokens_keep_the_box_order_and_round_half_to_even():
    tokenizer = LDMLayoutTokenizer()
    ids = tokenizer.encode([("12", 0.0, 0.0, 1.0, 1.0), (3, 0.5, 0.5, 45 / 89, 1.0)])
    # 0.5 * 89 = 44.5 rounds to 44 (Python's round, half to even, as taming's tokenize_coordinates).
    assert ids[:6] == [12, 0, 8099, 3, 44 * 90 + 44, 89 * 90 + 45]
    assert ids[6:90] == [8191] * 84


@pytest.mark.parametrize("label, message", [
    ("cat", r"class ids as labels \(whole numbers 0 to 8190\)"),
    (8191, "class id 8191 is out of range; use 0 to 8190"),
    (-1, "class id -1 is out of range"),
    ("7.5", "whole numbers"),
    (True, "must be a class id"),
])
def test_a_bad_class_id_is_refused_with_a_message(label, message):
    with pytest.raises(ValueError, match=message):
        LDMLayoutTokenizer().encode([(label, 0.1, 0.1, 0.2, 0.2)])


def test_more_than_30_boxes_are_refused():
    with pytest.raises(ValueError, match="31 boxes given; this model takes at most 30"):
        LDMLayoutTokenizer().encode([(1, 0.1, 0.1, 0.2, 0.2)] * 31)
    with pytest.raises(ValueError, match=r"corner \(1.5, 0.2\) is outside the image"):
        LDMLayoutTokenizer().encode([(1, 0.1, 0.1, 1.5, 0.2)])


def test_the_layout_tokenizer_batches_layouts_and_refuses_a_prompt_alone():
    tokenizer = LDMLayoutTokenizer()
    ids = tokenizer.encode_batch(["", "ignored"], [[], [(5, 0.0, 0.0, 0.5, 0.5)]])
    assert ids.shape == (2, 92) and ids[0, :90].eq(8191).all() and ids[1, :3].tolist() == [5, 0, 44 * 90 + 44]
    assert tokenizer.notices(["", "a cat"]) == ["this model generates from the layout alone: the prompt and negative prompt are not used"]
    with pytest.raises(ValueError, match="layout boxes only"):
        tokenizer.encode_batch(["a cat"])


# --- generation from tiny files -------------------------------------------------


@pytest.fixture(scope="module")
def files(tiny_ldm_kl_text, tiny_ldm_vq_text, tiny_ldm_layout):
    """The tiny LDM text and layout models by preset name (each folder with its vocab.txt where it reads text)."""
    return {f.preset.name: f for f in (tiny_ldm_kl_text, tiny_ldm_vq_text, tiny_ldm_layout)}


def request(**fields) -> GenerationRequest:
    base = dict(prompt="a red cat", negative_prompt="", steps=3, scale=5.0, eta=0.0, seed=3, width=16, height=16)
    return GenerationRequest(**{**base, **fields})


@pytest.mark.parametrize("name", ["tiny-ldm-kl", "tiny-ldm-vq"])
def test_a_tiny_ldm_bert_model_loads_its_ema_weights_and_generates(files, name):
    loaded = files[name].load()  # vocab.txt beside the file
    assert loaded.report.used_ema and isinstance(loaded.model.cond_stage_model.tokenizer, BertPromptTokenizer)
    result = txt2img(loaded, request(prompt="a red cat " * 30))
    assert result.images[0].size == (16, 16)
    assert any("LDM BERT reads the first 75" in n for n in result.notices)
    again = txt2img(loaded, request(prompt="a red cat " * 30))
    assert list(result.images[0].getdata()) == list(again.images[0].getdata())


def test_a_tiny_layout_model_generates_from_class_id_boxes(files):
    loaded = files["tiny-ldm-layout"].load()
    boxes = (("7", 0.1, 0.1, 0.6, 0.5), ("2", 0.5, 0.5, 0.9, 0.9))
    result = layout(loaded, request(prompt="", scale=1.0, boxes=boxes))
    assert result.images[0].size == (16, 16) and result.notices == []
    # The layout conditions the latents (the VQ decoder's small codebook may map both to the same picture).
    latents = [sample_latents(loaded, request(prompt="", scale=1.0, boxes=b)) for b in (boxes, boxes[:1])]
    assert (latents[0] - latents[1]).abs().max() > 1e-3
    noted = layout(loaded, request(prompt="a cat", scale=1.0, boxes=boxes))
    assert "the prompt and negative prompt are not used" in noted.notices[0]
    assert list(noted.images[0].getdata()) == list(result.images[0].getdata())
    with pytest.raises(ValueError, match="class ids as labels"):
        layout(loaded, request(prompt="", scale=1.0, boxes=(("red circle", 0.1, 0.1, 0.5, 0.5),)))


def preset_yaml(folder: Path, make_dict) -> Path:
    raw = make_dict()
    return ldm_text.write_preset_yaml(raw, folder / f"{raw['name']}.yaml")


def test_the_cli_runs_txt2img_on_a_tiny_ldm_bert_model(files, tmp_path, capsys):
    out = tmp_path / "cat.png"
    args = ["txt2img", "--model", str(files["tiny-ldm-vq"].path), "--preset", str(preset_yaml(tmp_path, ldm_text.vq_preset_dict)),
            "--prompt", "a photo of a red house", "--steps", "2", "--seed", "5", "--out", str(out)]
    assert main(args) == 0
    params = read_png_parameters(out)
    assert (params["Prompt"], params["CFG scale"], params["Steps"]) == ("a photo of a red house", "5.0", "2")
    with Image.open(out) as image:
        assert image.size == (16, 16)  # latent 8 x the tiny autoencoder's f 2


def test_the_cli_runs_layout_on_a_tiny_layout_model_with_class_ids(files, tmp_path, capsys):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([{"label": 7, "box": [0.1, 0.1, 0.6, 0.5]}, {"label": "2", "box": [0.5, 0.5, 0.9, 0.9]}]))
    out = tmp_path / "layout.png"
    args = ["layout", "--model", str(files["tiny-ldm-layout"].path), "--preset", str(preset_yaml(tmp_path, ldm_text.layout_preset_dict)),
            "--boxes", str(boxes), "--prompt", "a cat", "--steps", "2", "--seed", "5", "--out", str(out)]
    assert main(args) == 0
    params = read_png_parameters(out)
    assert params["CFG scale"] == "1.0" and params["Layout"].startswith("7 0.100 0.100 0.600 0.500; 2 ")
    assert "the prompt and negative prompt are not used" in capsys.readouterr().err


def test_the_cli_explains_a_bad_class_id_and_a_text_prompt_for_the_layout_model(files, tmp_path, capsys):
    preset = str(preset_yaml(tmp_path, ldm_text.layout_preset_dict))
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps([{"label": 9000, "box": [0.1, 0.1, 0.6, 0.5]}]))
    base = ["--model", str(files["tiny-ldm-layout"].path), "--preset", preset, "--steps", "2", "--out", str(tmp_path / "x.png")]
    assert main(["layout", *base, "--boxes", str(boxes)]) == 2
    assert "class id 9000 is out of range; use 0 to 98" in capsys.readouterr().err
    assert main(["txt2img", *base, "--prompt", "a cat"]) == 2
    assert "layout boxes only" in capsys.readouterr().err


def test_read_boxes_takes_class_ids_and_names(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps([{"label": 7, "box": [0, 0, 0.5, 0.5]}, {"label": "red circle", "box": [0.5, 0.5, 1, 1]}]))
    assert read_boxes(str(path)) == (("7", 0, 0, 0.5, 0.5), ("red circle", 0.5, 0.5, 1, 1))
    path.write_text(json.dumps([{"label": 1.5, "box": [0, 0, 1, 1]}]))
    with pytest.raises(ValueError, match="neither a name nor a class id"):
        read_boxes(str(path))
    path.write_text(json.dumps([{"label": 1, "box": [0, 0, 1]}]))
    with pytest.raises(ValueError, match="box 1 has 3 coordinates, not 4"):
        read_boxes(str(path))


def test_inpainting_with_an_ldm_bert_model_reports_a_cut_prompt(files):
    from ldm.tasks.inpaint import inpaint

    loaded = files["tiny-ldm-vq"].load()
    image, mask = Image.new("RGB", (16, 16), (200, 40, 40)), Image.new("L", (16, 16), 0)
    mask.paste(255, (4, 4, 12, 12))
    result = inpaint(loaded, request(prompt="a red cat " * 30), image, mask)
    assert result.images[0].size == (16, 16)
    assert any("LDM BERT reads the first 75" in n for n in result.notices)
