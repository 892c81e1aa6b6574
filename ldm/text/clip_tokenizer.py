"""The CLIP BPE tokenizer that Stable Diffusion v1 and v2 checkpoints need.

SD v1 and v2 single-file checkpoints hold the text encoder's weights (CLIP ViT-L/14, OpenCLIP
ViT-H/14) but not its tokenizer; both use the same BPE vocabulary. `find_clip_tokenizer` looks for a
complete `vocab.json` + `merges.txt` in the order of ``ldm.text.lookup`` (a given folder, beside the
checkpoint, the Hugging Face cache), then:

4. The CLIP BPE file `bpe_simple_vocab_16e6.txt.gz` that the `open_clip_torch` package ships
   (byte-identical to openai/CLIP's). It is converted once into `vocab.json` + `merges.txt` under
   `$LDM_STUDIO_CACHE/tokenizers/` (default `~/.cache/ldm-studio/tokenizers/`) and reused afterwards.
5. Otherwise `TokenizerNotFoundError`, naming the places searched and the fix.

Whatever the source, the tokenizer returned behaves like SD v1's: at most 77 tokens,
`<|startoftext|>` as bos and `<|endoftext|>` as eos and pad (the SD 2.x encoder pads with token 0
itself, as open_clip does).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ldm.text.lookup import TokenizerNotFoundError, has_files, search

logger = logging.getLogger(__name__)

DEFAULT_HUB_REPO = "openai/clip-vit-large-patch14"
VOCAB_FILES = ("vocab.json", "merges.txt")
MAX_LENGTH = 77  # SD v1's FrozenCLIPEmbedder: truncate and pad to 77 tokens
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # also the pad token in SD v1

OPEN_CLIP_BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# openai/CLIP keeps the merges on lines [1, 48895) of the .gz: 49152 ids less
# 256 byte tokens and 2 specials (line 0 is a header).
BPE_MERGES_END = 49152 - 256 - 2 + 1
MERGES_HEADER = "#version: 0.2"

# Bytes that GPT-2/CLIP byte-level BPE writes as themselves ("!".."~", "¡".."¬",
# "®".."ÿ"); the other 68 bytes become chr(256), chr(257), ... in byte order.
_PRINTABLE_BYTES = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]


def find_clip_tokenizer(
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    hub_repo: str = DEFAULT_HUB_REPO,
):
    """Return SD v1's CLIP tokenizer (transformers' ``CLIPTokenizer``) from the first source in the
    module's lookup order."""
    found, searched = search(VOCAB_FILES, tokenizer_dir=tokenizer_dir, checkpoint_path=checkpoint_path,
                             hub_repo=hub_repo, requirement="it must hold vocab.json and merges.txt")
    if found is not None:
        return _load_clip_tokenizer(found.folder, source=found.source)
    gz_path = _open_clip_bpe_file()
    if gz_path is not None:
        folder = _cached_clip_vocab(gz_path)
        return _load_clip_tokenizer(folder, source=f"open_clip's {OPEN_CLIP_BPE_NAME}, converted in {folder}")
    searched.append(f"an installed open_clip_torch package ({OPEN_CLIP_BPE_NAME})")
    raise TokenizerNotFoundError(_not_found_message(searched, checkpoint_path, hub_repo))


