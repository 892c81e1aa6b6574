"""The conditioner of Stable Diffusion XL: two text encoders and the ADM vector of size conditioning.

The module tree is the checkpoint contract of sgm's ``GeneralConditioner``: ``embedders.N`` in the
order of the original config's ``emb_models``. The base model's are

- ``embedders.0``: CLIP ViT-L/14 (``transformer.text_model.*``), the output of its penultimate layer
  with no final norm (``FrozenCLIPEmbedder`` layer "hidden", layer_idx 11), (B, 77, 768);
- ``embedders.1``: OpenCLIP ViT-bigG/14 (``model.*``), its penultimate block's output with no
  ``ln_final`` for the context, (B, 77, 1280), and the pooled vector: ``ln_final`` of the last block's
  output at the end token, times ``text_projection`` (``FrozenOpenCLIPEmbedder2``, legacy False);
- ``embedders.2..4``: ``ConcatTimestepEmbedderND`` of the original size (height, width), the crop's
  top-left corner (top, left) and the target size (height, width), each number a 256-wide Fourier
  embedding (the UNet's ``timestep_embedding``). They have no weights, so no module here.

The refiner has one text encoder, the bigG at ``embedders.0``, and the aesthetic score instead of
the target size. The contexts are concatenated along the channels (B, 77 * chunks, 768 + 1280); the
ADM vector ``y`` is [pooled, Fourier embeddings in the order above]: 1280 + 6 * 256 = 2816 for the
base, 1280 + 5 * 256 = 2560 for the refiner.

Rows asked to be zeroed (AUTOMATIC1111 zeroes an empty negative prompt: ``force_zero_embeddings
['txt']``) get zeros for both text outputs, the context and the pooled part of ``y``; their size
embeddings stay, as in the original.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ldm.models.clip import (
    CLIPTextEncoder,
    CLIPTextEncoderConfig,
    OpenCLIPTextEncoder,
    OpenCLIPTextEncoderConfig,
    TextConditioning,
    apply_emphasis,
)
from ldm.models.unet import timestep_embedding

# Each input of the ADM vector and how many numbers it holds, in the order of the original configs.
VECTOR_INPUTS = {"original_size": 2, "crop_coords_top_left": 2, "target_size": 2, "aesthetic_score": 1}


@dataclass(frozen=True)
class SizeConditioning:
    """The numbers of one prompt's ADM vector. Sizes are (height, width) in pixels, the crop (top, left)."""

    original_size: tuple[int, int]
    target_size: tuple[int, int]
    crop_coords_top_left: tuple[int, int] = (0, 0)
    aesthetic_score: float = 6.0

    def numbers(self, name: str) -> tuple[float, ...]:
        value = getattr(self, name)
        return tuple(float(v) for v in value) if isinstance(value, tuple) else (float(value),)


@dataclass(frozen=True)
class SDXLConditionerConfig:
    """The text encoders (``clip`` first when there is one, then ``open_clip``) and the vector's inputs."""

    open_clip: OpenCLIPTextEncoderConfig
    clip: CLIPTextEncoderConfig | None = None
    vector_inputs: tuple[str, ...] = ("original_size", "crop_coords_top_left", "target_size")
    fourier_dim: int = 256

    def __post_init__(self):
        unknown = [name for name in self.vector_inputs if name not in VECTOR_INPUTS]
        if unknown:
            raise ValueError(f"vector_inputs {', '.join(unknown)} are not known; use some of {', '.join(VECTOR_INPUTS)}")

    @property
    def context_dim(self) -> int:
        return (0 if self.clip is None else self.clip.context_dim) + self.open_clip.context_dim

    @property
    def adm_channels(self) -> int:
        """The width of the ADM vector: the pooled vector and each number's Fourier embedding."""
        return self.open_clip.embed_dim + self.fourier_dim * sum(VECTOR_INPUTS[name] for name in self.vector_inputs)


