"""The layout tab with LDM's layout2img model, without a browser: the hint that boxes are class ids and
the prompt is not read, boxes always as layout tokens, and a generation with a prompt that becomes a notice."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldm.checkpoints.catalog import CatalogEntry
from ldm.checkpoints.presets import find_preset
from ldm.tasks.layout import layout
from ui.generation import batch_request
from ui.tabs.layout import NATIVE, REGIONS, box_fields, canvas_boxes, canvas_value, model_hint


class Catalog:
    """What model_hint asks of the studio: the catalog entry of a path."""

    def __init__(self, *entries: CatalogEntry):
        self.entries = {str(e.path): e for e in entries}

    def entry(self, path):
        if str(path) not in self.entries:
            raise ValueError(f"{Path(path).name} is not in the model list")
        return self.entries[str(path)]


def test_the_hint_says_boxes_are_class_ids_and_the_prompt_is_not_used_only_for_layout2img():
    layout_entry = CatalogEntry(Path("/m/layout2img.ckpt"), find_preset("layout2img-openimages256"))
    text = CatalogEntry(Path("/m/txt2img-large.ckpt"), find_preset("txt2img-1p4B-eval"))
    studio = Catalog(layout_entry, text)
    hint = model_hint(studio, str(layout_entry.path))
    assert "class ids" in hint and "0 to 8190" in hint and "at most 30 boxes" in hint and "prompts are not used" in hint
    assert model_hint(studio, str(text.path)) == ""
    assert model_hint(studio, "/m/gone.ckpt") == "" and model_hint(studio, None) == ""


@pytest.fixture(scope="module")
def layout_model(tiny_ldm_layout):
    return tiny_ldm_layout.load()


def test_class_id_boxes_from_the_canvas_generate_with_the_prompt_as_a_notice(layout_model):
    boxes = canvas_boxes(canvas_value(16, 16, [("7", 0.1, 0.1, 0.6, 0.5), ("12", 0.5, 0.5, 0.9, 0.9)]))
    assert box_fields(layout_model, boxes, REGIONS, []) == {"boxes": boxes}  # never region prompts on this model
    assert box_fields(layout_model, boxes, NATIVE, []) == {"boxes": boxes}
    request = batch_request("a cat on a sofa", "", {"steps": 2, "scale": 1.0, "eta": 0.0, "seed": 4}, 16, 16, 1,
                            **box_fields(layout_model, boxes, NATIVE, []))
    result = layout(layout_model, request)
    assert result.images[0].size == (16, 16)
    assert result.notices == ["this model generates from the layout alone: the prompt and negative prompt are not used"]
