"""What several test modules share and no builder makes: reference key lists of the original text
encoders, header-only checkpoint files, the numbers and reference samplers of the parity tests,
small pictures and masks, a free port. Test modules import from here, never from each other."""

from __future__ import annotations

import json
import math
import socket
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.checkpoints.loader import SCHEDULE_BUFFERS
from ldm.models.autoencoder import Autoencoder, AutoencoderConfig

FIXTURES = Path(__file__).parent / "fixtures"
DEFAULT_VOCAB = Path(__file__).resolve().parents[1] / "presets" / "tokenizers" / "default-words.txt"
TOL = 1e-4  # what the parity tests allow between our numbers and diffusers' in fp32


# --- pictures --------------------------------------------------------------------------------------


def picture(side: int, seed: int = 0) -> Image.Image:
    """A square RGB picture of noise."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


def square_mask(side: int) -> Image.Image:
    """A mask (white = fill) of the middle half of a square."""
    mask = Image.new("L", (side, side), 0)
    mask.paste(255, (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
    return mask


# --- the original checkpoints' text encoder keys, and files of any layout ------------------------


def clip_vit_l14_text_keys(prefix: str = "cond_stage_model.") -> dict[str, list[int]]:
    """SD v1's text encoder keys, written out from the layer names of transformers' CLIP text model
    (SDXL's first, under ``conditioner.embedders.0.``)."""
    p = prefix + "transformer.text_model."
    keys = {p + "embeddings.token_embedding.weight": [49408, 768], p + "embeddings.position_embedding.weight": [77, 768]}
    for i in range(12):
        layer = f"{p}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys[f"{layer}self_attn.{proj}.weight"] = [768, 768]
            keys[f"{layer}self_attn.{proj}.bias"] = [768]
        for norm in ("layer_norm1", "layer_norm2"):
            keys[f"{layer}{norm}.weight"] = [768]
            keys[f"{layer}{norm}.bias"] = [768]
        keys[f"{layer}mlp.fc1.weight"], keys[f"{layer}mlp.fc1.bias"] = [3072, 768], [3072]
        keys[f"{layer}mlp.fc2.weight"], keys[f"{layer}mlp.fc2.bias"] = [768, 3072], [768]
    keys[p + "final_layer_norm.weight"] = [768]
    keys[p + "final_layer_norm.bias"] = [768]
    return keys


def open_clip_vit_h14_text_keys() -> dict[str, list[int]]:
    """SD 2.x's text encoder keys: open_clip's text tower (width 1024, 24 blocks, MLP 4096), its visual
    half deleted before saving; text_projection and the scalar logit_scale are stored though unused."""
    return open_clip_text_keys("cond_stage_model.model.", 1024, 24)


def open_clip_text_keys(p: str, width: int, layers: int) -> dict[str, list[int]]:
    """An open_clip text tower's keys under ``p`` (ViT-H/14: 1024 wide, 24 blocks; ViT-bigG/14: 1280, 32)."""
    keys = {p + "token_embedding.weight": [49408, width], p + "positional_embedding": [77, width]}
    for i in range(layers):
        block = f"{p}transformer.resblocks.{i}."
        keys[block + "attn.in_proj_weight"], keys[block + "attn.in_proj_bias"] = [3 * width, width], [3 * width]
        keys[block + "attn.out_proj.weight"], keys[block + "attn.out_proj.bias"] = [width, width], [width]
        for norm in ("ln_1", "ln_2"):
            keys[f"{block}{norm}.weight"], keys[f"{block}{norm}.bias"] = [width], [width]
        keys[block + "mlp.c_fc.weight"], keys[block + "mlp.c_fc.bias"] = [4 * width, width], [4 * width]
        keys[block + "mlp.c_proj.weight"], keys[block + "mlp.c_proj.bias"] = [width, 4 * width], [width]
    keys[p + "ln_final.weight"], keys[p + "ln_final.bias"] = [width], [width]
    keys[p + "text_projection"] = [width, width]
    keys[p + "logit_scale"] = []
    return keys


def sdxl_file_shapes(kind: str = "base") -> dict[str, tuple[int, ...]]:
    """An SDXL base single file's tensors (the UNet and VAE of the reference key list, both text towers), or
    with ``kind="refiner"`` the refiner's as our preset builds it (its key contract is pinned in test_sdxl_keys)."""
    if kind == "refiner":
        from ldm.checkpoints.loader import build_model
        from ldm.checkpoints.presets import find_preset

        return {k: tuple(v.shape) for k, v in build_model(find_preset("sd_xl_refiner").model).state_dict().items()}
    shapes = {k: tuple(v) for k, v in json.loads((FIXTURES / "sd_xl_base.json").read_text()).items()}
    shapes.update({k: tuple(v) for k, v in clip_vit_l14_text_keys("conditioner.embedders.0.").items()})
    shapes.update({k: tuple(v) for k, v in open_clip_text_keys("conditioner.embedders.1.model.", 1280, 32).items()})
    return shapes


def sd_v2_file_shapes() -> dict[str, tuple[int, ...]]:
    """An SD 2.x single file: the original keys (eps and v files are identical), OpenCLIP, schedule buffers."""
    shapes = {k: tuple(v) for k, v in json.loads((FIXTURES / "v2-inference-v.json").read_text()).items()}
    shapes.update({k: tuple(v) for k, v in open_clip_vit_h14_text_keys().items()})
    shapes.update({k: (1000,) for k in SCHEDULE_BUFFERS if k != "logvar"})
    return shapes


def write_header_only_file(path: Path, shapes: dict, metadata: dict) -> Path:
    """A valid fp16 .safetensors file with these tensors, all zero: the header is written and the file is
    extended to its full size without writing data (sparse), so a multi-GB layout costs no disk."""
    header, offset = {"__metadata__": metadata}, 0
    for key, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


# --- parity with diffusers ---------------------------------------------------------------------------


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape, strides and bytes (torch.equal is undefined for float8 and calls -0.0 equal to 0.0)."""
    if (a.dtype, a.shape, a.stride()) != (b.dtype, b.shape, b.stride()):
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def assert_unet_matches(ours, reference_unet, in_channels: int = 4) -> None:
    """Our UNet and diffusers' on the same noisy latents (with any concat channels), timesteps and
    context, within TOL."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, in_channels, 8, 8, generator=g)
    context = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([999, 17])
    expected = reference_unet(x, t, encoder_hidden_states=context).sample
    got = ours(x, t, context=context)
    assert expected.abs().mean() > 0.05, "the reference output should not be trivial"
    assert max_error(got, expected) < TOL


def original_ddim(prediction_type: str, steps: int):
    """diffusers' DDIMScheduler set up as the original SD 2 sampler (its schedule and timestep spacing)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    scheduler.set_timesteps(steps)
    return scheduler


def open_clip_ids(ours, prompts: list[str]) -> torch.Tensor:
    """open_clip's tokenize: [start, ids..., end] then zeros to 77."""
    tokenizer = ours.model.cond_stage_model.tokenizer
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    return torch.tensor([row + [0] * (77 - len(row)) for row in rows])


def reference_embeddings(ours, text, prompts):
    return text(open_clip_ids(ours, prompts)).last_hidden_state


# --- autoencoders and servers ----------------------------------------------------------------------

AUTOENCODER_CONFIGS = {
    # attention in the middle and at the lowest level, blocks that change width and blocks that do not
    "kl": AutoencoderConfig("kl", embed_dim=4, z_channels=4, ch=16, ch_mult=(1, 2, 2), num_res_blocks=2,
                            attn_resolutions=(8,), resolution=32, norm_groups=8),
    # the LDM inpainting first stage: VQ with no attention in the middle
    "vq": AutoencoderConfig("vq", embed_dim=3, z_channels=3, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                            mid_attention=False, n_embed=32, resolution=32, norm_groups=8),
}


def random_autoencoder(config: AutoencoderConfig) -> Autoencoder:
    torch.manual_seed(0)
    model = Autoencoder(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # GroupNorm affine parameters away from 1 and 0, so that they matter
                p.add_(0.2 * torch.randn_like(p))
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def diffusers_clip_text_model(ours, checkpoint: dict):
    """transformers' CLIPTextModel of a tiny SD v1 checkpoint, through diffusers' single-file converter
    (``ours``: our loaded model, whose text encoder's config it copies)."""
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    clip = ours.model.cond_stage_model.config
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=clip.vocab_size, hidden_size=clip.hidden_size, intermediate_size=clip.intermediate_size,
        num_hidden_layers=clip.num_layers, num_attention_heads=clip.num_heads, max_position_embeddings=77,
        hidden_act="quick_gelu", bos_token_id=clip.vocab_size - 2, eos_token_id=clip.vocab_size - 1,
    ))
    converted = sfu.convert_ldm_clip_checkpoint(checkpoint)
    text.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items() if not k.endswith("position_ids")},
                         strict=True)
    return text


# python -m ldm batch on the embedded default model (64 px) in two steps, CPU fp32 (tests/test_batch*.py)
BATCH_FAST = ["--steps", "2", "--device", "cpu", "--dtype", "fp32"]


def batch_args(prompts: Path, out: Path, *extra: str) -> list[str]:
    """The arguments of a batch of every prompt of ``prompts`` x seeds 0 to 2 into ``out``."""
    return ["batch", "--prompts", str(prompts), "--seeds", "0-2", "--out", str(out), *BATCH_FAST, *extra]
