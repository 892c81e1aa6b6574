"""LoRA files: names mapped onto our layers, the merge formulas, exact restore, refusals, prompt tags,
the tasks and the PNG parameters."""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ldm.addons.library import default_lora_dirs, find_lora, lora_files, prompt_loras
from ldm.addons.lora import Applied, lora_hash, lora_targets, merged_loras, read_lora, unet_diffusers_name
from ldm.addons.tags import LoraTag, extract_lora_tags
from ldm.checkpoints.diffusers_folder import _unet_module
from ldm.checkpoints.errors import CheckpointError
from ldm.kernels import winograd
from ldm.kernels.winograd import Conv3x3, set_winograd
from ldm.sampling.steps import SamplingCancelled
from ldm.tasks.parameters import parse_parameters
from ldm.tasks.request import GenerationRequest, resolve_request
from ldm.tasks.txt2img import txt2img
from tests.builders.lora import kohya_names, random_lora, write

Q_PROJ = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
Q_TARGET = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
Q_SHAPE = (32, 32)  # the tiny model's first level is 32 channels wide
CONV1 = "lora_unet_down_blocks_0_resnets_0_conv1"  # a 3x3 conv: input_blocks.1.0.in_layers.2


@pytest.fixture(scope="module")
def sd1(tiny_sd_v1):
    """Our own copy of the tiny SD v1 model (the session's is shared with other tests)."""
    return tiny_sd_v1.load()


@pytest.fixture(scope="module")
def sd2(tiny_sd2_v):
    return tiny_sd2_v.load()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model, before: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(now[k], v)]
    assert not changed, f"not restored bit for bit: {changed[:3]}"


def weight(model, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("which", ["sd1", "sd2"])
def test_every_unet_layer_has_the_diffusers_name_the_folder_reader_maps_back(which, request):
    model = request.getfixturevalue(which).model
    per_block = model.config.unet.num_res_blocks
    names = {n: unet_diffusers_name(n, per_block) for n, m in model.unet.named_modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    has_attention = {int(m.group(1)) for d in names.values() if d and (m := re.match(r"up_blocks\.(\d+)\.attentions", d))}
    assert all(names.values()), [n for n, d in names.items() if d is None]
    for ours, diffusers in names.items():
        assert _unet_module(diffusers, per_block, has_attention) == ours
    assert names["input_blocks.1.1.transformer_blocks.0.attn1.to_q"] == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def test_sd2_text_keys_land_on_open_clip_rows(sd2):
    targets = lora_targets(sd2.model)
    attention = sd2.model.cond_stage_model.model.transformer.resblocks[0].attn
    width = attention.out_proj.in_features
    k = targets[("te", "text_model_encoder_layers_0_self_attn_k_proj")]
    assert k.module is attention and k.param == "in_proj_weight" and k.rows == (width, 2 * width)
    assert targets[("te", "text_model_encoder_layers_0_mlp_fc1")].name.endswith("resblocks.0.mlp.c_fc")


# ---------------------------------------------------------------- merge and restore


def test_apply_then_remove_restores_every_weight_bit_for_bit(sd1, tmp_path):
    names = kohya_names(sd1.model)
    path = write(tmp_path / "all.safetensors", random_lora(names, 4))
    lora = read_lora(path, sd1.model)
    assert len(lora.modules) == len(names) and lora.rank == 4
    before = snapshot(sd1.model)
    for multiplier in (1.0, -0.7, 1.0):  # switching weights never drifts
        with merged_loras([Applied(lora, multiplier, multiplier)]) as changed:
            assert changed == len(names)
            assert not torch.equal(weight(sd1.model, Q_TARGET), before[Q_TARGET + ".weight"])
        assert_same(sd1.model, before)


def test_an_error_inside_the_block_restores_the_weights(sd1, tmp_path):
    path = write(tmp_path / "q.safetensors", random_lora({Q_PROJ: Q_SHAPE}, 4))
    before = snapshot(sd1.model)
    with pytest.raises(RuntimeError, match="boom"), merged_loras([Applied(read_lora(path, sd1.model))]):
        raise RuntimeError("boom")
    assert_same(sd1.model, before)


def test_kohya_merge_is_w_plus_multiplier_alpha_over_rank_up_down(sd1, tmp_path):
    state = random_lora({Q_PROJ: tuple(weight(sd1.model, Q_TARGET).shape)}, 4, alpha=3.0)
    path = write(tmp_path / "q.safetensors", state)
    w = weight(sd1.model, Q_TARGET).detach().clone()
    up, down = state[Q_PROJ + ".lora_up.weight"], state[Q_PROJ + ".lora_down.weight"]
    with merged_loras([Applied(read_lora(path, sd1.model), te=0.0, unet=0.8)]):
        torch.testing.assert_close(weight(sd1.model, Q_TARGET), w + 0.8 * (3.0 / 4) * (up @ down), rtol=0, atol=1e-6)


def test_locon_3x3_and_peft_names_merge_as_written(sd1, tmp_path):
    module = "model.diffusion_model.input_blocks.1.0.in_layers.2"
    shape = tuple(weight(sd1.model, module).shape)
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(2, shape[1], 3, 3, generator=g), torch.randn(shape[0], 2, 1, 1, generator=g)
    peft_q = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 32, generator=g),
              "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(32, 4, generator=g)}
    path = write(tmp_path / "mixed.safetensors", {f"{CONV1}.lora_down.weight": down, f"{CONV1}.lora_up.weight": up, **peft_q})
    w_conv, w_q = weight(sd1.model, module).detach().clone(), weight(sd1.model, Q_TARGET).detach().clone()
    expected_conv = w_conv + F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)  # kohya's merge_to
    a, b = peft_q.values()
    with merged_loras([Applied(read_lora(path, sd1.model))]):
        torch.testing.assert_close(weight(sd1.model, module), expected_conv, rtol=0, atol=1e-5)
        torch.testing.assert_close(weight(sd1.model, Q_TARGET), w_q + b @ a, rtol=0, atol=1e-5)  # PEFT: no alpha, scale 1


