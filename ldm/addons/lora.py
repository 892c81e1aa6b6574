"""LoRA files (kohya, LoCon, LoHa, LoKr, diffusers/PEFT) read, mapped onto a loaded model, and merged
into its weights for the length of a ``with`` block.

A LoRA file gives, for some Linear and Conv layers, a low-rank change of the weight:

    kohya LoRA / LoCon   dW = up @ down                  (down [r, in(, kh, kw)], up [out, r]; mid for CP)
    LoHa                 dW = (w1a @ w1b) * (w2a @ w2b)  (elementwise product)
    LoKr                 dW = kron(w1, w2)               (w1 = w1a @ w1b where factored, w2 likewise)
    W' = W + multiplier * scale * dW,   scale = alpha / rank (1 when the file gives no alpha; LoKr: 1 unless factored)

The file names each layer in diffusers' naming (``lora_unet_down_blocks_0_attentions_0_..._to_q``,
``lora_te_text_model_encoder_layers_0_self_attn_q_proj``, or PEFT's ``unet.down_blocks.0....lora_A``);
``lora_targets`` names every layer of our model (the original CompVis names) in those namings, so a
key is looked up, never parsed. SD 2.x's text tower is OpenCLIP's: a LoRA's q, k and v changes go
to the three row blocks of ``attn.in_proj_weight`` (q first), ``mlp_fc1/fc2`` to ``mlp.c_fc/c_proj``.
SDXL's files (kohya) name the UNet's layers in the original naming (``lora_unet_input_blocks_4_1_
transformer_blocks_1_attn2_to_k``) or diffusers', the CLIP ViT-L ``lora_te1_*`` (PEFT ``text_encoder.``)
and the OpenCLIP bigG ``lora_te2_*`` (``text_encoder_2.``) in transformers' layout, its q/k/v split
into the rows of ``in_proj_weight`` as SD 2.x's.

Every key of a file must land on a layer of the model with the shape it changes; otherwise the file
is refused by name (``LoraError``), before any weight is touched. ``merged_loras`` keeps a CPU copy
of each weight it changes and copies it back at the end of the block, error or Stop included, so the
base weights come back bit for bit and switching LoRAs never re-reads the checkpoint. The speed paths
see the merged weights: Winograd's kept kernels are dropped for the layers changed (and made again at
their next call), and CUDA graphs read the weights in place, where the merge writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.io import read_key_shapes_and_metadata, read_state_dict
from ldm.kernels.winograd import Conv3x3
from ldm.models.clip import CLIPTextEncoder, OpenCLIPTextEncoder
from ldm.models.sdxl_conditioner import SDXLConditioner

log = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
UNET, TEXT = "unet", "te"
TEXT1, TEXT2 = "te1", "te2"  # SDXL's CLIP ViT-L and OpenCLIP bigG
# the tensors of each kind of module, by the suffix after the module's name
KINDS = {
    "lora": ("lora_down.weight", "lora_up.weight", "lora_mid.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
PEFT_NAMES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
SUFFIXES = sorted({s for kind in KINDS.values() for s in kind} | set(PEFT_NAMES) | {"alpha", "dora_scale"},
                  key=len, reverse=True)
FILE_PREFIXES = {"lora_unet_": UNET, "lora_te_": TEXT, "unet.": UNET, "text_encoder.": TEXT}
# on an SDXL model: PEFT's text_encoder. is the CLIP ViT-L, kohya's lora_te_ (SD 1/2) lands nowhere
SDXL_FILE_PREFIXES = {"lora_unet_": UNET, "lora_te1_": TEXT1, "lora_te2_": TEXT2, "lora_te_": TEXT, "unet.": UNET,
                      "text_encoder.": TEXT1, "text_encoder_2.": TEXT2}
SDXL_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.")
FAMILIES = {"sd_v1": "Stable Diffusion 1.x", "sd_v2": "Stable Diffusion 2.x", "sdxl": "SDXL"}


class LoraError(CheckpointError):
    """A LoRA file that cannot be applied to this model: the message names the file and why."""


# ---------------------------------------------------------------- the layers of our model, by LoRA name


@dataclass(frozen=True)
class Target:
    """Where one LoRA module's change goes: ``module.<param>`` (all of it, or its ``rows``)."""

    name: str  # our module's name
    module: nn.Module
    param: str = "weight"
    rows: tuple[int, int] | None = None  # (start, stop) of OpenCLIP's stacked q/k/v

    @property
    def weight(self) -> torch.Tensor:
        w = getattr(self.module, self.param)
        return w if self.rows is None else w[self.rows[0]:self.rows[1]]


