"""Textual-inversion embeddings: each file format read, unsafe and broken files refused by name, the
width rule, the folders and the listing, where the vectors go in a prompt's tokens (chunks, emphasis),
the tasks and the PNG's "TI hashes", the CLI; parity with diffusers' ``load_textual_inversion``."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm.addons.embeddings import (EmbeddingError, default_embedding_dirs, embedding_files, embedding_hashes,
                                   embedding_notices, list_embeddings, load_embedding, model_embeddings,
                                   read_embedding)
from ldm.checkpoints.errors import CheckpointError
from ldm.models.clip import PLACEHOLDER
from ldm.tasks.parameters import parse_parameters
from ldm.tasks.request import GenerationRequest
from ldm.tasks.txt2img import txt2img
from tests.helpers import max_error

NAME = "inkstyle"  # several tokens in the tiny vocabulary


def vectors(count: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


def a1111_pt(path: Path, tensor: torch.Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": tensor}, "name": path.stem, "step": 500,
                "sd_checkpoint": "abcdef01", "sd_checkpoint_name": "v1-5"}, path)
    return path


def safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def width_of(loaded) -> int:
    return loaded.model.cond_stage_model.config.context_dim


def token_vectors(loaded, text: str) -> torch.Tensor:
    """The token-embedding rows of ``text``'s tokens: an embedding made of them must encode as the text."""
    encoder = loaded.model.cond_stage_model
    ids = encoder.tokenizer(text, add_special_tokens=False)["input_ids"]
    table = (encoder.transformer.text_model.embeddings.token_embedding if hasattr(encoder, "transformer")
             else encoder.model.token_embedding)
    return table.weight[ids].detach().clone()


# ---------------------------------------------------------------- formats


def test_each_format_is_read_with_its_file_stem_as_the_name(tmp_path):
    t = vectors(3, 768)
    files = {
        "a1111": a1111_pt(tmp_path / "a1111.pt", t),
        "kohya": safetensors(tmp_path / "kohya.safetensors", {"emb_params": t}),
        "diffusers": safetensors(tmp_path / "diffusers.safetensors", {"<cat-toy>": t}),
    }
    torch.save({"emb_params": t}, tmp_path / "kohya_pt.pt")
    torch.save({"<cat-toy>": t[0]}, tmp_path / "learned_embeds.bin")  # diffusers' one vector, 1-D
    for name, path in files.items():
        embedding = read_embedding(path)
        assert embedding.name == name and embedding.family == "SD 1" and torch.equal(embedding.vectors, t)
    assert torch.equal(read_embedding(tmp_path / "kohya_pt.pt").vectors, t)
    one = read_embedding(tmp_path / "learned_embeds.bin")
    assert one.name == "learned_embeds" and one.vectors.shape == (1, 768) and torch.equal(one.vectors[0], t[0])
    a1111_pt(tmp_path / "trained.pt", torch.nn.Parameter(t.clone()))  # A1111 saves the trained parameter
    assert torch.equal(read_embedding(tmp_path / "trained.pt").vectors, t)
    sd2 = read_embedding(safetensors(tmp_path / "wide.safetensors", {"emb_params": vectors(2, 1024)}))
    assert sd2.family == "SD 2" and sd2.width == 1024


def test_an_sdxl_file_is_recognised_and_not_used(tmp_path, loaded_sd_v1):
    path = safetensors(tmp_path / "xl.safetensors", {"clip_l": vectors(2, 768), "clip_g": vectors(2, 1280)})
    assert read_embedding(path).family == "SDXL"
    found = model_embeddings(loaded_sd_v1.model, [tmp_path])
    assert "xl" not in found.vectors and "SDXL" in found.skipped["xl"]


def test_a_pickle_that_would_run_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": Payload()}, "name": "evil"}, path)
    with pytest.raises(CheckpointError, match="could run code") as caught:
        read_embedding(path)
    assert str(path) in str(caught.value) and not marker.exists()


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([[1.0, float("nan")]]), "NaN or infinite"),
    (torch.tensor([[1.0, float("inf")]]), "NaN or infinite"),
    (torch.zeros(2, 3, 4), r"shape \(2, 3, 4\); expected \(vectors, width\)"),
    (torch.zeros(76, 8), "1 to 75 vectors"),
    (torch.zeros(0, 8), "1 to 75 vectors"),
    (torch.zeros(2, 8, dtype=torch.int64), "not floating-point"),
])
def test_bad_vectors_are_refused_naming_the_file(tmp_path, bad, message):
    path = safetensors(tmp_path / "bad.safetensors", {"emb_params": bad})
    with pytest.raises(EmbeddingError, match=message) as caught:
        read_embedding(path)
    assert str(path) in str(caught.value)


