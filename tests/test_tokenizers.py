"""ldm/text/clip_tokenizer.py: the lookup order, its errors, the CLIP BPE conversion, and open_clip's real vocabulary."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest

from ldm.text import clip_tokenizer as tokenizers
from ldm.text import lookup
from ldm.text.clip_tokenizer import clip_vocab_from_bpe, find_clip_tokenizer
from ldm.text.lookup import TokenizerNotFoundError
from tests.builders.clip_tokenizer import tiny_vocab_size, write_tiny_clip_tokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# A published encoding of the real CLIP vocabulary (HF output quoted in microsoft/BlingFire#173).
FUNCTISTANER_TEXT = "a photo of a really, functistaner big cat."
FUNCTISTANER_IDS = [49406, 320, 1125, 539, 320, 1414, 267, 8679, 555, 2203, 528, 1205, 2368, 269, 49407]


@pytest.fixture
def no_shared_sources(monkeypatch, tmp_path):
    """Hide the Hugging Face cache and open_clip, so only the folders a test writes can be found."""
    monkeypatch.setattr(lookup, "hub_cached_folder", lambda hub_repo, files: None)
    monkeypatch.setattr(tokenizers, "_open_clip_bpe_file", lambda: None)
    monkeypatch.setenv("LDM_STUDIO_CACHE", str(tmp_path / "ldm-cache"))


def write_bpe_gz(path: Path, merge_lines: list[str]) -> Path:
    """A file laid out like openai/CLIP's bpe_simple_vocab_16e6.txt.gz: a header line, then merges."""
    text = "bpe_simple_vocab_16e6.txt#version: 0.2\n" + "".join(line + "\n" for line in merge_lines)
    path.write_bytes(gzip.compress(text.encode("utf-8")))
    return path


def strip_merges(folder: Path) -> None:
    """Keep the vocabulary but drop every merge: "the" then splits into t, h, e</w>."""
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


# --- the tiny fixture ---------------------------------------------------------


def test_tiny_fixture_loads_as_an_sd_v1_style_tokenizer(tmp_path, no_shared_sources):
    folder = write_tiny_clip_tokenizer(tmp_path / "tiny")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    tokenizer = find_clip_tokenizer(tokenizer_dir=folder)

    assert len(tokenizer) == tiny_vocab_size(folder) == len(vocab) < 700
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS, EOS, EOS)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (vocab[BOS], vocab[EOS])
    assert tokenizer.model_max_length == 77

    words = "a photo of the red cat and the dog with a blue house in the green mountain".split()
    expected = [vocab[BOS], *(vocab[word + "</w>"] for word in words), vocab[EOS]]
    assert tokenizer(" ".join(words)).input_ids == expected

    padded = tokenizer("the cat", padding="max_length", truncation=True, max_length=tokenizer.model_max_length)
    assert padded.input_ids == [vocab[BOS], vocab["the</w>"], vocab["cat</w>"]] + [vocab[EOS]] * 74


# --- lookup order -------------------------------------------------------------


def test_explicit_dir_wins_over_a_folder_next_to_the_checkpoint(tmp_path, no_shared_sources):
    explicit = write_tiny_clip_tokenizer(tmp_path / "explicit")
    beside = write_tiny_clip_tokenizer(tmp_path / "models" / "tokenizer")
    strip_merges(beside)
    checkpoint = tmp_path / "models" / "sd-v1-4.ckpt"

    assert find_clip_tokenizer(checkpoint_path=checkpoint).tokenize("the") == ["t", "h", "e</w>"]
    chosen = find_clip_tokenizer(tokenizer_dir=explicit, checkpoint_path=checkpoint)
    assert chosen.tokenize("the") == ["the</w>"]


@pytest.mark.parametrize("subfolder", ["", "tokenizer", "sd-v1-4.tokenizer"])
def test_a_folder_next_to_the_checkpoint_is_found(tmp_path, no_shared_sources, caplog, subfolder):
    models = tmp_path / "models"
    folder = write_tiny_clip_tokenizer(models / subfolder)
    (models / "sd-v1-4.ckpt").write_bytes(b"")

    with caplog.at_level(logging.INFO, logger=tokenizers.__name__):
        tokenizer = find_clip_tokenizer(checkpoint_path=models / "sd-v1-4.ckpt")

    assert len(tokenizer) == tiny_vocab_size(folder)
    assert str(folder) in caplog.text


