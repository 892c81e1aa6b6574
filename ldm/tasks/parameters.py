"""The generation parameters text that PNGs carry, in the format AUTOMATIC1111 writes, so other
tools read it, its one builder (``parameters_text``) and its reader:

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 0123456789, Model: name, Eta DDIM: 0.0
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, ...

The sampler and its schedule are written as AUTOMATIC1111 1.9+ writes them: "Schedule type" is the
schedule the sampler ran ("Automatic" resolved to the sampler's default), left out where that is
the sampler's own timesteps (DDIM, UniPC, LCM on "Automatic"), so DDIM's text is as it always was.
The eta is written under the sampler's key ("Eta DDIM" for DDIM, "Eta" for the ancestral and SDE
samplers), only for a sampler that takes one; s_noise as AUTOMATIC1111's "Sigma noise", only for a
sampler that takes it and where it is not 1. ``read_sampler`` reads these back, and the fused names
of AUTOMATIC1111 up to 1.8 ("DPM++ 2M Karras").
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

from typing import NamedTuple

from ldm.addons.embeddings import embedding_hashes
from ldm.addons.library import lora_hashes
from ldm.sampling.samplers import get_sampler, resolve_schedule, split_sampler_name
from ldm.sampling.sigmas import get_schedule
from ldm.tasks.request import GenerationRequest, TilingOptions

NEGATIVE = "Negative prompt: "
S_NOISE = "Sigma noise"  # AUTOMATIC1111's key for s_noise
_FIELD = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def format_parameters(prompt: str, negative_prompt: str, fields: dict[str, object]) -> str:
    lines = [prompt]
    if negative_prompt:
        lines.append(NEGATIVE + negative_prompt)
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def parameters_text(request: GenerationRequest, seed: int, loaded, fields: dict[str, object] | None = None, *, guided: bool = True,
                    size: str | None = None) -> str:
    """The text of one image of a resolved request (``ldm.tasks.request``) made with ``loaded`` (its
    ``name`` and ``short_hash``): the fields every task writes, in AUTOMATIC1111's order, then the
    task's own ``fields`` (None values are left out). ``guided``: the guidance scale is one of the
    common fields; ``size``: the image's size when it is not the request's."""
    schedule = resolve_schedule(request.sampler, request.schedule)
    common: dict[str, object] = {"Steps": request.steps, "Sampler": request.sampler,
                                 "Schedule type": None if schedule == "Automatic" else schedule}
    if guided:
        common["CFG scale"] = request.scale
    common.update({"Seed": seed, "Size": size or f"{request.width}x{request.height}", "Model hash": loaded.short_hash,
                   "Model": loaded.name, **noise_fields(request), "Emphasis": emphasis_field(request)})
    return format_parameters(request.prompt, request.negative_prompt,
                             {**common, **(fields or {}), **lora_fields(request), **embedding_fields(request, loaded)})


def lora_fields(request: GenerationRequest) -> dict[str, object]:
    """AUTOMATIC1111's "Lora hashes" of the LoRAs the prompts' tags apply (none without tags)."""
    prompts = request.prompts()
    if not any("<lora:" in p for p in prompts):
        return {}
    return {"Lora hashes": lora_hashes(prompts, list(request.lora_dirs))}


def embedding_fields(request: GenerationRequest, loaded) -> dict[str, object]:
    """AUTOMATIC1111's "TI hashes" of the textual-inversion embeddings the prompts use on ``loaded.model``
    (none without embedding folders, or on a model that reads no CLIP tokens)."""
    model = getattr(loaded, "model", None)
    if not request.embedding_dirs or model is None:
        return {}
    return {"TI hashes": embedding_hashes(model, request.prompts(), request.steps, list(request.embedding_dirs))}


def emphasis_field(request: GenerationRequest) -> str | None:
    """The emphasis mode, written as AUTOMATIC1111 writes it: only when it is not "Original" and a
    prompt has a bracket."""
    texts = (request.prompt, request.negative_prompt)
    return request.emphasis if request.emphasis != "Original" and any(c in t for t in texts for c in "([") else None


def noise_fields(request: GenerationRequest) -> dict[str, object]:
    """The eta under its sampler's key, and "Sigma noise", for the samplers that take them."""
    sampler = get_sampler(request.sampler)
    fields: dict[str, object] = {} if sampler.eta_field is None else {sampler.eta_field: request.eta}
    if sampler.s_noise and request.s_noise != 1.0:
        fields[S_NOISE] = request.s_noise
    return fields


