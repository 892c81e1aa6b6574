"""Command line: ``python -m ldm txt2img ...`` and ``python -m ldm inspect ...``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ldm.checkpoints.errors import CheckpointError
from ldm.models.tokenizers import TokenizerNotFoundError

log = logging.getLogger("ldm")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint file (.safetensors preferred; .ckpt/.pt are read safely)")
    parser.add_argument("--preset", help="model preset name or YAML path, when detection cannot tell the family")
    parser.add_argument("--tokenizer", help="folder with the CLIP tokenizer's vocab.json and merges.txt")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None, help="use the EMA weights (default: when present)")
    ema.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights even when EMA weights are present")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldm", description="LDM Studio engine: latent diffusion on the command line.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    t2i = commands.add_parser("txt2img", help="generate images from a text prompt")
    _add_model_arguments(t2i)
    t2i.add_argument("--prompt", required=True)
    t2i.add_argument("--negative", default="", help="negative prompt (the unconditional branch of guidance)")
    t2i.add_argument("--steps", type=int, help="DDIM steps (default: the model's preset)")
    t2i.add_argument("--scale", type=float, help="classifier-free guidance scale; 1 disables guidance")
    t2i.add_argument("--eta", type=float, help="DDIM eta: 0 deterministic, 1 DDPM-like")
    t2i.add_argument("--seed", type=int, default=-1, help="seed; -1 picks one (it is printed and saved in the PNG)")
    t2i.add_argument("--width", type=int, help="image width in pixels (default: the model's training size)")
    t2i.add_argument("--height", type=int, help="image height in pixels")
    t2i.add_argument("--batch-size", type=int, default=1)
    t2i.add_argument("--out", default="txt2img.png", help="output PNG; a batch writes NAME-1.png, NAME-2.png, ...")

    inspect = commands.add_parser("inspect", help="name the family of a checkpoint or preset")
    inspect.add_argument("target", help="a checkpoint file, or a preset name or YAML path")
    inspect.add_argument("--keys", action="store_true", help="print a JSON object mapping every key to its shape")
    return parser


def run_txt2img(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ldm.checkpoints.loader import load_model
    from ldm.devices import choose_device, choose_dtype
    from ldm.tasks.parameters import save_png
    from ldm.sampling.schedules import ddim_schedule
    from ldm.tasks.request import GenerationRequest, resolve_request
    from ldm.tasks.txt2img import txt2img

    device = choose_device(args.device)
    loaded = load_model(
        args.model, device=device, dtype=choose_dtype(args.dtype, device), preset=args.preset,
        ema=args.ema, tokenizer_dir=args.tokenizer,
    )
    preset, config = loaded.preset, loaded.model.config
    size = config.latent_size * config.downsampling_factor
    request = GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative,
        steps=args.steps if args.steps is not None else preset.sampler.steps,
        scale=args.scale if args.scale is not None else preset.sampler.scale,
        eta=args.eta if args.eta is not None else preset.sampler.eta,
        seed=args.seed,
        width=args.width or size,
        height=args.height or size,
        batch_size=args.batch_size,
    )
    request, notices = resolve_request(request, config.size_multiple)
    for notice in notices:
        print(f"note: {notice}", file=sys.stderr)
    with tqdm(desc=f"sampling (seed {request.seed})", total=len(ddim_schedule(loaded.model.alphas_cumprod, request.steps)), unit="step") as bar:
        result = txt2img(loaded, request, callback=lambda info: bar.update(1))
    out = Path(args.out)
    for i, (image, seed, text) in enumerate(zip(result.images, result.seeds, result.parameters)):
        path = out if len(result.images) == 1 else out.with_name(f"{out.stem}-{i + 1}{out.suffix}")
        save_png(image, path, text)
        print(f"{path} (seed {seed})")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from ldm.checkpoints.inspect import inspect_target

    report = inspect_target(args.target)
    if args.keys:
        print(json.dumps({k: list(v) for k, v in report.shapes.items()}, indent=1))
    else:
        print(report.describe())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return {"txt2img": run_txt2img, "inspect": run_inspect}[args.command](args)
    except (CheckpointError, TokenizerNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
