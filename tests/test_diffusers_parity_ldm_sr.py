"""Numerics of LDM super-resolution (bsr_sr) against diffusers' ``LDMSuperResolutionPipeline``
(UNet2DModel + VQModel + DDIMScheduler): a tiny file in bsr_sr's original layout (6 -> 3 UNet with
legacy AttentionBlocks by head width, VQ first stage), compared at fp32 to 1e-4.

Conversion. The VQ autoencoder goes through diffusers' own VAE converter (``tests.ldm_image.diffusers_vq``).
The installed diffusers has no converter for the legacy LDM ``UNetModel`` to ``UNet2DModel`` (its
``convert_ldm_original_checkpoint_to_diffusers.py`` is a repository script, not part of the package),
so ``ldm_unet_to_unet2d`` below writes the key mapping out from the facts of both layouts:
``time_embed.{0,2}`` -> ``time_embedding.linear_{1,2}``; ``input_blocks.0.0`` -> ``conv_in``; for level i
and block j, ``input_blocks.{1 + i(n+1) + j}.{0,1}`` -> ``down_blocks.i.{resnets,attentions}.j`` and
``input_blocks.{(i+1)(n+1)}.0.op`` -> ``down_blocks.i.downsamplers.0.conv``; ``middle_block.{0,1,2}`` ->
``mid_block.{resnets.0, attentions.0, resnets.1}``; ``output_blocks.{u(n+1) + j}`` ->
``up_blocks.u.{resnets,attentions}.j`` with the upsampling convolution last; ``out.{0,2}`` ->
``conv_norm_out``/``conv_out``. ResBlock ``in_layers.0/2, emb_layers.1, out_layers.0/3, skip_connection``
-> ``norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut``. The legacy attention's 1x1 ``qkv``
holds [q, k, v] per head (``QKVAttentionLegacy``), so it is split head by head into ``to_q/to_k/to_v``;
``norm`` -> ``group_norm``, ``proj_out`` -> ``to_out.0``.

Where diffusers departs from the original, the original is followed and the test says so:
- The scheduler is set up as LDM's DDIM sampler on bsr_sr's schedule (linear 0.0015..0.0155 as
  ``scaled_linear``, ``leading`` spacing, offset 1, the last step to alpha-bar at index 0, no clipping),
  not from a hub config.
- The pipeline's ``preprocess`` resizes a PIL input to a multiple of 32 with Lanczos; the original
  concatenates the low-resolution image at its own size, so the pipeline is given the tensor in
  [-1, 1] (which it uses as it is).
- The pipeline draws the initial latents from its ``generator`` but does not pass it to
  ``scheduler.step``, whose eta > 0 noise then comes from torch's global generator. The engine draws
  both from each seed's generator in that order; seeding the global generator and passing none to
  the pipeline gives it the same stream, which is how eta 1 (LDM's notebook default) is compared.
- Step counts that do not divide 1000 differ: LDM's ``make_ddim_timesteps`` takes
  ``arange(0, 1000, 1000 // S) + 1``, one step more than S (6 gives 7), which the engine follows;
  diffusers' ``leading`` spacing takes exactly S. The tests use counts that divide 1000.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, LDMSuperResolutionPipeline, UNet2DModel
from PIL import Image

from ldm.checkpoints.io import read_state_dict
from ldm.tasks.generate import sample
from ldm.tasks.images import from_pil
from ldm.tasks.request import GenerationRequest, resolve_request
from ldm.tasks.upscale import InputTiles, upscale
from tests.builders import ldm_image
from tests.helpers import TOL

pytestmark = pytest.mark.parity

SIZE = 16  # low-resolution pixels; the latent has the same size and the tiny first stage decodes it 2x
UNET = ldm_image.SR_UNET
LEVELS = len(UNET["channel_mult"])
ATTENTION_LEVELS = {i for i in range(LEVELS) if 2**i in UNET["attention_resolutions"]}

RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
            "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def module_map() -> dict[str, tuple[str, str]]:
    """LDM module path -> (kind, diffusers module path); kind is "plain", "res" or "attn"."""
    n = UNET["num_res_blocks"]
    mapping = {"time_embed.0": ("plain", "time_embedding.linear_1"), "time_embed.2": ("plain", "time_embedding.linear_2"),
               "input_blocks.0.0": ("plain", "conv_in"), "out.0": ("plain", "conv_norm_out"), "out.2": ("plain", "conv_out"),
               "middle_block.0": ("res", "mid_block.resnets.0"), "middle_block.1": ("attn", "mid_block.attentions.0"),
               "middle_block.2": ("res", "mid_block.resnets.1")}
    for i in range(LEVELS):
        for j in range(n):
            block = 1 + i * (n + 1) + j
            mapping[f"input_blocks.{block}.0"] = ("res", f"down_blocks.{i}.resnets.{j}")
            if i in ATTENTION_LEVELS:
                mapping[f"input_blocks.{block}.1"] = ("attn", f"down_blocks.{i}.attentions.{j}")
        if i < LEVELS - 1:
            mapping[f"input_blocks.{(i + 1) * (n + 1)}.0.op"] = ("plain", f"down_blocks.{i}.downsamplers.0.conv")
    for u in range(LEVELS):
        level = LEVELS - 1 - u
        for j in range(n + 1):
            block = u * (n + 1) + j
            mapping[f"output_blocks.{block}.0"] = ("res", f"up_blocks.{u}.resnets.{j}")
            if level in ATTENTION_LEVELS:
                mapping[f"output_blocks.{block}.1"] = ("attn", f"up_blocks.{u}.attentions.{j}")
            if j == n and level > 0:
                upsample = 2 if level in ATTENTION_LEVELS else 1
                mapping[f"output_blocks.{block}.{upsample}.conv"] = ("plain", f"up_blocks.{u}.upsamplers.0.conv")
    return mapping


def split_qkv(tensor: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A legacy ``qkv`` weight (3C, C, 1) or bias (3C,), laid out [q, k, v] per head, as (q, k, v)."""
    channels = tensor.shape[0] // 3
    per_head = tensor.reshape(heads, 3, channels // heads, *tensor.shape[1:])
    return tuple(per_head[:, i].reshape(channels, *tensor.shape[1:]).squeeze(-1) for i in range(3))


def ldm_unet_to_unet2d(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "model.diffusion_model."
    unet = {k.removeprefix(prefix): v for k, v in checkpoint.items() if k.startswith(prefix)}
    converted = {}
    for ldm, (kind, target) in module_map().items():
        params = {k.removeprefix(ldm + "."): v for k, v in unet.items() if k.startswith(ldm + ".")}
        assert params, f"no tensors under {ldm}"
        for name, tensor in params.items():
            if kind == "plain":
                converted[f"{target}.{name}"] = tensor
            elif kind == "res":
                module, param = name.rsplit(".", 1)
                converted[f"{target}.{RESBLOCK[module]}.{param}"] = tensor
            elif name.startswith("qkv."):
                heads = tensor.shape[0] // 3 // UNET["head_dim"]
                for proj, part in zip(("to_q", "to_k", "to_v"), split_qkv(tensor, heads)):
                    converted[f"{target}.{proj}.{name.removeprefix('qkv.')}"] = part
            elif name.startswith("proj_out."):
                converted[f"{target}.to_out.0.{name.removeprefix('proj_out.')}"] = tensor.squeeze(-1)
            else:
                converted[f"{target}.group_norm.{name.removeprefix('norm.')}"] = tensor
    assert sum(len([k for k in unet if k.startswith(m + ".")]) for m in module_map()) == len(unet), "unmapped UNet keys"
    return converted


def diffusers_unet(checkpoint: dict[str, torch.Tensor]) -> UNet2DModel:
    widths = tuple(UNET["model_channels"] * m for m in UNET["channel_mult"])
    unet = UNet2DModel(
        sample_size=SIZE, in_channels=UNET["in_channels"], out_channels=UNET["out_channels"], block_out_channels=widths,
        down_block_types=tuple("AttnDownBlock2D" if i in ATTENTION_LEVELS else "DownBlock2D" for i in range(LEVELS)),
        up_block_types=tuple("AttnUpBlock2D" if LEVELS - 1 - u in ATTENTION_LEVELS else "UpBlock2D" for u in range(LEVELS)),
        layers_per_block=UNET["num_res_blocks"], attention_head_dim=UNET["head_dim"], norm_num_groups=32, norm_eps=1e-5,
        downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
    )
    unet.load_state_dict(ldm_unet_to_unet2d(checkpoint), strict=True)
    return unet.eval()


def original_ddim() -> DDIMScheduler:
    """diffusers' DDIMScheduler set up as LDM's DDIM sampler on bsr_sr's schedule."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=ldm_image.SR_SCHEDULE["linear_start"], beta_end=ldm_image.SR_SCHEDULE["linear_end"],
        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
        prediction_type="epsilon",
    )


@pytest.fixture(scope="module")
def ours_and_pipeline(tmp_path_factory):
    files = ldm_image.write(tmp_path_factory.mktemp("ldm_sr"), seed=3, kind="sr")  # another seed than the shared file's
    checkpoint = read_state_dict(files.path)
    pipeline = LDMSuperResolutionPipeline(vqvae=ldm_image.diffusers_vq(checkpoint, mid_attention=True),
                                          unet=diffusers_unet(checkpoint), scheduler=original_ddim())
    pipeline.set_progress_bar_config(disable=True)
    return files.load(), pipeline


def picture(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


@torch.no_grad()
def test_the_legacy_unet_matches_unet2d(ours_and_pipeline):
    ours, pipeline = ours_and_pipeline
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 8, 8, generator=g)
    t = torch.tensor([999, 31])
    expected = pipeline.unet(x, t).sample
    assert expected.abs().mean() > 0.05, "the reference output should not be trivial"
    assert (ours.model.unet(x, t) - expected).abs().max() < TOL


def pipeline_images(pipeline, low: torch.Tensor, steps: int, eta: float, seed: int) -> torch.Tensor:
    """The pipeline's output (B, 3, H, W) in [0, 1]; the global generator, seeded, stands in for the seed's (see above)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return pipeline(low, num_inference_steps=steps, eta=eta, generator=None, output_type="pt").images


@pytest.mark.parametrize("eta", [0.0, 1.0])
@torch.no_grad()
def test_ddim_super_resolution_matches_the_pipeline(ours_and_pipeline, eta):
    loaded, pipeline = ours_and_pipeline
    model = loaded.model
    low = from_pil(picture())
    request = GenerationRequest("", steps=5, scale=1.0, eta=eta, seed=11, width=2 * SIZE, height=2 * SIZE)
    resolved, _ = resolve_request(request, model.config.size_multiple)
    latents = sample(model, resolved, concat=low)
    got = (model.decode_first_stage(latents).clamp(-1, 1) + 1) / 2
    expected = pipeline_images(pipeline, low, request.steps, eta, request.seed)
    assert got.shape == expected.shape == (1, 3, 2 * SIZE, 2 * SIZE)
    assert (got - expected).abs().max() < TOL
    if eta == 0.0:
        other = pipeline_images(pipeline, from_pil(picture(1)), request.steps, eta, request.seed)
        assert (other - expected).abs().max() > 100 * TOL, "the low-resolution image should matter"


@torch.no_grad()
def test_the_upscale_task_gives_the_pipelines_image(ours_and_pipeline):
    """The whole task (bsr_sr's default path, no tiling) against the pipeline's picture: equal to one
    level of 8-bit rounding."""
    loaded, pipeline = ours_and_pipeline
    request = GenerationRequest("", steps=4, scale=1.0, eta=1.0, seed=4)
    result = upscale(loaded, picture(2), request, tiles=InputTiles(0, 0))
    expected = pipeline_images(pipeline, from_pil(picture(2)), 4, 1.0, 4)[0].permute(1, 2, 0).numpy() * 255
    got = np.asarray(result.images[0], dtype=np.float32)
    assert got.shape == (2 * SIZE, 2 * SIZE, 3)
    assert np.abs(got - expected).max() <= 1.0
