"""Speed against diffusers on the same weights and machine: the full-size Stable Diffusion v1
architecture with random weights, built by this engine from its v1-inference preset and by diffusers
from the same tensors (through diffusers' own single-file converters), timed side by side in one run,
alternating, and checked for agreement. Also the embedded default model's whole text-to-image.

    .venv/bin/python -m ldm bench                 # CPU: fp32, and bf16 where the CPU has bf16 units
    .venv/bin/python -m ldm bench --device cuda   # GPU: fp16 and bf16
    .venv/bin/python -m ldm bench --parts unet --rounds 5
    .venv/bin/python -m ldm bench --parts unet vae --channels-last   # our models in channels-last
    .venv/bin/python -m ldm bench --parts fidelity --dtypes bf16     # PSNR of bf16 images against fp32
    .venv/bin/python -m ldm bench --parts unet --dtypes bf16 --channels-last --compile
    .venv/bin/python -m ldm bench --parts unet --malloc system      # the C library's allocator defaults
    .venv/bin/python -m ldm bench --parts unet --no-winograd        # our 3x3 convolutions direct (as diffusers')
    .venv/bin/python -m ldm bench --device cuda --no-cuda-graphs    # our UNet's kernels launched one by one
    .venv/bin/python -m ldm bench --parts unet --no-cpu-kernels     # torch's kernels only (ldm.kernels.cpu_kernels)
    .venv/bin/python -m ldm bench --parts txt2img --dtypes bf16 --rounds 2   # end to end, see below

``txt2img`` is the whole text to image at 512x512 on the full SD v1 architecture with random
weights, from its original-layout fp16 file (``bench/sd_files.py``): ours is the CLI's path
(``load_model`` as ``python -m ldm txt2img`` calls it, then ``txt2img`` with DPM++ 2M Karras, 20
steps, guidance 7.5); diffusers' is StableDiffusionPipeline with DPMSolverMultistepScheduler
(second order, Karras sigmas, final sigma 0) on the same file through its converters. Beside the
times it prints each call's peak: on a CPU the most resident memory during the call over what was
resident before it (the process's high-water mark, reset before each call), on a GPU
``torch.cuda.max_memory_allocated`` over what was allocated before.

Each figure is the median of ``--rounds`` timed calls after one warm-up. "ratio" is our time over
diffusers' (below 1: faster). TFLOP/s counts the part's floating-point work as diffusers does it
(torch's flop counter; our Winograd convolutions do less of it) over our time; "% peak" relates it
to a large matrix product's speed measured at the start, the practical limit of this machine for
this dtype. "max diff" is the largest difference between the two outputs (fp32: the same numbers up
to summation order).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.checkpoints.loader import build_model  # noqa: E402
from ldm.checkpoints.original_config import original_config  # noqa: E402
from ldm.checkpoints.presets import find_preset  # noqa: E402
from ldm.data.scoring import psnr  # noqa: E402
from ldm.devices import (choose_device, cpu_has_bf16, keep_freed_memory, peak_resident_mb, resident_mb,  # noqa: E402
                         reusing_freed_memory)
from ldm.kernels.cuda_graphs import set_cuda_graphs  # noqa: E402
from ldm.kernels.paths import SpeedPaths, set_speed_paths  # noqa: E402
from ldm.kernels.winograd import set_winograd  # noqa: E402
from ldm.options import add_speed_arguments  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PARTS = ("unet", "vae", "text", "default", "fidelity", "txt2img")
DEFAULT_PARTS = ("unet", "vae", "text", "default", "fidelity")  # txt2img: minutes a round, asked for by name
E2E_PROMPT = "a lighthouse on a cliff at dusk, oil painting"


@dataclass(frozen=True)
class Figure:
    part: str
    dtype: str
    ours_s: float
    theirs_s: float | None
    flop: float
    max_diff: float | None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """TFLOP/s of a large square matrix product (2048 on a CPU, 8192 on a GPU; the best of 20)."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(20):  # the best of many: on a shared machine single products vary by 10%
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def flops(call: Callable[[], object]) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        call()
    return float(counter.get_total_flops())


