"""Command line: ``python -m ldm COMMAND``.

txt2img, img2img, layout, inpaint, outpaint, upscale and semantic generate PNGs that carry their parameters; inspect names a
checkpoint's family; train and eval build and measure the embedded default model; batch renders many
text-to-image jobs into a folder, resumably, in this process or over Ray (``ldm.batch``, ``ldm.distributed``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ldm.checkpoints.errors import CheckpointError
from ldm.options import (FILL_MODES, MAX_MASK_BLUR, RESIZE_MODES, SAMPLER_NAMES, SCHEDULE_NAMES, add_device_arguments,
                         add_sampler_arguments, add_tiling_arguments, named, sampler_name)
from ldm.text.lookup import TokenizerNotFoundError
from ldm.text.prompt_syntax import EMPHASIS_MODES

log = logging.getLogger("ldm")


def _add_model_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--model", help="checkpoint file, or diffusers folder (the one with model_index.json) "
                        f"(default: the embedded {default} model in weights/default/)")
    parser.add_argument("--preset", help="model preset name or YAML path, when detection cannot tell the family")
    parser.add_argument("--tokenizer", help="folder with the model's tokenizer: CLIP's vocab.json and merges.txt (Stable "
                        "Diffusion), or bert-base-uncased's vocab.txt (LDM text2img models)")
    add_device_arguments(parser)
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None, help="use the EMA weights (default: when present)")
    ema.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights even when EMA weights are present")


def _add_sampling_arguments(parser: argparse.ArgumentParser, out: str, *, prompt: bool = True) -> None:
    if prompt:
        parser.add_argument("--prompt", default="", help="what to draw")
        parser.add_argument("--negative", default="", help="negative prompt (the unconditional branch of guidance)")
        parser.add_argument("--emphasis", type=named(EMPHASIS_MODES), choices=EMPHASIS_MODES, default="Original",
                            metavar="MODE", help="how (word:1.3) weights are applied on CLIP models: Original (weights, "
                            "then each chunk's mean restored; default) or 'No norm' (weights only)")
        parser.add_argument("--scale", type=float, help="classifier-free guidance scale; 1 disables guidance")
        parser.add_argument("--batch-size", type=int, default=1)
        parser.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                            help="a folder of LoRA files that <lora:NAME:WEIGHT> tags in the prompts name (repeatable; "
                            "models/Lora beside the model's folder and in the project are always searched)")
        parser.add_argument("--embeddings-dir", action="append", default=[], metavar="DIR",
                            help="a folder of textual-inversion embeddings, used where a prompt names one by its file "
                            "name (repeatable; models/embeddings beside the model's folder and in the project are "
                            "always searched)")
        _add_size_conditioning_arguments(parser)
    add_sampler_arguments(parser)
    parser.add_argument("--steps", type=int, help="sampler steps (default: the model's preset)")
    parser.add_argument("--eta", type=float, help="eta, 0 to 1, of DDIM (0 deterministic, 1 DDPM-like; default: the "
                        "model's preset) and of Euler a, DPM++ 2M SDE and DPM++ SDE (the noise added at each step; "
                        "default 1); the other samplers take none")
    parser.add_argument("--seed", type=int, default=-1, help="seed; -1 picks one (it is printed and saved in the PNG)")
    parser.add_argument("--out", default=out, help=f"output PNG (default {out}); a batch writes NAME-1.png, NAME-2.png, ...")


def _size_pair(text: str) -> tuple[int, int]:
    """"HEIGHTxWIDTH" (or "TOPxLEFT") -> (int, int)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected two whole numbers as HxW, e.g. 1024x1024, got {text!r}")
    return int(parts[0]), int(parts[1])


def _add_size_conditioning_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SDXL size conditioning", "what the SDXL UNet is told of the picture (other models "
                                      "ignore these); defaults as AUTOMATIC1111's")
    group.add_argument("--original-size", type=_size_pair, metavar="HxW", help="original size, height x width (default: the image's)")
    group.add_argument("--target-size", type=_size_pair, metavar="HxW", help="target size, height x width (default: the image's)")
    group.add_argument("--crop-top-left", type=_size_pair, default=(0, 0), metavar="TOPxLEFT", help="crop corner (default 0x0)")
    group.add_argument("--aesthetic-score", type=float, default=6.0, help="the refiner's aesthetic score (default 6.0)")
    group.add_argument("--negative-aesthetic-score", type=float, default=2.5,
                       help="the refiner's aesthetic score of the negative prompt (default 2.5)")


def size_conditioning(args: argparse.Namespace):
    from ldm.tasks.request import SizeConditioningOptions

    if not hasattr(args, "crop_top_left"):
        return SizeConditioningOptions()
    return SizeConditioningOptions(args.original_size, args.target_size, args.crop_top_left, args.aesthetic_score,
                                   args.negative_aesthetic_score)


