"""How long switching LoRAs takes on the full-size Stable Diffusion v1 (random weights, its original
fp16 file from ``bench/sd_files.py``), on the path a generation takes: the model loaded as
``python -m ldm txt2img`` loads it (the CLI's defaults), the prompt's ``<lora:NAME:WEIGHT>`` tag
looked up and read (``ldm.addons.library.prompt_loras``), merged into the weights and restored
(``ldm.addons.lora.merged_loras``) around the sampling.

    .venv/bin/python bench/lora_switch.py                    # rank 32 over every attention layer
    .venv/bin/python bench/lora_switch.py --rank 128 --rounds 9
    .venv/bin/python bench/lora_switch.py --no-diffusers     # ours only

The LoRAs are kohya-format files with random factors (fp16, alpha = rank / 2) on every attention
projection: q, k, v and out of each UNet transformer block's self- and cross-attention, and of each
text-encoder layer (128 + 48 layers, what a typical character or style LoRA trains). Two such files
are switched between, as an artist does from one image to the next.

Printed per part, the median of ``--rounds`` after one warm-up: "read" (find the file, read its
tensors and map them onto the model), "merge" (add the deltas to the weights, keeping CPU copies),
"restore" (copy the weights back) and "switch" = restore + read + merge, what one LoRA to the next
adds to a generation. diffusers' figures, on the same weights in one run, are its
``load_lora_weights`` + ``fuse_lora`` (read and merge) and ``unfuse_lora`` + ``unload_lora_weights``
(restore), through its kohya converter and PEFT.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.sd_files import random_model_file  # noqa: E402

ATTENTION = re.compile(r"^(down_blocks|mid_block|up_blocks)_.*_attn[12]_(to_q|to_k|to_v|to_out_0)$"
                       r"|^text_model_encoder_layers_\d+_self_attn_(q|k|v|out)_proj$")


def write_lora(model, path: Path, rank: int, seed: int) -> int:
    """A kohya LoRA of ``rank`` on every attention projection of ``model``; returns its module count."""
    from safetensors.torch import save_file

    from ldm.addons.lora import lora_targets

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for (tower, name), target in sorted(lora_targets(model).items()):
        if not ATTENTION.match(name):
            continue
        out_features, in_features = target.weight.shape
        key = f"lora_{tower}_{name}"
        tensors[f"{key}.lora_down.weight"] = (torch.randn(rank, in_features, generator=generator) / in_features**0.5).half()
        tensors[f"{key}.lora_up.weight"] = (torch.randn(out_features, rank, generator=generator) * 0.01).half()
        tensors[f"{key}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1", "ss_network_dim": str(rank)})
    return len(tensors) // 3


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def ours(loaded, folder: Path, names: list[str], rounds: int) -> dict[str, list[float]]:
    """read, merge and restore times of generations alternating between the LoRAs ``names``."""
    from ldm.addons.library import prompt_loras
    from ldm.addons.lora import merged_loras

    model, times = loaded.model, {"read": [], "merge": [], "restore": []}
    before = {k: v.clone() for k, v in model.state_dict().items() if "attn" in k}
    for i in range(rounds + 1):
        prompt = f"<lora:{names[i % len(names)]}:0.8> a lighthouse at dusk"
        start = time.perf_counter()
        loras = prompt_loras(model, [prompt], [folder])
        read = time.perf_counter() - start
        block = merged_loras(loras.applied)
        merge = timed(block.__enter__)
        restore = timed(lambda: block.__exit__(None, None, None))
        if i:  # the first is the warm-up
            for part, seconds in zip(times, (read, merge, restore)):
                times[part].append(seconds)
    after = model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    if changed:
        raise SystemExit(f"restore did not bring back {len(changed)} weights, e.g. {changed[0]}")
    return times


def theirs(path: Path, folder: Path, names: list[str], rounds: int) -> dict[str, list[float]]:
    """diffusers' load_lora_weights + fuse_lora, and unfuse_lora + unload_lora_weights, on the same file."""
    from bench.sd_files import diffusers_pipeline

    pipe = diffusers_pipeline(path, torch.float32)
    times = {"read": [], "merge": [], "restore": []}
    for i in range(rounds + 1):
        name = names[i % len(names)]
        read = timed(lambda: pipe.load_lora_weights(str(folder / f"{name}.safetensors"), adapter_name=f"a{i}"))
        merge = timed(lambda: pipe.fuse_lora(lora_scale=0.8))
        restore = timed(lambda: (pipe.unfuse_lora(), pipe.unload_lora_weights()))
        if i:
            for part, seconds in zip(times, (read, merge, restore)):
                times[part].append(seconds)
    return times


def report(who: str, times: dict[str, list[float]]) -> dict[str, float]:
    figures = {part: statistics.median(values) for part, values in times.items()}
    figures["switch"] = figures["restore"] + figures["read"] + figures["merge"]
    print(f"{who:<10}" + "".join(f"{figures[p]:>10.3f}" for p in ("read", "merge", "restore", "switch")), flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-diffusers", action="store_true", help="measure ours only")
    args = parser.parse_args()

    from ldm.cli import build_parser, load

    path = random_model_file("sd-v1")
    cli_args = build_parser().parse_args(["txt2img", "--model", str(path)])
    loaded = load(cli_args, "txt2img")  # the CLI's own loading, with its defaults
    print(f"SD v1 (random weights) loaded as the CLI does: {loaded.model.dtype}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        names = ["styleA", "styleB"]
        for seed, name in enumerate(names):
            modules = write_lora(loaded.model, folder / f"{name}.safetensors", args.rank, seed)
        size = (folder / f"{names[0]}.safetensors").stat().st_size / 1e6
        print(f"LoRA: rank {args.rank}, {modules} attention layers, {size:.1f} MB each (fp16); "
              f"median of {args.rounds} generations alternating between two such files")
        print(f"{'seconds':<10}{'read':>10}{'merge':>10}{'restore':>10}{'switch':>10}")
        mine = report("ours", ours(loaded, folder, names, args.rounds))
        if not args.no_diffusers:
            del loaded
            their = report("diffusers", theirs(path, folder, names, args.rounds))
            print(f"switch: ours {mine['switch']:.3f} s, diffusers {their['switch']:.3f} s, "
                  f"ratio {mine['switch'] / their['switch']:.2f}")
        print(f"merge + restore: {mine['merge'] + mine['restore']:.3f} s (target 0.5 s)")


if __name__ == "__main__":
    main()