def alternate(ours: Callable[[], torch.Tensor], theirs: Callable[[], torch.Tensor] | None, rounds: int,
              device: torch.device) -> tuple[float, float | None, torch.Tensor, torch.Tensor | None]:
    """Median seconds of each, called in turn (ours, theirs, ours, ...) after a warm-up, and their outputs."""
    def timed(call):
        synchronize(device)
        start = time.perf_counter()
        out = call()
        synchronize(device)
        return time.perf_counter() - start, out

    out_ours, out_theirs = ours(), theirs() if theirs else None  # warm-up
    if device.type == "cuda":  # a second call records our UNet's CUDA graph (ldm.kernels.cuda_graphs)
        ours()
    times_ours, times_theirs = [], []
    for _ in range(rounds):
        t, out_ours = timed(ours)
        times_ours.append(t)
        if theirs:
            t, out_theirs = timed(theirs)
            times_theirs.append(t)
    return statistics.median(times_ours), statistics.median(times_theirs) if theirs else None, out_ours, out_theirs


def random_sd_v1(seed: int = 0):
    """Our SD v1 model with random weights (float32, CPU)."""
    torch.manual_seed(seed)
    model = build_model(find_preset("v1-inference").model, device="cpu").eval().requires_grad_(False)
    model.cond_stage_model.init_non_persistent_buffers()
    with torch.no_grad():  # the default init of a zero-initialised output layer would make the UNet trivial
        for p in model.parameters():
            if p.dim() > 1 and p.abs().max() == 0:
                p.normal_(0, 0.02)
    return model


