"""LoRA on SDXL: kohya's SDXL names (``lora_unet_*`` in the original naming over a UNet with transformer
depth 2, ``lora_te1_*`` for the CLIP ViT-L, ``lora_te2_*`` for the OpenCLIP bigG with its q/k/v rows)
merged as W + multiplier * alpha / rank * up @ down, computed here from the file independently of
the name tables, and restored bit for bit; SD 1/2 LoRAs refused on SDXL by name; a tagged LoRA
through text to image."""

from __future__ import annotations

import pytest
import torch

from ldm.addons.lora import Applied, LoraError, merged_loras, read_lora
from ldm.tasks.request import GenerationRequest
from ldm.tasks.txt2img import txt2img
from tests.builders.lora import random_lora, write

ALPHA, RANK = 3.0, 4


@pytest.fixture(scope="module")
def xl(tiny_sdxl):
    """Our own copy of the tiny SDXL base (the session's is shared with other tests)."""
    return tiny_sdxl.load()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def kohya_sdxl_names(model) -> dict[str, tuple[str, tuple[int, int] | None, tuple[int, ...]]]:
    """kohya SDXL module name -> (our module, rows of the bigG's in_proj or None, weight shape), by walking the
    modules: the UNet in the original naming, CLIP's in transformers' naming, the bigG's blocks by index."""
    names = {}
    for name, module in model.unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            names["lora_unet_" + name.replace(".", "_")] = (f"model.diffusion_model.{name}", None, tuple(module.weight.shape))
    clip = model.cond_stage_model.embedders[0]
    for name, module in clip.transformer.named_modules():
        if isinstance(module, torch.nn.Linear):
            names["lora_te1_" + name.replace(".", "_")] = (f"conditioner.embedders.0.transformer.{name}", None,
                                                           tuple(module.weight.shape))
    big_g = model.cond_stage_model.embedders[1]
    for i, block in enumerate(big_g.model.transformer.resblocks):
        base, width = f"conditioner.embedders.1.model.transformer.resblocks.{i}", block.attn.out_proj.in_features
        for j, part in enumerate("qkv"):
            names[f"lora_te2_text_model_encoder_layers_{i}_self_attn_{part}_proj"] = (
                f"{base}.attn", (j * width, (j + 1) * width), (width, width))
        for part, ours in (("self_attn_out_proj", "attn.out_proj"), ("mlp_fc1", "mlp.c_fc"), ("mlp_fc2", "mlp.c_proj")):
            names[f"lora_te2_text_model_encoder_layers_{i}_{part}"] = (f"{base}.{ours}", None,
                                                                       tuple(block.get_submodule(ours).weight.shape))
    return names


def expected_weights(model, names, state, te: float, unet: float) -> dict[tuple[str, tuple | None], torch.Tensor]:
    out = {}
    for key, (module_name, rows, shape) in names.items():
        if f"{key}.lora_down.weight" not in state:
            continue
        module = model.get_submodule(module_name)
        w = (module.in_proj_weight if rows is not None else module.weight).detach()
        if rows is not None:
            w = w[rows[0]:rows[1]]
        up, down = state[f"{key}.lora_up.weight"], state[f"{key}.lora_down.weight"]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(shape)
        mult = unet if key.startswith("lora_unet_") else te
        out[(module_name, rows)] = w + mult * (ALPHA / down.shape[0]) * delta
    return out


def current(model, module_name: str, rows) -> torch.Tensor:
    module = model.get_submodule(module_name)
    if rows is None:
        return module.weight
    return module.in_proj_weight[rows[0]:rows[1]]


def test_a_kohya_sdxl_lora_merges_on_every_layer_and_restores_bit_for_bit(xl, tmp_path):
    model = xl.model
    names = kohya_sdxl_names(model)
    assert any("transformer_blocks_1_attn2_to_k" in n for n in names), "the tiny UNet has transformer depth 2"
    assert any(n.startswith("lora_unet_label_emb") for n in names)
    shapes = {key: shape for key, (_, _, shape) in names.items()}
    state = random_lora(shapes, RANK, alpha=ALPHA)
    path = write(tmp_path / "xl.safetensors", state, {"ss_base_model_version": "sdxl_base_v1-0"})
    lora = read_lora(path, model)
    landed = {key.rsplit(".", 2)[0] for key in state}
    assert len(lora.modules) == len(landed) and {m.key for m in lora.modules} == landed
    want = expected_weights(model, names, state, te=0.6, unet=0.8)
    before = snapshot(model)
    with merged_loras([Applied(lora, te=0.6, unet=0.8)]) as changed:
        assert changed == len(want) - 2 * len(model.cond_stage_model.embedders[1].model.transformer.resblocks)  # q/k/v: one weight
        for (module_name, rows), expected in want.items():
            torch.testing.assert_close(current(model, module_name, rows), expected, rtol=0, atol=1e-5,
                                       msg=lambda m, n=module_name: f"{n}: {m}")
    after = model.state_dict()
    assert not [k for k, v in before.items() if not torch.equal(after[k], v)]


