"""python -m ldm batch in this process (--ray none): jobs named by their parameters, a sidecar each,
resuming after a crash, clear messages for bad prompts and grid files, and no Ray imported."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.batch.jobs import expand, grid_from_values, model_facts, parse_seeds, read_grid
from ldm.batch.outputs import png_path, sidecar_path
from ldm.cli import main
from ldm.tasks.parameters import read_png_parameters
from tests.helpers import batch_args

ROOT = Path(__file__).resolve().parents[1]


def test_two_prompts_by_three_seeds_give_six_pictures_with_sidecars(batch_in_process):
    pictures, sidecars = sorted(batch_in_process.glob("*.png")), sorted(batch_in_process.glob("*.json"))
    assert len(pictures) == 6 and [p.stem for p in pictures] == [s.stem for s in sidecars]
    seen = set()
    for sidecar in sidecars:
        record = json.loads(sidecar.read_text())
        job = record["job"]
        assert record["id"] == sidecar.stem and record["file"] == f"{sidecar.stem}.png"
        params = read_png_parameters(png_path(batch_in_process, sidecar.stem))
        assert params["Prompt"] == job["prompt"] and params["Seed"] == str(job["seed"]) and params["Steps"] == "2"
        assert record["parameters"].startswith(job["prompt"])
        seen.add((job["prompt"], job["seed"]))
        with Image.open(png_path(batch_in_process, sidecar.stem)) as image:
            assert image.size == (64, 64)
    assert seen == {(p, s) for p in ("a red circle", "a blue square") for s in (0, 1, 2)}


def test_a_rerun_renders_nothing_and_a_lost_job_is_rendered_again(batch_in_process, batch_prompts, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in batch_in_process.iterdir()}
    assert main(batch_args(batch_prompts, batch_in_process)) == 0
    assert "0 rendered, 6 already there, 0 failed" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in batch_in_process.iterdir()} == before
    lost = sorted(batch_in_process.glob("*.json"))[0].stem  # a crash between the picture and its sidecar
    picture = np.asarray(Image.open(png_path(batch_in_process, lost)))
    sidecar_path(batch_in_process, lost).unlink()
    assert main(batch_args(batch_prompts, batch_in_process)) == 0
    assert "1 rendered, 5 already there" in capsys.readouterr().out
    assert np.array_equal(np.asarray(Image.open(png_path(batch_in_process, lost))), picture)
    assert not list(batch_in_process.glob(".tmp-*"))  # atomic writes leave no temporary files


def test_job_names_hash_what_decides_the_pixels():
    facts = {"default": model_facts("default")}
    grid = grid_from_values({"prompts": ["a red circle"], "seeds": [1, 2], "guidance": [3, 5], "steps": 2})
    jobs = expand(grid, facts)
    assert len(jobs) == 4 and len({job.id for job in jobs}) == 4
    assert [job.id for job in expand(grid, facts)] == [job.id for job in jobs]  # the same grid, the same names
    moved = expand(grid, {"default": replace(facts["default"], path=Path("/elsewhere/x.safetensors"))})
    assert [job.id for job in moved] == [job.id for job in jobs]  # a model is known by its hash, not its path
    assert jobs[0].steps == 2 and jobs[0].scale == 3.0 and jobs[0].sampler == "DDIM"  # the preset's sampler


def test_a_grid_file_crosses_prompts_seeds_samplers_and_guidance(tmp_path):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text("prompts: [a red circle, a blue square]\nseeds: '0-1'\nsamplers: [DDIM, euler a]\n"
                         "guidance: [2, 4.5]\nmodels: [default]\nsteps: 2\nwidth: 60\n")
    grid = read_grid(grid_file)
    jobs = expand(grid, {"default": model_facts("default")})
    assert len(jobs) == 2 * 2 * 2 * 2
    assert {job.sampler for job in jobs} == {"DDIM", "Euler a"} and {job.scale for job in jobs} == {2.0, 4.5}
    assert {(job.width, job.height) for job in jobs} == {(64, 64)}  # rounded as a request rounds 60


@pytest.mark.parametrize("text, message", [
    ("prompts: [a]\nsampler: DDIM\n", "unknown key(s) sampler; allowed: prompts, seeds, samplers"),
    ("seeds: [1]\n", "'prompts' is required"),
    ("- a\n- b\n", "expected a YAML mapping: prompts (a list of text; required)"),
    ("", "got an empty file"),
    ("prompts: [a\n", "not valid YAML at line 2"),
    ("prompts: [a]\nseeds: [1, x]\n", "'seeds' must be whole numbers from 0 to 4294967295 or ranges such as '0-99'"),
    ("prompts: [a]\nseeds: '9-3'\n", "(a range runs from low to high)"),
    ("prompts: [a]\nguidance: [high]\n", "'guidance' must be a number"),
    ("prompts: [a]\nsamplers: [Eulr]\n", "'samplers': 'Eulr' is not a sampler; use one of DDIM, Euler"),
    ("prompts: [a]\nsamplers: [DPM++ 2M Karras]\n", "fuses a sampler and a schedule"),
    ("prompts: [a]\nmodels: [missing.safetensors]\n", "model 'missing.safetensors' not found (looked at"),
    ("prompts: []\n", "'prompts' is empty"),
    ("prompts: [a]\nsteps: 0\n", "'steps' must be a whole number of at least 1, got 0"),
    ("prompts: [a]\nsteps: 5000\n", "job 'a' (seed 0, DDIM, guidance 4): steps must be between 1 and 1000"),
])
def test_a_bad_grid_file_is_a_message_naming_what_is_wrong(tmp_path, capsys, text, message):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(text)
    assert main(["batch", "--grid", str(grid_file), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {grid_file}") or err.startswith("error: job "), err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_bad_prompts_files_and_clashing_options_are_messages(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n")
    assert main(["batch", "--prompts", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no prompts; expected one prompt a line" in capsys.readouterr().err
    assert main(["batch", "--prompts", str(tmp_path / "absent.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "absent.txt: cannot read the prompts" in capsys.readouterr().err
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text("prompts: [a]\nsteps: 2\n")
    assert main(["batch", "--grid", str(grid_file), "--steps", "3", "--out", str(tmp_path / "o")]) == 2
    assert "sets steps and the options set it too" in capsys.readouterr().err
    assert main(["batch", "--grid", str(grid_file), "--threads", "-1", "--out", str(tmp_path / "o")]) == 2
    assert "--threads -1: expected 0 (the default) or more" in capsys.readouterr().err
    assert parse_seeds("1,5,7-9") == (1, 5, 7, 8, 9)


def test_the_engine_and_the_batch_command_import_no_ray(tmp_path):
    code = ("import sys\nimport ldm.cli, ldm.batch.run, ldm.distributed.batch\n"
            "from ldm.cli import main\n"
            f"assert main(['batch', '--prompts', {str(tmp_path / 'p.txt')!r}, '--out', {str(tmp_path / 'o')!r}, "
            "'--steps', '1', '--ray', 'none']) == 0\n"
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]\n")
    (tmp_path / "p.txt").write_text("a red circle\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_without_ray_installed_the_message_names_the_extra(tmp_path, capsys, monkeypatch):
    (tmp_path / "p.txt").write_text("a red circle\n")
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert main(["batch", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"), "--ray", "local"]) == 2
    err = capsys.readouterr().err
    assert "Ray is not installed" in err and "requirements-ray.txt" in err and "./launch.sh --ray" in err
