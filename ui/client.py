"""Drive a running studio from a script, as a browser would: one ``StudioClient`` per user (its own
session, gallery and stop flag), each tab's generate endpoint called with its inputs named by their
labels on the page, every other input at the page's default.

    client = StudioClient("http://127.0.0.1:7860/")
    status, gallery, parameters = client.generate("txt2img", Prompt="a red circle", Seed=7, Steps=20)
"""

from __future__ import annotations

from typing import Any, NamedTuple

from gradio_client import Client


class Generated(NamedTuple):
    status: str  # "saved NAME.png in FOLDER", or why it stopped
    gallery: list  # the session's images, newest first: {"image": path or file data, "caption": ...}
    parameters: str  # the newest image's parameters text


class StudioClient:
    def __init__(self, url: str, auth: tuple[str, str] | None = None):
        self.client = Client(url, auth=auth, verbose=False)
        self._endpoints = self.client.view_api(return_format="dict", print_info=False)["named_endpoints"]

    def inputs(self, tab: str) -> list[tuple[str, Any]]:
        """(label, default) of each input of a tab's generate endpoint, in the endpoint's order. An empty
        text box's default is None on the API; the page sends ""."""
        name = f"/{tab}_generate"
        if name not in self._endpoints:
            tabs = sorted(n[1:].removesuffix("_generate") for n in self._endpoints if n.endswith("_generate"))
            raise ValueError(f"the studio has no tab {tab!r}; tabs: {', '.join(tabs)}")
        return [(p["label"], "" if p["component"] == "Textbox" and p.get("parameter_default") is None
                 else p.get("parameter_default")) for p in self._endpoints[name]["parameters"]]

    def arguments(self, tab: str, by_label: dict[str, Any]) -> list:
        inputs = self.inputs(tab)
        unknown = sorted(set(by_label) - {label for label, _ in inputs})
        if unknown:
            raise ValueError(f"the {tab} tab has no input {', '.join(map(repr, unknown))}; "
                             f"its inputs: {', '.join(label for label, _ in inputs)}")
        return [by_label.get(label, default) for label, default in inputs]

    def generate(self, tab: str, **by_label) -> Generated:
        """Run a generation to its end and return what the page shows."""
        _preview, status, gallery, parameters = self.client.predict(*self.arguments(tab, by_label), api_name=f"/{tab}_generate")
        return Generated(status, gallery, parameters)

    def submit(self, tab: str, **by_label):
        """Start a generation; returns gradio_client's Job (``outputs()`` streams, ``result()`` waits)."""
        return self.client.submit(*self.arguments(tab, by_label), api_name=f"/{tab}_generate")

    def stop(self, tab: str) -> None:
        """Stop this session's running generation (finished images are kept)."""
        self.client.predict(api_name=f"/{tab}_stop")
