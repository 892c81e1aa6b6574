"""3x3 convolutions as Winograd F(2x2, 3x3) when sampling on a CPU.

Each 2x2 block of output pixels is computed from the 4x4 block of input pixels around it: the input
block and the 3x3 kernel are taken to a 4x4 transform domain (``B^T d B`` and ``G g G^T``), multiplied
there (16 matrix products of tiles x input channels by input x output channels), and the product is
taken back (``A^T m A``). That is 16 multiplications for 4 outputs instead of 36: 2.25x fewer FLOPs
than the direct convolution, and one large matrix product per transform-domain point instead of a
convolution over a small image, whose weights a direct kernel reads once for few pixels. Its error
against a float64 reference is smaller than the direct kernel's in fp32 and about 1.5 times it in
bf16 (``tests/test_winograd.py`` bounds both; ``bench/convolutions.py`` times each layer shape).

Used for the 3x3 convolutions of the UNet and of the autoencoder (a tiled decode's tiles too, through
``Conv3x3.unpadded``). On a CPU with AVX512-BF16 the data transforms (``B^T d B`` of every block,
``A^T m A`` and the bias) run through our C++ kernels (``csrc/winograd_transforms.cpp``,
``ldm.kernels.cpu_kernels``): one pass over memory each instead of a pad, a gathering copy and a
16 x 16 matrix product.

The transformed kernels (16/9 the size of the kernel) are kept on the module, made at load by
``set_winograd`` (or at the first Winograd call), and made again when the module is moved or cast or
its weights change (``weights_changed``, which LoRA merging calls). Training, every device but the
CPU, and layers narrower than ``MIN_CHANNELS`` run the direct convolution (``torch.nn.functional.conv2d``);
fp32 images larger than ``FP32_MAX_PIXELS`` too, where the transforms' memory traffic outweighs the saving.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.kernels.cpu_kernels import load_cpu_kernels
from ldm.kernels.memory_format import memory_format_of

# F(2x2, 3x3) (Lavin and Gray, 2016): output = A^T [(G g G^T) * (B^T d B)] A
_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
_BT = torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, -1.0, 1.0, 0.0], [0.0, 1.0, 0.0, -1.0]],
                   dtype=torch.float64)
_AT = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
# Both 2-d transforms of a block as one matrix over its values, row-major: kron(M, M)
INPUT_TRANSFORM = torch.kron(_BT, _BT)  # (16, 16)
OUTPUT_TRANSFORM = torch.kron(_AT, _AT)  # (4, 16)
KERNEL_TRANSFORM = torch.kron(_G, _G)  # (16, 9)

# fp32 images up to this many pixels (128x128) go through Winograd; larger ones run faster direct
FP32_MAX_PIXELS = 128 * 128
# narrower layers spend their time in the transforms (the embedded default model ran slower with them)
MIN_CHANNELS = 256


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """(O, I, 3, 3) kernel -> (16, O, I) transformed kernel ``G g G^T``: one matrix product in the
    kernel's dtype (its entries 1, 1/2 and 1/4 are exact; the CPU kernels accumulate in float32 and
    round once)."""
    out_channels, in_channels = weight.shape[:2]
    transform = KERNEL_TRANSFORM.to(weight.device, weight.dtype)
    u = transform @ weight.detach().reshape(out_channels * in_channels, 9).T  # (16, O*I)
    return u.view(16, out_channels, in_channels)


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     transform_kernels: bool = False) -> torch.Tensor:
    """A 3x3 convolution, stride 1, zero padding 1, of ``x`` (B, C, H, W) with the transformed kernel
    ``weight`` (16, O, C) from ``winograd_weight``. Returns (B, O, H, W) channels-last in memory.
    ``transform_kernels``: the data transforms through our C++ kernels (``ldm.kernels.cpu_kernels``,
    which must be loaded), one pass over memory each; otherwise through torch's operations."""
    b, c, h, w = x.shape
    th, tw = (h + 1) // 2, (w + 1) // 2  # 2x2 output tiles; an odd side is padded and cropped
    if transform_kernels:
        v = torch.ops.ldm.winograd_input(x.permute(0, 2, 3, 1).contiguous(), th, tw)  # (16, tiles, C)
        m = torch.bmm(v, weight.transpose(1, 2))  # (16, tiles, O)
        return torch.ops.ldm.winograd_output(m, bias, b, h, w).permute(0, 3, 1, 2)
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1 + w % 2, 1, 1 + h % 2))  # (B, H+2, W+2, C) + odd sides
    blocks = padded.unfold(1, 4, 2).unfold(2, 4, 2)  # (B, th, tw, C, 4, 4), overlapping views
    d = blocks.permute(4, 5, 0, 1, 2, 3).reshape(16, b * th * tw * c)  # one row per block position
    v = (INPUT_TRANSFORM.to(x.device, x.dtype) @ d).view(16, b * th * tw, c)
    m = torch.bmm(v, weight.transpose(1, 2))  # (16, tiles, O); BLAS reads the transpose in place
    y = OUTPUT_TRANSFORM.to(x.device, x.dtype) @ m.view(16, -1)  # (4, tiles * O)
    y = y.view(2, 2, b, th, tw, -1).permute(2, 3, 0, 4, 1, 5)  # (B, th, 2, tw, 2, O)
    out = torch.empty(b, 2 * th, 2 * tw, y.shape[-1], device=x.device, dtype=x.dtype)
    if bias is None:
        out.view(y.shape).copy_(y)
    else:
        torch.add(y, bias, out=out.view(y.shape))
    return out[:, :h, :w].permute(0, 3, 1, 2)