def test_loha_and_lokr_follow_their_formulas(sd1, tmp_path):
    g = torch.Generator().manual_seed(2)
    k_name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    k_target = Q_TARGET.replace("to_q", "to_k")
    loha = {f"{Q_PROJ}.hada_w1_a": torch.randn(32, 4, generator=g), f"{Q_PROJ}.hada_w1_b": torch.randn(4, 32, generator=g),
            f"{Q_PROJ}.hada_w2_a": torch.randn(32, 4, generator=g), f"{Q_PROJ}.hada_w2_b": torch.randn(4, 32, generator=g),
            f"{Q_PROJ}.alpha": torch.tensor(2.0)}
    lokr = {f"{k_name}.lokr_w1": torch.randn(4, 2, generator=g),
            f"{k_name}.lokr_w2_a": torch.randn(8, 2, generator=g), f"{k_name}.lokr_w2_b": torch.randn(2, 16, generator=g),
            f"{k_name}.alpha": torch.tensor(1.0)}
    path = write(tmp_path / "lyco.safetensors", {**loha, **lokr})
    w_q, w_k = weight(sd1.model, Q_TARGET).detach().clone(), weight(sd1.model, k_target).detach().clone()
    t = list(loha.values())
    d_loha = ((t[0] @ t[1]) * (t[2] @ t[3])) * (2.0 / 4)  # Hadamard product, alpha / rank
    w1, w2a, w2b = list(lokr.values())[:3]
    d_lokr = torch.kron(w1, w2a @ w2b) * (1.0 / 2)  # Kronecker product, alpha / the factored rank
    lora = read_lora(path, sd1.model)
    assert lora.kinds == ("loha", "lokr")
    with merged_loras([Applied(lora, 1.0, 0.5)]):
        torch.testing.assert_close(weight(sd1.model, Q_TARGET), w_q + 0.5 * d_loha, rtol=0, atol=1e-5)
        torch.testing.assert_close(weight(sd1.model, k_target), w_k + 0.5 * d_lokr, rtol=0, atol=1e-5)


