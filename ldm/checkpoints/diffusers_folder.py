"""Stable Diffusion models saved as diffusers folders, read into the original single-file layout.

A diffusers folder holds ``model_index.json`` (naming the pipeline class and its components) and one
subfolder per component: ``unet/``, ``vae/``, ``text_encoder/`` (a ``config.json`` and the weights,
``diffusion_pytorch_model.safetensors`` / ``model.safetensors``, ``.bin`` pickles, or their ``.fp16``
variants), ``tokenizer/`` (vocab.json, merges.txt) and ``scheduler/`` (``scheduler_config.json``).

The weights are renamed back to the keys of the original checkpoints (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.*``), so that a folder goes through the same
detect -> registry -> strict load -> report path as a single file. The renaming is the inverse of
diffusers' single-file converters; every key must match a known pattern, and one that does not
is an error naming its file.

SDXL folders (``StableDiffusionXLPipeline``, and the refiner's ``StableDiffusionXLImg2ImgPipeline``) hold
two text encoders: ``text_encoder`` (CLIP ViT-L, absent in the refiner's) and ``text_encoder_2`` (the
OpenCLIP bigG tower as transformers' CLIPTextModelWithProjection); they go to sgm's
``conditioner.embedders.N`` in that order, and the UNet's ``add_embedding`` to ``label_emb``. The bigG's
``logit_scale``, which transformers' model does not have and sampling never reads, is filled with zeros.

What the folder states is read as a single file's metadata would be: the prediction type from
``scheduler/scheduler_config.json`` (``epsilon`` -> eps, ``v_prediction`` -> v).

SD 2.x folders carry a text tower one block shorter than the original OpenCLIP one (SD 2 reads the
penultimate block, so diffusers drops the last, and the text projection with it). The model is built
as the preset describes it; the tensors it never runs are filled by :func:`fill_unused` and named
in the load report: the last block with zeros (a zero residual block is the identity, so the tower
computes the same whichever block is read), the projection and logit scale with zeros.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.io import read_key_shapes, read_state_dict
from ldm.models.clip import OpenCLIPTextEncoderConfig
from ldm.models.latent_diffusion import LatentDiffusionConfig
from ldm.models.sdxl_conditioner import SDXLConditionerConfig
from ldm.sampling.schedules import ScheduleConfig

log = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
# The pipeline classes loaded, with the components each needs beyond unet, vae and scheduler.
PIPELINES = {
    "StableDiffusionPipeline": ("text_encoder",),
    "StableDiffusionInpaintPipeline": ("text_encoder",),
    "StableDiffusionUpscalePipeline": ("text_encoder", "low_res_scheduler"),
    "StableDiffusionXLPipeline": ("text_encoder", "text_encoder_2"),
    "StableDiffusionXLImg2ImgPipeline": ("text_encoder_2",),  # the refiner's; a base saved so has text_encoder too
}
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")
# Full precision first, as diffusers loads when no variant is asked for.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".fp16.safetensors", ".fp16.bin")
SCHEDULER_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}
SCHEDULER_KINDS = {"scaled_linear": "linear", "linear": "sqrt_linear"}  # diffusers' beta_schedule -> ours
UNSTATED = "unstated"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."

Tensors = dict[str, torch.Tensor]


def is_diffusers_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / MODEL_INDEX).is_file()


# ---------------------------------------------------------------- the folder and what it states


@dataclass(frozen=True)
class DiffusersFolder:
    root: Path
    pipeline: str  # the class model_index.json names
    index: dict  # model_index.json

    def component(self, name: str) -> Path:
        return self.root / name

    def config(self, name: str, file: str = "config.json") -> dict:
        return _read_json(self.root / name / file)

    @property
    def prediction(self) -> str:
        """What the scheduler states the UNet predicts: "eps", "v", another word as written, or "unstated"."""
        stated = self.config("scheduler", "scheduler_config.json").get("prediction_type")
        if not isinstance(stated, str) or not stated:
            return UNSTATED
        return SCHEDULER_PREDICTIONS.get(stated, stated)

    @property
    def is_sdxl(self) -> bool:
        return self.pipeline in SDXL_PIPELINES

    def has(self, name: str) -> bool:
        """Whether model_index.json lists the component (the refiner's lists ``text_encoder`` as null)."""
        return _listed(self.index, name) and (self.root / name).is_dir()

    @property
    def text_encoders(self) -> tuple[str, ...]:
        if not self.is_sdxl:
            return ("text_encoder",)
        return tuple(name for name in ("text_encoder", "text_encoder_2") if self.has(name))

    @property
    def tokenizer_dir(self) -> Path | None:
        """``tokenizer/`` (SDXL's refiner: ``tokenizer_2/``, the same BPE) when it holds CLIP's vocab.json and
        merges.txt (as published folders do); else None, and the tokenizer is looked up as for a single file
        (transformers 5 saves only a tokenizer.json)."""
        folder = self.root / "tokenizer"
        if self.is_sdxl and not self.has("tokenizer"):
            folder = self.root / "tokenizer_2"
        if all((folder / name).is_file() for name in ("vocab.json", "merges.txt")):
            return folder
        log.warning("%s has no vocab.json and merges.txt; the CLIP tokenizer is looked up as for a single file "
                    "(pass --tokenizer FOLDER to choose one)", folder)
        return None

    def metadata(self) -> dict[str, object]:
        """What ``inspect`` shows beside the tensors."""
        return {"pipeline": self.pipeline, "scheduler prediction_type": self.prediction,
                "diffusers version": self.index.get("_diffusers_version", "?")}


def _read_json(path: Path) -> dict:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError.for_file(path, "is missing", "A diffusers folder needs it; copy the whole folder again") from None
    except (OSError, ValueError) as error:
        raise CheckpointError.for_file(path, f"cannot be read as JSON ({error})") from None
    if not isinstance(document, dict):
        raise CheckpointError.for_file(path, f"holds a {type(document).__name__}, not a JSON object")
    return document


def open_folder(path: str | Path) -> DiffusersFolder:
    """A diffusers folder whose pipeline class we load and whose components are all present."""
    root = Path(path)
    if not is_diffusers_folder(root):
        raise CheckpointError.for_file(root, f"is a folder without {MODEL_INDEX}, so not a diffusers pipeline folder",
                                       "Point to a checkpoint file, or to the folder that holds model_index.json")
    index = _read_json(root / MODEL_INDEX)
    pipeline = index.get("_class_name")
    if pipeline not in PIPELINES:
        raise CheckpointError.for_file(
            root, f"is a diffusers folder of a {pipeline} pipeline, which is not loaded here",
            f"Supported pipelines: {', '.join(PIPELINES)}")
    needed = ("unet", "vae", "scheduler", *PIPELINES[pipeline])
    missing = [name for name in needed if not _listed(index, name) or not (root / name).is_dir()]
    if missing:
        raise CheckpointError.for_file(
            root, f"lacks the component(s) {', '.join(missing)} of its {pipeline} (model_index.json and "
            "a subfolder for each)", f"A {pipeline} folder needs {', '.join(needed)}; copy the whole folder again")
    return DiffusersFolder(root, pipeline, index)


def _listed(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def weight_file(folder: Path) -> Path:
    """A component's weights: the full-precision file if there is one, else its fp16 variant."""
    for suffix in WEIGHT_SUFFIXES:
        for name in WEIGHT_NAMES:
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    if any(folder.glob("*.index.json")):
        raise CheckpointError.for_file(folder, "holds weights split into shards, which are not read here",
                                       "Save the pipeline with a larger max_shard_size")
    names = ", ".join(f"{n}{s}" for n in WEIGHT_NAMES[:2] for s in WEIGHT_SUFFIXES[:1])
    raise CheckpointError.for_file(folder, f"has no weights file (looked for {names}, .bin and .fp16 variants)",
                                   "Copy the whole diffusers folder again")


def weight_files(path: str | Path) -> list[Path]:
    """The weights files a folder's model is read from, in a fixed order (for hashing)."""
    folder = open_folder(path)
    return [weight_file(folder.component(name)) for name in ("unet", "vae", *folder.text_encoders)]


# ---------------------------------------------------------------- UNet2DConditionModel -> model.diffusion_model.*

UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    "class_embedding": "label_emb",  # the x4 upscaler's noise-level embedding (nn.Embedding)
    "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",  # SDXL's ADM vector
}
UNET_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
_TRANSFORMER = re.compile(
    r"(norm|proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|norm[123]))"
)
_UNET_PART = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_UNET_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def unet_to_original(state: Tensors, layers_per_block: int, source: Path) -> Tensors:
    """diffusers' UNet keys -> the original ``model.diffusion_model.*`` keys. Each down block holds
    ``layers_per_block`` res blocks (and attentions) and a downsampler, each up block one more."""
    has_attention = {int(m.group(1)) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, tensor in state.items():
        module, param = key.rsplit(".", 1)
        name = _unet_module(module, layers_per_block, has_attention)
        if name is None:
            raise _unmapped(source, key, "UNet2DConditionModel")
        out[f"{UNET_PREFIX}{name}.{param}"] = tensor
    return out


def _unet_module(module: str, per_block: int, has_attention: set[int]) -> str | None:
    if module in UNET_TOP:
        return UNET_TOP[module]
    if m := _UNET_MID.fullmatch(module):
        kind, index, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "resnets" and index < 2 and rest in UNET_RESNET:
            return f"middle_block.{2 * index}.{UNET_RESNET[rest]}"
        if kind == "attentions" and index == 0 and _TRANSFORMER.fullmatch(rest):
            return f"middle_block.1.{rest}"
        return None
    m = _UNET_PART.fullmatch(module)
    if m is None:
        return None
    side, block, kind, index, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    if side == "down_blocks":
        first = 1 + block * (per_block + 1)  # input_blocks.0 is conv_in
        if kind == "resnets" and rest in UNET_RESNET:
            return f"input_blocks.{first + index}.0.{UNET_RESNET[rest]}"
        if kind == "attentions" and _TRANSFORMER.fullmatch(rest):
            return f"input_blocks.{first + index}.1.{rest}"
        if kind == "downsamplers" and index == 0 and rest == "conv":
            return f"input_blocks.{first + per_block}.0.op"
        return None
    first = block * (per_block + 1)
    if kind == "resnets" and rest in UNET_RESNET:
        return f"output_blocks.{first + index}.0.{UNET_RESNET[rest]}"
    if kind == "attentions" and _TRANSFORMER.fullmatch(rest):
        return f"output_blocks.{first + index}.1.{rest}"
    if kind == "upsamplers" and index == 0 and rest == "conv":
        # The upsampler follows the last res block, and its attention where the block has one.
        return f"output_blocks.{first + per_block}.{2 if block in has_attention else 1}.conv"
    return None


# ---------------------------------------------------------------- AutoencoderKL -> first_stage_model.*

VAE_TOP = {"conv_in", "conv_out", "quant_conv", "post_quant_conv"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
# Current diffusers names, then those of folders saved before diffusers 0.14.
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                 "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_VAE_PART = re.compile(r"(encoder|decoder)\.(down_blocks|up_blocks|mid_block)\.(.+)")


def vae_to_original(state: Tensors, up_blocks: int, source: Path) -> Tensors:
    """diffusers' AutoencoderKL keys -> ``first_stage_model.*``. The decoder's up blocks run in the
    opposite order of the original's ``up.N``; the mid-block attention's Linear layers become the
    original 1x1 convolutions."""
    out = {}
    for key, tensor in state.items():
        module, param = key.rsplit(".", 1)
        name = _vae_module(module, up_blocks)
        if name is None:
            raise _unmapped(source, key, "AutoencoderKL")
        if ".mid.attn_1." in f".{name}." and param == "weight" and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)  # Linear (C, C) -> Conv2d 1x1 (C, C, 1, 1)
        out[f"{VAE_PREFIX}{name}.{param}"] = tensor
    return out


def _vae_module(module: str, up_blocks: int) -> str | None:
    if module in VAE_TOP:
        return module
    if m := re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)", module):
        return f"{m.group(1)}.{m.group(2).replace('conv_norm_out', 'norm_out')}"
    m = _VAE_PART.fullmatch(module)
    if m is None:
        return None
    side, part, rest = m.groups()
    if part == "mid_block":
        if r := re.fullmatch(r"resnets\.([01])\.(\w+)", rest):
            return f"{side}.mid.block_{int(r.group(1)) + 1}.{VAE_RESNET[r.group(2)]}" if r.group(2) in VAE_RESNET else None
        if (r := re.fullmatch(r"attentions\.0\.(.+)", rest)) and r.group(1) in VAE_ATTENTION:
            return f"{side}.mid.attn_1.{VAE_ATTENTION[r.group(1)]}"
        return None
    r = re.fullmatch(r"(\d+)\.(resnets\.(\d+)\.(\w+)|downsamplers\.0\.conv|upsamplers\.0\.conv)", rest)
    if r is None or (side, part) not in (("encoder", "down_blocks"), ("decoder", "up_blocks")):
        return None
    block = int(r.group(1)) if part == "down_blocks" else up_blocks - 1 - int(r.group(1))
    level = f"{side}.{'down' if part == 'down_blocks' else 'up'}.{block}"
    if r.group(3) is not None:
        return f"{level}.block.{r.group(3)}.{VAE_RESNET[r.group(4)]}" if r.group(4) in VAE_RESNET else None
    return f"{level}.{'downsample' if part == 'down_blocks' else 'upsample'}.conv"


# ---------------------------------------------------------------- CLIPTextModel -> cond_stage_model.*

_CLIP_KEY = re.compile(
    r"(embeddings\.(token_embedding|position_embedding)\.weight|final_layer_norm\.(weight|bias)|"
    r"encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|layer_norm[12]|mlp\.fc[12])\.(weight|bias))"
)


def _text_keys(state: Tensors) -> Tensors:
    """The text model's own keys: transformers before 5 saved them under ``text_model.``; the position
    ids buffer that transformers 4 saved is dropped (the model recreates it)."""
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


def clip_to_original(state: Tensors, source: Path, prefix: str = CLIP_PREFIX) -> Tensors:
    """SD v1: the original stores transformers' CLIPTextModel itself, under ``cond_stage_model.transformer.``
    (SDXL's first encoder: ``conditioner.embedders.0.transformer.``)."""
    out = {}
    for key, tensor in _text_keys(state).items():
        if not _CLIP_KEY.fullmatch(key):
            raise _unmapped(source, key, "CLIPTextModel")
        out[prefix + key] = tensor
    return out


OPEN_CLIP_NAMES = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias",
}
OPEN_CLIP_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def open_clip_to_original(state: Tensors, source: Path, prefix: str = OPEN_CLIP_PREFIX) -> Tensors:
    """SD 2.x: transformers' CLIPTextModel -> OpenCLIP's text tower under ``cond_stage_model.model.``
    (SDXL's bigG: ``conditioner.embedders.N.model.``).
    The q, k and v projections are stacked into ``attn.in_proj_weight``/``bias`` (q first), as
    ``torch.nn.MultiheadAttention`` holds them; a ``text_projection.weight`` (CLIPTextModelWithProjection)
    is the transpose of OpenCLIP's ``text_projection``."""
    out, qkv = {}, {}
    for key, tensor in _text_keys(state).items():
        if key in OPEN_CLIP_NAMES:
            out[prefix + OPEN_CLIP_NAMES[key]] = tensor
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
        elif (m := _LAYER.fullmatch(key)) and m.group(2) in OPEN_CLIP_BLOCK:
            out[f"{prefix}transformer.resblocks.{m.group(1)}.{OPEN_CLIP_BLOCK[m.group(2)]}.{m.group(3)}"] = tensor
        elif (m := _LAYER.fullmatch(key)) and m.group(2) in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)[-6]] = tensor
        else:
            raise _unmapped(source, key, "CLIPTextModel (OpenCLIP layout)")
    for (layer, param), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            key = f"encoder.layers.{layer}.self_attn.*_proj.{param}"
            raise CheckpointError.for_file(source, f"has only the {', '.join(sorted(parts))} part(s) of {key}",
                                           "Copy the folder again")
        stacked = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # (3W, W) or (3W,)
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}"] = stacked
    return out


