"""Which tokenizer a text encoder needs, and where its files are found.

Checkpoints hold an encoder's weights but not its tokenizer, and nothing here downloads one. A
tokenizer's files are looked for in this order (``search``), the first complete folder winning:

1. ``tokenizer_dir``, when given. A folder without the files is an error, never skipped.
2. Next to the checkpoint: its own folder, its ``tokenizer/`` subfolder, or a
   ``<checkpoint stem>.tokenizer/`` folder beside it.
3. The Hugging Face cache for the tokenizer's repository (files already downloaded; offline).

Each tokenizer module adds its own last resort (CLIP: the BPE file open_clip_torch ships) and its
own message naming the places searched and the fix. ``tokenizer_for`` picks the tokenizer of an
encoder from its config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class TokenizerNotFoundError(FileNotFoundError):
    """No tokenizer in any of the places searched; the message names them and the fix."""


@dataclass(frozen=True)
class Found:
    folder: Path
    source: str  # where it was found, for the log and for messages


def folders_next_to(checkpoint: Path) -> list[Path]:
    """The folders beside a checkpoint that may hold its tokenizer, in lookup order."""
    return [checkpoint.parent, checkpoint.parent / "tokenizer", checkpoint.parent / f"{checkpoint.stem}.tokenizer"]


def hub_cached_folder(hub_repo: str, files: tuple[str, ...]) -> Path | None:
    """The cached snapshot folder of ``hub_repo`` if it holds every one of ``files``, else None."""
    import huggingface_hub  # where a tokenizer is looked for, not at start-up

    paths = [huggingface_hub.try_to_load_from_cache(hub_repo, name) for name in files]
    if not all(isinstance(path, str) for path in paths):
        return None
    return Path(paths[0]).parent


def has_files(folder: Path, files: tuple[str, ...]) -> bool:
    return all((folder / name).is_file() for name in files)


def search(files: tuple[str, ...], *, tokenizer_dir: str | os.PathLike | None, checkpoint_path: str | os.PathLike | None,
           hub_repo: str, requirement: str) -> tuple[Found | None, list[str]]:
    """The first folder holding ``files`` (see the module's order), and the places searched before it.
    A given ``tokenizer_dir`` without them raises ``TokenizerNotFoundError`` ending in ``requirement``
    (what the folder must hold)."""
    if tokenizer_dir is not None:
        folder = Path(tokenizer_dir)
        missing = [name for name in files if not (folder / name).is_file()]
        if not folder.is_dir() or missing:
            what = "does not exist" if not folder.is_dir() else f"has no {' and no '.join(missing)}"
            raise TokenizerNotFoundError(f"Tokenizer folder {folder} {what}; {requirement}")
        return Found(folder, f"tokenizer folder {folder}"), []
    searched: list[str] = []
    if checkpoint_path is not None:
        for folder in folders_next_to(Path(checkpoint_path)):
            if has_files(folder, files):
                return Found(folder, f"folder next to the checkpoint {folder}"), searched
            searched.append(f"{folder}/")
    folder = hub_cached_folder(hub_repo, files)
    if folder is not None:
        return Found(folder, f"Hugging Face cache for {hub_repo} ({folder})"), searched
    searched.append(f"the Hugging Face cache for {hub_repo}")
    return None, searched


def tokenizer_for(encoder, checkpoint_path: Path, tokenizer_dir: str | os.PathLike | None, *, preset_name: str,
                  vocabulary_root: Path):
    """The tokenizer a conditioning stage needs: CLIP's BPE (looked up; OpenCLIP and both SDXL encoders use the same one),
    bert-base-uncased's WordPiece for LDM BERT (looked up), LDM's layout tokens for a layout-only
    encoder, or a word-and-layout vocabulary file named by the preset (relative to ``vocabulary_root``)."""
    from ldm.models.clip import CLIPTextEncoder, OpenCLIPTextEncoder
    from ldm.models.sdxl_conditioner import SDXLConditioner
    from ldm.text.bert_tokenizer import BERT_HUB_REPO, find_bert_tokenizer

    if isinstance(encoder, (CLIPTextEncoder, OpenCLIPTextEncoder, SDXLConditioner)):
        from ldm.text.clip_tokenizer import find_clip_tokenizer

        return find_clip_tokenizer(tokenizer_dir=tokenizer_dir, checkpoint_path=checkpoint_path)
    config = encoder.config
    if config.vocab == BERT_HUB_REPO:
        tokenizer = find_bert_tokenizer(tokenizer_dir=tokenizer_dir, checkpoint_path=checkpoint_path)
        if tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"{checkpoint_path}: the tokenizer from {tokenizer.source} has {tokenizer.vocab_size} "
                                  f"tokens, more than the {config.vocab_size} of the {preset_name} model; it is not "
                                  f"{BERT_HUB_REPO}'s")
        return tokenizer
    if config.vocab == "layout":
        from ldm.text.layout_tokens import LDMLayoutTokenizer

        return LDMLayoutTokenizer(config.vocab_size, config.max_objects, config.grid) if config.max_objects else None
    from ldm.text.word_tokenizer import WordLayoutTokenizer

    vocab = vocabulary_root / config.vocab
    if not vocab.is_file():
        raise TokenizerNotFoundError(f"{checkpoint_path}: the tokenizer vocabulary {vocab} that preset {preset_name} names "
                                     "is missing")
    return WordLayoutTokenizer.from_file(vocab, config.caption_tokens, config.max_objects, config.grid)
