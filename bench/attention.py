"""bf16 attention: our kernel for CPUs with AVX512-BF16 (``ldm.kernels.cpu_attention``) against torch's
``scaled_dot_product_attention``, at the shapes of Stable Diffusion v1 at 512 px (guided batch of 2,
8 heads), SD 2's head width and the autoencoder's single wide head: the best time of each over
``--rounds`` calls, the largest error of each against float64, and the achieved TFLOP/s of ours (the
two matrix products' floating-point work).

    .venv/bin/python bench/attention.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.devices import keep_freed_memory, reusing_freed_memory  # noqa: E402
from ldm.kernels.cpu_kernels import load_cpu_kernels  # noqa: E402

# (what, batch, heads, queries, keys, head width)
SHAPES = [
    ("SD v1 self-attention, 64x64 latent", 2, 8, 4096, 4096, 40),
    ("SD v1 self-attention, 32x32", 2, 8, 1024, 1024, 80),
    ("SD v1 self-attention, 16x16", 2, 8, 256, 256, 160),
    ("SD v1 cross-attention, 64x64 to 77 tokens", 2, 8, 4096, 77, 40),
    ("SD 2 self-attention, 96x96 latent", 2, 5, 9216, 9216, 64),
    ("VAE mid-block attention, 512 px", 1, 1, 4096, 4096, 512),
]


def best_seconds(call, rounds: int) -> float:
    call()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def float64_error(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
    """Largest difference from softmax(q k^T / sqrt(d)) v in float64, one head at a time."""
    worst = 0.0
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            qd, kd, vd = (t[b, h].double() for t in (q, k, v))
            expected = torch.softmax(qd @ kd.T / qd.shape[-1] ** 0.5, dim=-1) @ vd
            worst = max(worst, (out[b, h].double() - expected).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    keep_freed_memory(torch.device("cpu"))
    if not load_cpu_kernels():
        sys.exit("our bf16 attention kernel is not available here (it needs a CPU with AVX512-BF16 and a C++ compiler)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'shape':44s} {'(B, heads, N, M, d)':>24s} {'ours':>9s} {'torch':>9s} {'ratio':>5s} {'TFLOP/s':>7s}  "
          "error ours / torch")
    g = torch.Generator().manual_seed(0)
    for what, b, h, n, m, d in SHAPES:
        # (B, heads, N, d) views of (B, N, heads * d) memory, as the UNet's projections give them
        q, k, v = (torch.randn(b, tokens, h * d, generator=g).bfloat16().view(b, tokens, h, d).transpose(1, 2)
                   for tokens in (n, m, m))
        with torch.inference_mode(), reusing_freed_memory():  # kept as in sampling steps
            ours_s = best_seconds(lambda: torch.ops.ldm.attention_bf16(q, k, v, d**-0.5), args.rounds)
            torch_s = best_seconds(lambda: F.scaled_dot_product_attention(q, k, v), args.rounds)
            errors = [float64_error(out, q, k, v) for out in (torch.ops.ldm.attention_bf16(q, k, v, d**-0.5),
                                                               F.scaled_dot_product_attention(q, k, v))]
        tflops = 4 * b * h * n * m * d / ours_s / 1e12
        print(f"{what:44s} {str((b, h, n, m, d)):>24s} {1e3 * ours_s:6.1f} ms {1e3 * torch_s:6.1f} ms "
              f"{ours_s / torch_s:5.2f} {tflops:7.3f}  {errors[0]:.1e} / {errors[1]:.1e}", flush=True)


if __name__ == "__main__":
    main()
