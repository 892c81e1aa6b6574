"""A latent diffusion model: first stage (autoencoder), conditioning stage tau_theta, and the UNet.

Submodule names are the top level of the original checkpoints: ``model.diffusion_model`` (the UNet
inside its wrapper), ``first_stage_model`` and ``cond_stage_model``, which SDXL's files (sgm's
``DiffusionEngine``) call ``conditioner``. The engine keeps no per-call
state here: prompts, seeds and scales are arguments of the methods and of the samplers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.devices import returning_freed_memory
from ldm.models.autoencoder import Autoencoder, AutoencoderConfig, DiagonalGaussian
from ldm.models.autoencoder_tiling import tiled_decode, tiled_encode
from ldm.models.clip import CLIPTextEncoder, CLIPTextEncoderConfig, OpenCLIPTextEncoder, OpenCLIPTextEncoderConfig
from ldm.models.ldm_bert import TransformerEmbedder, TransformerEmbedderConfig
from ldm.models.sdxl_conditioner import SDXLConditioner, SDXLConditionerConfig, SizeConditioning
from ldm.models.spatial_rescaler import SpatialRescaler, SpatialRescalerConfig
from ldm.models.unet import UNetConfig, UNetModel
from ldm.sampling.denoiser import EpsDenoiser, check_parameterization
from ldm.sampling.schedules import ScheduleConfig, make_alphas_cumprod
from ldm.text.prompt_syntax import strip_syntax

CONDITIONING_KEYS = ("crossattn", "concat", "hybrid", "none")
# What a concat/hybrid model's extra UNet input channels carry, after x (the original's c_concat):
CONCAT_INPUTS = (
    "none",
    "low_res_image",           # an RGB image in [-1, 1] at latent size (LDM-BSR, the x4 upscaler): 3 channels
    "mask_and_masked_latent",  # SD inpainting: [mask (1 = fill), masked-image latent]
    "masked_latent_and_mask",  # LDM inpainting_big: [masked-image latent, mask in [-1, 1]]
    "segmentation",            # semantic synthesis: the conditioning stage's map of a segmentation
)
CondStageConfig = (CLIPTextEncoderConfig | OpenCLIPTextEncoderConfig | TransformerEmbedderConfig | SpatialRescalerConfig
                   | SDXLConditionerConfig)


@dataclass(frozen=True)
class NoiseAugmentationConfig:
    """Noise augmentation of a concatenated low-resolution image (the x4 upscaler's
    ``ImageConcatWithNoiseAugmentation``): the image is diffused to a noise level in
    0..max_noise_level under its own ``schedule``, and the level is the UNet's class label."""

    schedule: ScheduleConfig
    max_noise_level: int

    def __post_init__(self):
        if not 0 <= self.max_noise_level < self.schedule.timesteps:
            raise ValueError(f"max_noise_level must be from 0 to {self.schedule.timesteps - 1}, got {self.max_noise_level}")


@dataclass(frozen=True)
class FirstStageConditionerConfig:
    """The original's ``cond_stage_config: __is_first_stage__`` (LDM inpainting_big): the conditioning
    stage is the first stage itself, which encodes the masked image. No module of its own is built, so
    the model's keys are the original's; a file may still hold ``cond_stage_model.*`` copies of the
    first stage's tensors (the original registers the same module twice), which the loader checks."""


