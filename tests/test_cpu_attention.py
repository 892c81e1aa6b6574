"""Our bf16 attention kernel for CPUs with AVX512-BF16 (ldm/kernels/cpu_attention.py): its numbers
against a float64 reference written out here, and where it is used. Building and the fallback where
it cannot be built: tests/test_cpu_kernels.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ldm.kernels.cpu_attention as cpu_attention
from ldm.devices import cpu_has_avx512_bf16
from ldm.kernels.cpu_kernels import load_cpu_kernels
from ldm.kernels import paths
from ldm.kernels.paths import SpeedPaths
from ldm.models.attention import AttentionBlock, CrossAttention
from ldm.models.autoencoder import AttnBlock
from ldm.tasks.request import GenerationRequest
from ldm.tasks.txt2img import txt2img

pytestmark = pytest.mark.kernels

needs_avx512_bf16 = pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="the kernel needs a CPU with AVX512-BF16")


@pytest.fixture(scope="module")
def kernel():
    """The built kernel: on a CPU with AVX512-BF16, with a C++ compiler installed (./launch.sh installs
    g++), not having it is a failure, not a skip."""
    assert load_cpu_kernels(), "our CPU kernels did not build (see the warning above)"
    return torch.ops.ldm.attention_bf16


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in float64, written out."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return torch.softmax(scores, dim=-1) @ v


def heads_view(batch: int, tokens: int, heads: int, dim: int, generator: torch.Generator, spread: float = 1.0):
    """(B, heads, N, d) bf16 views of (B, N, heads*d) memory, as a Linear's output is split into heads."""
    flat = torch.randn(batch, tokens, heads * dim, generator=generator) * spread
    return flat.bfloat16().view(batch, tokens, heads, dim).transpose(1, 2)


# (batch, heads, queries, keys, dim): SD v1's self-attention at each UNet level and its cross-attention,
# SD 2's head width, the autoencoder's single wide head, and edge cases (tails of the 48-query and
# 64-key blocks, one key, the narrowest head)
SHAPES = [(2, 8, 4096, 4096, 40), (2, 8, 1024, 1024, 80), (2, 8, 256, 256, 160), (2, 8, 4096, 77, 40),
          (2, 5, 1024, 1024, 64), (1, 1, 1024, 1024, 512), (1, 3, 100, 37, 64), (1, 2, 49, 65, 2),
          (3, 1, 47, 1, 18), (1, 2, 70, 130, 272)]


@needs_avx512_bf16
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_the_kernel_is_as_close_to_float64_as_torchs_bf16_attention(kernel, shape):
    b, h, n, m, d = shape
    g = torch.Generator().manual_seed(n * m + d)
    q, k, v = heads_view(b, n, h, d, g), heads_view(b, m, h, d, g), heads_view(b, m, h, d, g)
    expected = reference(q, k, v)
    got = kernel(q, k, v, d**-0.5)
    torchs = F.scaled_dot_product_attention(q, k, v)
    assert got.shape == (b, h, n, d) and got.dtype == torch.bfloat16
    assert got.transpose(1, 2).is_contiguous()  # (B, N, heads, d) memory: merging the heads back is a view
    err, torch_err = ((t.double() - expected).abs() for t in (got, torchs))
    assert err.max() <= 1.25 * torch_err.max() + 1e-3
    assert err.mean() <= 1.25 * torch_err.mean() + 1e-5


@needs_avx512_bf16
def test_large_scores_neither_overflow_nor_lose_the_largest_key(kernel):
    """Scores in the hundreds (the online softmax subtracts each row's running maximum), and rows whose
    largest score comes in a later block of keys than their first."""
    g = torch.Generator().manual_seed(0)
    q, k, v = heads_view(1, 96, 2, 64, g, spread=6.0), heads_view(1, 700, 2, 64, g, spread=6.0), heads_view(1, 700, 2, 64, g)
    k[:, :, 650] = q[:, :, 5] * 3  # row 5's winner is in the third block of 256 keys
    got = kernel(q, k, v, 64**-0.5)
    expected = reference(q, k, v)
    assert torch.isfinite(got).all()
    assert (expected[:, :, 5] - v[:, :, 650].double()).abs().max() < 1e-6
    assert (got.double() - expected).abs().max() < 2e-2


