"""The task registry: which tasks serve each model family, answered once, by the tasks themselves."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ldm.checkpoints.presets import find_preset, list_presets
from ldm.tasks import img2img, inpaint, layout, registry, semantic, txt2img, upscale
from ldm.tasks.request import check_model

TEXT = ("txt2img", "img2img", "inpaint", "layout")  # in the registry's order
SERVED = {
    "default-txt2img": TEXT, "v1-inference": TEXT, "v2-inference": TEXT, "v2-inference-v": TEXT,
    "v2-inpainting-inference": TEXT, "text2img256": TEXT, "txt2img-1p4B-eval": TEXT,
    "default-upscale": ("upscale",), "bsr_sr": ("upscale",),
    "x4-upscaling": ("upscale",),  # hybrid and text-guided, yet only an upscaler
    "inpainting_big": ("inpaint",),  # no text stage: it fills from the image alone
    "layout2img-openimages256": ("layout",),  # reads class ids, no text
    "semantic_synthesis256": ("semantic",), "semantic_synthesis512": ("semantic",),
    "sd_xl_base": TEXT, "sd_xl_refiner": TEXT,  # the refiner is meant for image to image, but generates too
    "sd_turbo": TEXT, "sd_xl_turbo": TEXT,  # chosen by name: the files are their base models' tensors
}


def test_every_shipped_preset_is_listed_here():
    assert {p.name for p in list_presets()} == set(SERVED)


@pytest.mark.parametrize("name", sorted(SERVED))
def test_each_family_is_served_by_the_tasks_made_for_it(name):
    config = find_preset(name).model
    assert registry.tasks_for(config) == SERVED[name]
    for task, module in registry.TASKS.items():
        assert registry.serves(task, config) == (task in SERVED[name]) == (module.serves(config) is None)


def test_the_registry_holds_each_task_module_once_by_its_name():
    assert registry.TASKS == {"txt2img": txt2img, "img2img": img2img, "inpaint": inpaint, "upscale": upscale,
                              "layout": layout, "semantic": semantic}
    assert list(registry.TASKS) == ["txt2img", "img2img", "inpaint", "upscale", "layout", "semantic"]  # the tab order
    with pytest.raises(ValueError, match="task 'outpaint' is not known; tasks: txt2img, img2img, inpaint, upscale, layout, semantic"):
        registry.task("outpaint")


@pytest.mark.parametrize("task, preset, reason", [
    (txt2img, "x4-upscaling", "is a super-resolution model: it needs a low-resolution image"),
    (txt2img, "semantic_synthesis256", "generates from a segmentation map"),
    (txt2img, "inpainting_big", "has no text conditioning stage"),
    (txt2img, "layout2img-openimages256", "reads no text: its conditioning stage takes layout boxes only"),
    (img2img, "x4-upscaling", "is a super-resolution model: use it to upscale, not for image to image"),
    (img2img, "layout2img-openimages256", "reads no text: its conditioning stage takes layout boxes only"),
    (inpaint, "bsr_sr", "cannot inpaint: its UNet also reads a low res image; use an inpainting model"),
    (inpaint, "layout2img-openimages256", "cannot inpaint: it reads no text prompt"),
    (upscale, "v1-inference", r"is not a super-resolution model \(it does not take a low-resolution image\)"),
    (semantic, "default-txt2img", r"is not a semantic synthesis model \(it does not take a segmentation map\)"),
    (layout, "bsr_sr", "cannot generate from a layout: it reads neither text nor layout boxes"),
])
def test_a_task_refuses_a_model_it_does_not_serve_by_name_and_why(task, preset, reason):
    loaded = SimpleNamespace(model=SimpleNamespace(config=find_preset(preset).model), name="my-model")
    with pytest.raises(ValueError, match=f"^my-model {reason}"):
        check_model(task.serves, loaded)