def test_sd2_qkv_changes_go_to_the_rows_of_in_proj(sd2, tmp_path):
    attention = sd2.model.cond_stage_model.model.transformer.resblocks[1].attn
    width = attention.out_proj.in_features
    state = random_lora({"lora_te_text_model_encoder_layers_1_self_attn_v_proj": (width, width)}, 4, alpha=4.0)
    path = write(tmp_path / "v.safetensors", state, {"ss_base_model_version": "sd_v2"})
    before = attention.in_proj_weight.detach().clone()
    up, down = list(state.values())[1], list(state.values())[0]
    with merged_loras([Applied(read_lora(path, sd2.model), te=1.0, unet=0.0)]):
        torch.testing.assert_close(attention.in_proj_weight[2 * width:], before[2 * width:] + up @ down, rtol=0, atol=1e-6)
        assert torch.equal(attention.in_proj_weight[:2 * width], before[:2 * width])
    assert torch.equal(attention.in_proj_weight, before)


def test_winograd_sees_the_merged_kernel(sd1, tmp_path, monkeypatch):
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)  # the tiny model's convs are narrow
    conv = sd1.model.get_submodule("model.diffusion_model.input_blocks.1.0.in_layers.2")
    assert isinstance(conv, Conv3x3)
    try:
        set_winograd(sd1.model.unet, True, transform_kernels=False)
        x = torch.randn(1, conv.in_channels, 8, 8)
        with torch.inference_mode():
            before = conv(x)
        assert conv._transformed is not None
        path = write(tmp_path / "conv.safetensors", random_lora({CONV1: tuple(conv.weight.shape)}, 2, scale=0.5))
        with merged_loras([Applied(read_lora(path, sd1.model))]), torch.inference_mode():
            merged = conv(x)
            direct = F.conv2d(x, conv.weight, conv.bias, padding=1)
        torch.testing.assert_close(merged, direct, rtol=0, atol=1e-4)
        assert (merged - before).abs().max() > 1e-2
        with torch.inference_mode():
            torch.testing.assert_close(conv(x), before, rtol=0, atol=0)
    finally:
        set_winograd(sd1.model.unet, False)


# ---------------------------------------------------------------- refusals


def refused(path: Path, model, match: str) -> None:
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=match) as caught:
        read_lora(path, model)
    assert str(path) in str(caught.value)
    assert_same(model, before)


def test_keys_that_land_nowhere_are_named(sd1, tmp_path):
    state = random_lora({Q_PROJ: Q_SHAPE, "lora_unet_down_blocks_7_attentions_0_proj_in": Q_SHAPE}, 4)
    refused(write(tmp_path / "x.safetensors", state), sd1.model, "match no layer.*down_blocks_7_attentions_0_proj_in")


def test_a_lora_for_another_family_is_refused_with_the_reason(sd1, sd2, tmp_path):
    sd1_file = write(tmp_path / "sd1.safetensors", random_lora(kohya_names(sd1.model, attention_only=True), 4))
    refused(sd1_file, sd2.model, "another model family")  # shapes: text width, cross-attention width
    stated = write(tmp_path / "stated.safetensors", random_lora({Q_PROJ: Q_SHAPE}, 4), {"ss_base_model_version": "sd_v2"})
    refused(stated, sd1.model, "made for Stable Diffusion 2.x")
    sdxl = write(tmp_path / "xl.safetensors", random_lora({"lora_te1_text_model_encoder_layers_0_mlp_fc1": (8, 8)}, 2))
    refused(sdxl, sd1.model, "SDXL")


def test_damaged_files_are_refused_with_a_message(sd1, tmp_path):
    good = write(tmp_path / "good.safetensors", random_lora({Q_PROJ: Q_SHAPE}, 4))
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    refused(truncated, sd1.model, "truncated|corrupt|smaller|size")
    lying = tmp_path / "lying.safetensors"
    lying.write_bytes((10**9).to_bytes(8, "little") + data[8:])
    refused(lying, sd1.model, "header|truncated|corrupt")
    nan = random_lora({Q_PROJ: Q_SHAPE}, 4)
    nan[Q_PROJ + ".lora_up.weight"][0, 0] = float("nan")
    refused(write(tmp_path / "nan.safetensors", nan), sd1.model, "non-finite")
    ranks = random_lora({Q_PROJ: Q_SHAPE}, 4)
    ranks[Q_PROJ + ".lora_up.weight"] = torch.randn(32, 3)
    refused(write(tmp_path / "ranks.safetensors", ranks), sd1.model, "ranks")
    stray = {**random_lora({Q_PROJ: Q_SHAPE}, 4), "something_else": torch.zeros(2)}
    refused(write(tmp_path / "stray.safetensors", stray), sd1.model, "no part of a LoRA")


