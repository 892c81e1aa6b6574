"""``<lora:NAME>``, ``<lora:NAME:WEIGHT>`` and ``<lora:NAME:TE:UNET>`` tags in a prompt, as AUTOMATIC1111
writes them: taken out of the text before it is encoded, each a LoRA name and its text-encoder and
UNet multipliers (``te=`` and ``unet=`` may also be named: ``<lora:ink:1:unet=0.5>``). Other
``<word:...>`` tags (hypernetworks) are left in the text as they are.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

TAG = re.compile(r"<lora:([^>]*)>")
MAX_WEIGHT = 5.0  # |multiplier|; artists use about -2 to 2


class LoraTag(NamedTuple):
    name: str
    te: float = 1.0
    unet: float = 1.0


class Tagged(NamedTuple):
    text: str  # the prompt without its tags
    tags: list[LoraTag]


def _weight(tag: str, what: str, value: str) -> float:
    try:
        weight = float(value)
    except ValueError:
        raise ValueError(f"{tag}: the {what} weight {value!r} is not a number") from None
    if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
        raise ValueError(f"{tag}: the {what} weight {value} is outside the allowed range "
                         f"-{MAX_WEIGHT:g} to {MAX_WEIGHT:g}")
    return weight


def parse_tag(body: str) -> LoraTag:
    """The inside of ``<lora:...>``: a name, then up to two positional weights and ``te=``/``unet=``."""
    tag = f"<lora:{body}>"
    items = [item.strip() for item in body.split(":")]
    name, rest = items[0], items[1:]
    if not name:
        raise ValueError(f"{tag}: the tag names no LoRA; write <lora:NAME:WEIGHT>")
    named = dict(item.split("=", 1) for item in rest if "=" in item)
    positional = [item for item in rest if "=" not in item]
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown or len(positional) > 2:
        raise ValueError(f"{tag}: expected <lora:NAME>, <lora:NAME:WEIGHT> or <lora:NAME:TE:UNET> "
                         f"(and te=, unet=), not {body!r}")
    te = _weight(tag, "text encoder", positional[0]) if positional else 1.0
    te = _weight(tag, "text encoder", named["te"]) if "te" in named else te
    unet = _weight(tag, "UNet", positional[1]) if len(positional) > 1 else te
    unet = _weight(tag, "UNet", named["unet"]) if "unet" in named else unet
    return LoraTag(name, te, unet)


def extract_lora_tags(prompt: str) -> Tagged:
    """The prompt without its ``<lora:...>`` tags (spaces left around them are kept, as AUTOMATIC1111
    does) and the tags in order. Raises ValueError naming a malformed tag and what is allowed."""
    tags = [parse_tag(m.group(1)) for m in TAG.finditer(prompt)]
    return Tagged(TAG.sub("", prompt) if tags else prompt, tags)