def fourier_embedding(numbers: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, k) numbers -> (B, k * dim): each number's ``timestep_embedding`` (cos, sin), side by side
    (sgm's ``ConcatTimestepEmbedderND``)."""
    b, k = numbers.shape
    return timestep_embedding(numbers.reshape(-1), dim).reshape(b, k * dim)


class SDXLConditioner(nn.Module):
    """``embedders``: [CLIP ViT-L, OpenCLIP bigG] (base) or [OpenCLIP bigG] (refiner). Both read prompts
    with the same CLIP BPE tokenizer, attached after construction (``tokenizer``)."""

    def __init__(self, config: SDXLConditionerConfig):
        super().__init__()
        self.config = config
        encoders = [] if config.clip is None else [CLIPTextEncoder(config.clip)]
        self.embedders = nn.ModuleList([*encoders, OpenCLIPTextEncoder(config.open_clip)])

    @property
    def open_clip(self) -> OpenCLIPTextEncoder:
        return self.embedders[-1]

    @property
    def clip(self) -> CLIPTextEncoder | None:
        return self.embedders[0] if self.config.clip is not None else None

    @property
    def tokenizer(self):
        return self.open_clip.tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        for encoder in self.embedders:
            encoder.tokenizer = tokenizer

    def init_non_persistent_buffers(self) -> None:
        for encoder in self.embedders:
            encoder.init_non_persistent_buffers()

    def encode_text(self, prompts: list[str], min_chunks: int = 1, emphasis: str = "Original",
                    embeddings: Mapping[str, torch.Tensor] | None = None) -> TextConditioning:
        """Prompts in A1111's syntax to the concatenated context (B, 77 * chunks, context_dim), each encoder's
        tokens weighted as ``emphasis`` says, and the bigG's pooled vectors (B, embed_dim). Both encoders
        get the same chunks: the same tokenizer cuts the prompts alike, and only the padding differs
        (CLIP's end token, open_clip's 0)."""
        encoders = list(self.embedders)
        tokens = [encoder.weighted_chunks(prompts, min_chunks, self.embeddings_for(i, embeddings))
                  for i, encoder in enumerate(encoders)]
        contexts = [apply_emphasis(e(t.ids, t.fixes), t.weights, emphasis) for e, t in zip(encoders[:-1], tokens)]
        last = tokens[-1]
        context, pooled = self.open_clip.context_and_pooled(last.ids, last.fixes)
        contexts.append(apply_emphasis(context, last.weights, emphasis))
        return TextConditioning(torch.cat(contexts, dim=-1), pooled)

    def embeddings_for(self, index: int, embeddings: Mapping[str, torch.Tensor] | None) -> Mapping[str, torch.Tensor] | None:
        """Encoder ``index``'s part of SDXL embeddings given as [clip_l | clip_g] side by side (n_vec, 768 + 1280):
        the CLIP ViT-L takes the first columns, the bigG the last (the refiner's only encoder, clip_g)."""
        if not embeddings:
            return embeddings
        width = self.embedders[index].config.context_dim
        last = index == len(self.embedders) - 1
        return {name: (v[:, -width:] if last else v[:, :width]) for name, v in embeddings.items()}

    def vector(self, pooled: torch.Tensor, sizes: list[SizeConditioning]) -> torch.Tensor:
        """The ADM vector (B, adm_channels): [pooled, Fourier embeddings of each of ``vector_inputs``]."""
        if len(sizes) != pooled.shape[0]:
            raise ValueError(f"{len(sizes)} size conditionings for {pooled.shape[0]} prompts")
        parts = [pooled]
        for name in self.config.vector_inputs:
            numbers = torch.tensor([s.numbers(name) for s in sizes], dtype=torch.float32, device=pooled.device)
            parts.append(fourier_embedding(numbers, self.config.fourier_dim).to(pooled.dtype))
        return torch.cat(parts, dim=1)

    def encode(self, prompts: list[str], sizes: list[SizeConditioning], zero: list[bool] | None = None,
               min_chunks: int = 1, emphasis: str = "Original",
               embeddings: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The UNet's conditioning of each prompt: ``context`` (B, N, context_dim) and the ADM vector ``y``.
        Rows where ``zero`` is true get zeros for the text (context and pooled), as the original's
        ``force_zero_embeddings``."""
        text = self.encode_text(prompts, min_chunks, emphasis, embeddings)
        context, pooled = text.context, text.pooled
        if zero is not None and any(zero):
            keep = torch.tensor([not z for z in zero], device=context.device).to(context.dtype)
            context, pooled = context * keep[:, None, None], pooled * keep[:, None]
        return {"context": context, "y": self.vector(pooled, sizes)}
