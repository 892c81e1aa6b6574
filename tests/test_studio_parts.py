"""The studio's pieces without a browser: model catalog, sampler presets, output files, job streaming,
error messages."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.checkpoints.catalog import scan
from ldm.checkpoints.io import read_key_shapes
from ldm.checkpoints.presets import find_preset
from ldm.sampling.steps import SamplingCancelled, StepInfo
from ldm.tasks.sampler_presets import read_sampler_presets
from tests.builders import default
from ui.errors import friendly, message_for
from ui.jobs import Done, Step, stream
from ui.outputs import OutputWriter, read_restore


def test_catalog_names_each_file_and_its_family(tmp_path):
    (tmp_path / "a").mkdir()
    files = default.write(tmp_path / "a", kind="hybrid")
    preset, path = files.preset, files.path
    key = "model.diffusion_model.input_blocks.0.0.weight"
    preset = dataclasses.replace(preset, detect={key: read_key_shapes(path)[key]})
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    entries = {e.path.name: e for e in scan([tmp_path, tmp_path / "missing"], presets=[preset, find_preset("v1-inference")])}
    assert set(entries) == {"junk.safetensors", *(p.name for p in (tmp_path / "a").iterdir() if p.suffix == ".safetensors")}
    junk = entries.pop("junk.safetensors")
    assert junk.preset is None and "not usable" in junk.label()
    (model,) = entries.values()
    assert model.preset.name == preset.name and model.preset.model.concat_input == "mask_and_masked_latent"
    assert model.label().endswith(f"[{model.preset.family}]")


def test_sampler_presets_are_read_and_checked(tmp_path):
    presets = read_sampler_presets()
    assert [p.steps for p in presets] == sorted(p.steps for p in presets) and len(presets) >= 3
    assert all(0 <= p.eta <= 1 for p in presets)
    (tmp_path / "bad.yaml").write_text("name: Bad\nsteps: 0\neta: 0\n")
    with pytest.raises(ValueError, match="steps must be"):
        read_sampler_presets(tmp_path)
    (tmp_path / "bad.yaml").write_text("name: Bad\nsteps: 5\neta: 0\nsolver: euler\n")
    with pytest.raises(ValueError, match="unknown sampler preset keys"):
        read_sampler_presets(tmp_path)
    (tmp_path / "bad.yaml").write_text("name: Bad\nsteps: 5\nsampler: euler\n")
    with pytest.raises(ValueError, match="sampler 'euler' is not known; use one of DDIM, Euler, Euler a"):
        read_sampler_presets(tmp_path)
    (tmp_path / "bad.yaml").write_text("name: Bad\nsteps: 5\nsampler: Euler\nschedule: Polyexponential\n")
    with pytest.raises(ValueError, match="schedule 'Polyexponential' is not known; use one of Automatic, Uniform, Karras"):
        read_sampler_presets(tmp_path)
    (tmp_path / "bad.yaml").write_text("name: Bad\nsteps: 60\nsampler: LCM\n")
    with pytest.raises(ValueError, match="LCM's own schedule has 1 to 50 steps"):
        read_sampler_presets(tmp_path)


def test_sampler_presets_name_sampler_and_schedule_and_keep_ddim_for_the_old_ones():
    presets = {p.name: p for p in read_sampler_presets()}
    for name in ("Fast", "Balanced", "Quality", "Stochastic"):
        assert (presets[name].sampler, presets[name].schedule) == ("DDIM", "Automatic")
    assert (presets["DPM++ 2M Karras 20"].sampler, presets["DPM++ 2M Karras 20"].schedule,
            presets["DPM++ 2M Karras 20"].steps) == ("DPM++ 2M", "Karras", 20)
    assert (presets["Euler a 20"].sampler, presets["Euler a 20"].eta) == ("Euler a", 1.0)
    assert (presets["DPM++ 2M SDE Karras 30"].sampler, presets["DPM++ 2M SDE Karras 30"].schedule) == ("DPM++ 2M SDE", "Karras")
    lcm = presets["LCM 4 steps"]
    assert (lcm.sampler, lcm.steps) == ("LCM", 4) and 1 <= lcm.scale <= 2


def test_outputs_are_numbered_by_day_and_carry_their_settings(tmp_path):
    writer = OutputWriter(tmp_path)
    image, mask = Image.new("RGB", (8, 8), (200, 10, 10)), Image.new("L", (8, 8), 255)
    text = "a red square\nNegative prompt: blur\nSteps: 12, Sampler: DDIM, CFG scale: 4.0, Seed: 77, Size: 8x8"
    first = writer.save(image, text, 77, {"task": "inpaint", "mask": {"feather": 2}}, {"mask": mask})
    second = writer.save(image, text, 78, {"task": "txt2img"})
    assert first.parent == writer.folder() and first.name == "00001-77.png" and second.name == "00002-78.png"
    assert (first.parent / "00001-77-mask.png").is_file()
    restored = read_restore(first)
    assert restored.fields["Prompt"] == "a red square" and restored.fields["Negative prompt"] == "blur"
    assert restored.number("Steps", int) == 12 and restored.size == (8, 8)
    assert restored.extra == {"task": "inpaint", "mask": {"feather": 2}, "files": {"mask": "00001-77-mask.png"}}
    with Image.open(first) as saved:
        assert json.loads(saved.text["ldm_studio"])["task"] == "inpaint"


def test_restoring_from_a_png_without_parameters_says_so(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="carries no generation parameters"):
        read_restore(tmp_path / "plain.png")


def fake_steps(total: int, stop_after: int | None = None):
    def work(callback, should_stop):
        for i in range(total):
            if should_stop():
                raise SamplingCancelled(i, total)
            x = torch.zeros(1, 4, 2, 2)
            callback(StepInfo(i, total, 999 - i, x, x))
            time.sleep(0.01)
        return "finished"

    return work


def test_stream_reports_steps_then_the_result():
    events = list(stream(fake_steps(5), threading.Event(), lambda info: None))
    assert isinstance(events[-1], Done) and events[-1].value == "finished"
    steps = [e.step for e in events if isinstance(e, Step)]
    assert steps and steps == sorted(steps) and steps[-1] <= 5 and all(e.total == 5 for e in events[:-1])


def test_stream_stops_when_the_flag_is_set():
    stop = threading.Event()
    events = stream(fake_steps(1000), stop, lambda info: None)
    next(events)
    stop.set()
    with pytest.raises(SamplingCancelled):
        list(events)


def test_an_abandoned_stream_stops_its_worker():
    stop = threading.Event()
    events = stream(fake_steps(1000), stop, lambda info: None)
    next(events)
    events.close()  # what Gradio does when the browser goes away
    assert stop.is_set()


def test_errors_become_short_messages():
    @friendly
    def bad_request():
        raise ValueError("steps must be between 1 and 1000, got 0")

    @friendly
    def crashes():
        yield 1
        raise RuntimeError("Traceback (most recent call last): ... tensor a (3) must match tensor b (4)")

    with pytest.raises(gr.Error, match="Steps must be between 1 and 1000"):
        bad_request()
    with pytest.raises(gr.Error) as caught:
        list(crashes())
    assert "Traceback" not in caught.value.message and "RuntimeError" in caught.value.message
    assert "memory" in message_for(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))


def test_the_mask_is_wherever_the_brush_painted():
    from ui.tabs.inpaint import editor_parts

    background = Image.new("RGB", (16, 12), (10, 20, 30))
    layer = Image.new("RGBA", (16, 12), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (2, 3, 6, 5))
    image, mask = editor_parts({"background": background, "layers": [layer], "composite": background})
    painted = np.asarray(mask) > 0
    assert image.size == (16, 12) and painted.sum() == 4 * 2 and painted[3:5, 2:6].all()
    with pytest.raises(ValueError, match="mask is empty"):
        editor_parts({"background": background, "layers": [Image.new("RGBA", (16, 12))], "composite": background})
    with pytest.raises(ValueError, match="no image"):
        editor_parts({"background": None, "layers": [], "composite": None})


def test_canvas_boxes_are_normalised_and_need_labels():
    from ui.tabs.layout import canvas_boxes, canvas_value

    value = canvas_value(128, 64, [("red circle", 0.1, 0.2, 0.5, 0.9)])
    assert value["image"].shape[:2] == (256, 512)
    (box,) = canvas_boxes(value)
    assert box[0] == "red circle" and np.allclose(box[1:], (0.1, 0.2, 0.5, 0.9))
    dragged_backwards = {"image": value["image"], "boxes": [{"label": "blue square", "xmin": 300, "ymin": 200, "xmax": 100, "ymax": 50}]}
    assert np.allclose(canvas_boxes(dragged_backwards)[0][1:], (100 / 512, 50 / 256, 300 / 512, 200 / 256))
    with pytest.raises(ValueError, match="needs a label"):
        canvas_boxes({"image": value["image"], "boxes": [{"label": "", "xmin": 1, "ymin": 1, "xmax": 9, "ymax": 9}]})


def test_region_table_follows_the_boxes_and_gives_each_its_negative_and_strength():
    from ldm.tasks.request import GenerationRequest, regions_from_boxes, resolve_request
    from ui.tabs.layout import region_details, region_rows

    boxes = (("red circle", 0.0, 0.0, 0.5, 0.5), ("blue square", 0.5, 0.5, 1.0, 1.0))
    assert region_rows(boxes, []) == [["red circle", "", 1.0], ["blue square", "", 1.0]]
    edited = [["red circle", "green", 0.6], ["blue square", "", 1.0]]
    # a box added in front and one renamed: rows follow their labels, new boxes start plain
    moved = (("yellow star", 0.2, 0.2, 0.4, 0.4), ("red circle", 0.0, 0.0, 0.5, 0.5), ("blue ring", 0.5, 0.5, 1.0, 1.0))
    assert region_rows(moved, edited) == [["yellow star", "", 1.0], ["red circle", "green", 0.6], ["blue ring", "", 1.0]]
    assert region_details(boxes, edited) == [("green", 0.6), ("", 1.0)]
    with pytest.raises(ValueError, match=r"region 1 \(red circle\): strength must be a number from 0 to 1, got 'lots'"):
        region_details(boxes, [["red circle", "", "lots"]])
    for malformed in (True, "red circle", [["red circle", "", 1.0], 7]):
        with pytest.raises(ValueError, match=r"the region table must be rows of \[Box, Negative prompt, Strength\]"):
            region_details(boxes, malformed)
    request = GenerationRequest("", regions=regions_from_boxes(boxes, [("", 1.5)]))
    with pytest.raises(ValueError, match="region 1 strength must be between 0 and 1, got 1.5"):
        resolve_request(request, 64)


def test_a_canvas_change_updates_the_region_table_only_when_the_boxes_change():
    import gradio as gr

    from ui.tabs.layout import canvas_regions, canvas_value

    value = canvas_value(64, 64, (("red circle", 0.0, 0.0, 0.5, 0.5), ("blue square", 0.5, 0.5, 1.0, 1.0)))
    edited = [["red circle", "green", 0.6], ["blue square", "", 1.0]]
    skip = type(gr.skip())
    assert isinstance(canvas_regions(value, edited), skip)  # moved or resized only: the user's edits stay
    value["boxes"].append({"label": "yellow star", "xmin": 8, "ymin": 8, "xmax": 20, "ymax": 20})
    assert canvas_regions(value, edited) == edited + [["yellow star", "", 1.0]]
    value["boxes"].append({"label": "", "xmin": 30, "ymin": 30, "xmax": 40, "ymax": 40})
    assert isinstance(canvas_regions(value, edited), skip)  # its row comes once it has a name
    for malformed in (True, "red circle", [["red circle", "", 1.0], 7]):  # rebuilt from the boxes
        assert canvas_regions(canvas_value(64, 64, (("red circle", 0.0, 0.0, 0.5, 0.5),)), malformed) == [["red circle", "", 1.0]]


def test_model_menu_notes_say_which_files_cannot_be_used_and_what_detection_assumed(tmp_path):
    from tests.helpers import sd_v2_file_shapes, write_header_only_file
    from ui.controls import unusable_files

    write_header_only_file(tmp_path / "sd21.safetensors", sd_v2_file_shapes(), {})
    write_header_only_file(tmp_path / "sd2-base.safetensors", sd_v2_file_shapes(), {"modelspec.prediction_type": "epsilon"})
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    entries = scan([tmp_path])

    class Catalog:
        def catalog(self):
            return entries

    notes = unusable_files(Catalog()).splitlines()
    assert len(notes) == 2
    assert notes[0].startswith("- `junk.safetensors` cannot be used")
    assert notes[1].startswith("- `sd21.safetensors`: ") and "--preset v2-inference" in notes[1]


def test_an_outputs_folder_that_cannot_be_made_is_reported_with_its_path(tmp_path):
    from ui.outputs import OutputError

    blocked = tmp_path / "outputs"
    blocked.write_text("a file where the folder should be")
    with pytest.raises(OutputError) as error:
        OutputWriter(blocked).save(Image.new("RGB", (4, 4)), "p", 1, {})
    text = message_for(error.value)
    assert str(blocked) in text and "--outputs" in text


def test_a_full_disk_is_reported_and_leaves_no_partial_file_nor_loses_earlier_images(tmp_path, monkeypatch):
    import errno

    from ui.outputs import OutputError

    writer = OutputWriter(tmp_path)
    first = writer.save(Image.new("RGB", (4, 4), "red"), "first", 1, {})

    def full(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(OutputError, match="No space left on device") as error:
        writer.save(Image.new("RGB", (4, 4), "blue"), "second", 2, {}, attachments={"mask": Image.new("L", (4, 4))})
    assert "the images saved before it are kept" in message_for(error.value)
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]
    monkeypatch.undo()
    assert read_restore(first).fields["Prompt"] == "first"