def test_diffusers_unet_names_and_peft_text_names_land_on_the_same_layers(xl, tmp_path):
    model = xl.model
    width = model.cond_stage_model.embedders[1].model.transformer.resblocks[1].attn.out_proj.in_features
    clip_q = tuple(model.get_submodule("conditioner.embedders.0.transformer.text_model.encoder.layers.2.self_attn.q_proj").weight.shape)
    sgm = {"lora_unet_middle_block_1_transformer_blocks_1_attn1_to_v": (32 * 2, 32 * 2)}
    g = torch.Generator().manual_seed(3)
    tensors = {n: torch.randn(s, generator=g) * 0.1 for n, s in
               (("down", (2, 64)), ("up", (64, 2)), ("d1", (2, clip_q[1])), ("u1", (clip_q[0], 2)), ("d2", (2, width)), ("u2", (width, 2)))}
    kohya = {f"{next(iter(sgm))}.lora_down.weight": tensors["down"], f"{next(iter(sgm))}.lora_up.weight": tensors["up"],
             "lora_te1_text_model_encoder_layers_2_self_attn_q_proj.lora_down.weight": tensors["d1"],
             "lora_te1_text_model_encoder_layers_2_self_attn_q_proj.lora_up.weight": tensors["u1"],
             "lora_te2_text_model_encoder_layers_1_self_attn_k_proj.lora_down.weight": tensors["d2"],
             "lora_te2_text_model_encoder_layers_1_self_attn_k_proj.lora_up.weight": tensors["u2"]}
    peft = {"unet.mid_block.attentions.0.transformer_blocks.1.attn1.to_v.lora_A.weight": tensors["down"],
            "unet.mid_block.attentions.0.transformer_blocks.1.attn1.to_v.lora_B.weight": tensors["up"],
            "text_encoder.text_model.encoder.layers.2.self_attn.q_proj.lora_A.weight": tensors["d1"],
            "text_encoder.text_model.encoder.layers.2.self_attn.q_proj.lora_B.weight": tensors["u1"],
            "text_encoder_2.text_model.encoder.layers.1.self_attn.k_proj.lora_A.weight": tensors["d2"],
            "text_encoder_2.text_model.encoder.layers.1.self_attn.k_proj.lora_B.weight": tensors["u2"]}
    merged = []
    for name, state in (("kohya", kohya), ("peft", peft)):
        with merged_loras([Applied(read_lora(write(tmp_path / f"{name}.safetensors", state), model))]) as changed:
            assert changed == 3
            merged.append(snapshot(model))
    assert all(torch.equal(merged[0][k], merged[1][k]) for k in merged[0])
    attn = "model.diffusion_model.middle_block.1.transformer_blocks.1.attn1.to_v.weight"
    assert not torch.equal(merged[0][attn], model.state_dict()[attn])
    in_proj = merged[0]["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"]
    base = model.state_dict()["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(in_proj[:width], base[:width]) and torch.equal(in_proj[2 * width:], base[2 * width:])
    torch.testing.assert_close(in_proj[width:2 * width], base[width:2 * width] + tensors["u2"] @ tensors["d2"], rtol=0, atol=1e-6)


def test_sd1_and_sd2_loras_are_refused_on_sdxl_with_the_reason(xl, tmp_path):
    one_encoder = write(tmp_path / "sd1.safetensors", random_lora({"lora_te_text_model_encoder_layers_0_mlp_fc1": (37, 32)}, 2))
    with pytest.raises(LoraError, match="one text encoder.*SDXL"):
        read_lora(one_encoder, xl.model)
    stated = write(tmp_path / "sd2.safetensors", random_lora({"lora_te2_text_model_encoder_layers_0_mlp_fc1": (128, 32)}, 2),
                   {"ss_base_model_version": "sd_v2"})
    with pytest.raises(LoraError, match="Stable Diffusion 2.x.*SDXL"):
        read_lora(stated, xl.model)


def test_txt2img_on_sdxl_applies_the_tagged_lora_and_restores_the_model(xl, tmp_path):
    folder = tmp_path / "Lora"
    shapes = {key: shape for key, (_, _, shape) in kohya_sdxl_names(xl.model).items()}
    write(folder / "ink.safetensors", random_lora(shapes, RANK, scale=0.3))
    before = snapshot(xl.model)

    def run(prompt):
        request = GenerationRequest(prompt=prompt, negative_prompt="", steps=1, scale=5.0, seed=7, width=16, height=16,
                                    lora_dirs=(folder,))
        return torch.tensor(list(txt2img(xl, request).images[0].getdata()), dtype=torch.float32)

    styled, plain = run("a red cat <lora:ink:1>"), run("a red cat")
    assert not [k for k, v in before.items() if not torch.equal(xl.model.state_dict()[k], v)]
    assert (plain - styled).abs().mean() > 1.0
