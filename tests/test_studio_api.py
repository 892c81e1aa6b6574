"""The studio's scripting API stays as scripts and ``ui.client`` use it: each tab's generate and stop
endpoint, with its inputs in their order (labels, components, defaults) and its outputs, as pinned in
``tests/fixtures/studio_api.json`` (recorded before the UI's structure change of issue 25; issue 27 added
the Sampler and Schedule type menus before Steps and the Sigma noise slider after Eta on every tab)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from app import make_studio, parse_args
from ui.studio import build_app

ROOT = Path(__file__).resolve().parents[1]
PINNED = json.loads((Path(__file__).parent / "fixtures" / "studio_api.json").read_text())


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory):
    studio = make_studio(parse_args(["--outputs", str(tmp_path_factory.mktemp("outputs")), "--device", "cpu", "--dtype", "fp32"]))
    return build_app(studio).get_api_info()["named_endpoints"]


def default_text(value) -> str:
    """A parameter's default as text, with this checkout's root and Gradio's per-machine cache
    folder (a hash of where the file came from) written as placeholders."""
    text = repr(value).replace(str(ROOT), "<root>")
    return re.sub(r"/gradio/[0-9a-f]{64}/", "/gradio/<cached>/", text)


def described(endpoint: dict) -> dict:
    return {"parameters": [{"label": p.get("label"), "component": p.get("component"),
                            "default": default_text(p.get("parameter_default"))}
                           for p in endpoint["parameters"]],
            "returns": [{"label": None if str(r.get("label")).startswith("value_") else r.get("label"),
                         "component": r.get("component")} for r in endpoint["returns"]]}


def test_every_tab_keeps_its_generate_and_stop_endpoints(endpoints):
    names = {name for name in endpoints if name.endswith(("_generate", "_stop"))}
    assert names == set(PINNED)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_each_endpoint_takes_and_returns_what_it_did(endpoints, name):
    assert described(endpoints[name]) == PINNED[name]


def test_every_task_has_its_tab_found_by_name_and_each_send_to_reaches_a_tab_that_receives():
    from ldm.tasks.registry import TASKS
    from ui.studio import TABS

    assert list(TABS) == list(TASKS)
    for name, module in TABS.items():
        assert module.TAB == name and module.TITLE and callable(module.build)
        for target in module.SEND_TO:
            assert callable(TABS[target].receive), f"{name} sends to {target}, which has no receive"
