"""Layout to image: labelled boxes (and an optional prompt) to a picture.

Every text model serves it: a model with layout conditioning (the default model, LDM layout2img)
reads the boxes as layout tokens (a class token and two grid corners each); any other text model
takes each box's label as the prompt of its region (``ldm.sampling.regions``), fused with the global
prompt. LDM's layout2img reads class ids and no text, so its boxes are always layout tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from ldm.checkpoints.loaded import LoadedModel
from ldm.checkpoints.presets import PRESET_DIR
from ldm.models.latent_diffusion import LatentDiffusionConfig
from ldm.sampling.steps import Callback
from ldm.tasks.request import GenerationRequest, check_model
from ldm.tasks.result import GenerationResult
from ldm.tasks.txt2img import generate_from_prompts
from ldm.tasks.txt2img import serves as serves_text
from ldm.text.bert_tokenizer import BERT_HUB_REPO
from ldm.text.word_tokenizer import WordLayoutTokenizer

NAME = "layout"


def takes_layout_tokens(config: LatentDiffusionConfig) -> bool:
    """A model whose conditioning stage reads boxes as layout tokens."""
    return getattr(config.cond_stage, "max_objects", 0) > 0


def reads_class_ids(config: LatentDiffusionConfig) -> bool:
    """A layout-only conditioning stage (LDM layout2img): its boxes name class ids, and it reads no text."""
    return takes_layout_tokens(config) and not getattr(config.cond_stage, "takes_text", True)


class ClassIds(NamedTuple):
    largest: int  # the largest class id a box may name
    boxes: int  # the most boxes a layout may have


def class_ids(config: LatentDiffusionConfig) -> ClassIds | None:
    """What a model that reads class ids takes (its class-name table was not released), else None."""
    if not reads_class_ids(config):
        return None
    return ClassIds(config.cond_stage.vocab_size - 2, config.cond_stage.max_objects)


def class_names(config: LatentDiffusionConfig) -> list[str]:
    """The box labels a word-and-layout model knows (the classes of its vocabulary file), else []."""
    vocab = getattr(config.cond_stage, "vocab", "")
    if not takes_layout_tokens(config) or vocab in ("layout", BERT_HUB_REPO):
        return []
    return WordLayoutTokenizer.from_file(PRESET_DIR.parent / vocab, config.cond_stage.caption_tokens,
                                         config.cond_stage.max_objects, config.cond_stage.grid).classes


def serves(config: LatentDiffusionConfig) -> str | None:
    """None for a text model (boxes become region prompts) or a model with layout conditioning."""
    if serves_text(config) is None or takes_layout_tokens(config):
        return None
    return "cannot generate from a layout: it reads neither text nor layout boxes"


def as_layout_tokens(config: LatentDiffusionConfig, wanted: bool) -> bool:
    """Whether boxes reach the model as layout tokens (else as region prompts): where ``wanted`` and the
    model takes them, and always on a layout-only model, which reads no region prompts."""
    return (wanted or reads_class_ids(config)) and takes_layout_tokens(config)


def check_details(boxes: tuple, details: Sequence[tuple[str, object]]) -> list[tuple[str, float]]:
    """Each box's (negative prompt, strength) as text and a number (an empty strength is 1); the
    strength's range is checked with the request (``resolve_request``)."""
    checked = []
    for i, ((label, *_), (negative, strength)) in enumerate(zip(boxes, details)):
        try:
            value = float(strength if strength not in (None, "") else 1.0)
        except (TypeError, ValueError):
            raise ValueError(f"region {i + 1} ({label}): strength must be a number from 0 to 1, got {strength!r}") from None
        checked.append(("" if negative is None else str(negative).strip(), value))
    return checked


def layout(
    loaded: LoadedModel,
    request: GenerationRequest,
    *,
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> GenerationResult:
    """Generate from ``request.boxes`` (and ``request.regions``), as ``txt2img`` does: boxes are layout
    tokens where the model takes them and region prompts on other text models."""
    check_model(serves, loaded)
    return generate_from_prompts(loaded, request, callback=callback, should_stop=should_stop)