def build_pair(seed: int = 0):
    """Our SD v1 model with random weights, and diffusers' UNet, VAE and CLIP text model from the same tensors."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    preset = find_preset("v1-inference")
    ours = random_sd_v1(seed)
    checkpoint = {k: v for k, v in ours.state_dict().items()}
    config = original_config(preset.model)
    unet_config = sfu.create_unet_diffusers_config_from_ldm(config, checkpoint)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(config, checkpoint, scaling_factor=preset.model.scale_factor)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)
    clip = preset.model.cond_stage
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=clip.vocab_size, hidden_size=clip.hidden_size, intermediate_size=clip.intermediate_size,
        num_hidden_layers=clip.num_layers, num_attention_heads=clip.num_heads, max_position_embeddings=clip.max_positions,
        hidden_act=clip.hidden_act))
    converted = sfu.convert_ldm_clip_checkpoint(checkpoint)
    text.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items() if not k.endswith("position_ids")},
                         strict=True)
    return ours, unet.eval().requires_grad_(False), vae.eval().requires_grad_(False), text.eval().requires_grad_(False)


def autocast(device: torch.device, dtype: torch.dtype):
    """diffusers' usual low-precision CPU path is bf16 autocast over fp32 weights (as measured in
    the project's notes); on a GPU its models are simply cast."""
    if device.type == "cpu" and dtype != torch.float32:
        return torch.autocast("cpu", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def run_pair_parts(parts: list[str], dtype_name: str, device: torch.device, rounds: int,
                   channels_last: bool = False, speed: SpeedPaths = SpeedPaths()) -> list[Figure]:
    dtype = DTYPES[dtype_name]
    ours, unet, vae, text = build_pair()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    ours = ours.to(device, dtype, memory_format=layout)
    set_speed_paths(ours, device, speed)  # as load_model does
    their_dtype = torch.float32 if device.type == "cpu" else dtype  # CPU: autocast over fp32 weights
    unet, vae, text = (m.to(device) if their_dtype == torch.float32 else m.to(device, their_dtype) for m in (unet, vae, text))
    g = torch.Generator().manual_seed(1)
    figures = []
    with torch.inference_mode():
        if "unet" in parts:  # one guided step: batch 2 (unconditional and conditional), 64x64 latent
            x = torch.randn(2, 4, 64, 64, generator=g).to(device)
            t = torch.tensor([500, 500], device=device)
            context = torch.randn(2, 77, 768, generator=g).to(device)

            def ours_call():
                return ours.unet(x.to(dtype).contiguous(memory_format=layout), t, context=context.to(dtype))

            def theirs_call():
                with autocast(device, dtype):
                    return unet(x.to(their_dtype), t, encoder_hidden_states=context.to(their_dtype)).sample

            figures.append(measure("UNet step (guided, 64x64 latent)", dtype_name, ours_call, theirs_call, rounds, device))
        if "vae" in parts:  # decoding one 512x512 image
            z = torch.randn(1, 4, 64, 64, generator=g).to(device)

            def ours_call():
                return ours.first_stage_model.decode(z.to(dtype).contiguous(memory_format=layout))

            def theirs_call():
                with autocast(device, dtype):
                    return vae.decode(z.to(their_dtype)).sample

            figures.append(measure("VAE decode 512x512", dtype_name, ours_call, theirs_call, rounds, device))
        if "text" in parts:  # two prompts of 77 tokens
            ids = torch.randint(0, 49407, (2, 1, 77), generator=g).to(device)

            def ours_call():
                return ours.cond_stage_model(ids)

            def theirs_call():
                with autocast(device, dtype):
                    return text(ids[:, 0]).last_hidden_state

            figures.append(measure("text encoder (2 x 77 tokens)", dtype_name, ours_call, theirs_call, rounds, device))
    return figures


def measure(part: str, dtype_name: str, ours, theirs, rounds: int, device: torch.device, count=None) -> Figure:
    """``count``: the call whose floating-point work is counted (default: theirs, or else ours)."""
    ours_s, theirs_s, a, b = alternate(ours, theirs, rounds, device)
    diff = None if b is None else (a.float() - b.float().reshape(a.shape)).abs().max().item()
    figure = Figure(part, dtype_name, ours_s, theirs_s, flops(count or theirs or ours), diff)
    print(format_figure(figure, None), flush=True)
    return figure


def default_model_figure(dtype_name: str, device: torch.device, rounds: int, channels_last: bool = False,
                         speed: SpeedPaths = SpeedPaths()) -> Figure:
    from ldm.checkpoints.loader import load_model
    from ldm.checkpoints.presets import DEFAULT_MODELS
    from ldm.tasks.request import GenerationRequest
    from ldm.tasks.txt2img import txt2img

    loaded = load_model(DEFAULT_MODELS["txt2img"], device=device, dtype=DTYPES[dtype_name],
                        memory_format="channels_last" if channels_last else "contiguous", speed=speed)
    request = GenerationRequest("a red circle in the top left and a small blue square at the bottom", steps=20, scale=4.0,
                                seed=1, width=64, height=64)

    def call():
        return torch.tensor(np.array(txt2img(loaded, request).images[0]))

    def count():  # after the timing: a replayed CUDA graph's work does not pass torch's flop counter
        set_cuda_graphs(loaded.model.unet, False)
        return call()

    return measure("default model text to image (64 px, 20 steps, guided)", dtype_name, call, None, rounds, device, count)


def default_model_fidelity(dtype_name: str, device: torch.device, count: int) -> list[float]:
    """PSNR of the default model's images in ``dtype_name`` against fp32, from the same held-out
    captions and seeds (64 px, 20 steps, guidance 4)."""
    from ldm.checkpoints.loader import load_model
    from ldm.checkpoints.presets import DEFAULT_MODELS
    from ldm.data.batches import HELD_OUT_SEED
    from ldm.data.world import scene_from_seed
    from ldm.tasks.request import GenerationRequest
    from ldm.tasks.txt2img import txt2img

    models = {d: load_model(DEFAULT_MODELS["txt2img"], device=device, dtype=d) for d in (torch.float32, DTYPES[dtype_name])}
    values = []
    for i in range(count):
        request = GenerationRequest(scene_from_seed(HELD_OUT_SEED + 10_000 + i).caption, steps=20, scale=4.0, seed=i,
                                    width=64, height=64)
        fp32, low = (np.asarray(txt2img(m, request).images[0]) for m in models.values())
        values.append(psnr(fp32, low))
    return values


def sd_v1_fidelity(dtype_name: str, device: torch.device, count: int, side: int = 256, steps: int = 10) -> list[float]:
    """PSNR of SD v1 (random weights) images in ``dtype_name`` against fp32: guided DDIM from the same
    noise and a random stand-in for the text embedding, then the VAE decode. The fp32 reference runs its
    convolutions directly; the low-precision model runs as the CLI does (Winograd where it pays, CUDA
    graphs on a GPU)."""
    from ldm.sampling.ddim import ddim_sample
    from ldm.sampling.guidance import ClassifierFreeGuidance
    from ldm.sampling.schedules import ddim_schedule
    from ldm.tasks.images import to_pil

    full = random_sd_v1().to(device)
    low = copy.deepcopy(full).to(dtype=DTYPES[dtype_name])  # fp32 stays fp32: no weights rounded and back
    set_winograd(full, False)  # the reference: direct convolutions in fp32
    set_speed_paths(low, device)  # as the CLI and the studio run
    values = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        x_T = torch.randn(1, 4, side // 8, side // 8, generator=g)
        context = torch.randn(2, 77, 768, generator=g)
        images = []
        for model in (full, low):
            dtype = model.dtype
            guided = ClassifierFreeGuidance(model.denoiser(), 7.5)
            with torch.inference_mode():
                z = ddim_sample(guided, x_T.to(device, dtype), ddim_schedule(model.alphas_cumprod, steps),
                                generator=[torch.Generator().manual_seed(i)],
                                extra_args={"uncond": {"context": context[:1].to(device, dtype)},
                                            "cond": {"context": context[1:].to(device, dtype)}})
                images.append(np.asarray(to_pil(model.decode_first_stage(z))[0]))
        values.append(psnr(*images))
    return values


def fidelity_lines(dtype_name: str, device: torch.device, count: int) -> list[str]:
    lines = []
    for name, measure_psnr in (("default model text to image", default_model_fidelity), ("SD v1 (random weights) 256 px, 10 steps", sd_v1_fidelity)):
        values = measure_psnr(dtype_name, device, count)
        line = f"{name:55s} {dtype_name:5s} PSNR vs fp32: mean {np.mean(values):.1f} dB, min {min(values):.1f} dB over {count} images"
        print(line, flush=True)
        lines.append(line)
    return lines


def reset_peak(device: torch.device) -> float:
    """Reset the peak memory counter; what is held now (MB)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from VmRSS
    return resident_mb()


def peak_since(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_resident_mb()


def end_to_end(dtype_name: str, device: torch.device, rounds: int, speed: SpeedPaths) -> Figure:
    """512x512 text to image, DPM++ 2M Karras 20 steps with guidance, ours (the CLI's path) and
    diffusers' alternating; prints times and each call's added peak memory."""
    from bench.sd_files import diffusers_pipeline, random_model_file
    from ldm.checkpoints.loader import load_model
    from ldm.tasks.request import GenerationRequest
    from ldm.tasks.txt2img import txt2img

    dtype = DTYPES[dtype_name]
    path = random_model_file("sd-v1")
    loaded = load_model(path, device=device, dtype=dtype, memory_format="auto", speed=speed)  # as the CLI's defaults
    request = GenerationRequest(E2E_PROMPT, steps=20, scale=7.5, seed=1, width=512, height=512,
                                sampler="DPM++ 2M", schedule="Karras")
    their_dtype = torch.float32 if device.type == "cpu" else dtype  # CPU: bf16 autocast over fp32 weights, as the UNet part
    pipe = diffusers_pipeline(path, their_dtype, "DPM++ 2M Karras").to(device)
    peaks = {"ours": [], "theirs": []}

    def with_peak(name, call):
        def measured():
            before = reset_peak(device)
            out = call()
            peaks[name].append(peak_since(device) - before)
            return out
        return measured

    def ours_call():
        return torch.tensor(np.array(txt2img(loaded, request).images[0]))

    def theirs_call():
        with autocast(device, dtype):
            image = pipe(E2E_PROMPT, height=512, width=512, num_inference_steps=20, guidance_scale=7.5,
                         generator=torch.Generator().manual_seed(1)).images[0]
        return torch.tensor(np.array(image))

    ours_s, theirs_s, _, _ = alternate(with_peak("ours", ours_call), with_peak("theirs", theirs_call), rounds, device)
    figure = Figure("text to image 512x512, DPM++ 2M Karras 20 steps", dtype_name, ours_s, theirs_s, 0.0, None)
    print(format_figure(figure, None), flush=True)
    unit = "allocated" if device.type == "cuda" else "resident"
    print(f"{'':55s} {dtype_name:5s} peak {unit} added a call: ours {max(peaks['ours']):,.0f} MB, diffusers "
          f"{max(peaks['theirs']):,.0f} MB (ratio {max(peaks['ours']) / max(peaks['theirs']):.2f}); weights held: ours "
          f"{weights_mb(loaded.model):,.0f} MB, diffusers {sum(weights_mb(m) for m in (pipe.unet, pipe.vae, pipe.text_encoder)):,.0f} MB",
          flush=True)
    return figure


def weights_mb(module: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in module.parameters()) / 2**20


def format_figure(f: Figure, peaks: dict[str, float] | None) -> str:
    rate = f.flop / f.ours_s / 1e12 if f.flop else 0.0
    theirs = f"{f.theirs_s:8.3f} s" if f.theirs_s is not None else "       -  "
    ratio = f"{f.ours_s / f.theirs_s:5.2f}" if f.theirs_s else "    -"
    peak = f"{100 * rate / peaks[f.dtype]:4.0f}%" if peaks and f.flop else "    -"
    diff = f"{f.max_diff:.2e}" if f.max_diff is not None else "-"
    return f"{f.part:55s} {f.dtype:5s} {f.ours_s:8.3f} s {theirs} {ratio} {rate:6.3f} {peak}  {diff}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ldm bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES),
                        help="default: fp32 and, on a CPU with bf16 units, bf16; fp16 and bf16 on a GPU")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(DEFAULT_PARTS),
                        help=f"default: {' '.join(DEFAULT_PARTS)}; txt2img (end to end) when named")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fidelity-images", type=int, default=8, help="images per model for the low-precision PSNR check")
    parser.add_argument("--channels-last", action="store_true", help="run our models in channels-last memory format (the default on a CPU: "
                        "ldm.kernels.memory_format)")
    add_speed_arguments(parser)  # as the CLI and the studio take them; --compile compiles in the warm-up call
    parser.add_argument("--threads", type=int, help="torch threads on the CPU (default: torch's choice)")
    parser.add_argument("--malloc", choices=["kept", "system"], default="kept",
                        help="CPU: kept (freed memory stays in the process, as in the CLI and the studio: "
                        "ldm.devices.reusing_freed_memory) or system (the C library's defaults); both models run under it")
    args = parser.parse_args(argv)
    device = choose_device(args.device)
    speed = SpeedPaths.from_arguments(args)
    kept = args.malloc == "kept" and keep_freed_memory(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = args.dtypes or (["fp16", "bf16"] if device.type == "cuda" else ["fp32"] + (["bf16"] if cpu_has_bf16() else []))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} on {name}" + ("" if device.type == "cuda" else f", memory {'kept' if kept else 'system'}"))
    peaks = {d: matmul_peak(device, DTYPES[d]) for d in dtypes}
    print("matrix product peak: " + ", ".join(f"{d} {p:.3f} TFLOP/s" for d, p in peaks.items()))
    print(f"{'part':55s} {'dtype':5s} {'ours':>10s} {'diffusers':>10s} {'ratio':>5s} {'TFLOP/s':>6s} {'peak':>5s}  max diff")
    figures, fidelity = [], []
    with reusing_freed_memory():  # kept as in the CLI's sampling steps (here the VAE's and the text encoder's calls too)
        for dtype_name in dtypes:
            pair_parts = [p for p in args.parts if p in ("unet", "vae", "text")]
            if pair_parts:
                figures += run_pair_parts(pair_parts, dtype_name, device, args.rounds, args.channels_last, speed)
            if "default" in args.parts:
                # never compiled, as before SpeedPaths: --compile is for the SD v1 UNet's figures
                figures.append(default_model_figure(dtype_name, device, args.rounds, args.channels_last,
                                                    replace(speed, compile=False)))
            if "fidelity" in args.parts and DTYPES[dtype_name] != torch.float32:
                fidelity += fidelity_lines(dtype_name, device, args.fidelity_images)
    if "txt2img" in args.parts:  # the CLI's own memory policy (kept freed memory while sampling only), both pipelines under it
        for dtype_name in dtypes:
            figures.append(end_to_end(dtype_name, device, args.rounds, speed))
    print("\nsummary")
    for f in figures:
        print(format_figure(f, peaks))
    for line in fidelity:
        print(line)


if __name__ == "__main__":
    main()