@dataclass(frozen=True)
class LatentDiffusionConfig:
    unet: UNetConfig
    first_stage: AutoencoderConfig
    cond_stage: CondStageConfig | FirstStageConditionerConfig | None
    schedule: ScheduleConfig
    parameterization: str = "eps"
    scale_factor: float = 1.0
    conditioning: str = "crossattn"
    latent_size: int = 64  # the latent side the UNet was trained at
    noise_augmentation: NoiseAugmentationConfig | None = None
    concat_input: str = "none"  # one of CONCAT_INPUTS; must be set for concat and hybrid conditioning

    def __post_init__(self):
        check_parameterization(self.parameterization)
        if self.first_stage_conditions and self.concat_input != "masked_latent_and_mask":
            raise ValueError(f"cond_stage kind first_stage encodes a masked image for concat_input 'masked_latent_and_mask', "
                             f"not {self.concat_input!r}")
        if self.noise_augmentation is not None and not isinstance(self.unet.num_classes, int):
            raise ValueError("noise augmentation gives the UNet its noise level as a class label: set unet.num_classes")
        if self.conditioning not in CONDITIONING_KEYS:
            raise ValueError(f"conditioning {self.conditioning!r} is not known; use one of {', '.join(CONDITIONING_KEYS)}")
        if self.conditioning in ("crossattn", "hybrid") and self.cond_stage is None:
            raise ValueError(f"conditioning {self.conditioning!r} needs a cond_stage")
        if self.concat_input not in CONCAT_INPUTS:
            raise ValueError(f"concat_input {self.concat_input!r} is not known; use one of {', '.join(CONCAT_INPUTS)}")
        if (self.conditioning in ("concat", "hybrid")) != (self.concat_input != "none"):
            raise ValueError(f"conditioning {self.conditioning!r} with concat_input {self.concat_input!r}: concat and "
                             "hybrid models name what their extra input channels carry, other models take none")
        if isinstance(self.cond_stage, SDXLConditionerConfig):
            self._check_adm_vector(self.cond_stage)
        extra = {"low_res_image": 3, "mask_and_masked_latent": self.latent_channels + 1,
                 "masked_latent_and_mask": self.latent_channels + 1}.get(self.concat_input)
        if self.concat_input == "segmentation":
            if not isinstance(self.cond_stage, SpatialRescalerConfig):
                raise ValueError("concat_input 'segmentation' needs a spatial_rescaler cond_stage (it maps the segmentation "
                                 "to the latent size)")
            extra = self.cond_stage.out_channels
            if self.cond_stage.downsampling_factor != self.downsampling_factor:
                raise ValueError(f"the spatial_rescaler reduces the segmentation {self.cond_stage.downsampling_factor}x, "
                                 f"but the latent is {self.downsampling_factor}x smaller than the image")
        if extra is not None and self.unet.in_channels != self.latent_channels + extra:
            raise ValueError(f"concat_input {self.concat_input!r} gives the UNet {self.latent_channels + extra} input "
                             f"channels ({self.latent_channels} latent + {extra}), but unet.in_channels is {self.unet.in_channels}")

    def _check_adm_vector(self, cond: SDXLConditionerConfig) -> None:
        if self.unet.context_dim != cond.context_dim:
            raise ValueError(f"the SDXL conditioner's contexts are {cond.context_dim} wide together, but unet.context_dim "
                             f"is {self.unet.context_dim}")
        if self.unet.num_classes != "sequential" or self.unet.adm_in_channels != cond.adm_channels:
            raise ValueError(f"the SDXL conditioner gives an ADM vector of {cond.adm_channels} (pooled "
                             f"{cond.open_clip.embed_dim} + {cond.fourier_dim} per number of {', '.join(cond.vector_inputs)}); "
                             f"the UNet needs num_classes 'sequential' and adm_in_channels {cond.adm_channels}, "
                             f"not {self.unet.num_classes!r} and {self.unet.adm_in_channels}")

    @property
    def cond_stage_name(self) -> str:
        """The conditioning stage's name in the checkpoints: ``conditioner`` in SDXL's (sgm), else ``cond_stage_model``."""
        return "conditioner" if isinstance(self.cond_stage, SDXLConditionerConfig) else "cond_stage_model"

    @property
    def first_stage_conditions(self) -> bool:
        """The first stage is the conditioning stage (``__is_first_stage__``)."""
        return isinstance(self.cond_stage, FirstStageConditionerConfig)

    @property
    def latent_channels(self) -> int:
        return self.first_stage.embed_dim

    @property
    def downsampling_factor(self) -> int:
        """Image pixels per latent pixel (the first stage's f)."""
        return self.first_stage.downsampling_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the first stage's f times the UNet's downsampling."""
        return self.first_stage.downsampling_factor * self.unet.downsampling_factor


def build_cond_stage(config: CondStageConfig | None) -> nn.Module | None:
    if config is None:
        return None
    if isinstance(config, CLIPTextEncoderConfig):
        return CLIPTextEncoder(config)
    if isinstance(config, OpenCLIPTextEncoderConfig):
        return OpenCLIPTextEncoder(config)
    if isinstance(config, SpatialRescalerConfig):
        return SpatialRescaler(config)
    if isinstance(config, SDXLConditionerConfig):
        return SDXLConditioner(config)
    return TransformerEmbedder(config)


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model``, the name the checkpoints use."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class LatentDiffusion(nn.Module):
    def __init__(self, config: LatentDiffusionConfig):
        super().__init__()
        self.config = config
        self.model = DiffusionWrapper(UNetModel(config.unet))
        self.first_stage_model = Autoencoder(config.first_stage)
        # A first stage that conditions (inpainting_big) is not registered twice: no cond_stage_model keys.
        # Registered under the checkpoints' name for it (``cond_stage_name``), which ``cond_stage_model`` reads
        # (set in ``_modules`` itself: ``add_module`` refuses a name the class has as a property).
        self._modules[config.cond_stage_name] = None if config.first_stage_conditions else build_cond_stage(config.cond_stage)
        # float64 on the CPU: the samplers read their coefficients from it as Python floats.
        self.alphas_cumprod = make_alphas_cumprod(config.schedule)
        augmentation = config.noise_augmentation
        self.low_scale_alphas_cumprod = None if augmentation is None else make_alphas_cumprod(augmentation.schedule)

    @property
    def cond_stage_model(self) -> nn.Module | None:
        """The conditioning stage, whatever the checkpoints call it (``conditioner`` in SDXL's)."""
        return self._modules[self.config.cond_stage_name]

    @property
    def takes_adm_vector(self) -> bool:
        """SDXL: the UNet takes a vector ``y`` of pooled text and size conditioning beside the context."""
        return isinstance(self.cond_stage_model, SDXLConditioner)

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.time_embed[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.time_embed[0].weight.device

    def denoiser(self) -> EpsDenoiser:
        return EpsDenoiser(self.unet, self.alphas_cumprod, self.config.parameterization)

    @property
    def takes_layout(self) -> bool:
        return isinstance(self.cond_stage_model, TransformerEmbedder) and self.cond_stage_model.config.max_objects > 0

    @property
    def encodes_tokens(self) -> bool:
        """Whether the conditioning stage encodes prompts or layout tokens (and needs a tokenizer);
        False without one and for a spatial conditioner (semantic synthesis's segmentation maps)."""
        return isinstance(self.cond_stage_model, (CLIPTextEncoder, OpenCLIPTextEncoder, TransformerEmbedder, SDXLConditioner))

    def segmentation_concat(self, labels: torch.Tensor) -> torch.Tensor:
        """The concat channels of a semantic synthesis model: label maps (B, H, W) of class indices,
        one-hot, through the spatial conditioner to (B, out_channels, H / f, W / f)."""
        if not isinstance(self.cond_stage_model, SpatialRescaler):
            raise ValueError("this model takes no segmentation map (its conditioning stage is not a spatial rescaler)")
        return self.cond_stage_model.encode_labels(labels).to(self.dtype)

    @property
    def reads_emphasis(self) -> bool:
        """Whether the text encoder applies A1111's emphasis weights (CLIP and OpenCLIP); the others get
        the prompt's text with the syntax removed."""
        return isinstance(self.cond_stage_model, (CLIPTextEncoder, OpenCLIPTextEncoder, SDXLConditioner))

    def encode_prompts(self, prompts: list[str], min_chunks: int = 1, layouts: list | None = None,
                       emphasis: str = "Original", embeddings: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Conditioning tokens (B, N, context_dim) for prompts in A1111's emphasis syntax (weights applied
        as ``emphasis`` says where the encoder reads them, the syntax removed where it does not), and for
        layouts (lists of (label, x0, y0, x1, y1) boxes) on models that take them. ``embeddings`` (name ->
        (n_vec, context_dim) vectors, ``ldm.addons.embeddings``) stand for their names on CLIP and OpenCLIP
        encoders; other encoders read the names as words."""
        if not self.encodes_tokens:
            raise ValueError("this model takes no text prompt (it has no text conditioning stage)")
        if layouts is not None and any(layouts) and not self.takes_layout:
            raise ValueError("this model takes no layout boxes; use region prompts instead")
        if isinstance(self.cond_stage_model, TransformerEmbedder):
            plain = [strip_syntax(p) for p in prompts]
            return self.cond_stage_model.encode(plain, layouts=layouts).to(self.dtype)
        if self.takes_adm_vector:
            return self.cond_stage_model.encode_text(prompts, min_chunks, emphasis, embeddings).context.to(self.dtype)
        if embeddings and self.reads_emphasis:
            return self.cond_stage_model.encode(prompts, min_chunks, emphasis, embeddings=embeddings).to(self.dtype)
        return self.cond_stage_model.encode(prompts, min_chunks, emphasis).to(self.dtype)

    def encode_conditioning(self, prompts: list[str], *, negative: list[bool], sizes: list[SizeConditioning] | None = None,
                            layouts: list | None = None, emphasis: str = "Original",
                            embeddings: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The UNet's conditioning of each prompt as denoiser arguments: ``context`` (B, N, context_dim),
        and on SDXL the ADM vector ``y`` from ``sizes`` (one per prompt), where an empty prompt that is a
        ``negative`` one gets zeros for its text as AUTOMATIC1111 gives it (its size embeddings stay)."""
        if not self.takes_adm_vector:
            return {"context": self.encode_prompts(prompts, layouts=layouts, emphasis=emphasis, embeddings=embeddings)}
        if sizes is None or len(sizes) != len(prompts) or len(negative) != len(prompts):
            raise ValueError("an SDXL model needs one size conditioning and one negative flag per prompt")
        if layouts is not None and any(layouts):
            raise ValueError("this model takes no layout boxes; use region prompts instead")
        zero = [is_negative and prompt == "" for prompt, is_negative in zip(prompts, negative)]
        encoded = self.cond_stage_model.encode(prompts, sizes, zero, emphasis=emphasis, embeddings=embeddings)
        return {key: value.to(self.dtype) for key, value in encoded.items()}

    def encode_first_stage(self, images: torch.Tensor, generator: torch.Generator | None = None, tile: int = 0) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) to scaled latents. A KL posterior is sampled with ``generator``
        (its mean when None); a VQ model returns its pre-quantisation latent. ``tile`` > 0 encodes in
        tiles with whole-image normalisation."""
        first = self.first_stage_model
        images = images.to(self.device, first.decoder.conv_in.weight.dtype)
        if tile:
            with returning_freed_memory():
                encoded = tiled_encode(first, images, tile)
        else:
            encoded = first.encode(images)
        latent = encoded.sample(generator) if isinstance(encoded, DiagonalGaussian) else encoded
        return self.config.scale_factor * latent.to(self.dtype)

    @property
    def inpaints_natively(self) -> bool:
        """A model whose UNet takes a mask and the masked image's latent: SD's [x, mask, masked latent]
        or LDM inpainting_big's [x, masked latent, mask]."""
        return self.config.concat_input in ("mask_and_masked_latent", "masked_latent_and_mask")

    def inpainting_concat(self, images: torch.Tensor, mask: torch.Tensor, tile: int = 0) -> torch.Tensor:
        """The concat channels [mask, masked-image latent] at latent size. ``images`` (B, 3, H, W) in
        [-1, 1]; ``mask`` (B, 1, H, W), 1 where the image is to be filled. A latent pixel counts as
        masked when any of its pixels is. An all-ones mask is "no mask": generate everything."""
        if self.config.concat_input == "masked_latent_and_mask":
            return self._ldm_inpainting_concat(images, mask, tile)
        f = self.config.downsampling_factor
        masked_latent = self.encode_first_stage(images * (1 - mask), tile=tile)
        latent_mask = torch.nn.functional.max_pool2d(mask.float(), f).to(masked_latent)
        return torch.cat([latent_mask, masked_latent], dim=1)

    def _ldm_inpainting_concat(self, images: torch.Tensor, mask: torch.Tensor, tile: int) -> torch.Tensor:
        """LDM inpainting_big's concat [masked-image latent, mask], as its scripts/inpaint.py builds it:
        the masked image is (1 - mask) * image in [0, 1] (black where masked), then it and the mask go
        to [-1, 1]; the first stage (the conditioning stage) encodes the masked image to its
        pre-quantisation latent, unscaled; the mask is resized to latent size by nearest neighbour."""
        mask = (mask >= 0.5).to(images)
        masked = (1 - mask) * (images + 1) - 1  # ((1 - mask) * (images + 1) / 2) * 2 - 1
        latent = self.encode_first_stage(masked, tile=tile) / self.config.scale_factor
        latent_mask = F.interpolate(mask * 2 - 1, size=latent.shape[-2:], mode="nearest").to(latent)
        return torch.cat([latent, latent_mask], dim=1)

    def augment_low_res(self, images: torch.Tensor, noise_level: int, noise: torch.Tensor) -> torch.Tensor:
        """The low-resolution ``images`` (B, 3, h, w) in [-1, 1] diffused to ``noise_level`` under the
        augmentation schedule with the given standard normal ``noise``:
        sqrt(abar) * images + sqrt(1 - abar) * noise (the original's q_sample)."""
        if self.low_scale_alphas_cumprod is None:
            raise ValueError("this model has no noise augmentation of its low-resolution input")
        alpha_bar = float(self.low_scale_alphas_cumprod[noise_level])
        return alpha_bar**0.5 * images + (1 - alpha_bar) ** 0.5 * noise.to(images)

    def decode_first_stage(self, latents: torch.Tensor, tile: int = 0) -> torch.Tensor:
        """Scaled latents to images in about [-1, 1] (not clamped); in tiles of ``tile`` at each level
        of the decoder when ``tile`` > 0, with whole-image normalisation (``autoencoder_tiling``)."""
        first = self.first_stage_model
        z = (latents / self.config.scale_factor).to(first.decoder.conv_in.weight.dtype)
        if not tile:
            return first.decode(z)
        with returning_freed_memory():
            return tiled_decode(first, z, tile)
