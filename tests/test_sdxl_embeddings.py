"""Textual-inversion embeddings on SDXL: a file's clip_l vectors go to the CLIP ViT-L, its clip_g vectors to
the bigG (the refiner's only encoder); an embedding made of a word's token rows in each encoder encodes
as that word (context and pooled vector); SD 1-shaped and wrong-width files are skipped with a notice
that says why."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm.addons.embeddings import embedding_hashes, embedding_notices, model_embeddings
from ldm.models.sdxl_conditioner import SizeConditioning
from tests.helpers import max_error

NAME = "inkstyle"  # several tokens in the tiny vocabulary


def rows(encoder, text: str) -> torch.Tensor:
    """The token-embedding rows of ``text`` in one encoder (CLIP's or the bigG's table)."""
    ids = encoder.tokenizer(text, add_special_tokens=False)["input_ids"]
    table = (encoder.transformer.text_model.embeddings.token_embedding if hasattr(encoder, "transformer")
             else encoder.model.token_embedding)
    return table.weight[ids].detach().clone()


def write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def encode(loaded, prompts, embeddings=None):
    sizes = [SizeConditioning((16, 16), (16, 16))] * len(prompts)
    with torch.no_grad():
        return loaded.model.encode_conditioning(prompts, negative=[False] * len(prompts), sizes=sizes, embeddings=embeddings)


def test_an_sdxl_embedding_of_a_words_rows_encodes_as_that_word_in_both_encoders(loaded_sdxl, tmp_path):
    conditioner = loaded_sdxl.model.cond_stage_model
    clip, big_g = conditioner.embedders
    write(tmp_path / f"{NAME}.safetensors", {"clip_l": rows(clip, "red cat"), "clip_g": rows(big_g, "red cat")})
    found = model_embeddings(loaded_sdxl.model, [tmp_path])
    assert not found.skipped and found.vectors[NAME].shape == (2, clip.config.context_dim + big_g.config.context_dim)
    got = encode(loaded_sdxl, [f"a {NAME} on a tree", f"(a {NAME}:1.4), blue"], found.vectors)
    expected = encode(loaded_sdxl, ["a red cat on a tree", "(a red cat:1.4), blue"])
    assert max_error(got["context"], expected["context"]) < 1e-5 and max_error(got["y"], expected["y"]) < 1e-5
    # each encoder reads its own half: the bigG's rows swapped for noise change only the bigG's half and the pooled part
    noisy = {NAME: torch.cat([rows(clip, "red cat"), torch.randn(2, big_g.config.context_dim)], dim=1)}
    other = encode(loaded_sdxl, [f"a {NAME} on a tree"], noisy)
    width = clip.config.context_dim
    assert max_error(other["context"][..., :width], expected["context"][:1, :, :width]) < 1e-5
    assert max_error(other["context"][..., width:], expected["context"][:1, :, width:]) > 1e-3
    assert max_error(other["y"], expected["y"][:1]) > 1e-3
    assert embedding_hashes(loaded_sdxl.model, [f"a {NAME}"], 10, [tmp_path]).startswith(f"{NAME}: ")


def test_the_refiner_takes_the_clip_g_vectors(loaded_sdxl_refiner, tmp_path):
    big_g = loaded_sdxl_refiner.model.cond_stage_model.open_clip
    write(tmp_path / f"{NAME}.safetensors", {"clip_l": torch.randn(2, 32), "clip_g": rows(big_g, "red cat")})
    found = model_embeddings(loaded_sdxl_refiner.model, [tmp_path])
    got = encode(loaded_sdxl_refiner, [f"a {NAME} on a tree"], found.vectors)
    expected = encode(loaded_sdxl_refiner, ["a red cat on a tree"])
    assert max_error(got["context"], expected["context"]) < 1e-5 and max_error(got["y"], expected["y"]) < 1e-5


def test_one_encoder_and_wrong_width_embeddings_are_skipped_with_the_reason(loaded_sdxl, tmp_path):
    write(tmp_path / "sdone.safetensors", {"emb_params": torch.randn(1, 32)})
    write(tmp_path / "narrow.safetensors", {"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 16)})
    found = model_embeddings(loaded_sdxl.model, [tmp_path])
    assert found.vectors == {}
    notices = embedding_notices(loaded_sdxl.model, ["a sdone cat, narrow"], 10, [tmp_path])
    assert len(notices) == 2
    one, narrow = sorted(notices, key=lambda n: "narrow" in n)
    assert "one text encoder" in one and "clip_l and clip_g" in one and "not used" in one
    assert "clip_g is 16 wide, the model's 32" in narrow
