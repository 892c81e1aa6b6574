"""The Add-ons list beside a tab's prompt: the LoRA files (and, with them, any other kind the studio
lists) of the folders, searchable by name; a click on a row puts the entry's text in the prompt
(``<lora:NAME:1>``), and Rescan reads the folders again. Entries come from ``Studio.addons()``;
with no add-on at all the list says where to put files. An entry made for another family than the
tab's model says so in its note.

Embeddings are listed beside the LoRAs (kind "embedding", with their vector count; a click inserts
the name, the word that calls them) from the folders ``Studio.addon_folders()`` names."""

from __future__ import annotations

import re
from dataclasses import dataclass

import gradio as gr

from ldm.addons.library import named_loras
from ldm.addons.listing import AddonEntry, fits, matches, model_family_name
from ui.services import Studio

HEADERS = ["Name", "Type", "Family", "Rank", "MB", "Note"]
KIND_NAMES = {"lora": "LoRA files (.safetensors, .pt, .ckpt, .bin)", "embedding": "textual-inversion embeddings"}


@dataclass
class AddonsPanel:
    search: gr.Textbox
    table: gr.Dataframe
    note: gr.Markdown  # where to put files when there are none; what a search left out
    rescan: gr.Button
    shown: gr.State  # the prompt text of each row of the table, in order


@dataclass(frozen=True)
class Listing:
    """What the panel shows for a search: the rows, the text each row inserts, and the note."""

    rows: list[list]
    texts: list[str]
    note: str
    any: bool = True  # whether the folders hold any add-on: the table shows only then


def listing(studio: Studio, search: str | None, model_path: str | None = None) -> Listing:
    entries = studio.addons()
    if not entries:
        return Listing([], [], where_to_put_files(studio), any=False)
    family = model_family(studio, model_path)
    kept = [e for e in entries if matches(e, search or "")]
    note = "" if kept else f"No add-on name contains “{(search or '').strip()}”."
    return Listing([row(e, family) for e in kept], [e.prompt_text for e in kept], note)


def row(entry: AddonEntry, family: str | None) -> list:
    kind = "/".join(entry.types) or ("Embedding" if entry.kind == "embedding" else "?")
    if entry.vectors:
        kind += f" ({entry.vectors} vector{'s' if entry.vectors > 1 else ''})"
    if entry.problem:
        note = f"cannot be read: {entry.problem}"
    elif fits(entry, family) is False:
        note = f"made for {entry.family}; this model is {family}"
    else:
        note = ""
    return [entry.name, kind, entry.family, "" if entry.rank is None else entry.rank, entry.size_mb, note]


def model_family(studio: Studio, path: str | None) -> str | None:
    """"SD 1" or "SD 2" for the tab's model, None where LoRA files are not made for it or it is unknown."""
    try:
        entry = studio.entry(path) if path else None
    except ValueError:  # a file gone since the last scan: the model menu reports it
        return None
    return model_family_name(entry.preset.model) if entry is not None and entry.preset is not None else None


def where_to_put_files(studio: Studio) -> str:
    lines = ["No add-ons found. Put them in these folders, then press ↻ Rescan:"]
    for kind, folders in studio.addon_folders().items():
        lines.append(f"- {KIND_NAMES.get(kind, kind)}: " + ", ".join(f"`{f}`" for f in folders))
    return "\n".join(lines)


def insert(prompt: str | None, text: str) -> str:
    """The prompt with ``text`` added at its end after a space; unchanged where it already has it (a
    LoRA's tag at any weight, an embedding's name as a word of its own)."""
    prompt = prompt or ""
    has_word = re.search(rf"(?<!\w){re.escape(text)}(?!\w)", prompt) is not None
    if has_word or set(named_loras([text])) & set(named_loras([prompt])):
        return prompt
    if not prompt.strip():
        return text
    return prompt + ("" if prompt[-1].isspace() else " ") + text


def addons_panel(studio: Studio, prefix: str, prompt: gr.Textbox, model: gr.Dropdown | None = None) -> AddonsPanel:
    """The closed "Add-ons" accordion of a tab whose ``prompt`` takes LoRA tags; ``model``: the tab's
    model menu, whose family the entries are compared with."""
    first = listing(studio, "", model.value if model is not None else None)
    with gr.Accordion("Add-ons", open=False, elem_id=f"{prefix}-addons"):
        with gr.Row(equal_height=True):
            search = gr.Textbox(label="Search", placeholder="part of a name", scale=8, elem_id=f"{prefix}-addons-search")
            rescan = gr.Button("↻ Rescan", scale=1, min_width=80, elem_id=f"{prefix}-addons-rescan")
        table = gr.Dataframe(value=first.rows, headers=HEADERS, datatype=["str", "str", "str", "number", "number", "str"],
                             type="array", interactive=False, wrap=True, max_height=320, visible=first.any,
                             label="Click a row to add it to the prompt", elem_id=f"{prefix}-addons-table")
        note = gr.Markdown(first.note, elem_id=f"{prefix}-addons-note")
    panel = AddonsPanel(search, table, note, rescan, gr.State(first.texts))
    wire(studio, panel, prompt, model)
    return panel


def wire(studio: Studio, panel: AddonsPanel, prompt: gr.Textbox, model: gr.Dropdown | None) -> None:
    inputs = [panel.search, *([model] if model is not None else [])]
    outputs = [panel.table, panel.shown, panel.note]
    panel.search.change(shower(studio, panel), inputs, outputs, queue=False)
    panel.rescan.click(shower(studio, panel, refresh=True), inputs, outputs, queue=False)
    if model is not None:
        model.change(shower(studio, panel), inputs, outputs, queue=False)
    panel.table.select(picker(), [prompt, panel.shown], prompt, queue=False)


def shower(studio: Studio, panel: AddonsPanel, refresh: bool = False):
    """The handler that shows the list for a search (and the model's family), reading the folders
    again first with ``refresh``."""

    def show(search, model_path=None):
        if refresh:
            studio.addons(refresh=True)
        shown = listing(studio, search, model_path)
        return {panel.table: gr.update(value=shown.rows, visible=shown.any), panel.shown: shown.texts,
                panel.note: shown.note}

    return show


def picker():
    """The handler of a click on a row: the prompt with that row's text added."""

    def pick(prompt, texts, evt: gr.SelectData):
        index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if not texts or not isinstance(index, int) or not 0 <= index < len(texts):
            return gr.skip()
        return insert(prompt, texts[index])

    return pick
