"""Base then refiner in text to image: the base runs int(steps * switch) steps, its state goes on through the
refiner for the rest of the same schedule (with the base itself as the "refiner" this is the plain run),
the refiner's UNet runs the remaining steps with its own conditioning, and the CLI writes A1111's
"Refiner" and "Refiner switch at" fields."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ldm.cli import main
from ldm.models.unet import UNetModel
from ldm.tasks.parameters import read_png_parameters
from ldm.tasks.request import GenerationRequest, resolve_request
from ldm.tasks.txt2img import refined_latents, sample_latents, switch_step, txt2img
from tests.builders import sdxl
from tests.builders.clip_tokenizer import tiny_vocab_size


def request(**changes) -> GenerationRequest:
    base = GenerationRequest(prompt="a red cat", negative_prompt="blurry", steps=4, scale=5.0, seed=11, width=16, height=16,
                             sampler="Euler")
    resolved, _ = resolve_request(replace(base, **changes), 8)
    return resolved


def test_the_switch_step_is_a1111s():
    assert [switch_step(10, s) for s in (0.8, 0.5, 0.05, 1.0)] == [8, 5, 1, 10]
    with pytest.raises(ValueError, match="above 0 and at most 1"):
        switch_step(10, 0.0)


@torch.no_grad()
def test_handing_the_state_to_the_same_model_is_the_plain_run(loaded_sdxl):
    # Euler is one-step and draws no noise; a multistep sampler (DPM++ 2M) starts its history again at the switch
    r = request(steps=2)
    plain = sample_latents(loaded_sdxl, r)
    handed = refined_latents(loaded_sdxl, loaded_sdxl, r, 0.5)
    torch.testing.assert_close(handed, plain, rtol=0, atol=1e-5)


def test_the_refiner_runs_the_rest_with_its_own_unet(loaded_sdxl, loaded_sdxl_refiner, monkeypatch):
    calls = []
    forward = UNetModel.forward

    def counted(self, x, *args, **kwargs):
        calls.append(self)
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(UNetModel, "forward", counted)
    steps = []
    r = request(steps=2)
    with torch.no_grad():
        refined = refined_latents(loaded_sdxl, loaded_sdxl_refiner, r, 0.7, callback=lambda info: steps.append(info.step))
    base, refiner = loaded_sdxl.model.unet, loaded_sdxl_refiner.model.unet
    assert calls == [base, refiner] and steps == [0, 1]  # int(2 * 0.7) = 1 step of the base
    calls.clear()
    with torch.no_grad():
        plain = sample_latents(loaded_sdxl, r)
    assert (refined - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="DDIM"):
        txt2img(loaded_sdxl, request(sampler="DDIM"), refiner=loaded_sdxl_refiner)


def test_the_cli_runs_base_then_refiner_and_writes_the_fields(tiny_sdxl, tiny_sdxl_refiner, tmp_path):
    vocab = tiny_vocab_size(tiny_sdxl.tokenizer_dir)
    base_yaml = sdxl.write_preset_yaml(tmp_path / "base.yaml", vocab)
    refiner_yaml = sdxl.write_preset_yaml(tmp_path / "refiner.yaml", vocab, kind="refiner")
    out = tmp_path / "refined.png"
    assert main(["txt2img", "--model", str(tiny_sdxl.path), "--preset", str(base_yaml), "--tokenizer",
                 str(tiny_sdxl.tokenizer_dir), "--refiner", str(tiny_sdxl_refiner.path), "--refiner-preset", str(refiner_yaml),
                 "--refiner-switch", "0.5", "--prompt", "a red cat", "--steps", "2", "--sampler", "Euler", "--seed", "5",
                 "--width", "16", "--height", "16", "--out", str(out)]) == 0
    fields = read_png_parameters(out)
    assert fields["Refiner"] == tiny_sdxl_refiner.path.stem and fields["Refiner switch at"] == "0.5"
