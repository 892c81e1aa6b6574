"""SDXL through the engine: a tiny SDXL-layout file generating from the command line with two
samplers, prompt syntax read by both tokenizers, AUTOMATIC1111's zeros for an empty negative prompt,
and the size conditioning of the ADM vector (the numbers asked for, in the original's order)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli import main
from ldm.tasks.parameters import read_png_parameters
from ldm.models.sdxl_conditioner import SizeConditioning
from ldm.models.unet import timestep_embedding
from ldm.tasks.generate import conditioning
from ldm.tasks.request import GenerationRequest, SizeConditioningOptions, resolve_request
from tests.builders import sdxl
from tests.builders.clip_tokenizer import tiny_vocab_size
from tests.helpers import max_error

POOLED = sdxl.OPEN_CLIP["embed_dim"]


def fourier(value: float) -> torch.Tensor:
    return timestep_embedding(torch.tensor([float(value)]), sdxl.FOURIER)[0]


def cli_args(files, preset_yaml, out, *extra):
    return ["txt2img", "--model", str(files.path), "--preset", str(preset_yaml), "--tokenizer", str(files.tokenizer_dir),
            "--prompt", "a (red:1.3) cat BREAK [green:blue:0.5] sky", "--negative", "", "--steps", "3", "--scale", "5",
            "--seed", "7", "--width", "16", "--height", "16", "--out", str(out), *extra]


def test_txt2img_runs_an_sdxl_file_with_ddim_and_dpmpp_2m(tiny_sdxl, tmp_path):
    preset_yaml = sdxl.write_preset_yaml(tmp_path / "tiny-sdxl.yaml", tiny_vocab_size(tiny_sdxl.tokenizer_dir))
    pictures = {}
    for sampler in ("DDIM", "DPM++ 2M"):
        out = tmp_path / f"{sampler}.png"
        assert main(cli_args(tiny_sdxl, preset_yaml, out, "--sampler", sampler)) == 0
        with Image.open(out) as image:
            assert image.size == (16, 16)
            pictures[sampler] = np.asarray(image.convert("RGB"))
        assert read_png_parameters(out)["Sampler"] == sampler
        assert pictures[sampler].std() > 0, "a flat picture means the model gave nothing"
    assert not np.array_equal(pictures["DDIM"], pictures["DPM++ 2M"])


@torch.no_grad()
def test_prompt_syntax_reaches_both_text_encoders(loaded_sdxl):
    conditioner = loaded_sdxl.model.conditioner
    width = sdxl.CLIP["hidden_size"]
    plain, weighted, neutral = (conditioner.encode_text([p]).context
                                for p in ("a red cat", "a (red:1.5) cat", "a (red:1.0) cat"))
    assert max_error(neutral, plain) == 0
    assert max_error(weighted[..., :width], plain[..., :width]) > 1e-3  # CLIP ViT-L's half
    assert max_error(weighted[..., width:], plain[..., width:]) > 1e-3  # the bigG's half
    split = conditioner.encode_text(["a red cat BREAK a blue dog"])
    assert split.context.shape == (1, 154, 64)  # BREAK: two chunks for both encoders
    # the pooled vector is the first chunk's, from its tokens before the emphasis weights (as A1111)
    pooled = conditioner.encode_text(["a red cat"]).pooled
    assert max_error(conditioner.encode_text(["a (red:1.5) cat"]).pooled, pooled) == 0
    assert max_error(split.pooled, pooled) == 0
    assert max_error(conditioner.encode_text(["a blue dog"]).pooled, pooled) > 1e-3


@torch.no_grad()
def test_an_empty_negative_prompt_is_zeros_but_keeps_its_size_embeddings(loaded_sdxl):
    model = loaded_sdxl.model
    sizes = [SizeConditioning((32, 48), (32, 48))] * 3
    encoded = model.encode_conditioning(["", "", "a blue dog"], negative=[True, False, True], sizes=sizes)
    context, y = encoded["context"], encoded["y"]
    assert torch.count_nonzero(context[0]) == 0 and torch.count_nonzero(y[0, :POOLED]) == 0
    assert torch.count_nonzero(context[1]) > 0 and torch.count_nonzero(context[2]) > 0  # an empty prompt, a negative one
    assert torch.equal(y[0, POOLED:], y[2, POOLED:])
    expected = torch.cat([fourier(v) for v in (32, 48, 0, 0, 32, 48)])
    assert max_error(y[0, POOLED:], expected) == 0


def test_the_request_size_options_become_the_adm_vector_with_a1111s_defaults(loaded_sdxl):
    request, _ = resolve_request(GenerationRequest("a red cat", "", steps=2, seed=1, width=48, height=32), 8)
    cond, uncond = conditioning(loaded_sdxl.model, request, None)
    expected = torch.cat([fourier(v) for v in (32, 48, 0, 0, 32, 48)])  # original = target = the image, crop 0, 0
    assert max_error(cond["y"][0, POOLED:], expected) == 0
    assert torch.count_nonzero(uncond["context"]) == 0  # the empty negative prompt
    options = SizeConditioningOptions(original_size=(1024, 768), target_size=(512, 512), crop_top_left=(16, 8))
    request, _ = resolve_request(GenerationRequest("a red cat", "a dog", steps=2, seed=1, width=48, height=32,
                                                   size_conditioning=options), 8)
    cond, uncond = conditioning(loaded_sdxl.model, request, None)
    expected = torch.cat([fourier(v) for v in (1024, 768, 16, 8, 512, 512)])
    assert max_error(cond["y"][0, POOLED:], expected) == 0 and max_error(uncond["y"][0, POOLED:], expected) == 0


def test_the_refiner_takes_the_aesthetic_scores_of_its_prompts(loaded_sdxl_refiner):
    request, _ = resolve_request(GenerationRequest("a red cat", "a blue dog", steps=2, seed=1, width=32, height=32), 8)
    cond, uncond = conditioning(loaded_sdxl_refiner.model, request, None)
    assert cond["y"].shape == (1, POOLED + 5 * sdxl.FOURIER)
    assert max_error(cond["y"][0, -sdxl.FOURIER:], fourier(6.0)) == 0
    assert max_error(uncond["y"][0, -sdxl.FOURIER:], fourier(2.5)) == 0


@pytest.mark.parametrize("options, message", [
    (SizeConditioningOptions(original_size=(0, 512)), "original size height must be between 1"),
    (SizeConditioningOptions(crop_top_left=(-1, 0)), "crop top-left top must be between 0"),
    (SizeConditioningOptions(target_size=(512,)), r"target size must be \(height, width\)"),
    (SizeConditioningOptions(aesthetic_score=11.0), "aesthetic score must be between 0 and 10"),
])
def test_bad_size_conditioning_is_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        resolve_request(GenerationRequest("a cat", size_conditioning=options), 8)


def test_an_sdxl_file_with_the_denoisers_sigmas_loads_strictly_and_a_stray_tensor_does_not(tiny_sdxl, loaded_sdxl, tmp_path):
    """sgm writes ``denoiser.sigmas``; some fine-tunes and merges leave out the bigG's ``logit_scale``, which
    sampling never reads: it is filled with zero and the load report names it."""
    from safetensors.torch import save_file

    from ldm.checkpoints.errors import CheckpointError
    from ldm.checkpoints.io import read_state_dict
    from ldm.checkpoints.loader import load_model

    state = read_state_dict(tiny_sdxl.path)
    state["denoiser.sigmas"] = ((1 - loaded_sdxl.model.alphas_cumprod) / loaded_sdxl.model.alphas_cumprod).sqrt().float()
    state["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    logit_scale = "conditioner.embedders.1.model.logit_scale"
    save_file({k: v for k, v in state.items() if k != logit_scale}, str(tmp_path / "sgm.safetensors"))
    loaded = load_model(tmp_path / "sgm.safetensors", preset=tiny_sdxl.preset, tokenizer_dir=tiny_sdxl.tokenizer_dir)
    assert "denoiser.sigmas" in loaded.report.ignored and loaded.report.filled == (logit_scale,)
    ours = loaded.model.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in loaded_sdxl.model.state_dict().items() if k != logit_scale)
    assert ours[logit_scale].item() == 0.0
    save_file(dict(state, **{"conditioner.embedders.2.weight": torch.zeros(3)}), str(tmp_path / "stray.safetensors"))
    with pytest.raises(CheckpointError, match="do not belong to this model, e.g. conditioner.embedders.2.weight"):
        load_model(tmp_path / "stray.safetensors", preset=tiny_sdxl.preset, tokenizer_dir=tiny_sdxl.tokenizer_dir)


def test_img2img_and_inpainting_by_blending_run_on_an_sdxl_file(tiny_sdxl, tmp_path):
    preset_yaml = sdxl.write_preset_yaml(tmp_path / "tiny-sdxl.yaml", tiny_vocab_size(tiny_sdxl.tokenizer_dir))
    picture = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype("uint8")
    mask = np.zeros((16, 16), "uint8")
    mask[4:12, 4:12] = 255
    Image.fromarray(picture).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = ["--model", str(tiny_sdxl.path), "--preset", str(preset_yaml), "--tokenizer", str(tiny_sdxl.tokenizer_dir),
              "--prompt", "a red cat", "--steps", "3", "--seed", "1"]
    assert main(["img2img", "--image", str(tmp_path / "in.png"), "--width", "16", "--height", "16", *common,
                 "--out", str(tmp_path / "i2i.png")]) == 0
    with Image.open(tmp_path / "i2i.png") as image:
        assert image.size == (16, 16) and not np.array_equal(np.asarray(image.convert("RGB")), picture)
    assert main(["inpaint", "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), *common,
                 "--out", str(tmp_path / "inpainted.png")]) == 0
    with Image.open(tmp_path / "inpainted.png") as image:
        out = np.asarray(image.convert("RGB"))
    assert np.array_equal(out[mask == 0], picture[mask == 0])  # the unmasked pixels come back exactly
    assert not np.array_equal(out[mask > 0], picture[mask > 0])
