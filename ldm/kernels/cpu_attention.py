"""bf16 attention on CPUs with AVX512-BF16, through our own kernel (``csrc/attention_bf16.cpp``).

torch's CPU attention spends as long on the softmax's exponentials as on its two matrix products in
SD v1's 4096-token self-attention (head width 40). The kernel computes the products as AVX512-BF16
dot products over register tiles and the exponential as a short polynomial, one pass over the keys
per block of 48 queries (the online softmax of FlashAttention), accumulating in fp32. Its largest
error against a float64 reference is torch's bf16 kernel's (both are the final rounding to bf16);
``bench/attention.py`` times the two at SD's shapes.

The kernel is built with our other CPU kernels (``ldm.kernels.cpu_kernels``) and called as
``torch.ops.ldm.attention_bf16``. Where the CPU lacks AVX512-BF16, or no compiler is installed, or
the build fails, attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (a
warning says why). Only sampling uses it: calls that need gradients, other dtypes and other devices
take torch's kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.kernels.cpu_kernels import load_cpu_kernels


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, bf16_kernel: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, tokens, d) tensors; with ``bf16_kernel`` (set by
    ``set_attention_kernel``) sampling calls in bf16 on the CPU go to our kernel."""
    if (bf16_kernel and q.device.type == "cpu" and q.shape[-1] % 2 == 0
            and all(t.dtype == torch.bfloat16 and t.stride(-1) == 1 and not t.requires_grad for t in (q, k, v))):
        return torch.ops.ldm.attention_bf16(q, k, v, q.shape[-1] ** -0.5)
    return F.scaled_dot_product_attention(q, k, v)


def set_attention_kernel(model: nn.Module, enabled: bool) -> int:
    """Turn our bf16 attention kernel on or off in every attention layer of ``model`` (those with a
    ``bf16_kernel`` attribute); on builds or loads it first, and stays off where it cannot be had.
    Returns the number of layers that use it."""
    enabled = enabled and load_cpu_kernels()
    layers = [m for m in model.modules() if hasattr(m, "bf16_kernel")]
    for layer in layers:
        layer.bf16_kernel = enabled
    return len(layers) if enabled else 0
