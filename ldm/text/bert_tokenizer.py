"""The bert-base-uncased tokenizer that LDM's text-to-image models (LDM BERT) need.

LDM's ``BERTEmbedder`` turns a caption into ids with transformers' ``BertTokenizerFast`` for
"bert-base-uncased": ``[CLS] ... [SEP]``, truncated and padded with ``[PAD]`` (id 0) to 77 tokens
(CompVis/latent-diffusion ``ldm/modules/encoders/modules.py``). The checkpoints hold no vocabulary
and no pip package ships bert-base-uncased's ``vocab.txt``, so ``find_bert_tokenizer`` looks for it
in the order of ``ldm.text.lookup`` (a given folder, beside the checkpoint, the Hugging Face cache)
and never downloads; otherwise ``TokenizerNotFoundError`` names the places searched and where to put
``vocab.txt``.

A prompt longer than 77 tokens is cut, as the original does; ``notices`` says so for the user.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.text.lookup import TokenizerNotFoundError, search

log = logging.getLogger(__name__)

BERT_HUB_REPO = "bert-base-uncased"
BERT_VOCAB_FILE = "vocab.txt"
BERT_MAX_LENGTH = 77  # LDM's BERTTokenizer(max_length=77)
BERT_SPECIALS = {"pad": ("[PAD]", 0), "cls": ("[CLS]", None), "sep": ("[SEP]", None)}


@dataclass(frozen=True)
class BertPromptTokenizer:
    """bert-base-uncased ids for prompts, as LDM's ``BERTTokenizer`` makes them: (B, 77) with
    ``[CLS]`` first, ``[SEP]`` after the last kept token, ``[PAD]`` = 0 after it. The interface of
    the project's word-and-layout tokenizer (``encode_batch(prompts, layouts)``), so that the
    conditioning stage encodes with it unchanged; LDM BERT models take no layout."""

    tokenizer: object  # transformers' BertTokenizerFast
    max_length: int = BERT_MAX_LENGTH
    source: str = ""

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def token_count(self, prompt: str) -> int:
        """Tokens of ``prompt`` with ``[CLS]`` and ``[SEP]``, before truncation."""
        return len(self.tokenizer(prompt, truncation=False, verbose=False)["input_ids"])

    def notices(self, prompts: Sequence[str]) -> list[str]:
        """What the user should know: which prompts are cut to the model's 77 tokens."""
        out = []
        for prompt in dict.fromkeys(p for p in prompts if p):
            count = self.token_count(prompt)
            if count > self.max_length:
                kept = self.tokenizer.decode(self.encode_batch([prompt])[0, 1:-1].tolist())
                out.append(f"prompt {_excerpt(prompt)!r} is {count - 2} tokens long; LDM BERT reads the first "
                           f"{self.max_length - 2}, up to {_excerpt(kept, tail=True)!r}, and ignores the rest")
        return out

    def encode_batch(self, prompts: Sequence[str], layouts: Sequence | None = None) -> torch.Tensor:
        if layouts is not None and any(layouts):
            raise ValueError("this model takes no layout boxes (its LDM BERT reads text only); use region prompts")
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")["input_ids"]
        return ids.to(torch.long)  # (B, 77)


def _excerpt(text: str, width: int = 40, tail: bool = False) -> str:
    if len(text) <= width:
        return text
    return "..." + text[-width:] if tail else text[:width] + "..."


def find_bert_tokenizer(
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    hub_repo: str = BERT_HUB_REPO,
) -> BertPromptTokenizer:
    """LDM BERT's tokenizer from the first source in the module's lookup order."""
    found, searched = search((BERT_VOCAB_FILE,), tokenizer_dir=tokenizer_dir, checkpoint_path=checkpoint_path,
                             hub_repo=hub_repo, requirement=f"for an LDM BERT model it must hold {hub_repo}'s {BERT_VOCAB_FILE}")
    if found is None:
        raise TokenizerNotFoundError(_not_found_message(searched, checkpoint_path, hub_repo))
    return load_bert_tokenizer(found.folder, source=found.source)


def _not_found_message(searched: list[str], checkpoint_path: str | os.PathLike | None, hub_repo: str) -> str:
    where = f"in {Path(checkpoint_path).parent / 'tokenizer'}/" if checkpoint_path is not None else "in a folder"
    lines = [
        f"No {hub_repo} tokenizer found. LDM BERT checkpoints (LDM text2img) do not contain one, no pip package "
        "ships it and nothing is downloaded. Searched:",
        *(f"  - {place}" for place in searched),
        "To fix, do one of:",
        f"  - put {hub_repo}'s {BERT_VOCAB_FILE} (30,522 lines, from the Hugging Face model {hub_repo}) {where}",
        f"  - pass --tokenizer DIR, a folder holding {BERT_VOCAB_FILE}",
        f"  - download it once into the Hugging Face cache: `huggingface-cli download {hub_repo} {BERT_VOCAB_FILE}`",
    ]
    return "\n".join(lines)


def load_bert_tokenizer(folder: str | os.PathLike, *, source: str = "") -> BertPromptTokenizer:
    """The uncased WordPiece tokenizer of ``folder/vocab.txt``, checked for BERT's special tokens."""
    from transformers import BertTokenizerFast  # imported when a tokenizer is loaded: it takes a second to import

    folder = Path(folder)
    tokenizer = BertTokenizerFast.from_pretrained(str(folder), local_files_only=True, do_lower_case=True,
                                                  model_max_length=BERT_MAX_LENGTH)
    vocab = tokenizer.get_vocab()
    for token, wanted in BERT_SPECIALS.values():
        if token not in vocab or (wanted is not None and vocab[token] != wanted):
            at = "missing" if token not in vocab else f"id {vocab[token]}, not {wanted}"
            raise ValueError(f"{folder / BERT_VOCAB_FILE} is not a BERT WordPiece vocabulary: {token} is {at}")
    log.info("BERT tokenizer: %s", source or folder)
    return BertPromptTokenizer(tokenizer, source=source or str(folder))