def winograd_can_pay(conv: nn.Conv2d) -> bool:
    """Whether Winograd can be the faster way for this layer: on a CPU, in fp32 or bf16, with
    ``MIN_CHANNELS`` or more in and out."""
    w = conv.weight
    return (w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16)
            and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS)


def winograd_pays(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether Winograd is the faster way for this call: sampling (no gradient) a layer that
    ``winograd_can_pay``, bf16 at any size, fp32 up to ``FP32_MAX_PIXELS``."""
    if torch.is_grad_enabled() or x.dtype != conv.weight.dtype or not winograd_can_pay(conv):
        return False
    return x.dtype == torch.bfloat16 or x.shape[-2] * x.shape[-1] <= FP32_MAX_PIXELS


class Conv3x3(nn.Conv2d):
    """``nn.Conv2d(in, out, 3, padding=1)`` (the same ``weight`` and ``bias``, the checkpoint's keys)
    that runs as Winograd where ``winograd_pays`` and ``winograd`` is on (``set_winograd``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.winograd = True
        self.transform_kernels = False  # set by set_winograd where our C++ transforms are loaded
        self._transformed: tuple[tuple, torch.Tensor] | None = None  # (weight identity, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.winograd and winograd_pays(self, x):
            out = winograd_conv3x3(x, self.transformed_weight(), self.bias, self.transform_kernels)
            return out.contiguous(memory_format=memory_format_of(x))
        return super().forward(x)

    def unpadded(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution without its zero padding, (B, O, H-2, W-2): what a tile read with a
        one-pixel halo needs (``ldm.models.autoencoder_tiling``). Winograd where it pays, computed
        padded and cropped."""
        if self.winograd and winograd_pays(self, x):
            out = winograd_conv3x3(x, self.transformed_weight(), self.bias, self.transform_kernels)[..., 1:-1, 1:-1]
            return out.contiguous(memory_format=memory_format_of(x))
        return F.conv2d(x, self.weight, self.bias)

    def transformed_weight(self) -> torch.Tensor:
        w = self.weight
        identity = (w.data_ptr(), w.dtype, 0 if w.is_inference() else w._version)
        if self._transformed is None or self._transformed[0] != identity:
            self._transformed = (identity, winograd_weight(w))
        return self._transformed[1]

    def weights_changed(self) -> None:
        """The weights were written in place (a LoRA merged or restored, ``ldm.addons.lora``): the kept
        kernel is dropped and made again at the next Winograd call (an inference tensor's writes are
        not counted in its version, so ``transformed_weight`` alone could not tell)."""
        self._transformed = None

    def _apply(self, fn, recurse=True):  # .to(), .float(), .cpu(): a kept kernel would be stale
        self._transformed = None
        return super()._apply(fn, recurse)


def winograd_kernel_bytes(model: nn.Module) -> int:
    """The bytes the transformed kernels of ``model`` take beside its weights once ``set_winograd`` makes
    them: 16/9 of each paying layer's 3x3 kernel (SD v1 in fp32: 4.0 GiB, as much as its weights)."""
    return sum(16 * conv.out_channels * conv.in_channels * conv.weight.element_size()
               for conv in model.modules() if isinstance(conv, Conv3x3) and winograd_can_pay(conv))


def set_winograd(model: nn.Module, enabled: bool, transform_kernels: bool = True) -> int:
    """Turn Winograd on or off in every ``Conv3x3`` of ``model``. On, the transformed kernels of the
    layers where it can pay are made now (at load, where their memory is counted with the weights,
    and not in the first step); off, they are freed. ``transform_kernels``: those layers transform
    their data through our C++ kernels where they can be loaded (``ldm.kernels.cpu_kernels``; built on
    first use). Returns the number of layers that have Winograd kernels."""
    convs = [m for m in model.modules() if isinstance(m, Conv3x3)]
    paying = [conv for conv in convs if enabled and winograd_can_pay(conv)]
    kernels = bool(paying) and transform_kernels and load_cpu_kernels()
    for conv in convs:
        conv.winograd = enabled
        conv._transformed = None
        conv.transform_kernels = kernels
    for conv in paying:
        conv.transformed_weight()
    return len(paying)