def _add_upscale_tile_arguments(parser: argparse.ArgumentParser) -> None:
    """The upscaling tab's tiles of the input (``ldm.tasks.upscale.InputTiles``), fused at every step."""
    group = parser.add_argument_group("tiles", "the input is denoised in overlapping tiles blended at every step")
    group.add_argument("--tile", type=int, default=128, metavar="PX",
                       help="tile side in input pixels (default 128; 0: the whole image at once); a larger tile takes "
                       "more memory (with its area) and fewer windows a step")
    group.add_argument("--overlap", type=int, metavar="PX",
                       help="input pixels neighbouring tiles share and blend across, 0 to half the tile (default 16; "
                       "none with --tile 0)")


def _add_hires_arguments(parser: argparse.ArgumentParser) -> None:
    """Text to image's hires fix (``ldm.tasks.hires``): on with a factor other than 1 or a target size. The
    upscalers' names are written out here (``ldm.tasks.hires.UPSCALERS``; a test keeps them the same), so
    that --help imports no torch."""
    group = parser.add_argument_group("hires fix", "generate at --width x --height, upscale, then redraw at the "
                                      "larger size (image to image with the same seeds); on with --hires-scale "
                                      "other than 1, or --hires-width/--hires-height")
    group.add_argument("--hires-scale", type=float, default=1.0, metavar="F",
                       help="the target is the first pass's size times F, 1 to 4 (e.g. 2)")
    group.add_argument("--hires-width", type=int, default=0, metavar="PX",
                       help="target width instead of the factor (0 with --hires-height: keep the aspect ratio)")
    group.add_argument("--hires-height", type=int, default=0, metavar="PX", help="target height instead of the factor")
    group.add_argument("--hires-upscaler", default="Latent", metavar="NAME",
                       help="Latent (bilinear; the default), 'Latent (antialiased)', 'Latent (bicubic)', 'Latent (bicubic "
                       "antialiased)', 'Latent (nearest)', 'Latent (nearest-exact)', Lanczos (decode, resize, encode), "
                       "or the checkpoint of a super-resolution model (LDM SR, the SD x4 upscaler)")
    group.add_argument("--hires-steps", type=int, default=0, metavar="N",
                       help="steps of the second pass (default 0: as many as the first); it runs exactly N")
    group.add_argument("--hires-strength", type=float, default=0.7, metavar="S",
                       help="denoising strength of the second pass, 0 (keep) to 1 (redraw; default 0.7)")


def hires_options(args: argparse.Namespace):
    """The HiresOptions and the super-resolution model (or None) of the --hires-* options, None
    without a hires fix; a --hires-upscaler that is a file or folder is loaded as the model."""
    from ldm.tasks.hires import UPSCALERS, HiresOptions

    if getattr(args, "hires_scale", 1.0) == 1.0 and not args.hires_width and not args.hires_height:
        given = [option for option, value, default in (("--hires-upscaler", args.hires_upscaler, "Latent"),
                                                       ("--hires-steps", args.hires_steps, 0),
                                                       ("--hires-strength", args.hires_strength, 0.7)) if value != default]
        if given:
            raise ValueError(f"{', '.join(given)} set the hires fix, which runs with --hires-scale F (other than 1) or "
                             "--hires-width/--hires-height")
        return None, None
    upscaler, model = args.hires_upscaler, None
    if upscaler not in UPSCALERS and Path(upscaler).expanduser().exists():
        model = load_upscaler(args, Path(upscaler).expanduser())
        upscaler = model.name
    options = HiresOptions(scale=args.hires_scale, width=args.hires_width, height=args.hires_height, upscaler=upscaler,
                           steps=args.hires_steps, strength=args.hires_strength)
    return options.check(model), model


def load_upscaler(args: argparse.Namespace, path: Path):
    """A super-resolution checkpoint, on the device and dtype the options name (detected by its keys)."""
    return load_file(args, path, preset=None, ema=None)


def _add_outpaint_parser(commands) -> None:
    outpaint = commands.add_parser("outpaint", help="extend an image: the model draws the new border",
                                   description="Extend an image by some pixels on each side (or to a target size or "
                                   "aspect ratio, centred); the model draws the new border and the image's own pixels "
                                   "come back unchanged.")
    _add_model_arguments(outpaint, "txt2img")
    _add_sampling_arguments(outpaint, "outpaint.png")
    outpaint.add_argument("--image", required=True)
    for side in ("left", "right", "top", "bottom"):
        outpaint.add_argument(f"--{side}", type=int, default=0, metavar="PX", help=f"pixels added on the {side} (default 0)")
    outpaint.add_argument("--width", type=int, help="extend to this canvas width, the image centred (instead of --left/--right)")
    outpaint.add_argument("--height", type=int, help="extend to this canvas height, the image centred (instead of --top/--bottom)")
    outpaint.add_argument("--aspect", metavar="W:H", help="extend to the smallest canvas of this aspect ratio, e.g. 16:9")
    outpaint.add_argument("--fill", choices=FILL_MODES, default=FILL_MODES[0], metavar="MODE",
                          help="what the new border starts from: fill (blurred copies of the image; default), original "
                          "(its edge pixels stretched), 'latent noise', 'latent nothing'")
    outpaint.add_argument("--mask-blur", type=int, default=8, metavar="PX",
                          help=f"how far the soft seam reaches into the image, 0 to {MAX_MASK_BLUR} px (default 8)")
    outpaint.add_argument("--strength", type=float, default=1.0,
                          help="denoising strength of the border, 0 to 1 (default 1: drawn anew)")
    add_tiling_arguments(outpaint)