class SamplerSettings(NamedTuple):
    """What a parameters text says of its sampler (``read_sampler``)."""

    sampler: str
    schedule: str
    eta: float | None  # None: the sampler takes no eta
    s_noise: float


def read_sampler(fields: dict[str, str]) -> SamplerSettings | None:
    """The sampler, schedule, eta and s_noise of parsed parameters (``parse_parameters``), or None when
    they name no sampler. Reads AUTOMATIC1111 1.9+'s "Sampler" and "Schedule type" and the fused names
    of earlier versions ("DPM++ 2M Karras"; a name with no schedule meant "Uniform" there), where a
    fused schedule that is the sampler's default reads as "Automatic", as AUTOMATIC1111 reads it. A missing eta is
    the sampler's default (AUTOMATIC1111 writes it only when it differs). Raises ValueError naming the
    known samplers (or schedules) for one it does not know."""
    label = fields.get("Sampler", "").strip()
    if not label:
        return None
    sampler, fused = split_sampler_name(label)
    entry = get_sampler(sampler)
    written = fields.get("Schedule type", "").strip()
    if written:
        schedule = get_schedule(written).name
    else:  # up to 1.8: the fused schedule, or the k-diffusion default; the sampler's own default is "Automatic"
        schedule = fused or ("Automatic" if entry.automatic is None else "Uniform")
        schedule = "Automatic" if schedule == entry.automatic else schedule
    return SamplerSettings(sampler, schedule, None if entry.eta_field is None else
                           _number(fields, entry.eta_field, entry.eta_default), _number(fields, S_NOISE, 1.0))


def _number(fields: dict[str, str], key: str, default: float) -> float:
    try:
        return float(fields[key])
    except (KeyError, ValueError):
        return default


def canvas_fields(request: GenerationRequest) -> dict[str, object]:
    """The fields of a request's layout boxes, region prompts and tiling (None where it has none)."""
    tiling = request.tiling
    return {
        "Layout": "; ".join(f"{b[0]} {b[1]:.3f} {b[2]:.3f} {b[3]:.3f} {b[4]:.3f}" for b in request.boxes) or None,
        "Regions": "; ".join(f"{r.prompt} {r.box[0]:.3f} {r.box[1]:.3f} {r.box[2]:.3f} {r.box[3]:.3f} {r.strength:g}"
                             for r in request.regions) or None,
        "Region negatives": "; ".join(f"{i + 1}: {r.negative_prompt}" for i, r in enumerate(request.regions)
                                      if r.negative_prompt) or None,
        "Tiling": None if tiling == TilingOptions() else f"{tiling.mode} {tiling.tile} {tiling.overlap} {tiling.budget_mb}",
    }


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
    """Write a PNG with a ``parameters`` text chunk (and ``ldm_studio`` JSON for ``extra``), atomically
    (``write_atomically``)."""
    return write_atomically(path, encode_png(image, parameters, extra))


def encode_png(image: Image.Image, parameters: str | None = None, extra: dict | None = None) -> bytes:
    """The bytes of a PNG with a ``parameters`` text chunk (and ``ldm_studio`` JSON for ``extra``)."""
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    if extra:
        info.add_text("ldm_studio", json.dumps(extra))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_atomically(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file in ``path``'s folder, then rename it to ``path``, so a crash
    never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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