@needs_avx512_bf16
def test_the_kernel_refuses_what_it_cannot_compute_with_a_message(kernel):
    q = torch.zeros(1, 2, 8, 16, dtype=torch.bfloat16)
    for args, message in (((q.float(), q, q, 0.25), "bfloat16"), ((q[..., :15], q[..., :15], q[..., :15], 0.25), "even"),
                          ((q, q[:, :1], q, 0.25), "share batch and heads"), ((q, q, q[..., :8], 0.25), "match q's dim"),
                          ((q, q, q, -1.0), "scale must be positive"), ((q.transpose(2, 3), q, q, 0.25), "contiguous")):
        with pytest.raises(RuntimeError, match=message):
            kernel(*args)


@needs_avx512_bf16
def test_attention_uses_the_kernel_only_for_bf16_sampling_on_the_cpu(kernel, monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(a[0].dtype) or sdpa(*a, **kw))
    g = torch.Generator().manual_seed(1)
    q, k, v = (heads_view(1, 64, 2, 16, g) for _ in range(3))
    expected = kernel(q, k, v, 16**-0.5)
    assert torch.equal(cpu_attention.attention(q, k, v, bf16_kernel=True), expected) and calls == []
    cpu_attention.attention(q, k, v, bf16_kernel=False)
    cpu_attention.attention(q.float(), k.float(), v.float(), bf16_kernel=True)
    cpu_attention.attention(q[..., :15], k[..., :15], v[..., :15], bf16_kernel=True)  # odd width
    cpu_attention.attention(q.requires_grad_(), k, v, bf16_kernel=True)  # training: torch's, which has a backward
    assert calls == [torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16]


@needs_avx512_bf16
def test_a_bf16_model_attends_through_the_kernel_and_generates_the_same_kind_of_image(kernel, tiny_sd_v1, monkeypatch):
    monkeypatch.setattr(paths, "cpu_has_amx", lambda: False)  # as on a CPU with AVX512-BF16 and no AMX
    loaded = {name: tiny_sd_v1.load(dtype=dtype, speed=SpeedPaths(cpu_kernels=on))
              for name, dtype, on in (("on", torch.bfloat16, True), ("off", torch.bfloat16, False), ("fp32", torch.float32, True))}
    layers = {name: [m.bf16_kernel for m in lm.model.modules() if isinstance(m, (CrossAttention, AttentionBlock, AttnBlock))]
              for name, lm in loaded.items()}
    assert layers["on"] and all(layers["on"]) and not any(layers["off"]) and not any(layers["fp32"])
    calls = []
    op = torch.ops.ldm.attention_bf16
    monkeypatch.setattr(torch.ops.ldm, "attention_bf16", lambda *a: calls.append(a[0].shape) or op(*a))
    request = GenerationRequest("a red house", steps=4, scale=5.0, seed=3, width=32, height=32)
    images = {name: np.asarray(txt2img(lm, request).images[0]).astype(float) for name, lm in loaded.items()}
    unet_layers = sum(isinstance(m, (CrossAttention, AttentionBlock)) for m in loaded["on"].model.model.modules())
    decoder_layers = sum(isinstance(m, AttnBlock) for m in loaded["on"].model.first_stage_model.decoder.modules())
    assert len(calls) == 4 * unet_layers + decoder_layers  # one batched (guided) call per layer and step
    assert np.abs(images["on"] - images["off"]).mean() < 2.0  # bf16 against bf16 through torch's kernel
    assert np.abs(images["on"] - images["fp32"]).mean() < 4.0
