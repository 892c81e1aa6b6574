"""Parity: a textual-inversion embedding loaded by diffusers (``load_textual_inversion``, which adds the
tokens ``<name>``, ``<name>_1``, ... to the tokenizer and writes the vectors into the resized token
table) and by us (``ldm.addons.embeddings``, the name's tokens replaced by the vectors) gives the same
text-encoder output within 1e-4 in fp32, on the tiny SD v1 and SD 2 models. The prompt has no
emphasis, so our Original emphasis is the identity; diffusers' tokens stand where our placeholders do."""

from __future__ import annotations

import pytest
import torch

from diffusers import DDIMScheduler, StableDiffusionPipeline
from transformers import CLIPTokenizer

from ldm.addons.embeddings import load_embedding
from ldm.checkpoints.io import read_state_dict
from tests.builders.sd2 import converted_text_model
from tests.helpers import diffusers_clip_text_model, max_error

pytestmark = pytest.mark.parity
TOL = 1e-4
TOKEN = "inkstyle"


def a1111_file(path, width: int, count: int):
    vectors = torch.randn(count, width, generator=torch.Generator().manual_seed(5))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": TOKEN, "step": 100}, path)
    return path


def diffusers_ids(text, files, path, prompts: list[str], pad_id: int | None) -> torch.Tensor:
    """The token ids diffusers' pipeline gives ``prompts`` after ``load_textual_inversion(path)``; pad with
    ``pad_id`` after the end token (None: the tokenizer's own padding, as SD v1)."""
    tokenizer = CLIPTokenizer.from_pretrained(str(files.tokenizer_dir))
    pipe = StableDiffusionPipeline(vae=None, text_encoder=text, tokenizer=tokenizer, unet=None,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_textual_inversion(str(path), token=TOKEN)
    converted = pipe.maybe_convert_prompt(prompts, tokenizer)
    assert converted[0].count(TOKEN) > 1, "diffusers should have written one token per vector"
    if pad_id is None:
        return tokenizer(converted, padding="max_length", max_length=77, return_tensors="pt").input_ids
    rows = [tokenizer(p)["input_ids"] for p in converted]
    return torch.tensor([row + [pad_id] * (77 - len(row)) for row in rows])


PROMPTS = [f"a {TOKEN} cat on a tree", f"red {TOKEN}"]


@torch.no_grad()
def test_sd1_embedding_matches_diffusers(tiny_sd_v1, tmp_path):
    ours = tiny_sd_v1.load()
    width = ours.model.cond_stage_model.config.context_dim
    path = a1111_file(tmp_path / f"{TOKEN}.pt", width, 3)
    text = diffusers_clip_text_model(ours, read_state_dict(tiny_sd_v1.path)).eval()
    ids = diffusers_ids(text, tiny_sd_v1, path, PROMPTS, None)
    expected = text(ids).last_hidden_state
    got = ours.model.encode_prompts(PROMPTS, embeddings={TOKEN: load_embedding(path).vectors})
    plain = ours.model.encode_prompts(PROMPTS)
    assert max_error(got, plain) > 100 * TOL
    assert max_error(got, expected) < TOL


@torch.no_grad()
def test_sd2_embedding_matches_diffusers(tiny_sd2_v, tmp_path):
    ours = tiny_sd2_v.load()
    width = ours.model.cond_stage_model.config.context_dim
    path = a1111_file(tmp_path / f"{TOKEN}.pt", width, 2)
    text = converted_text_model(ours, read_state_dict(tiny_sd2_v.path)).eval()
    ids = diffusers_ids(text, tiny_sd2_v, path, PROMPTS, 0)
    expected = text(ids).last_hidden_state
    got = ours.model.encode_prompts(PROMPTS, embeddings={TOKEN: load_embedding(path).vectors})
    assert max_error(got, ours.model.encode_prompts(PROMPTS)) > 100 * TOL
    assert max_error(got, expected) < TOL