def test_an_absurd_weight_on_half_precision_is_undone(tiny_sd_v1, tmp_path):
    loaded = tiny_sd_v1.load(dtype=torch.float16)
    state = random_lora({Q_PROJ: Q_SHAPE}, 4, scale=1e3)  # finite in the file, over fp16 once multiplied
    path = write(tmp_path / "huge.safetensors", state)
    before = snapshot(loaded.model)
    with pytest.raises(ValueError, match="smaller weight"), merged_loras([Applied(read_lora(path, loaded.model))]):
        pass
    assert_same(loaded.model, before)


# ---------------------------------------------------------------- tags, folders and hashes


def test_tags_are_taken_out_of_the_prompt():
    tagged = extract_lora_tags("a cat <lora:ink:0.8>, <lora:paper> <lora:x:0.5:1> <lora:y:1:unet=0.25> <hypernet:z:1>")
    assert tagged.text == "a cat ,    <hypernet:z:1>"  # other extra networks stay in the text
    assert tagged.tags == [LoraTag("ink", 0.8, 0.8), LoraTag("paper"), LoraTag("x", 0.5, 1.0), LoraTag("y", 1.0, 0.25)]


@pytest.mark.parametrize("tag, match", [("<lora:x:1e9>", "range -5 to 5"), ("<lora:x:nan>", "range"),
                                        ("<lora:x:big>", "not a number"), ("<lora::1>", "names no LoRA"),
                                        ("<lora:x:1:2:3>", "expected")])
def test_bad_tags_are_refused_before_any_work(tag, match):
    with pytest.raises(ValueError, match=match):
        resolve_request(GenerationRequest(prompt=f"a cat {tag}"), 8)


def test_names_are_looked_up_in_the_folders(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    write(first / "sub" / "ink.safetensors", {"k": torch.zeros(1)})
    write(second / "ink.safetensors", {"k": torch.zeros(1)})
    write(second / "paper.safetensors", {"k": torch.zeros(1)})
    assert lora_files([first, second]) == {"ink": first / "sub" / "ink.safetensors", "paper": second / "paper.safetensors"}
    with pytest.raises(ValueError, match="no LoRA named 'missing'.*found: ink, paper"):
        find_lora("missing", [first, second])
    models = tmp_path / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    assert tmp_path / "models" / "Lora" in default_lora_dirs([models / "x.safetensors"])


def test_the_hash_is_the_sha256_after_the_header_or_the_stated_one(tmp_path):
    state = {"k": torch.arange(4.0)}
    plain = write(tmp_path / "plain.safetensors", state)
    tagged = write(tmp_path / "meta.safetensors", state, {"ss_output_name": "a much longer name that grows the header"})
    data = plain.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert lora_hash(plain) == hashlib.sha256(data[8 + header:]).hexdigest()[:12] == lora_hash(tagged)
    assert lora_hash(plain, {"sshs_model_hash": "ABCDEF0123456789"}) == "abcdef012345"


# ---------------------------------------------------------------- through the task


def small_request(prompt: str, lora_dir: Path) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, negative_prompt="blurry", steps=3, scale=5.0, seed=7, width=32, height=32,
                             lora_dirs=(lora_dir,))


def test_txt2img_applies_the_tagged_lora_and_restores_the_model(sd1, tmp_path):
    folder = tmp_path / "Lora"
    write(folder / "ink.safetensors", random_lora(kohya_names(sd1.model), 4, scale=0.3))
    before = snapshot(sd1.model)
    plain = txt2img(sd1, small_request("a red cat", folder))
    assert_same(sd1.model, before)
    styled = txt2img(sd1, small_request("a red cat <lora:ink:1>", folder))
    assert_same(sd1.model, before)
    again = txt2img(sd1, small_request("a red cat <lora:ink:0>", folder))  # weight 0: the plain image
    a, b, c = (torch.tensor(list(r.images[0].getdata()), dtype=torch.float32) for r in (plain, styled, again))
    assert (a - b).abs().mean() > 1.0 and torch.equal(a, c)
    fields = parse_parameters(styled.parameters[0])
    assert fields["Prompt"] == "a red cat <lora:ink:1>"
    assert fields["Lora hashes"] == f"ink: {lora_hash(folder / 'ink.safetensors')}"


