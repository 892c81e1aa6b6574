"""The default model's word-and-layout tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldm.data.world import vocabulary
from ldm.text.word_tokenizer import WordLayoutTokenizer

VOCAB = Path(__file__).resolve().parents[1] / "presets" / "tokenizers" / "default-words.txt"


@pytest.fixture(scope="module")
def tokenizer():
    return WordLayoutTokenizer.from_file(VOCAB, caption_tokens=40, max_objects=4, grid=16)


def test_the_shipped_vocabulary_is_the_worlds():
    assert VOCAB.read_text().split("\n")[:-1] == vocabulary(16)


def test_a_caption_and_layout_make_one_fixed_length_sequence(tokenizer):
    ids = tokenizer.encode("a red circle in the top left", [("red circle", 0.25, 0.5, 0.5, 0.75)])
    assert len(ids) == tokenizer.length == 52
    words = [tokenizer.tokens[i] for i in ids[:7]]
    assert words == ["a", "red", "circle", "in", "the", "top", "left"]
    assert all(tokenizer.tokens[i] == "<pad>" for i in ids[7:40])
    # the LDM layout scheme: class token, then the corners on the grid, round(y*(g-1))*g + round(x*(g-1)) with
    # Python's round (half to even): (0.25, 0.5) -> 8*16 + 4 = 132, (0.5, 0.75) -> 11*16 + 8 = 184
    assert [tokenizer.tokens[i] for i in ids[40:43]] == ["<class:red circle>", "<grid:132>", "<grid:184>"]
    assert all(tokenizer.tokens[i] == "<pad>" for i in ids[43:])


def test_unknown_words_become_unk_and_long_captions_are_cut_to_the_caption_part(tokenizer):
    ids = tokenizer.caption_ids("a zebra")
    assert [tokenizer.tokens[i] for i in ids] == ["a", "<unk>"]
    assert len(tokenizer.encode(" ".join(["red"] * 100))) == 52


def test_bad_layouts_are_refused_with_what_is_allowed(tokenizer):
    with pytest.raises(ValueError, match="at most 4"):
        tokenizer.encode("", [("red circle", 0, 0, 0.1, 0.1)] * 5)
    with pytest.raises(ValueError, match="known: .*red circle"):
        tokenizer.encode("", [("dragon", 0, 0, 0.1, 0.1)])


def test_a_batch_is_a_long_tensor(tokenizer):
    batch = tokenizer.encode_batch(["a red circle", ""], [None, [("blue ring", 0.1, 0.1, 0.3, 0.3)]])
    assert batch.shape == (2, 52) and str(batch.dtype) == "torch.int64"