def _unmapped(source: Path, key: str, kind: str) -> CheckpointError:
    return CheckpointError.for_file(
        source, f"has a tensor {key!r} that is not part of a Stable Diffusion {kind}",
        "The folder may hold a different architecture; it cannot be loaded strictly")


# ---------------------------------------------------------------- the whole folder


def _config_value(folder: DiffusersFolder, component: str, key: str, kind: type):
    value = folder.config(component).get(key)
    if type(value) is not kind:
        raise CheckpointError.for_file(folder.component(component) / "config.json",
                                       f"has {key} = {value!r}; expected a {kind.__name__}")
    return value


def text_layout(folder: DiffusersFolder) -> str:
    """"clip" (OpenAI's CLIP, SD v1, quick GELU) or "open_clip" (OpenCLIP ViT-H, SD 2.x, plain GELU),
    from the text encoder's activation."""
    activation = folder.config("text_encoder").get("hidden_act")
    layouts = {"quick_gelu": "clip", "gelu": "open_clip"}
    if activation not in layouts:
        raise CheckpointError.for_file(
            folder.component("text_encoder") / "config.json",
            f"has hidden_act {activation!r}; a Stable Diffusion text encoder has quick_gelu (CLIP, SD v1) or gelu (OpenCLIP, SD 2.x)")
    return layouts[activation]