def test_stop_and_a_missing_lora_leave_the_model_as_it_was(sd1, tmp_path):
    folder = tmp_path / "Lora"
    write(folder / "ink.safetensors", random_lora(kohya_names(sd1.model), 4))
    before = snapshot(sd1.model)
    with pytest.raises(SamplingCancelled):
        txt2img(sd1, small_request("<lora:ink:1> a cat", folder), should_stop=lambda: True)
    assert_same(sd1.model, before)
    with pytest.raises(ValueError, match="no LoRA named 'nowhere'"):
        txt2img(sd1, replace(small_request("a cat", folder), negative_prompt="<lora:nowhere:1>"))
    assert_same(sd1.model, before)


def test_a_lora_file_removed_while_the_images_are_made_leaves_them_finished(sd1, tmp_path):
    folder = tmp_path / "Lora"
    path = write(folder / "ink.safetensors", random_lora(kohya_names(sd1.model), 4))

    def delete_at_the_last_step(info):
        if info.step == info.total - 1:
            path.unlink()

    result = txt2img(sd1, small_request("a red cat <lora:ink:1>", folder), callback=delete_at_the_last_step)
    assert not path.exists() and len(result.images) == 1
    fields = parse_parameters(result.parameters[0])
    assert fields["Prompt"] == "a red cat <lora:ink:1>" and "Lora hashes" not in fields


def test_prompt_loras_reads_each_name_once(sd1, tmp_path):
    write(tmp_path / "ink.safetensors", random_lora({Q_PROJ: Q_SHAPE}, 2))
    loras = prompt_loras(sd1.model, ["<lora:ink:0.5> cat", "<lora:ink:1> dog"], [tmp_path])
    assert loras.prompts == [" cat", " dog"] and len(loras.applied) == 1 and loras.applied[0].te == 0.5


def test_the_cli_finds_loras_in_lora_dir_and_writes_their_hashes(tiny_sd_v1, sd1, tmp_path, capsys):
    from ldm.cli import main
    from ldm.tasks.parameters import read_png_parameters
    from tests.builders import sd_v1
    from tests.builders.clip_tokenizer import tiny_vocab_size

    folder = write(tmp_path / "loras" / "ink.safetensors", random_lora(kohya_names(sd1.model), 4)).parent
    preset = sd_v1.write_preset_yaml(tmp_path / "tiny-v1.yaml", tiny_vocab_size(tiny_sd_v1.tokenizer_dir))
    args = ["txt2img", "--model", str(tiny_sd_v1.path), "--preset", str(preset), "--tokenizer", str(tiny_sd_v1.tokenizer_dir),
            "--steps", "2", "--seed", "1", "--width", "32", "--height", "32", "--lora-dir", str(folder)]
    out = tmp_path / "cat.png"
    assert main([*args, "--prompt", "a cat <lora:ink:0.7>", "--out", str(out)]) == 0
    params = read_png_parameters(out)
    assert params["Prompt"] == "a cat <lora:ink:0.7>" and params["Lora hashes"] == f"ink: {lora_hash(folder / 'ink.safetensors')}"
    capsys.readouterr()
    assert main([*args, "--prompt", "a cat <lora:gone:1>", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no LoRA named 'gone'" in err and str(folder) in err and "Traceback" not in err
    assert main([*args, "--prompt", "a cat <lora:ink:1e9>", "--out", str(out)]) == 2
    assert "outside the allowed range -5 to 5" in capsys.readouterr().err


def test_the_studio_searches_lora_dir_then_lora_beside_its_models_folders(tmp_path):
    from app import make_studio, parse_args

    models = tmp_path / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    studio = make_studio(parse_args(["--models-dir", str(models), "--lora-dir", str(tmp_path / "mine"),
                                     "--outputs", str(tmp_path / "out"), "--device", "cpu"]))
    dirs = studio.lora_dirs()
    assert dirs[0] == tmp_path / "mine" and tmp_path / "models" / "Lora" in dirs
