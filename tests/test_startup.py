"""The command line starts without the heavy libraries it does not need: ``--help`` imports neither
torch nor transformers, and inspecting a file imports no transformers (it reads key shapes only).
``bench/startup.py`` times both."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import contextlib, io, json, sys
from ldm.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        code = main(sys.argv[1:])
    except SystemExit as exit:
        code = exit.code
print(json.dumps({"code": code, "out": out.getvalue(), "loaded": sorted(m for m in ("torch", "transformers", "gradio", "diffusers") if m in sys.modules)}))
"""


def run(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_help_imports_neither_torch_nor_transformers():
    for args in (["--help"], ["txt2img", "--help"], []):
        result = run(*args)
        assert result["code"] == 0 and "usage: python -m ldm" in result["out"]
        assert result["loaded"] == [], f"{args} imported {result['loaded']}"


def test_inspecting_a_file_reads_its_keys_without_transformers():
    result = run("inspect", str(ROOT / "weights" / "default" / "default-txt2img.safetensors"))
    assert result["code"] == 0 and "family: LDM Studio default (preset default-txt2img)" in result["out"]
    assert result["loaded"] == ["torch"]
