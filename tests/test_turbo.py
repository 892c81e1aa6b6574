"""SD-Turbo and SDXL-Turbo: presets chosen by name with the architecture of SD 2.1-base and SDXL base and
Stability's recommended sampling as their default (1 step of Euler a from t = 999, guidance off); the
Simple schedule is diffusers' trailing spacing; the CLI samples a tiny SDXL file with that default in one
unguided UNet pass and writes it in the PNG parameters."""

from __future__ import annotations

import dataclasses

import torch
from diffusers import EulerAncestralDiscreteScheduler
from omegaconf import OmegaConf

from ldm.checkpoints.presets import find_preset, list_presets
from ldm.cli import main
from ldm.models.unet import UNetModel
from ldm.sampling.sigmas import DiscreteSigmas, schedule_sigmas
from ldm.sampling.schedules import make_alphas_cumprod
from ldm.tasks.parameters import read_png_parameters
from ldm.tasks.sampler_presets import read_sampler_presets
from tests.builders import sdxl
from tests.builders.clip_tokenizer import tiny_vocab_size

TURBO = ("Euler a", "Simple", 1, 1.0, 1.0)


def sampling(defaults) -> tuple:
    return defaults.sampler, defaults.schedule, defaults.steps, defaults.scale, defaults.eta


def test_the_turbo_presets_have_their_base_architecture_and_turbo_sampling():
    sd_turbo, xl_turbo = find_preset("sd_turbo"), find_preset("sd_xl_turbo")
    assert sd_turbo.model == find_preset("v2-inference").model  # SD 2.1-base: eps, 512, OpenCLIP ViT-H
    assert xl_turbo.model == dataclasses.replace(find_preset("sd_xl_base").model, latent_size=64)  # trained at 512
    assert sampling(sd_turbo.sampler) == sampling(xl_turbo.sampler) == TURBO
    assert not sd_turbo.detect and not xl_turbo.detect  # the tensors of their base models: chosen by name
    assert {"sd_turbo", "sd_xl_turbo"} <= {p.name for p in list_presets()}
    turbo = {p.name: p for p in read_sampler_presets()}["Turbo 1 step"]
    assert (turbo.sampler, turbo.schedule, turbo.steps, turbo.scale, turbo.eta) == TURBO


def test_simple_is_diffusers_trailing_spacing_at_one_two_and_four_steps():
    alphas_cumprod = make_alphas_cumprod(find_preset("sd_turbo").model.schedule)
    table = DiscreteSigmas(alphas_cumprod)
    for steps in (1, 2, 3, 4):
        scheduler = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                    timestep_spacing="trailing")
        scheduler.set_timesteps(steps)
        ours = torch.tensor(schedule_sigmas("Simple", table, steps), dtype=torch.float64)
        if steps == 3:  # trailing rounds 1000 - 666.7 to 333, less 1: 332; Simple takes 999 - 666 = 333
            assert scheduler.timesteps.tolist() == [999, 666, 332]
            ours[2] = table.sigmas[332]
        torch.testing.assert_close(ours, scheduler.sigmas.double(), rtol=1e-5, atol=1e-6)
    assert schedule_sigmas("Simple", table, 1)[0] == float(table.sigmas[999])


def test_the_cli_samples_with_the_turbo_default_in_one_unguided_pass(tiny_sdxl, tmp_path, monkeypatch):
    raw = sdxl.preset_dict(tiny_vocab_size(tiny_sdxl.tokenizer_dir))
    raw["sampler"] = dataclasses.asdict(find_preset("sd_xl_turbo").sampler)
    preset_yaml = tmp_path / "tiny-sdxl-turbo.yaml"
    OmegaConf.save(OmegaConf.create(raw), preset_yaml)
    rows = []
    forward = UNetModel.forward

    def counted(self, x, *args, **kwargs):
        rows.append(x.shape[0])
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(UNetModel, "forward", counted)
    out = tmp_path / "turbo.png"
    assert main(["txt2img", "--model", str(tiny_sdxl.path), "--preset", str(preset_yaml), "--tokenizer",
                 str(tiny_sdxl.tokenizer_dir), "--prompt", "a red cat", "--seed", "3", "--width", "16", "--height", "16",
                 "--out", str(out)]) == 0
    assert rows == [1], "one step, the unconditional pass skipped at scale 1"
    fields = read_png_parameters(out)
    assert (fields["Sampler"], fields["Schedule type"], fields["Steps"], fields["CFG scale"]) == ("Euler a", "Simple", "1", "1.0")
