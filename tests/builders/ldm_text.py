"""Tiny models in the layouts of CompVis' LDM text-to-image and layout-to-image models, with random
weights, saved as original single files (``model_ema.*`` copies included, as LDM's default
``use_ema=True`` writes them).

- ``kind="kl"``, ``tiny-ldm-kl``: txt2img-1p4B-eval's layout (KL autoencoder, LDM BERT, heads by count);
- ``kind="vq"``, ``tiny-ldm-vq``: text2img256's layout (VQ autoencoder with 3 latent channels, LDM BERT,
  heads by width);
- ``kind="layout"``, ``tiny-ldm-layout``: layout2img-openimages256's layout (VQ, an LDM BERT of layout
  ids, depth-2 transformers).

The LDM BERTs keep the original's 8 heads of 64 (diffusers' ``LDMBertConfig`` cannot change them)
at width 32. Each preset has a ``detect`` section of its own tiny shapes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.checkpoints.loader import build_model, ema_key
from ldm.checkpoints.presets import ModelPreset, preset_from_dict
from tests.builders import TINY_KL, TINY_VQ, TinyFiles, randomise, schedule_buffers, weights

BERT_WORDS = ["a", "an", "the", "of", "with", "and", "photo", "painting", "cat", "dog", "red", "blue", "house",
              "tree", "sky", "on", "in", "big", "small", ",", ".", "##s", "##ing", "##er", "sun", "set"]
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS]
BERT = dict(kind="transformer", vocab="bert-base-uncased", vocab_size=48, max_seq_len=77, dim=32, depth=2, heads=8, head_dim=64)
LAYOUT = dict(kind="transformer", vocab="layout", vocab_size=100, max_seq_len=14, dim=32, depth=2, heads=8, head_dim=64,
              max_objects=4, grid=10)  # 4 objects x 3 + 2 crop tokens = 14; grid = sqrt(100)


def write_bert_vocab(folder: Path, words: list[str] = BERT_WORDS) -> Path:
    """A tiny bert-base-uncased-style vocab.txt: [PAD] = 0, the other specials, words and word pieces."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return folder


def _preset_dict(name: str, model: dict, detect: dict, sampler: dict) -> dict:
    return {"name": name, "family": f"{name} (tests)", "model": model, "detect": detect, "sampler": sampler}


def kl_preset_dict() -> dict:
    return _preset_dict("tiny-ldm-kl", {
        "scale_factor": 0.18215, "conditioning": "crossattn", "latent_size": 8,
        "schedule": dict(kind="linear", timesteps=1000, linear_start=0.00085, linear_end=0.012),
        "unet": dict(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 1], num_res_blocks=1,
                     channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True, transformer_depth=1, context_dim=32),
        "first_stage": dict(TINY_KL), "cond_stage": BERT,
    }, {"model.diffusion_model.input_blocks.0.0.weight": [32, 4, 3, 3],
        "cond_stage_model.transformer.token_emb.weight": [48, 32]}, {"steps": 4, "scale": 5.0, "eta": 0.0})


def vq_preset_dict() -> dict:
    return _preset_dict("tiny-ldm-vq", {
        "conditioning": "crossattn", "latent_size": 8,
        "schedule": dict(kind="linear", timesteps=1000, linear_start=0.0015, linear_end=0.0195),
        "unet": dict(in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[2, 1], num_res_blocks=1,
                     channel_mult=[1, 2], head_dim=16, use_spatial_transformer=True, transformer_depth=1, context_dim=32),
        "first_stage": dict(TINY_VQ), "cond_stage": BERT,
    }, {"model.diffusion_model.input_blocks.0.0.weight": [32, 3, 3, 3],
        "cond_stage_model.transformer.token_emb.weight": [48, 32]}, {"steps": 4, "scale": 5.0, "eta": 0.0})


def layout_preset_dict() -> dict:
    return _preset_dict("tiny-ldm-layout", {
        "conditioning": "crossattn", "latent_size": 8,
        "schedule": dict(kind="linear", timesteps=1000, linear_start=0.0015, linear_end=0.0205),
        "unet": dict(in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[2, 1], num_res_blocks=1,
                     channel_mult=[1, 2], head_dim=16, use_spatial_transformer=True, transformer_depth=2, context_dim=32),
        "first_stage": dict(TINY_VQ), "cond_stage": LAYOUT,
    }, {"model.diffusion_model.input_blocks.0.0.weight": [32, 3, 3, 3],
        "cond_stage_model.transformer.token_emb.weight": [100, 32],
        "cond_stage_model.transformer.pos_emb.emb.weight": [14, 32]}, {"steps": 4, "scale": 1.0, "eta": 0.0})


KINDS = {"kl": kl_preset_dict, "vq": vq_preset_dict, "layout": layout_preset_dict}


def preset_dict(kind: str = "kl") -> dict:
    return KINDS[kind]()


def make_preset(kind: str = "kl") -> ModelPreset:
    raw = preset_dict(kind)
    return preset_from_dict(raw, Path(f"{raw['name']}.yaml"))


def write_preset_yaml(raw: dict, path: Path) -> Path:
    """A preset dict as a YAML file, for ``--preset FILE``."""
    OmegaConf.save(OmegaConf.create(raw), path)
    return path


def bert_norms_near_identity(model: torch.nn.Module, seed: int) -> None:
    """LDM BERT's layer norms (named by index, ``layers.{i}.0``) near 1 and 0, like a trained model's."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.LayerNorm) and name.startswith("cond_stage_model."):
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))


def original_state(preset: ModelPreset, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random model's tensors as an original LDM file holds them: the weights, the schedule buffers,
    and LitEma's copies of the UNet (the weights times 0.5, so that a test can tell which were used)."""
    model = build_model(preset.model, device="cpu")
    randomise(model, seed)
    bert_norms_near_identity(model, seed + 1)
    state = weights(model)
    state.update(schedule_buffers(preset.model.schedule))
    for k in [k for k in state if k.startswith("model.diffusion_model.")]:
        state[ema_key(k)] = state[k] * 0.5
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(10)
    return state


def write(folder: Path, seed: int = 0, *, kind: str = "kl", vocab_beside: bool = True) -> TinyFiles:
    """``folder/tiny-ldm-<kind>.safetensors``, with a tiny vocab.txt beside it for the LDM BERT models
    (where the loader finds it: no tokenizer folder to pass)."""
    preset = make_preset(kind)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{preset.name}.safetensors"
    save_file(original_state(preset, seed), str(path))
    if vocab_beside and preset.model.cond_stage.takes_text:
        write_bert_vocab(folder)
    return TinyFiles(path, preset)