UNET_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
            "input_blocks.0.0": "conv_in", "out.2": "conv_out",
            "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}  # SDXL's ADM vector
RESNET = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
          "skip_connection": "conv_shortcut"}


def model_family(model) -> str:
    """"sd_v1", "sd_v2" or "sdxl" by the text encoder(s); LoRA files are made for these three here."""
    encoder = getattr(model, "cond_stage_model", None)
    if isinstance(encoder, SDXLConditioner):
        return "sdxl"
    if isinstance(encoder, OpenCLIPTextEncoder):
        return "sd_v2"
    if isinstance(encoder, CLIPTextEncoder):
        return "sd_v1"
    raise ValueError("LoRA files apply to Stable Diffusion 1.x, 2.x and SDXL models (CLIP or OpenCLIP text encoders); "
                     "this model has neither")


def unet_diffusers_name(name: str, per_block: int) -> str | None:
    """Our UNet module name (under ``diffusion_model.``) -> diffusers' (``down_blocks.0.attentions.0.proj_in``),
    or None for a module diffusers does not name. ``per_block``: res blocks per level."""
    if name in UNET_TOP:
        return UNET_TOP[name]
    if m := re.fullmatch(r"input_blocks\.(\d+)\.([01])\.(.+)", name):
        n, part, rest = int(m.group(1)) - 1, m.group(2), m.group(3)
        level, index = divmod(n, per_block + 1)
        if index == per_block:  # the downsampler closes the level
            return f"down_blocks.{level}.downsamplers.0.conv" if rest == "op" else None
        return _block_name(f"down_blocks.{level}", index, part, rest)
    if m := re.fullmatch(r"middle_block\.([012])\.(.+)", name):
        index, rest = int(m.group(1)), m.group(2)
        return f"mid_block.attentions.0.{rest}" if index == 1 else _block_name("mid_block", index // 2, "0", rest)
    if m := re.fullmatch(r"output_blocks\.(\d+)\.([012])\.(.+)", name):
        level, index = divmod(int(m.group(1)), per_block + 1)
        part, rest = m.group(2), m.group(3)
        if rest == "conv" and part != "0":  # the upsampler, after the attention where the level has one
            return f"up_blocks.{level}.upsamplers.0.conv"
        return _block_name(f"up_blocks.{level}", index, part, rest)
    return None


def _block_name(block: str, index: int, part: str, rest: str) -> str | None:
    if part == "0":
        return f"{block}.resnets.{index}.{RESNET[rest]}" if rest in RESNET else None
    return f"{block}.attentions.{index}.{rest}"


def _layers(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_modules(prefix=prefix):
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            yield name, child


def lora_targets(model) -> dict[tuple[str, str], Target]:
    """Every (tower, name) a LoRA file may use for a layer of ``model``, the name with dots as
    underscores: (``unet``, ``down_blocks_0_attentions_0_proj_in``), also the original name
    (``input_blocks_1_1_proj_in``), and (``te``, ``text_model_encoder_layers_0_self_attn_q_proj``)."""
    family = model_family(model)
    per_block = model.config.unet.num_res_blocks
    targets: dict[tuple[str, str], Target] = {}
    for name, module in _layers(model.unet, "model.diffusion_model"):
        short = name.removeprefix("model.diffusion_model.")
        target = Target(name, module)
        targets[(UNET, short.replace(".", "_"))] = target
        diffusers = unet_diffusers_name(short, per_block)
        if diffusers is not None:
            targets[(UNET, diffusers.replace(".", "_"))] = target
    encoder = model.cond_stage_model
    if family == "sd_v1":
        targets.update(_clip_targets(encoder, "cond_stage_model", TEXT))
    elif family == "sd_v2":
        targets.update(_open_clip_targets(encoder, "cond_stage_model", TEXT))
    else:  # SDXL: the base's CLIP ViT-L at embedders.0 (te1), the bigG last (te2; the refiner's only one)
        if encoder.clip is not None:
            targets.update(_clip_targets(encoder.clip, "conditioner.embedders.0", TEXT1))
        targets.update(_open_clip_targets(encoder.open_clip, f"conditioner.embedders.{len(encoder.embedders) - 1}", TEXT2))
    return targets


def _clip_targets(encoder: CLIPTextEncoder, prefix: str, tower: str) -> dict[tuple[str, str], Target]:
    """transformers' names of CLIP's layers (``text_model_encoder_layers_0_self_attn_q_proj``)."""
    return {(tower, name.removeprefix(f"{prefix}.transformer.").replace(".", "_")): Target(name, module)
            for name, module in _layers(encoder.transformer, f"{prefix}.transformer")}


def _open_clip_targets(encoder: OpenCLIPTextEncoder, prefix: str, tower: str) -> dict[tuple[str, str], Target]:
    """kohya's names for OpenCLIP's blocks (it trains on transformers' layout of the tower)."""
    targets = {}
    prefix = f"{prefix}.model.transformer.resblocks"
    for i, block in enumerate(encoder.model.transformer.resblocks):
        layer = f"text_model_encoder_layers_{i}"
        attention, width = block.attn, block.attn.out_proj.in_features
        for j, part in enumerate("qkv"):
            targets[(tower, f"{layer}_self_attn_{part}_proj")] = Target(
                f"{prefix}.{i}.attn.in_proj_weight[{part}]", attention, "in_proj_weight", (j * width, (j + 1) * width))
        targets[(tower, f"{layer}_self_attn_out_proj")] = Target(f"{prefix}.{i}.attn.out_proj", attention.out_proj)
        targets[(tower, f"{layer}_mlp_fc1")] = Target(f"{prefix}.{i}.mlp.c_fc", block.mlp.c_fc)
        targets[(tower, f"{layer}_mlp_fc2")] = Target(f"{prefix}.{i}.mlp.c_proj", block.mlp.c_proj)
    return targets


# ---------------------------------------------------------------- one module's change


@dataclass(frozen=True)
class LoraModule:
    """One layer's change as a file gives it: its kind, tensors (by suffix, PEFT's renamed to kohya's)
    and scale (alpha / rank)."""

    key: str  # the file's module name
    target: Target
    kind: str  # "lora", "loha" or "lokr"
    tensors: dict[str, torch.Tensor]
    scale: float
    rank: int

    def delta(self) -> torch.Tensor:
        """scale * dW in float32, in the target weight's shape."""
        return self.raw_delta().reshape(self.target.weight.shape) * self.scale

    def add_to(self, weight: torch.Tensor, multiplier: float) -> None:
        """weight += multiplier * scale * dW, in place (``weight``: float32, the target's shape). A plain
        LoRA's product is added by one ``addmm_`` into the flattened weight (a conv's (out, in, kh, kw)
        flattens as up @ down does), with no dW tensor made."""
        t = self.tensors
        if self.kind == "lora" and "lora_mid.weight" not in t:
            up, down = t["lora_up.weight"], t["lora_down.weight"]
            weight.view(weight.shape[0], -1).addmm_(up.reshape(up.shape[0], -1).float(),
                                                   down.reshape(down.shape[0], -1).float(),
                                                   alpha=multiplier * self.scale)
        else:
            weight.add_(self.delta().to(weight.device), alpha=multiplier)

    def raw_delta(self) -> torch.Tensor:
        """dW in float32 in the shape its factors give (a 1x1 conv's may lack the kernel's dims)."""
        t = {k: v.float() for k, v in self.tensors.items()}
        if self.kind == "lora":
            dw = lora_delta(t["lora_up.weight"], t["lora_down.weight"], t.get("lora_mid.weight"))
        elif self.kind == "loha":
            dw = loha_delta(t)
        else:
            dw = lokr_delta(t)
        return dw


def lora_delta(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None = None) -> torch.Tensor:
    """up @ down (flattened); a conv LoRA's 3x3 ``down`` keeps its kernel (out, in, kh, kw); with a CP
    ``mid`` [r, r, kh, kw], down and up are 1x1."""
    up2, down2 = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
    if mid is not None:
        return torch.einsum("nmkl,in,mj->ijkl", mid, up2, down2)
    dw = up2 @ down2
    return dw.reshape(up.shape[0], down.shape[1], *down.shape[2:]) if down.dim() == 4 else dw


def _tucker(t: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ijkl,jr,ip->prkl", t, b, a)


def loha_delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """(w1a @ w1b) * (w2a @ w2b), elementwise; with Tucker cores t1, t2 each factor through its core."""
    if "hada_t1" in t and "hada_t2" in t:
        return _tucker(t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"]) * _tucker(t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
    return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])


def lokr_delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """kron(w1, w2), each given whole or as a product a @ b (w2 through a Tucker core t2 where given)."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = _tucker(t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2)


# ---------------------------------------------------------------- the file


@dataclass(frozen=True)
class Lora:
    """A LoRA file mapped onto one model: what ``merged_loras`` applies and the studio lists."""

    path: Path
    modules: tuple[LoraModule, ...]
    metadata: dict[str, object] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules), default=0)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(sorted({m.kind for m in self.modules}))

    @property
    def short_hash(self) -> str:
        return lora_hash(self.path, self.metadata)


def _split_key(key: str) -> tuple[str, str]:
    for suffix in SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return key, ""


def _tower_and_name(module: str, sdxl: bool = False) -> tuple[str, str] | None:
    for prefix, tower in (SDXL_FILE_PREFIXES if sdxl else FILE_PREFIXES).items():
        if module.startswith(prefix):
            return tower, module[len(prefix):].replace(".", "_")
    return None


def _fail(path: Path, problem: str, hint: str = "") -> LoraError:
    return LoraError.for_file(path, problem, hint)


def stated_family(metadata: dict[str, object]) -> str | None:
    """The family kohya's metadata says a file was made for ("sd_v1", "sd_v2", "sdxl"), or None."""
    stated = str(metadata.get("ss_base_model_version") or "")
    if stated.startswith("sdxl"):
        return "sdxl"
    if stated.startswith("sd_v2") or str(metadata.get("ss_v2", "")).lower() == "true":
        return "sd_v2"
    if stated.startswith("sd_v1"):
        return "sd_v1"
    return None


def check_family(path: Path, metadata: dict[str, object], family: str) -> None:
    """Refuse a file whose metadata says it was made for another family than the model's."""
    made_for = stated_family(metadata)
    if made_for is not None and made_for != family:
        stated = str(metadata.get("ss_base_model_version") or "")
        raise _fail(path, f"is a LoRA made for {FAMILIES[made_for]} (its metadata: ss_base_model_version "
                          f"{stated or '?'}, ss_v2 {metadata.get('ss_v2', '?')}), but the model is {FAMILIES[family]}",
                    "Choose a LoRA made for this model's family")


def _peft_scale(metadata: dict[str, object]) -> float | None:
    raw = metadata.get("lora_adapter_metadata")
    if not isinstance(raw, str):
        return None
    try:
        stated = json.loads(raw)
        return float(stated["lora_alpha"]) / float(stated["r"])
    except (ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


def read_lora(path: str | Path, model) -> Lora:
    """Read ``path`` (safetensors, or a pickle through the safe unpickler) and map it onto ``model``.
    Raises ``LoraError`` naming the file: keys that land on no layer, shapes that do not fit (a LoRA
    for another family, or with wrong ranks), NaN or infinite values, unknown tensors."""
    path = Path(path)
    family = model_family(model)
    shapes, metadata = read_key_shapes_and_metadata(path)
    check_family(path, metadata, family)
    sdxl = [k for k in shapes if k.startswith(SDXL_PREFIXES)]
    if sdxl and family != "sdxl":
        raise _fail(path, f"is a LoRA for SDXL (two text encoders: {sdxl[0]}), but the model is {FAMILIES[family]}")
    if family == "sdxl":
        one_encoder = [k for k in shapes if k.startswith("lora_te_")]
        if one_encoder:
            raise _fail(path, f"is a LoRA for one text encoder (SD 1.x or 2.x: {one_encoder[0]}), but the model is SDXL "
                              "(two text encoders, lora_te1_/lora_te2_)", "Choose a LoRA made for SDXL")
    groups = _group_keys(path, list(shapes), family == "sdxl")
    targets = lora_targets(model)
    state = read_state_dict(path)
    peft_scale = _peft_scale(metadata)
    # the modules that land are checked first: a shape that does not fit says which family the file is for
    modules = [_module(path, module, targets[place], parts, state, peft_scale)
               for module, (place, parts) in groups.items() if place in targets]
    unmapped = [module for module, (place, _) in groups.items() if place not in targets]
    if unmapped:
        raise _fail(path, f"{len(unmapped)} of its {len(groups)} modules match no layer of this {FAMILIES[family]} model, "
                          f"e.g. {', '.join(unmapped[:3])}", "The LoRA may be for another model family or use an unknown naming")
    return Lora(path, tuple(modules), metadata)


def _group_keys(path: Path, keys: list[str], sdxl: bool = False) -> dict[str, tuple[tuple[str, str], dict[str, str]]]:
    """The file's module name -> ((tower, name), {suffix: key})."""
    groups: dict[str, tuple[tuple[str, str], dict[str, str]]] = {}
    for key in keys:
        module, suffix = _split_key(key)
        place = _tower_and_name(module, sdxl)
        if not suffix or place is None:
            raise _fail(path, f"has a tensor {key} that is no part of a LoRA (kohya lora_unet_/lora_te_ names with "
                              ".lora_down/.lora_up/.alpha, LoHa hada_*, LoKr lokr_*, or PEFT unet./text_encoder. with lora_A/lora_B)")
        if suffix == "dora_scale":
            raise _fail(path, f"is a DoRA ({key}), which is not supported")
        groups.setdefault(module, (place, {}))[1][PEFT_NAMES.get(suffix, suffix)] = key
    return groups


def _kind(path: Path, module: str, parts: dict[str, str]) -> str:
    kinds = [kind for kind, names in KINDS.items() if any(n in parts for n in names)]
    if len(kinds) != 1:
        raise _fail(path, f"module {module} has {'no' if not kinds else 'mixed'} LoRA tensors ({', '.join(sorted(parts))})")
    return kinds[0]


def _module(path: Path, module: str, target: Target, parts: dict[str, str], state: dict[str, torch.Tensor],
            peft_scale: float | None) -> LoraModule:
    kind = _kind(path, module, parts)
    tensors = {suffix: state[key] for suffix, key in parts.items() if suffix != "alpha"}
    for suffix, tensor in tensors.items():
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise _fail(path, f"{parts[suffix]} holds non-finite (NaN or infinite) or non-float values",
                        "The file is damaged; download it again")
    required = {"lora": ("lora_down.weight", "lora_up.weight")}.get(kind, ())
    missing = [s for s in required if s not in tensors]
    if missing:
        raise _fail(path, f"module {module} lacks {', '.join(missing)}")
    rank = _rank(path, module, kind, tensors)
    alpha = _alpha(path, module, parts, state)
    if kind == "lokr":
        factored = next((tensors[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in tensors), None)
        scale = alpha / factored if alpha is not None and factored else 1.0
    elif alpha is not None and alpha != 0:
        scale = alpha / rank
    else:
        scale = peft_scale if peft_scale is not None and kind == "lora" else 1.0
    built = LoraModule(module, target, kind, tensors, scale, rank)
    _check_shape(path, built)
    return built


def _rank(path: Path, module: str, kind: str, t: dict[str, torch.Tensor]) -> int:
    """The module's rank, once its factors agree on it."""
    pairs = {"lora": [("lora_up.weight", 1, "lora_down.weight", 0)],
             "loha": [("hada_w1_a", 1, "hada_w1_b", 0), ("hada_w2_a", 1, "hada_w2_b", 0)],
             "lokr": [("lokr_w1_a", 1, "lokr_w1_b", 0), ("lokr_w2_a", 1, "lokr_w2_b", 0)]}[kind]
    ranks = []
    for left, i, right, j in pairs:
        if (left in t) != (right in t):
            raise _fail(path, f"module {module} has {left if left in t else right} without its pair")
        if left not in t:
            continue
        if t[left].dim() < 2 or t[right].dim() < 1 or t[left].shape[i] != t[right].shape[j]:
            raise _fail(path, f"module {module}: the ranks of {left} {list(t[left].shape)} and {right} "
                              f"{list(t[right].shape)} differ", "The file is damaged or not a LoRA")
        ranks.append(t[right].shape[j])
    return max(ranks, default=0)


def _alpha(path: Path, module: str, parts: dict[str, str], state: dict[str, torch.Tensor]) -> float | None:
    if "alpha" not in parts:
        return None
    alpha = state[parts["alpha"]]
    if alpha.numel() != 1 or not torch.isfinite(alpha.float()).all():
        raise _fail(path, f"{parts['alpha']} must be one finite number, not {list(alpha.shape)} {alpha.flatten()[:3].tolist()}")
    return float(alpha.item())


def _check_shape(path: Path, module: LoraModule) -> None:
    """The change must have the shape of the weight it changes; else the LoRA is for another model."""
    want = tuple(module.target.weight.shape)
    try:
        got = tuple(module.raw_delta().shape)
        fits = got[0] == want[0] and math.prod(got) == math.prod(want)
    except RuntimeError:  # factors that cannot multiply
        got, fits = tuple(tuple(t.shape) for t in module.tensors.values()), False
    if not fits:
        raise _fail(path, f"module {module.key} makes a change of {list(got)} for {module.target.name}, whose weight is "
                          f"{list(want)}", "The LoRA was made for another model family (SD 1.x text width 768, "
                          "SD 2.x 1024, SDXL 768 and 1280) or its ranks are wrong")


# ---------------------------------------------------------------- hashes


@cache
def _hash_of(path: Path, size: int, mtime: float) -> str:
    with open(path, "rb") as f:
        if path.suffix.lower() == ".safetensors":
            header = int.from_bytes(f.read(8), "little")
            f.seek(header + 8)
        digest = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lora_hash(path: Path, metadata: dict[str, object] | None = None) -> str:
    """The 12 hex digits AUTOMATIC1111 writes in "Lora hashes": the file's ``sshs_model_hash`` metadata, else
    the sha256 of a safetensors file after its header (of the whole file for a pickle)."""
    stated = (metadata or {}).get("sshs_model_hash")
    if isinstance(stated, str) and re.fullmatch(r"[0-9a-fA-F]{12,64}", stated):
        return stated[:12].lower()
    stat = path.stat()
    return _hash_of(path, stat.st_size, stat.st_mtime)[:12]


# ---------------------------------------------------------------- merging


@dataclass(frozen=True)
class Applied:
    """A LoRA as the prompt applies it: its text-encoder and UNet multipliers."""

    lora: Lora
    te: float = 1.0
    unet: float = 1.0

    def multiplier(self, target: Target) -> float:
        return self.te if target.name.startswith(("cond_stage_model.", "conditioner.")) else self.unet


def _weight_key(target: Target) -> tuple[int, str]:
    return id(target.module), target.param


@contextmanager
def merged_loras(applied: Iterable[Applied]) -> Iterator[int]:
    """Merge the LoRAs into their model's weights for the block, then copy back the CPU copies of
    every weight changed (bit for bit), also when the block raises. Yields the number of weights
    changed. A merge whose result is not finite (an absurd multiplier on a half-precision model) is
    undone and raises ``ValueError``."""
    groups: dict[tuple[int, str], list[tuple[LoraModule, float]]] = {}
    for item in applied:
        for module in item.lora.modules:
            mult = item.multiplier(module.target)
            if mult != 0:
                groups.setdefault(_weight_key(module.target), []).append((module, mult))
    backups: list[tuple[nn.Module, str, torch.Tensor]] = []
    try:
        with torch.no_grad():
            scratch = _Scratch()
            for changes in groups.values():
                backups.append(_merge(changes, scratch))
        yield len(backups)
    finally:
        with torch.no_grad():
            for module, param, copy in backups:
                getattr(module, param).copy_(copy)
                _weights_changed(module)


class _Scratch:
    """One float32 buffer per device, grown to the largest weight and reused for every weight of a
    merge: a fresh buffer per weight would be mapped and faulted in anew each time (most of a merge's
    time on a CPU)."""

    def __init__(self) -> None:
        self.buffers: dict[torch.device, torch.Tensor] = {}

    def like(self, weight: torch.Tensor) -> torch.Tensor:
        buffer = self.buffers.get(weight.device)
        if buffer is None or buffer.numel() < weight.numel():
            buffer = self.buffers[weight.device] = torch.empty(weight.numel(), dtype=torch.float32, device=weight.device)
        return buffer[:weight.numel()].view(weight.shape)


def _merge(changes: list[tuple[LoraModule, float]], scratch: _Scratch) -> tuple[nn.Module, str, torch.Tensor]:
    """Add every change of one weight (in float32, rounded once to the weight's dtype); returns (module,
    param, the CPU copy of the weight before)."""
    first = changes[0][0].target
    weight = getattr(first.module, first.param)
    copy = weight.detach().to("cpu", copy=True)
    total = scratch.like(weight).copy_(weight)
    for module, mult in changes:
        rows = module.target.rows
        module.add_to(total if rows is None else total[rows[0]:rows[1]], mult)
    weight.copy_(total)
    low, high = torch.aminmax(weight)  # one pass; both are finite exactly when every element is (NaN propagates)
    if not (torch.isfinite(low) and torch.isfinite(high)):
        weight.copy_(copy)
        raise ValueError(f"merging LoRA {changes[0][0].key} into {first.name} gives values outside what "
                         f"{weight.dtype} holds; use a smaller weight in the <lora:...> tag")
    _weights_changed(first.module)
    return first.module, first.param, copy


def _weights_changed(module: nn.Module) -> None:
    if isinstance(module, Conv3x3):
        module.weights_changed()


def describe(lora: Lora) -> str:
    """One line for a list: name, kinds, rank, modules and size."""
    size = lora.path.stat().st_size
    return f"{lora.name}: {'/'.join(lora.kinds)} rank {lora.rank}, {len(lora.modules)} modules, {size / 1e6:.1f} MB"


__all__ = ["Applied", "Lora", "LoraError", "LoraModule", "Target", "lora_hash", "lora_targets", "merged_loras",
           "model_family", "read_lora", "unet_diffusers_name", "describe"]
