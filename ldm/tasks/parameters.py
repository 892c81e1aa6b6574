"""The generation parameters text that PNGs carry, in the format AUTOMATIC1111 writes, so other
tools read it, and its reader:

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 0123456789, Model: name, Eta DDIM: 0.0
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

NEGATIVE = "Negative prompt: "
_FIELD = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def format_parameters(prompt: str, negative_prompt: str, fields: dict[str, object]) -> str:
    lines = [prompt]
    if negative_prompt:
        lines.append(NEGATIVE + negative_prompt)
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def _quote(value: object) -> str:
    text = str(value)
    return json.dumps(text) if ("," in text or ":" in text or "\n" in text) else text


def parse_parameters(text: str) -> dict[str, str]:
    """The fields of a parameters text, plus "Prompt" and "Negative prompt"."""
    *head, last = text.strip("\n").split("\n")
    if not _FIELD.match(last) or "Steps:" not in last:
        head, last = [*head, last], ""
    prompt_lines, negative_lines, target = [], [], None
    for line in head:
        if line.startswith(NEGATIVE):
            target = negative_lines
            line = line[len(NEGATIVE) :]
        (negative_lines if target is negative_lines else prompt_lines).append(line)
    fields = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines)}
    for key, value in _FIELD.findall(last):
        value = value.strip()
        fields[key.strip()] = json.loads(value) if value.startswith('"') else value
    return fields


def save_png(image: Image.Image, path: str | Path, parameters: str | None = None, extra: dict | None = None) -> Path:
    """Write a PNG with a ``parameters`` text chunk (and ``ldm_studio`` JSON for ``extra``), atomically:
    a temporary file in the same folder, then a rename, so a crash never leaves half an image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    if extra:
        info.add_text("ldm_studio", json.dumps(extra))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_png_parameters(path: str | Path) -> dict[str, str]:
    with Image.open(path) as image:
        text = image.text.get("parameters") if hasattr(image, "text") else None
    if text is None:
        raise ValueError(f"{path} carries no generation parameters")
    return parse_parameters(text)