class Component(NamedTuple):
    weights: Path
    to_original: Callable[[Tensors], Tensors]  # the component's keys -> the original single file's


def _components(folder: DiffusersFolder) -> list[Component]:
    """The UNet, VAE and text encoder(s): each one's weights file and key map."""
    per_block = _config_value(folder, "unet", "layers_per_block", int)
    up_blocks = len(_config_value(folder, "vae", "up_block_types", list))
    unet, vae = (weight_file(folder.component(n)) for n in ("unet", "vae"))
    parts = [
        Component(unet, lambda state: unet_to_original(state, per_block, unet)),
        Component(vae, lambda state: vae_to_original(state, up_blocks, vae)),
    ]
    if folder.is_sdxl:
        return parts + _sdxl_text_components(folder)
    text = clip_to_original if text_layout(folder) == "clip" else open_clip_to_original
    text_encoder = weight_file(folder.component("text_encoder"))
    return parts + [Component(text_encoder, lambda state: text(state, text_encoder))]


def _sdxl_text_components(folder: DiffusersFolder) -> list[Component]:
    """SDXL: ``text_encoder`` (CLIP ViT-L, where there is one) then ``text_encoder_2`` (the bigG), as sgm's
    ``conditioner.embedders.0`` and the next."""
    parts = []
    if folder.has("text_encoder"):
        clip = weight_file(folder.component("text_encoder"))
        parts.append(Component(clip, lambda state: clip_to_original(state, clip, SDXL_CLIP_PREFIX)))
    big_g, prefix = weight_file(folder.component("text_encoder_2")), f"conditioner.embedders.{len(parts)}.model."
    return parts + [Component(big_g, lambda state: open_clip_to_original(state, big_g, prefix))]


