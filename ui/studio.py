"""The studio's page: a header, one tab per task (each a module of ``ui.tabs``), and the "send to" links
between them. ``build_app`` only builds; ``app.py`` launches."""

from __future__ import annotations

import importlib

import gradio as gr

from ldm.tasks.registry import TASKS
from ui.errors import friendly
from ui.outputs import read_restore
from ui.services import Studio

# One tab per task, in the registry's order, each the module ui/tabs/<task>.py with TAB, TITLE,
# SEND_TO, build(studio, titles) and, where others send to it, receive(tab). Importing them builds nothing.
TABS = {name: importlib.import_module(f"ui.tabs.{name}") for name in TASKS}

# Ctrl+Enter (Cmd+Enter on a Mac) presses the visible tab's generate button.
SHORTCUTS_JS = """
() => {
  window.ldmStudioShortcuts = true;
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey)) return;
    const buttons = [...document.querySelectorAll(".generate-button")].filter((b) => b.offsetParent !== null);
    if (buttons.length) { event.preventDefault(); buttons[0].click(); }
  });
}
"""

CSS = """
.status p { margin: 0; min-height: 1.5em; }
.live-preview img { image-rendering: pixelated; }
/* Four columns whatever the count: Gradio sizes a gallery of fewer images to that many columns,
   so a first result filled the whole width and showed cropped in the gallery's height. */
.results-gallery .grid-container { grid-template-columns: repeat(4, minmax(0, 1fr)) !important; }
"""


def build_app(studio: Studio) -> gr.Blocks:
    with gr.Blocks(title="LDM Studio") as app:
        gr.Markdown("## LDM Studio\nLatent diffusion on your own machine. Every image is saved, with its settings, "
                    f"under `{studio.writer.root}/<date>/`.")
        titles = {name: module.TITLE for name, module in TABS.items()}
        with gr.Tabs() as tabs:
            built = {}
            for name, module in TABS.items():
                with gr.Tab(module.TITLE, id=name, elem_id=f"tab-{name}"):
                    built[name] = module.build(studio, titles)
        for source in built.values():
            for target, button in source.output.send.items():
                connect_send(button, source.output.selected, TABS[target].receive(built[target]), tabs, target)
    return app


def connect_send(button: gr.Button, selected: gr.State, receiver, tabs: gr.Tabs, target: str) -> None:
    apply, outputs = receiver

    @friendly
    def send(path):
        if not path:
            raise ValueError("pick an image in the gallery first")
        prompt = read_restore(path).fields.get("Prompt", "")
        return {**apply(path, prompt), tabs: gr.Tabs(selected=target)}

    button.click(send, selected, [*outputs, tabs], queue=False)