def clip_vocab_from_bpe(gz_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert openai/CLIP's `bpe_simple_vocab_16e6.txt.gz` into `vocab.json` + `merges.txt` in `out_dir`.

    vocab = the 256 byte characters, the same with "</w>", one token per merge,
    then `<|startoftext|>` and `<|endoftext|>` (49,408 ids for the real file).
    The files are written to a temporary sibling folder that is then renamed to
    `out_dir`, so a reader never sees half a vocabulary. If `out_dir` already
    holds both files (another process won the race), it is kept as it is.
    """
    out_dir = Path(out_dir)
    merges = _read_bpe_merges(Path(gz_path))
    vocab = _clip_vocab(merges)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_vocab_files(staging, vocab, merges)
        _move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


# --- lookup steps -------------------------------------------------------------


def _open_clip_bpe_file() -> Path | None:
    """open_clip's BPE .gz, found without importing open_clip (its import pulls in torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / OPEN_CLIP_BPE_NAME
        if candidate.is_file():
            return candidate
    return None


def open_clip_vocab_folder() -> Path | None:
    """The CLIP vocabulary folder converted from open_clip's BPE file (transformers' CLIPTokenizer
    reads it), or None where open_clip is not installed."""
    gz_path = _open_clip_bpe_file()
    return None if gz_path is None else _cached_clip_vocab(gz_path)


def _cached_clip_vocab(gz_path: Path) -> Path:
    """The converted vocab folder for `gz_path`, converting it on first use."""
    digest = hashlib.sha256(gz_path.read_bytes()).hexdigest()
    folder = _cache_root() / "tokenizers" / f"clip-bpe-{digest[:12]}"
    if _has_vocab_files(folder):
        logger.debug("Reusing converted CLIP vocabulary in %s", folder)
        return folder
    logger.info("Converting %s into %s", gz_path, folder)
    return clip_vocab_from_bpe(gz_path, folder)


def _cache_root() -> Path:
    """`$LDM_STUDIO_CACHE`, or `~/.cache/ldm-studio`."""
    configured = os.environ.get("LDM_STUDIO_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "ldm-studio"


def _not_found_message(searched: list[str], checkpoint_path: str | os.PathLike | None, hub_repo: str) -> str:
    if checkpoint_path is not None:
        put_it = f"put vocab.json and merges.txt of {hub_repo} in {Path(checkpoint_path).parent / 'tokenizer'}/"
    else:
        put_it = f"put vocab.json and merges.txt of {hub_repo} in a folder"
    lines = [
        "No CLIP tokenizer found. SD v1 and v2 checkpoints do not contain one and nothing is downloaded. Searched:",
        *(f"  - {place}" for place in searched),
        "To fix, do one of:",
        f"  - {put_it}",
        "  - pass --tokenizer DIR, a folder holding vocab.json and merges.txt",
        "  - install open_clip_torch, which ships the CLIP vocabulary: `pip install --no-deps open_clip_torch`",
    ]
    return "\n".join(lines)


# --- folders and loading ------------------------------------------------------


def _has_vocab_files(folder: Path) -> bool:
    return has_files(folder, VOCAB_FILES)


def _load_clip_tokenizer(folder: Path, *, source: str):
    """Load the tokenizer in `folder` with SD v1's length and special tokens."""
    from transformers import CLIPTokenizer  # imported when a tokenizer is loaded: it takes a second to import

    tokenizer = CLIPTokenizer.from_pretrained(
        str(folder),
        local_files_only=True,
        model_max_length=MAX_LENGTH,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )
    _check_byte_level_vocab(tokenizer, source)
    logger.info("CLIP tokenizer: %s", source)
    return tokenizer


def _check_byte_level_vocab(tokenizer, source: str) -> None:
    """Reject vocabularies that are not CLIP's byte-level BPE (they would give wrong token ids)."""
    vocab = tokenizer.get_vocab()
    base = _byte_level_alphabet()
    missing = [token for token in (*base, *(char + "</w>" for char in base)) if token not in vocab]
    if missing:
        raise ValueError(
            f"The tokenizer from {source} is not a CLIP byte-level BPE vocabulary: "
            f"{len(missing)} of its 512 byte tokens are missing (first: {missing[0]!r})"
        )


# --- BPE conversion -----------------------------------------------------------


def _byte_level_alphabet() -> list[str]:
    """The 256 byte characters in GPT-2/CLIP order: printable bytes, then chr(256 + n) for the rest."""
    return [chr(b) for b in _PRINTABLE_BYTES] + [chr(256 + n) for n in range(256 - len(_PRINTABLE_BYTES))]


def _read_bpe_merges(gz_path: Path) -> list[tuple[str, str]]:
    """The merge pairs of a CLIP BPE .gz: lines 1 to 48,894, each "left right"."""
    text = gzip.decompress(gz_path.read_bytes()).decode("utf-8")
    lines = text.rstrip("\n").split("\n")[1:BPE_MERGES_END]
    merges = []
    for number, line in enumerate(lines, start=2):
        pair = line.split()
        if len(pair) != 2:
            raise ValueError(f"{gz_path}, line {number}: expected a merge 'left right', got {line!r}")
        merges.append((pair[0], pair[1]))
    return merges


def _clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    alphabet = _byte_level_alphabet()
    tokens = [*alphabet, *(char + "</w>" for char in alphabet), *(left + right for left, right in merges)]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"The BPE merges give {len(tokens) - len(vocab)} duplicate tokens; ids would shift")
    return vocab


def _write_vocab_files(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = [MERGES_HEADER, *(f"{left} {right}" for left, right in merges)]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename `staging` to `out_dir`; an existing complete `out_dir` is kept."""
    try:
        os.rename(staging, out_dir)
    except OSError:
        if not out_dir.exists():
            raise
        if _has_vocab_files(out_dir):
            logger.debug("%s was written meanwhile; keeping it", out_dir)
            return
        raise FileExistsError(f"{out_dir} exists and does not hold vocab.json + merges.txt; remove it") from None