def test_a_stem_folder_of_another_checkpoint_is_not_used(tmp_path, no_shared_sources):
    write_tiny_clip_tokenizer(tmp_path / "models" / "other.tokenizer")
    with pytest.raises(TokenizerNotFoundError):
        find_clip_tokenizer(checkpoint_path=tmp_path / "models" / "sd-v1-4.ckpt")


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt"])
def test_an_incomplete_explicit_dir_raises_naming_the_missing_file(tmp_path, no_shared_sources, missing):
    explicit = write_tiny_clip_tokenizer(tmp_path / "explicit")
    (explicit / missing).unlink()
    write_tiny_clip_tokenizer(tmp_path / "models" / "tokenizer")  # must not be fallen back to

    with pytest.raises(TokenizerNotFoundError) as raised:
        find_clip_tokenizer(tokenizer_dir=explicit, checkpoint_path=tmp_path / "models" / "sd.ckpt")

    message = str(raised.value)
    present = ({"vocab.json", "merges.txt"} - {missing}).pop()
    assert str(explicit) in message
    assert f"no {missing}" in message
    assert f"no {present}" not in message


def test_a_missing_explicit_dir_raises_naming_it(tmp_path, no_shared_sources):
    with pytest.raises(TokenizerNotFoundError, match="does not exist") as raised:
        find_clip_tokenizer(tokenizer_dir=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(raised.value)


def test_with_nothing_available_the_error_names_the_places_and_the_fix(tmp_path, no_shared_sources):
    models = tmp_path / "models"
    models.mkdir()

    with pytest.raises(TokenizerNotFoundError) as raised:
        find_clip_tokenizer(checkpoint_path=models / "sd-v1-4.ckpt")

    assert isinstance(raised.value, FileNotFoundError)
    message = str(raised.value)
    for place in [f"{models}/", f"{models / 'tokenizer'}/", f"{models / 'sd-v1-4.tokenizer'}/"]:
        assert f"- {place}\n" in message
    assert "Hugging Face cache for openai/clip-vit-large-patch14" in message
    assert "open_clip_torch package (bpe_simple_vocab_16e6.txt.gz)" in message
    assert f"put vocab.json and merges.txt of openai/clip-vit-large-patch14 in {models / 'tokenizer'}/" in message
    assert "--tokenizer DIR" in message
    assert "pip install --no-deps open_clip_torch" in message


def test_a_vocabulary_that_is_not_byte_level_bpe_is_rejected(tmp_path, no_shared_sources):
    folder = tmp_path / "bert-like"
    folder.mkdir()
    tokens = [BOS, EOS, "a", "b", "ab"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\na b\n", encoding="utf-8")

    with pytest.raises(ValueError, match="not a CLIP byte-level BPE vocabulary"):
        find_clip_tokenizer(tokenizer_dir=folder)


# --- the Hugging Face cache ---------------------------------------------------


def fake_hub_cache(root: Path, repo: str) -> Path:
    """A cache laid out like huggingface_hub's: refs/main names a snapshot folder."""
    repo_cache = root / f"models--{repo.replace('/', '--')}"
    (repo_cache / "refs").mkdir(parents=True)
    (repo_cache / "refs" / "main").write_text("0123abcd")
    return write_tiny_clip_tokenizer(repo_cache / "snapshots" / "0123abcd")


def test_the_hf_cache_comes_before_open_clip(tmp_path, monkeypatch):
    snapshot = fake_hub_cache(tmp_path / "hub", "openai/clip-vit-large-patch14")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    gz = write_bpe_gz(tmp_path / "bpe.txt.gz", ["t h", "th e</w>"])
    monkeypatch.setattr(tokenizers, "_open_clip_bpe_file", lambda: gz)
    monkeypatch.setenv("LDM_STUDIO_CACHE", str(tmp_path / "ldm-cache"))

    tokenizer = find_clip_tokenizer(checkpoint_path=tmp_path / "models" / "sd.ckpt")

    assert len(tokenizer) == tiny_vocab_size(snapshot)
    assert not (tmp_path / "ldm-cache").exists()


def test_an_empty_hf_cache_is_not_mistaken_for_a_tokenizer(tmp_path, monkeypatch):
    # transformers 5 returns a 3-token tokenizer for an uncached repo instead of raising.
    (tmp_path / "hub").mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(tokenizers, "_open_clip_bpe_file", lambda: None)

    with pytest.raises(TokenizerNotFoundError):
        find_clip_tokenizer()


# --- CLIP BPE conversion ------------------------------------------------------


def test_clip_vocab_from_bpe_gives_the_clip_layout(tmp_path, no_shared_sources):
    gz = write_bpe_gz(tmp_path / "bpe.txt.gz", ["t h", "th e</w>", "a n", "an d</w>"])

    out = clip_vocab_from_bpe(gz, tmp_path / "out")

    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 256 + 256 + 4 + 2
    assert (vocab["!"], vocab["a"], vocab["ÿ"]) == (0, 64, 187)  # printable bytes first, in byte order
    assert (vocab["Ā"], vocab["Ġ"]) == (188, 220)  # then byte 0 as U+0100, ..., the space as U+0120
    assert vocab["a</w>"] == 320  # the real CLIP id of "a"
    assert [vocab[t] for t in ["th", "the</w>", "an", "and</w>", BOS, EOS]] == [512, 513, 514, 515, 516, 517]
    merges = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges == ["#version: 0.2", "t h", "th e</w>", "a n", "an d</w>"]

    tiny = json.loads((write_tiny_clip_tokenizer(tmp_path / "tiny") / "vocab.json").read_text(encoding="utf-8"))
    assert sorted(vocab, key=vocab.get)[:512] == sorted(tiny, key=tiny.get)[:512]  # independent byte alphabet

    assert find_clip_tokenizer(tokenizer_dir=out)("the and").input_ids == [516, 513, 515, 517]


def test_clip_vocab_from_bpe_stops_after_48894_merges(tmp_path):
    lines = [f"q{i} z" for i in range(48894 + 3)]
    gz = write_bpe_gz(tmp_path / "bpe.txt.gz", lines)

    out = clip_vocab_from_bpe(gz, tmp_path / "out")

    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert (vocab["q48893z"], vocab[BOS], vocab[EOS]) == (49405, 49406, 49407)
    assert "q48894z" not in vocab
    merges = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(merges) == 1 + 48894 and merges[-1] == "q48893 z"


def test_clip_vocab_from_bpe_rejects_a_malformed_merge(tmp_path):
    gz = write_bpe_gz(tmp_path / "bpe.txt.gz", ["t h", "broken"])
    with pytest.raises(ValueError, match="line 3"):
        clip_vocab_from_bpe(gz, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_clip_vocab_from_bpe_keeps_a_complete_folder_and_refuses_a_foreign_one(tmp_path):
    gz = write_bpe_gz(tmp_path / "bpe.txt.gz", ["t h"])
    done = write_tiny_clip_tokenizer(tmp_path / "done")
    before = (done / "vocab.json").read_text(encoding="utf-8")

    assert clip_vocab_from_bpe(gz, done) == done
    assert (done / "vocab.json").read_text(encoding="utf-8") == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="foreign"):
        clip_vocab_from_bpe(gz, foreign)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bpe.txt.gz", "done", "foreign"]  # no staging left


def test_open_clip_step_converts_once_into_the_cache_and_reuses_it(tmp_path, monkeypatch):
    gz = write_bpe_gz(tmp_path / "bpe.txt.gz", ["t h", "th e</w>", "a n", "an d</w>"])
    monkeypatch.setattr(lookup, "hub_cached_folder", lambda hub_repo, files: None)
    monkeypatch.setattr(tokenizers, "_open_clip_bpe_file", lambda: gz)
    monkeypatch.setenv("LDM_STUDIO_CACHE", str(tmp_path / "ldm-cache"))

    assert find_clip_tokenizer()("the and").input_ids == [516, 513, 515, 517]

    digest = hashlib.sha256(gz.read_bytes()).hexdigest()
    cache = tmp_path / "ldm-cache" / "tokenizers"
    assert [p.name for p in cache.iterdir()] == [f"clip-bpe-{digest[:12]}"]

    def fail(*args):
        raise AssertionError("converted again instead of reusing the cache")

    monkeypatch.setattr(tokenizers, "clip_vocab_from_bpe", fail)
    assert find_clip_tokenizer()("the and").input_ids == [516, 513, 515, 517]


# --- the real CLIP vocabulary from open_clip ----------------------------------


@pytest.fixture
def open_clip_gz() -> Path:
    """open_clip_torch's bpe_simple_vocab_16e6.txt.gz, found without importing open_clip; skip if absent."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip_torch is not installed (pip install --no-deps open_clip_torch)")
    gz = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not gz.is_file():
        pytest.skip(f"open_clip_torch has no {gz.name}")
    return gz


def test_open_clip_vocab_encodes_like_sd_v1(tmp_path, monkeypatch, open_clip_gz):
    monkeypatch.setattr(lookup, "hub_cached_folder", lambda hub_repo, files: None)
    monkeypatch.setenv("LDM_STUDIO_CACHE", str(tmp_path / "ldm-cache"))
    open_clip_was_imported = "open_clip" in sys.modules

    tokenizer = find_clip_tokenizer()

    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    assert tokenizer(FUNCTISTANER_TEXT).input_ids == FUNCTISTANER_IDS
    padded = tokenizer(FUNCTISTANER_TEXT, padding="max_length", truncation=True, max_length=tokenizer.model_max_length)
    assert padded.input_ids == FUNCTISTANER_IDS + [49407] * (77 - len(FUNCTISTANER_IDS))
    long = tokenizer("cat " * 100, padding="max_length", truncation=True, max_length=tokenizer.model_max_length)
    assert len(long.input_ids) == 77 and long.input_ids[-1] == 49407

    digest = hashlib.sha256(open_clip_gz.read_bytes()).hexdigest()
    assert (tmp_path / "ldm-cache" / "tokenizers" / f"clip-bpe-{digest[:12]}" / "vocab.json").is_file()
    assert open_clip_was_imported or "open_clip" not in sys.modules