def test_truncated_lying_and_foreign_files_are_refused_by_name(tmp_path):
    whole = safetensors(tmp_path / "whole.safetensors", {"emb_params": vectors(4, 768)}).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(whole[: len(whole) - 100])
    torch.save({"emb_params": vectors(4, 768)}, tmp_path / "cut.pt")
    data = (tmp_path / "cut.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "lying.safetensors").write_bytes((10**6).to_bytes(8, "little") + b"{}")
    torch.save({"string_to_param": {"*": vectors(1, 8), "x": vectors(1, 8)}}, tmp_path / "two.pt")
    safetensors(tmp_path / "lora.safetensors", {"lora_unet_x.lora_up.weight": vectors(4, 4),
                                                "lora_unet_x.lora_down.weight": vectors(4, 4)})
    torch.save([1, 2], tmp_path / "list.pt")
    with open(tmp_path / "model.safetensors", "wb") as f:  # a model put in the wrong folder: never read
        f.truncate(17 * 2**20)
    for name, message in [("cut.safetensors", "truncated or corrupt"), ("cut.pt", "truncated or corrupt"), ("lying.safetensors", "header"),
                          ("two.pt", "2 terms"), ("lora.safetensors", "not an embedding layout"), ("list.pt", "holds a list"),
                          ("model.safetensors", "too big for an embedding")]:
        with pytest.raises(CheckpointError, match=message) as caught:
            read_embedding(tmp_path / name)
        assert str(tmp_path / name) in str(caught.value)


def test_files_are_read_again_only_when_they_change(tmp_path):
    path = safetensors(tmp_path / "e.safetensors", {"emb_params": vectors(1, 8)})
    assert load_embedding(path) is load_embedding(path)
    safetensors(path, {"emb_params": vectors(2, 8)})
    os.utime(path, ns=(1, 1))
    assert load_embedding(path).vectors.shape == (2, 8)


# ---------------------------------------------------------------- folders and the listing


def test_folders_are_searched_recursively_first_folder_first(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    a1111_pt(first / "style" / "ink.pt", vectors(1, 8))
    safetensors(second / "ink.safetensors", {"emb_params": vectors(2, 8)})
    safetensors(second / "paper.safetensors", {"emb_params": vectors(2, 8)})
    safetensors(second / ".hidden.safetensors", {"emb_params": vectors(2, 8)})
    safetensors(second / ".cache" / "old.safetensors", {"emb_params": vectors(2, 8)})
    (second / "paper.preview.png").write_bytes(b"\x89PNG")
    files = embedding_files([first, second, tmp_path / "missing"])
    assert files == {"ink": first / "style" / "ink.pt", "paper": second / "paper.safetensors"}
    models = tmp_path / "models" / "Stable-diffusion"
    assert tmp_path / "models" / "embeddings" in default_embedding_dirs([models / "v1-5.safetensors"])


def test_the_listing_gives_name_vectors_width_family_size_and_path(tmp_path):
    ink = a1111_pt(tmp_path / "ink.pt", vectors(3, 768))
    wide = safetensors(tmp_path / "Wide.safetensors", {"emb_params": vectors(1, 1024)})
    broken = safetensors(tmp_path / "broken.safetensors", {"emb_params": torch.full((1, 8), float("nan"))})
    entries = list_embeddings([tmp_path])
    assert [e.name for e in entries] == ["broken", "ink", "Wide"]
    bad, first, second = entries
    assert (first.vectors, first.width, first.family, first.size, first.path, first.problem) == (
        3, 768, "SD 1", ink.stat().st_size, ink, None)
    assert (second.vectors, second.width, second.family) == (1, 1024, "SD 2") and second.path == wide
    assert bad.path == broken and bad.vectors == 0 and "NaN" in bad.problem


def test_another_width_is_skipped_with_a_notice_only_when_a_prompt_names_it(tmp_path, loaded_sd_v1):
    width = width_of(loaded_sd_v1)
    path = safetensors(tmp_path / "wide.safetensors", {"emb_params": vectors(2, width + 8)})
    safetensors(tmp_path / "fits.safetensors", {"emb_params": vectors(2, width)})
    found = model_embeddings(loaded_sd_v1.model, [tmp_path])
    assert list(found.vectors) == ["fits"]
    notice = found.skipped["wide"]
    assert str(path) in notice and str(width + 8) in notice and f"{width} wide" in notice
    assert embedding_notices(loaded_sd_v1.model, ["a cat", ""], 10, [tmp_path]) == []
    assert embedding_notices(loaded_sd_v1.model, ["a cat", "wide"], 10, [tmp_path]) == [notice]


# ---------------------------------------------------------------- where the vectors go


def test_the_name_becomes_n_vec_placeholders_and_its_vectors_replace_them(loaded_sd_v1):
    encoder = loaded_sd_v1.model.cond_stage_model
    emb = {NAME: vectors(3, width_of(loaded_sd_v1))}
    tokens = encoder.weighted_chunks([f"a {NAME} cat"], embeddings=emb)
    plain = encoder.weighted_chunks(["a cat"]).ids[0, 0].tolist()
    ids = tokens.ids[0, 0].tolist()
    assert ids[:5] == [plain[0], plain[1], PLACEHOLDER, PLACEHOLDER, PLACEHOLDER] and ids[5] == plain[2]
    (fix,) = tokens.fixes
    assert (fix.row, fix.offset, fix.name) == (0, 1, NAME) and fix.vectors is emb[NAME]


def test_an_embedding_that_would_not_fit_starts_the_next_chunk(loaded_sd_v1):
    encoder = loaded_sd_v1.model.cond_stage_model
    emb = {NAME: vectors(3, width_of(loaded_sd_v1))}
    tokens = encoder.weighted_chunks([" ".join(["cat"] * 73) + f" {NAME} dog", "red"], embeddings=emb)
    assert tokens.ids.shape == (2, 2, 77)
    assert tokens.ids[0, 0, 74].item() != PLACEHOLDER and tokens.ids[0, 1, 1:4].tolist() == [PLACEHOLDER] * 3
    assert [(f.row, f.offset) for f in tokens.fixes] == [(1, 0)]  # prompt 0's second chunk; prompt 1 has none
    fits = encoder.weighted_chunks([" ".join(["cat"] * 72) + f" {NAME}"], embeddings=emb)
    assert fits.ids.shape[1] == 1 and [(f.row, f.offset) for f in fits.fixes] == [(0, 72)]


def test_break_and_the_comma_backtrack_carry_the_embedding_into_the_next_chunk(loaded_sd_v1):
    encoder = loaded_sd_v1.model.cond_stage_model
    emb = {NAME: vectors(3, width_of(loaded_sd_v1))}
    broken = encoder.weighted_chunks([f"cat BREAK {NAME}"], embeddings=emb)
    assert [(f.row, f.offset) for f in broken.fixes] == [(1, 0)]
    # 60 cats, a comma, 10 dogs, the 3 placeholders and a red fill the chunk; the next red moves all after the comma
    prompt = " ".join(["cat"] * 60) + ", " + " ".join(["dog"] * 10) + f" {NAME} " + " ".join(["red"] * 5)
    moved = encoder.weighted_chunks([prompt], embeddings=emb)
    assert [(f.row, f.offset) for f in moved.fixes] == [(1, 10)]
    assert moved.ids[0, 1, 11:14].tolist() == [PLACEHOLDER] * 3 and moved.ids[0, 0, 62].item() != PLACEHOLDER


def test_the_longest_name_wins_and_other_tokens_stay(loaded_sd_v1):
    encoder = loaded_sd_v1.model.cond_stage_model
    width = width_of(loaded_sd_v1)
    emb = {"ink": vectors(1, width), NAME: vectors(2, width)}
    names = [f.name for f in encoder.weighted_chunks([f"ink {NAME} ink"], embeddings=emb).fixes]
    assert names == ["ink", NAME, "ink"]


@pytest.mark.parametrize("family", ["loaded_sd_v1", "loaded_sd2_v"])
def test_an_embedding_of_a_words_vectors_encodes_as_that_word(family, request):
    loaded = request.getfixturevalue(family)
    emb = {NAME: token_vectors(loaded, "red cat")}
    with torch.no_grad():
        got = loaded.model.encode_prompts([f"a {NAME} on a tree", f"(a {NAME}:1.4), blue"], embeddings=emb)
        expected = loaded.model.encode_prompts(["a red cat on a tree", "(a red cat:1.4), blue"])
        other = loaded.model.encode_prompts([f"a {NAME} on a tree"], embeddings={NAME: vectors(2, width_of(loaded))})
    assert max_error(got, expected) < 1e-5
    assert max_error(other, expected[:1]) > 1e-3


def test_emphasis_weights_the_embedding_positions(loaded_sd_v1):
    encoder = loaded_sd_v1.model.cond_stage_model
    emb = {NAME: vectors(2, width_of(loaded_sd_v1))}
    tokens = encoder.weighted_chunks([f"a ({NAME}:1.5) [cat]"], embeddings=emb)
    weights = tokens.weights[0, 0].tolist()
    assert weights[2:4] == [1.5, 1.5] and weights[1] == 1.0 and weights[4] == pytest.approx(1 / 1.1)


def test_a_model_that_reads_no_clip_tokens_takes_no_embeddings(tmp_path, tiny_default_hybrid):
    loaded = tiny_default_hybrid.load()
    safetensors(tmp_path / "cat.safetensors", {"emb_params": vectors(1, 8)})
    assert model_embeddings(loaded.model, [tmp_path]).vectors == {}
    assert embedding_hashes(loaded.model, ["a cat"], 10, [tmp_path]) is None


# ---------------------------------------------------------------- through the task


def small_request(prompt: str, folder: Path, negative: str = "blurry") -> GenerationRequest:
    return GenerationRequest(prompt=prompt, negative_prompt=negative, steps=3, scale=5.0, seed=7, width=32, height=32,
                             embedding_dirs=(folder,))


def pixels(result) -> torch.Tensor:
    return torch.tensor(list(result.images[0].getdata()), dtype=torch.float32)


def test_txt2img_uses_embeddings_in_prompt_and_negative_prompt_and_writes_ti_hashes(tmp_path, loaded_sd_v1):
    folder = tmp_path / "embeddings"
    path = a1111_pt(folder / "kitty.pt", token_vectors(loaded_sd_v1, "cat"))
    safetensors(folder / "smudge.safetensors", {"emb_params": token_vectors(loaded_sd_v1, "blue")})
    kitty = txt2img(loaded_sd_v1, small_request("a red kitty", folder, "smudge"))
    cat = txt2img(loaded_sd_v1, small_request("a red cat", folder, "blue"))
    assert (pixels(kitty) - pixels(cat)).abs().max() <= 1.0  # the same conditioning, to rounding
    plain = txt2img(loaded_sd_v1, replace(small_request("a red kitty", folder, "smudge"), embedding_dirs=()))
    assert (pixels(plain) - pixels(kitty)).abs().mean() > 1.0
    fields = parse_parameters(kitty.parameters[0])
    sha = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    sha2 = hashlib.sha256((folder / "smudge.safetensors").read_bytes()).hexdigest()[:12]
    assert fields["TI hashes"] == f"kitty: {sha}, smudge: {sha2}" and fields["Prompt"] == "a red kitty"
    assert "TI hashes" not in parse_parameters(cat.parameters[0])


def test_prompt_editing_switches_to_and_from_an_embedding(tmp_path, loaded_sd_v1):
    folder = tmp_path / "embeddings"
    safetensors(folder / "kitty.safetensors", {"emb_params": token_vectors(loaded_sd_v1, "cat")})
    edited = txt2img(loaded_sd_v1, small_request("a [dog:kitty:2]", folder))
    expected = txt2img(loaded_sd_v1, small_request("a [dog:cat:2]", folder))
    assert (pixels(edited) - pixels(expected)).abs().max() <= 1.0
    assert parse_parameters(edited.parameters[0])["TI hashes"].startswith("kitty: ")


def test_a_skipped_embedding_gives_a_notice(tmp_path, loaded_sd_v1):
    folder = tmp_path / "embeddings"
    safetensors(folder / "wide.safetensors", {"emb_params": vectors(1, width_of(loaded_sd_v1) + 1)})
    result = txt2img(loaded_sd_v1, small_request("a wide cat", folder))
    assert any("wide.safetensors" in n and "it was not used" in n for n in result.notices)
    assert "TI hashes" not in parse_parameters(result.parameters[0])


def test_the_cli_finds_embeddings_in_embeddings_dir_and_writes_their_hashes(tiny_sd_v1, loaded_sd_v1, tmp_path):
    from ldm.cli import main
    from ldm.tasks.parameters import read_png_parameters
    from tests.builders import sd_v1
    from tests.builders.clip_tokenizer import tiny_vocab_size

    path = a1111_pt(tmp_path / "embs" / "kitty.pt", vectors(2, width_of(loaded_sd_v1)))
    preset = sd_v1.write_preset_yaml(tmp_path / "tiny-v1.yaml", tiny_vocab_size(tiny_sd_v1.tokenizer_dir))
    out = tmp_path / "cat.png"
    assert main(["txt2img", "--model", str(tiny_sd_v1.path), "--preset", str(preset), "--tokenizer",
                 str(tiny_sd_v1.tokenizer_dir), "--steps", "2", "--seed", "1", "--width", "32", "--height", "32",
                 "--embeddings-dir", str(path.parent), "--prompt", "a kitty", "--out", str(out)]) == 0
    params = read_png_parameters(out)
    assert params["TI hashes"] == f"kitty: {hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"


def test_the_studio_searches_embeddings_dir_then_embeddings_beside_its_models_folders(tmp_path):
    from app import make_studio, parse_args

    models = tmp_path / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    studio = make_studio(parse_args(["--models-dir", str(models), "--embeddings-dir", str(tmp_path / "mine"),
                                     "--outputs", str(tmp_path / "out"), "--device", "cpu"]))
    dirs = studio.embedding_dirs()
    assert dirs[0] == tmp_path / "mine" and tmp_path / "models" / "embeddings" in dirs
