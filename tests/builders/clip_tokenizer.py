"""A tiny CLIP-style BPE tokenizer for tests that need a text encoder without the real 49,408-token vocabulary.

The files have the real layout: `vocab.json` lists the 256 byte-level
characters in GPT-2/CLIP order, then each with "</w>", then one token per merge,
then `<|startoftext|>` and `<|endoftext|>`; `merges.txt` is "#version: 0.2"
followed by one "left right" pair a line. So `transformers.CLIPTokenizer` (and
`ldm.text.clip_tokenizer.find_clip_tokenizer(tokenizer_dir=...)`) loads it as is.

The byte alphabet is built here with the GPT-2 byte-to-unicode construction, on
purpose not imported from ldm/, so that tests of ldm's converter compare against
an independent implementation.
"""

from __future__ import annotations

import json
from pathlib import Path

# Merges in rank order. Each part is a byte character, a "</w>" form, or the
# result of an earlier merge; they spell a few prompt words.
_MERGES = """\
t h
th e</w>
t h</w>
a n
an d</w>
o f</w>
i n
in g</w>
e r</w>
o n</w>
a t</w>
c at</w>
d o
do g</w>
p h
o t
ph ot
phot o</w>
r e
re d</w>
b l
bl u
blu e</w>
h o
ho u
hou s
hous e</w>
t re
tre e</w>
s k
sk y</w>
i s</w>
a n</w>
w i
wi th</w>
g re
e n</w>
gre en</w>
i n</w>
m o
mo u
mou n
moun t
mount a
mounta in</w>
"""


def write_tiny_clip_tokenizer(folder: str | Path) -> Path:
    """Write vocab.json and merges.txt of a tiny CLIP-style tokenizer into `folder` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = [tuple(line.split()) for line in _MERGES.splitlines()]
    alphabet = _gpt2_byte_alphabet()
    tokens = alphabet + [char + "</w>" for char in alphabet] + [left + right for left, right in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    assert len(vocab) == len(tokens), "a merge repeats a token"
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2", *(f"{left} {right}" for left, right in merges)]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    return folder


def tiny_vocab_size(folder: str | Path) -> int:
    """The number of ids in the tokenizer that `write_tiny_clip_tokenizer` wrote into `folder`."""
    return len(json.loads((Path(folder) / "vocab.json").read_text(encoding="utf-8")))


def _gpt2_byte_alphabet() -> list[str]:
    """The characters that stand for bytes 0..255, in the order CLIP's vocab lists them."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    byte_to_char = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in byte_to_char:  # control bytes, space, etc. move above U+00FF
            byte_to_char[byte] = chr(256 + shifted)
            shifted += 1
    return list(byte_to_char.values())