def read_folder_state(path: str | Path) -> Tensors:
    """Every tensor of a diffusers folder, on CPU in its stored dtype, under the original keys."""
    state: Tensors = {}
    for file, to_original in _components(open_folder(path)):
        state.update(to_original(read_state_dict(file)))
    return state


def read_folder_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The original keys and shapes of a folder's tensors, from the safetensors headers where it has
    them (the key maps run on meta tensors, so nothing is read or allocated)."""
    shapes = {}
    for file, to_original in _components(open_folder(path)):
        meta = {k: torch.empty(s, device="meta") for k, s in read_key_shapes(file).items()}
        shapes.update({k: tuple(v.shape) for k, v in to_original(meta).items()})
    return shapes


# ---------------------------------------------------------------- what the original model has and the folder lacks


def unused_text_keys(config: LatentDiffusionConfig) -> set[str]:
    """Tensors of the preset's model that the folder's layout does not carry and that sampling never
    reads: for an OpenCLIP tower read at its penultimate block, the last block, the text projection
    and the logit scale."""
    cond = config.cond_stage
    if isinstance(cond, SDXLConditionerConfig):  # transformers' bigG has every block and the projection
        return {f"conditioner.embedders.{0 if cond.clip is None else 1}.model.logit_scale"}
    if not isinstance(cond, OpenCLIPTextEncoderConfig):
        return set()
    keys = {OPEN_CLIP_PREFIX + "text_projection", OPEN_CLIP_PREFIX + "logit_scale"}
    if cond.blocks_run < cond.layers:
        last = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{cond.layers - 1}."
        names = ("ln_1", "attn.in_proj", "attn.out_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
        keys |= {f"{last}{n}{'_' if n == 'attn.in_proj' else '.'}{p}" for n in names for p in ("weight", "bias")}
    return keys


def fill_unused(weights: Tensors, expected: Mapping[str, torch.Tensor], config: LatentDiffusionConfig) -> tuple[str, ...]:
    """Zeros for each tensor of ``unused_text_keys`` missing from ``weights`` (added in place); returns
    their names for the load report. Anything else missing is left for the completeness check."""
    filled = sorted(k for k in unused_text_keys(config) if k in expected and k not in weights)
    for key in filled:
        weights[key] = torch.zeros(expected[key].shape, dtype=torch.float32)
    if filled:
        log.info("filled %d tensors that the folder does not carry and sampling does not use with zeros: %s",
                 len(filled), ", ".join(filled))
    return tuple(filled)


# ---------------------------------------------------------------- the folder against the chosen preset


def check_against_preset(path: str | Path, config: LatentDiffusionConfig, preset_name: str) -> None:
    """The folder's schedules and latent scale are those of the preset (a folder whose tensors fit a preset
    but whose scheduler says otherwise would sample wrongly): raises naming the file and both values. An
    upscaler's VAE scale is not checked, as diffusers' pipeline does not read it."""
    folder = open_folder(path)
    _check_schedule(folder, "scheduler", config.schedule, preset_name)
    scale = folder.config("vae").get("scaling_factor")
    if folder.pipeline == "StableDiffusionUpscalePipeline":
        # diffusers' upscale pipeline sets 0.08333 whatever the VAE config says (published configs lacked it).
        log.debug("%s: the upscaler's VAE scaling_factor %s is not read; the preset's %s is used", path, scale,
                  config.scale_factor)
    elif scale is not None and abs(float(scale) - config.scale_factor) > 1e-6:
        raise CheckpointError.for_file(folder.component("vae") / "config.json",
                                       f"has scaling_factor {scale}, but preset {preset_name} has {config.scale_factor}",
                                       "Pass --preset with a preset of that scale factor")
    augmentation = config.noise_augmentation
    if folder.pipeline == "StableDiffusionUpscalePipeline" and augmentation is not None:
        _check_schedule(folder, "low_res_scheduler", augmentation.schedule, preset_name)
        level = folder.index.get("max_noise_level", augmentation.max_noise_level)
        if level != augmentation.max_noise_level:
            raise CheckpointError.for_file(folder.root / MODEL_INDEX, f"has max_noise_level {level}, but preset "
                                           f"{preset_name} has {augmentation.max_noise_level}")


def _check_schedule(folder: DiffusersFolder, name: str, schedule: ScheduleConfig, preset_name: str) -> None:
    where = folder.component(name) / "scheduler_config.json"
    raw = folder.config(name, "scheduler_config.json")
    stated = {
        "kind": SCHEDULER_KINDS.get(raw.get("beta_schedule", "linear"), raw.get("beta_schedule")),
        "timesteps": raw.get("num_train_timesteps", 1000),
        "linear_start": raw.get("beta_start", 0.0001), "linear_end": raw.get("beta_end", 0.02),
    }
    expected = {"kind": schedule.kind, "timesteps": schedule.timesteps,
                "linear_start": schedule.linear_start, "linear_end": schedule.linear_end}
    differ = [k for k in expected if stated[k] != expected[k] and not (
        isinstance(stated[k], float) and abs(stated[k] - expected[k]) <= 1e-9)]
    if differ:
        shown = ", ".join(f"{k} {stated[k]!r} (preset: {expected[k]!r})" for k in differ)
        raise CheckpointError.for_file(where, f"states a noise schedule that is not preset {preset_name}'s: {shown}",
                                       "Pass --preset with a preset of that schedule")