def outpaint_options(args: argparse.Namespace, size: tuple[int, int]):
    """The OutpaintOptions of the command line for an image of ``size``, checked: the sides given,
    or those that centre it on --width x --height or on the --aspect ratio."""
    from ldm.tasks.outpaint import OutpaintOptions, extend_to

    sides = {side: getattr(args, side) for side in ("left", "right", "top", "bottom")}
    target = args.width is not None or args.height is not None or args.aspect is not None
    if target and any(sides.values()):
        given = next(f"--{side}" for side, value in sides.items() if value)
        raise ValueError(f"give the extensions by side or as --aspect or --width/--height, not with {given}")
    if target:
        sides = extend_to(size, args.width, args.height, aspect=None if args.aspect is None else _aspect(args.aspect))
    options = OutpaintOptions(**sides, fill=args.fill, mask_blur=args.mask_blur, strength=args.strength)
    return options.check(size)


def _aspect(text: str) -> float:
    try:
        width, height = (float(part) for part in text.split(":"))
        if width > 0 and height > 0:
            return width / height
    except ValueError:
        pass
    raise ValueError(f"--aspect {text!r}: expected two positive numbers as W:H, e.g. 16:9")


def _add_batch_parser(commands) -> None:
    batch = commands.add_parser("batch", help="render a prompts file or a grid of settings into a folder, resumably",
                                description="Text to image for many jobs: every prompt x seed (x sampler x guidance x "
                                "model of a grid). Each job is named by a hash of its parameters and written as "
                                "ID.png with an ID.json sidecar; a rerun renders only the jobs missing from --out.")
    source = batch.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", metavar="FILE", help="text file, one prompt a line (blank and # lines skipped)")
    source.add_argument("--grid", metavar="YAML", help="grid file: prompts, seeds, samplers, guidance and models "
                        "lists, and single values negative, steps, width, height, schedule, eta")
    batch.add_argument("--out", required=True, metavar="DIR", help="output folder (created; kept between runs)")
    batch.add_argument("--ray", default="none", metavar="WHERE",
                       help="none (default: render in this process), local (start a Ray cluster of this machine on "
                       "127.0.0.1 and stop it at the end) or the ADDRESS of a running cluster (HOST:PORT, "
                       "ray://HOST:PORT); Ray is an optional extra: requirements-ray.txt")
    batch.add_argument("--seeds", help="seeds, e.g. 0-99 or 1,5,7-9 (default 0)")
    batch.add_argument("--model", help="checkpoint file or diffusers folder (default: the embedded txt2img model)")
    batch.add_argument("--negative", help="negative prompt of every job")
    batch.add_argument("--sampler", type=sampler_name, choices=SAMPLER_NAMES, metavar="NAME",
                       help="sampler (default: the model preset's)")
    batch.add_argument("--schedule", type=named(SCHEDULE_NAMES), choices=SCHEDULE_NAMES, metavar="NAME",
                       help="noise schedule (default Automatic: the sampler's own)")
    batch.add_argument("--scale", type=float, help="classifier-free guidance scale (default: the model preset's)")
    batch.add_argument("--eta", type=float, help="eta of DDIM and the ancestral/SDE samplers (default: the sampler's)")
    batch.add_argument("--steps", type=int, help="sampler steps (default: the model preset's)")
    batch.add_argument("--width", type=int, help="image width (default: the model's training size)")
    batch.add_argument("--height", type=int, help="image height")
    batch.add_argument("--preset", help="model preset name or YAML path, when detection cannot tell the family")
    batch.add_argument("--tokenizer", help="folder with the model's tokenizer")
    add_device_arguments(batch)
    batch.add_argument("--threads", type=int, default=0, metavar="N",
                       help="torch's CPU threads in each renderer (default: torch's own in this process, "
                       "--cpus-per-worker over Ray); 1 is much faster on a machine busy with other work")
    ray = batch.add_argument_group("Ray", "with --ray local or ADDRESS")
    ray.add_argument("--workers", type=int, help="renderer actors (default: one per GPU, else one per --cpus-per-worker "
                     "CPUs of the cluster)")
    ray.add_argument("--cpus-per-worker", type=int, default=1, metavar="N",
                     help="CPUs (torch threads) of each renderer on a machine without GPUs (default 1)")
    ray.add_argument("--retries", type=int, default=3, help="times a job is run again after its worker died (default 3)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldm", description="LDM Studio engine: latent diffusion on the command line.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    t2i = commands.add_parser("txt2img", help="generate images from a text prompt")
    _add_model_arguments(t2i, "txt2img")
    _add_sampling_arguments(t2i, "txt2img.png")
    t2i.add_argument("--width", type=int, help="image width in pixels (default: the model's training size)")
    t2i.add_argument("--height", type=int, help="image height in pixels")
    add_tiling_arguments(t2i)
    _add_hires_arguments(t2i)
    refine = t2i.add_argument_group("refiner", "SDXL base then refiner: the base denoises the first part of the schedule, "
                                    "the refiner the rest on the same latent with its own conditioning")
    refine.add_argument("--refiner", metavar="FILE", help="an SDXL refiner checkpoint file or diffusers folder")
    refine.add_argument("--refiner-preset", metavar="NAME_OR_YAML", help="the refiner's model preset, when detection cannot tell")
    refine.add_argument("--refiner-switch", type=float, default=0.8, metavar="FRACTION",
                        help="the fraction of the steps the base runs before the refiner takes over (default 0.8)")

    layout = commands.add_parser("layout", help="generate an image from labelled boxes (and an optional prompt)",
                                 description="Generate from labelled boxes. The default model's labels are class names "
                                 "('red circle'); LDM's layout2img-openimages256 takes up to 30 boxes labelled with "
                                 "class ids (whole numbers 0 to 8190: its class-name table was not released) and no "
                                 "prompt; other text models take each label as the prompt of its region.")
    _add_model_arguments(layout, "txt2img")
    _add_sampling_arguments(layout, "layout.png")
    layout.add_argument("--boxes", required=True, help='JSON file: [{"label": "red circle", "box": [x0, y0, x1, y1]}, ...], '
                        'corners in [0, 1]; for layout2img-openimages256 the labels are class ids: {"label": 7, ...}')
    layout.add_argument("--width", type=int)
    layout.add_argument("--height", type=int)
    add_tiling_arguments(layout)

    inpaint = commands.add_parser("inpaint", help="fill the masked part of an image")
    _add_model_arguments(inpaint, "txt2img")
    _add_sampling_arguments(inpaint, "inpaint.png")
    inpaint.add_argument("--image", required=True)
    inpaint.add_argument("--mask", required=True, help="mask image: white where the image is to be filled")

    i2i = commands.add_parser("img2img", help="re-draw an image under a prompt (image to image)",
                              description="Re-draw an image under a prompt: it is noised part-way down the sampler's "
                              "schedule by the denoising strength and denoised from there, keeping its composition.")
    _add_model_arguments(i2i, "txt2img")
    _add_sampling_arguments(i2i, "img2img.png")
    i2i.add_argument("--image", required=True, help="the picture (any size and mode: 16-bit, transparent, palette)")
    i2i.add_argument("--strength", type=float, default=0.75,
                     help="denoising strength, 0 (keep the picture) to 1 (redraw it); default 0.75")
    i2i.add_argument("--resize-mode", type=named(RESIZE_MODES), choices=RESIZE_MODES, default=RESIZE_MODES[0],
                     metavar="MODE", help="how the picture meets --width/--height: 'Just resize' (stretch; default), "
                     "'Crop and resize' (cover and crop the centre) or 'Resize and fill' (fit inside, edges stretched)")
    i2i.add_argument("--exact-steps", action="store_true",
                     help="run exactly --steps steps (AUTOMATIC1111's option, ComfyUI's denoise) instead of about "
                     "steps x strength of a --steps schedule (diffusers' arithmetic, the default)")
    i2i.add_argument("--sketch", help="an RGBA PNG of colour strokes (transparent elsewhere) laid over the picture first")
    i2i.add_argument("--width", type=int, help="working width in pixels (default: the picture's, within 4096)")
    i2i.add_argument("--height", type=int, help="working height in pixels (default: the picture's)")
    add_tiling_arguments(i2i)


    _add_outpaint_parser(commands)

    upscale = commands.add_parser("upscale", help="4x super-resolution of an image")
    _add_model_arguments(upscale, "upscale")
    _add_sampling_arguments(upscale, "upscale.png")  # the prompt guides text-guided upscalers (SD x4)
    upscale.add_argument("--image", required=True)
    upscale.add_argument("--noise-level", type=int, default=20,
                         help="noise added to the input before upscaling, 0 to the model's maximum (350 for the SD x4 "
                              "upscaler; default 20); models without noise augmentation ignore it")
    _add_upscale_tile_arguments(upscale)

    semantic = commands.add_parser("semantic", help="a picture from a segmentation map (LDM semantic synthesis models)")
    _add_model_arguments(semantic, "semantic")
    next(a for a in semantic._actions if a.dest == "model").help = (
        "checkpoint of a semantic synthesis model (LDM's semantic_synthesis256 or semantic_synthesis512); required")
    _add_sampling_arguments(semantic, "semantic.png", prompt=False)
    semantic.add_argument("--segmentation", required=True,
                          help="label map: an 8-bit greyscale (or palette) PNG whose pixel values are class indices "
                               "(0 to 181 for LDM's landscape models); the picture has its size")

    _add_batch_parser(commands)

    inspect = commands.add_parser("inspect", help="name the family of a checkpoint file, diffusers folder or preset")
    inspect.add_argument("target", help="a checkpoint file, a diffusers folder, or a preset name or YAML path")
    inspect.add_argument("--keys", action="store_true", help="print a JSON object mapping every key to its shape")

    train = commands.add_parser("train", help="train a stage of the embedded default model")
    train.add_argument("stage", nargs="?", choices=["autoencoder", "txt2img", "upscale"],
                       help="the stage, with its recipe presets/train/default-STAGE.yaml")
    train.add_argument("--preset", help="a training recipe YAML instead of a stage name, e.g. presets/train/default-txt2img.yaml")
    train.add_argument("--work-dir", default="runs/default", help="where training state is kept (resumes from it)")
    train.add_argument("--steps", type=int, help="total steps (default: the recipe's)")
    train.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda")
    train.add_argument("--from-scratch", action="store_true",
                       help="start from random weights as the recipe says, not from the shipped files (a state in --work-dir still resumes)")
    train.add_argument("--workers", type=int, help="processes drawing training scenes ahead of the step "
                       "(default: none on a CPU; on a GPU all cores but two, up to 12)")

    commands.add_parser("bench", add_help=False, help="time the engine against diffusers on the same weights "
                        "(bench/speed.py; --help lists its options)")

    evaluate = commands.add_parser("eval", help="measure the embedded default model on held-out scenes")
    evaluate.add_argument("--count", type=int, default=100, help="held-out samples per task")
    evaluate.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    evaluate.add_argument("--sampler", type=sampler_name, choices=SAMPLER_NAMES, default="DDIM", metavar="NAME",
                          help=f"sampler, one of {', '.join(SAMPLER_NAMES)} (default DDIM), at its default eta")
    evaluate.add_argument("--schedule", type=named(SCHEDULE_NAMES), choices=SCHEDULE_NAMES, default="Automatic",
                          metavar="NAME", help=f"noise schedule, one of {', '.join(SCHEDULE_NAMES)} (default Automatic)")
    evaluate.add_argument("--json", help="also write the figures to this JSON file")
    return parser


def load(args: argparse.Namespace, task: str):
    from ldm.checkpoints.presets import DEFAULT_MODELS
    from ldm.devices import choose_device, keep_freed_memory

    path = args.model or DEFAULT_MODELS[task]
    if args.model is None and not Path(path).is_file():
        raise ValueError(f"no --model given and the embedded default model {path} is missing; pass --model FILE_OR_FOLDER")
    keep_freed_memory(choose_device(args.device))
    return load_file(args, path, preset=args.preset, ema=args.ema)


def load_file(args: argparse.Namespace, path, *, preset, ema):
    """``path`` loaded on the device, dtype, memory format and speed paths the options name."""
    from ldm.checkpoints.loader import load_model
    from ldm.devices import choose_device, choose_dtype
    from ldm.kernels.paths import SpeedPaths

    device = choose_device(args.device)
    return load_model(path, device=device, dtype=choose_dtype(args.dtype, device), preset=preset, ema=ema,
                      tokenizer_dir=args.tokenizer, memory_format=args.memory_format, speed=SpeedPaths.from_arguments(args))


def read_boxes(path: str) -> tuple:
    """Boxes (label, x0, y0, x1, y1) from a JSON list of {"label": ..., "box": [x0, y0, x1, y1]}. A label
    is a name, or a class id (a whole number, kept as its digits) for models that number their classes."""
    expected = ('expected a JSON list of {"label": "red circle", "box": [x0, y0, x1, y1]} with corners in [0, 1] '
                '(labels are class ids such as 7 for layout2img-openimages256)')
    try:
        entries = json.loads(Path(path).read_text())
        boxes = tuple((_box_label(e["label"]), *e["box"]) for e in entries)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: cannot read boxes ({error}); {expected}") from None
    for i, box in enumerate(boxes):
        if len(box) != 5:
            raise ValueError(f"{path}: box {i + 1} has {len(box) - 1} coordinates, not 4; {expected}")
    return boxes


def _box_label(label) -> str:
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise ValueError(f"label {label!r} is neither a name nor a class id (a whole number)")
    return str(label)


def sampler_options(args: argparse.Namespace, defaults) -> dict:
    """The request's sampler, schedule, eta and s_noise: the options given, else the model preset's
    ``defaults`` (``SamplerDefaults``) for its own sampler, else the named sampler's Automatic
    schedule and default eta."""
    from ldm.sampling.samplers import get_sampler

    sampler = args.sampler or defaults.sampler
    own = sampler == defaults.sampler
    eta = args.eta if args.eta is not None else defaults.eta if own else get_sampler(sampler).eta_default
    schedule = args.schedule or (defaults.schedule if own else "Automatic")
    return {"sampler": sampler, "schedule": schedule, "eta": eta, "s_noise": args.s_noise}


def make_request(args: argparse.Namespace, loaded, **overrides):
    from ldm.tasks.request import GenerationRequest

    preset, config = loaded.preset, loaded.model.config
    size = config.latent_size * config.downsampling_factor
    return GenerationRequest(
        prompt=getattr(args, "prompt", ""),
        negative_prompt=getattr(args, "negative", ""),
        steps=args.steps if args.steps is not None else preset.sampler.steps,
        scale=getattr(args, "scale", None) if getattr(args, "scale", None) is not None else preset.sampler.scale,
        seed=args.seed,
        **sampler_options(args, preset.sampler),
        width=getattr(args, "width", None) or size,
        height=getattr(args, "height", None) or size,
        batch_size=getattr(args, "batch_size", 1),
        emphasis=getattr(args, "emphasis", "Original"),
        **({"tiling": tiling_options(args, size)} if hasattr(args, "tiling") else {}),
        lora_dirs=lora_dirs(args, loaded),
        embedding_dirs=embedding_dirs(args, loaded),
        size_conditioning=size_conditioning(args),
        **overrides,
    )


def lora_dirs(args: argparse.Namespace, loaded) -> tuple[Path, ...]:
    """The --lora-dir folders first, then the defaults beside the model (``ldm.addons.library``)."""
    from ldm.addons.library import default_lora_dirs

    given = [Path(d).expanduser() for d in getattr(args, "lora_dir", [])]
    return tuple(dict.fromkeys([*given, *default_lora_dirs([loaded.path])]))


def embedding_dirs(args: argparse.Namespace, loaded) -> tuple[Path, ...]:
    """The --embeddings-dir folders first, then the defaults beside the model (``ldm.addons.embeddings``)."""
    from ldm.addons.embeddings import default_embedding_dirs

    given = [Path(d).expanduser() for d in getattr(args, "embeddings_dir", [])]
    return tuple(dict.fromkeys([*given, *default_embedding_dirs([loaded.path])]))


def tiling_options(args: argparse.Namespace, size: int):
    """The TilingOptions of --tiling, --tile, --overlap and --memory-budget, each checked under its
    option's name; ``size`` is the model's training size (pixels), the tile of --tile 0."""
    from ldm.tasks.request import MAX_BUDGET_MB, MAX_SIDE, TilingOptions

    budget = _within("--memory-budget", args.memory_budget, 1, MAX_BUDGET_MB, "MB")
    tile = _within("--tile", args.tile, 0, MAX_SIDE, "px (0: the model's training size)")
    overlap = _within("--overlap", args.overlap, -1, MAX_SIDE, "px (-1: a quarter of the tile)")
    if overlap >= (tile or size):
        which = f"--tile {tile}" if tile else f"--tile 0: the model's training size, {size} px"
        raise ValueError(f"--overlap must be less than the tile ({which}), or -1 for a quarter of it; got {overlap}")
    return TilingOptions(args.tiling, tile, overlap, budget)


def _within(option: str, value: int, low: int, high: int, unit: str) -> int:
    if not low <= value <= high:
        raise ValueError(f"{option} must be from {low} to {high} {unit}, got {value}")
    return value


def input_tiles(args: argparse.Namespace, loaded):
    """Upscaling's tiles of --tile and --overlap (16, or none with --tile 0, when not given), checked as
    ``upscale`` checks them, under the options' names."""
    from ldm.tasks.upscale import InputTiles

    overlap = args.overlap if args.overlap is not None else (InputTiles().overlap if args.tile else 0)
    grid = loaded.model.config.unet.downsampling_factor
    for option, tiles in (("--tile", InputTiles(args.tile, 0)), ("--overlap", InputTiles(args.tile, overlap))):
        try:
            tiles.check(grid)
        except ValueError as error:
            raise ValueError(f"{option}: {error}") from None
    return InputTiles(args.tile, overlap)


def open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"{path}: cannot read the image ({error})") from None


def run_generation(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from tqdm import tqdm

    from ldm.tasks.parameters import save_png
    from ldm.tasks.registry import task
    from ldm.tasks.request import check_model, resolve_request

    pictures = img2img_pictures(args) if args.command == "img2img" else {}
    loaded = load(args, "upscale" if args.command == "upscale" else "txt2img")
    # outpainting is a mode of inpainting (no task of its own): the models that inpaint outpaint
    check_model(task("inpaint" if args.command == "outpaint" else args.command).serves, loaded)  # refused by name here
    inputs, tiles = pictures, None  # what the task takes beside the request
    if args.command == "layout":
        request = make_request(args, loaded, boxes=read_boxes(args.boxes))
    elif args.command == "img2img":
        request = img2img_request(args, loaded, pictures["image"])
    elif args.command == "outpaint":
        inputs["image"] = open_image(args.image)
        inputs["options"] = outpaint_options(args, inputs["image"].size)  # bad extensions are refused here
        width, height = inputs["options"].canvas_size(inputs["image"].size)
        request = replace(make_request(args, loaded), width=width, height=height)  # --width is the canvas's, if given
    else:
        request = make_request(args, loaded)
    resolved, _ = resolve_request(request, loaded.model.config.size_multiple)  # refuse bad input before the progress bar shows
    if args.command == "txt2img":
        inputs["hires"], inputs["hires upscaler"] = hires_options(args)
        if inputs["hires"] is not None:
            from ldm.tasks.hires import hires_size

            hires_size(resolved.width, resolved.height, inputs["hires"], loaded.model.config.size_multiple)
        if args.refiner:
            if inputs["hires"] is not None:
                raise ValueError("--refiner and the hires fix do not go together; choose one")
            from ldm.tasks.txt2img import check_refiner, switch_step

            switch_step(resolved.steps, args.refiner_switch)
            inputs["refiner"] = load_file(args, args.refiner, preset=args.refiner_preset, ema=None)
            check_refiner(loaded, inputs["refiner"], resolved)
    if args.command == "upscale":
        from ldm.tasks.upscale import check_noise_level

        check_noise_level(loaded.model, args.noise_level)
        tiles = input_tiles(args, loaded)
        inputs["image"] = open_image(args.image)
    if args.command == "inpaint":
        from ldm.tasks.inpaint import mask_array

        inputs["image"], inputs["mask"] = open_image(args.image), open_image(args.mask)
        mask_array(inputs["mask"], inputs["image"].size)  # an empty mask is refused here
    with tqdm(desc="sampling", unit="step") as bar:
        def progress(info):
            bar.total = info.total
            bar.update(1)

        result = run_task(args, loaded, request, inputs, progress, tiles)
    for notice in result.notices:
        print(f"note: {notice}", file=sys.stderr)
    out = Path(args.out)
    for i, (image, seed, text) in enumerate(zip(result.images, result.seeds, result.parameters)):
        path = out if len(result.images) == 1 else out.with_name(f"{out.stem}-{i + 1}{out.suffix}")
        save_png(image, path, text)
        print(f"{path} (seed {seed})")
    return 0


def img2img_pictures(args: argparse.Namespace) -> dict:
    """The picture (and sketch) of ``img2img``, read and checked before the model loads."""
    from ldm.tasks.img2img import check_picture

    inputs = {"image": open_image(args.image)}
    if args.sketch:
        inputs["sketch"] = open_image(args.sketch)
    check_picture(inputs["image"])
    img2img_options(args)  # a strength out of range is refused here, before any work
    return inputs


def img2img_request(args: argparse.Namespace, loaded, picture):
    """The request of ``img2img``: its size the picture's unless --width/--height say otherwise, the
    other side following the picture's aspect when only one is given."""
    from dataclasses import replace

    from ldm.tasks.img2img import picture_size

    (width, height), notices = picture_size(picture, args.width or 0, args.height or 0)
    for notice in notices:
        print(f"note: {notice}", file=sys.stderr)
    return replace(make_request(args, loaded), width=width, height=height)


def img2img_options(args: argparse.Namespace):
    from ldm.sampling.strength import STEP_MODES
    from ldm.tasks.img2img import Img2ImgOptions

    return Img2ImgOptions(args.strength, args.resize_mode, STEP_MODES[1] if args.exact_steps else STEP_MODES[0]).check()


def run_task(args, loaded, request, inputs, progress, tiles=None):
    if args.command == "img2img":
        from ldm.tasks.img2img import img2img

        return img2img(loaded, request, inputs["image"], options=img2img_options(args), sketch=inputs.get("sketch"),
                       callback=progress)
    if args.command == "inpaint":
        from ldm.tasks.inpaint import inpaint

        return inpaint(loaded, request, inputs["image"], inputs["mask"], callback=progress)
    if args.command == "outpaint":
        from ldm.tasks.outpaint import outpaint

        return outpaint(loaded, request, inputs["image"], options=inputs["options"], callback=progress)
    if args.command == "upscale":
        from ldm.tasks.upscale import upscale

        return upscale(loaded, inputs["image"], request, tiles=tiles, noise_level=args.noise_level,
                       callback=progress)
    if args.command == "layout":
        from ldm.tasks.layout import layout

        return layout(loaded, request, callback=progress)
    if inputs.get("hires") is not None:
        from ldm.tasks.hires import hires_fix

        return hires_fix(loaded, request, inputs["hires"], upscaler=inputs["hires upscaler"], callback=progress)
    from ldm.tasks.txt2img import txt2img

    return txt2img(loaded, request, callback=progress, refiner=inputs.get("refiner"),
                   refiner_switch=getattr(args, "refiner_switch", 0.8))


def run_semantic(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ldm.tasks.parameters import save_png
    from ldm.tasks.request import check_model
    from ldm.tasks.semantic import semantic, serves

    if args.model is None:
        raise ValueError("semantic synthesis has no embedded model: pass --model FILE, a checkpoint of LDM's "
                         "semantic_synthesis256 or semantic_synthesis512")
    loaded = load(args, "semantic")
    check_model(serves, loaded)
    segmentation = open_image(args.segmentation)
    with tqdm(desc="sampling", unit="step") as bar:
        def progress(info):
            bar.total = info.total
            bar.update(1)

        result = semantic(loaded, segmentation, make_request(args, loaded), callback=progress)
    for notice in result.notices:
        print(f"note: {notice}", file=sys.stderr)
    save_png(result.images[0], args.out, result.parameters[0])
    print(f"{args.out} (seed {result.seeds[0]})")
    return 0


# the grid key each batch option sets
BATCH_OPTIONS = {"seeds": "seeds", "model": "models", "negative": "negative", "sampler": "samplers",
                 "schedule": "schedule", "scale": "guidance", "eta": "eta", "steps": "steps", "width": "width",
                 "height": "height"}


def batch_jobs(args: argparse.Namespace) -> list:
    """The jobs of --prompts and the options, or of --grid and the options it leaves unset, each checked
    as a request."""
    from ldm.batch.jobs import expand, grid_from_values, model_facts, read_grid, read_prompts_file

    given = {key: getattr(args, option) for option, key in BATCH_OPTIONS.items() if getattr(args, option) is not None}
    if args.model is not None:
        given["models"] = str(Path(args.model).expanduser().resolve())
    if args.grid:
        grid = read_grid(args.grid, given)
    else:
        grid = grid_from_values({"prompts": list(read_prompts_file(args.prompts)), **given})
    facts = {name: model_facts(name, args.preset) for name in dict.fromkeys(grid.models)}
    return expand(grid, facts)


def batch_backend(args: argparse.Namespace, options):
    from ldm.batch.run import in_process

    if args.ray == "none":
        return in_process(options)
    from ldm.distributed.batch import ray_backend

    return ray_backend(options, workers=args.workers, cpus_per_worker=args.cpus_per_worker, retries=args.retries)


def run_batch_command(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from tqdm import tqdm

    from ldm.batch.outputs import pending
    from ldm.batch.render import LoadOptions
    from ldm.batch.run import run_batch
    from ldm.kernels.paths import SpeedPaths

    jobs = batch_jobs(args)  # bad files and settings are refused here, before any cluster starts
    out = Path(args.out)
    if args.threads < 0:
        raise ValueError(f"--threads {args.threads}: expected 0 (the default) or more")
    options = LoadOptions(device=args.device, dtype=args.dtype, memory_format=args.memory_format,
                          speed=SpeedPaths.from_arguments(args), preset=args.preset, tokenizer=args.tokenizer,
                          threads=args.threads)
    backend = batch_backend(args, options)
    if args.ray == "none":
        cluster = nullcontext()
    else:
        from ldm.distributed.cluster import connected

        cluster = connected(args.ray)
    with cluster, tqdm(total=len(pending(jobs, out)), desc="batch", unit="image", dynamic_ncols=True) as bar:
        report = run_batch(jobs, out, backend, on_result=lambda result: bar.update(1))
    print(f"{out}: {len(report.rendered)} rendered, {report.skipped} already there, {len(report.failed)} failed "
          f"({report.images_per_second:.2f} images/s)")
    for job_id, message in report.failed.items():
        print(f"failed: {job_id}: {message}", file=sys.stderr)
    return 1 if report.failed else 0


def run_inspect(args: argparse.Namespace) -> int:
    from ldm.checkpoints.inspect import inspect_target

    report = inspect_target(args.target)
    if args.keys:
        print(json.dumps({k: list(v) for k, v in report.shapes.items()}, indent=1))
    else:
        print(report.describe())
    return 0


def run_train(args: argparse.Namespace) -> int:
    from ldm.data.batches import default_workers
    from ldm.devices import choose_device, keep_freed_memory
    from ldm.train.pipeline import train_stage

    if (args.stage is None) == (args.preset is None):
        raise ValueError("name a stage (autoencoder, txt2img, upscale) or a recipe with --preset, not both")
    device = choose_device(args.device)
    keep_freed_memory(device)
    workers = default_workers(device) if args.workers is None else args.workers
    if workers < 0:
        raise ValueError(f"--workers {workers}: expected 0 (draw scenes in the training process) or more")
    train_stage(args.stage, Path(args.work_dir), args.steps, device, recipe=args.preset,
                from_scratch=args.from_scratch, workers=workers)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ldm.train.evaluate import evaluate_default, format_table

    figures = evaluate_default(count=args.count, steps=args.steps, sampler=args.sampler, schedule=args.schedule)
    print(format_table(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


COMMANDS = {
    "txt2img": run_generation,
    "layout": run_generation,
    "img2img": run_generation,
    "inpaint": run_generation,
    "outpaint": run_generation,
    "upscale": run_generation,
    "semantic": run_semantic,
    "batch": run_batch_command,
    "inspect": run_inspect,
    "train": run_train,
    "eval": run_eval,
}


def run_bench(argv: list[str]) -> int:
    """``bench/speed.py``, which lives with the other benchmarks outside the package."""
    import runpy

    speed = runpy.run_path(str(Path(__file__).resolve().parents[1] / "bench" / "speed.py"))
    speed["main"](argv)
    return 0


def configure_logging(args: argparse.Namespace) -> None:
    """Warnings only unless --verbose; training reports its progress (steps, loss, speed) regardless,
    since a run lasts hours."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ldm.train").setLevel(logging.INFO if args.command == "train" or args.verbose else logging.NOTSET)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return run_bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except (CheckpointError, TokenizerNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
