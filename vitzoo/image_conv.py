"""A model's first convolution, 3x3 over the 3-channel input image, with our own AVX-512 kernel (for
:func:`vitzoo.deploy`).

Convolutional stems (SHViT, EfficientViT, FastViT, MobileNetV3) start with a 3x3, stride-2 convolution of the RGB
image. ``deploy()``'s channels-last model needs its input in channels-last, a full copy of the batch before the
first layer, and oneDNN's kernel for 3 input channels is slow. This kernel reads the NCHW image as it comes and
writes channels-last: on SHViT-S1 at batch 16 the stem ran in 5.3 ms instead of 6.9 ms (2 threads), the whole
model 2-3% faster in IEEE fp32 and 3-14% under bf16x3 (``docs/benchmarks.md`` section 9). It makes one pass per
16 output channels, so ``deploy()`` uses it up to 16 (:data:`MAX_OUT_CHANNELS`). The arithmetic is IEEE fp32 (one
fused multiply-add per tap, after the bias; only the summation order differs from oneDNN's), so it is used with
either ``fp32_precision``.

The kernel (``image_conv.c``, next to this file) is compiled on first use and cached like the others
(:mod:`vitzoo.native_build`) and checked against float64 before it is used. It needs Linux on x86-64 with
AVX-512F and a C compiler; anywhere else :func:`load` returns ``None``, :func:`unavailable_reason` says why, and
the convolution stays on oneDNN.
"""
from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from vitzoo.native_build import load_once

__all__ = ["REQUIRED_CPU_FLAGS", "image_conv3x3", "load", "pack_weight", "unavailable_reason"]

SOURCE = Path(__file__).with_name("image_conv.c")
REQUIRED_CPU_FLAGS = ("avx512f", "fma")
_FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-mavx512f", "-mfma")
IN_CHANNELS = 3
#: deploy() uses the kernel up to this many output channels (one 16-lane block; see PackedConv2d.use_image_kernel)
MAX_OUT_CHANNELS = 16
STRIDES = (1, 2)

_lock = threading.Lock()
_state: dict = {}  # "lib" (CDLL or None) and "reason" (str) once load() has run


def load() -> Optional[ctypes.CDLL]:
    """The kernel library, compiled and checked on the first call; ``None`` where it cannot run here."""
    p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    functions = {"vitzoo_image_conv3x3": [p, i64, i64, i64, *[i] * 7, p, p, i, i, p, i]}
    return load_once(_state, _lock, SOURCE, _FLAGS, REQUIRED_CPU_FLAGS, functions, _self_check)


def unavailable_reason() -> str:
    """Why :func:`load` returns ``None`` (empty if it does not)."""
    load()
    return _state["reason"]


def _self_check(lib: ctypes.CDLL) -> Optional[str]:
    """A small convolution with borders on every side and a channel tail; ``None`` if it matches float64."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 6, generator=generator)
    weight = torch.randn(21, 3, 3, 3, generator=generator)
    bias = torch.randn(21, generator=generator)
    expected = F.conv2d(x.double(), weight.double(), bias.double(), 2, 1).relu()
    got = _run(lib, x, pack_weight(weight, bias), 21, 2, 1, True)
    error = (got.double() - expected).abs().max().item()
    return None if error <= 1e-5 * max(1.0, expected.abs().max().item()) else f"self-check off by {error:.3g}"


def pack_weight(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``(N, 3, 3, 3)`` weight and the bias as the kernel reads them: ``(ceil(N / 16), 27, 16)`` and
    ``ceil(N / 16) * 16`` fp32, zero-padded (no bias: zeros)."""
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (IN_CHANNELS, 3, 3):
        raise ValueError(f"expected a (N, 3, 3, 3) convolution weight, got {tuple(weight.shape)}")
    if bias is not None and bias.numel() != weight.shape[0]:
        raise ValueError(f"bias of shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    n = weight.shape[0]
    blocks = -(-n // 16)
    padded = torch.zeros(blocks * 16, 27)
    padded[:n] = weight.detach().float().reshape(n, 27)
    packed_bias = torch.zeros(blocks * 16)
    if bias is not None:
        packed_bias[:n] = bias.detach().float()
    return padded.view(blocks, 16, 27).transpose(1, 2).contiguous(), packed_bias


def _output_size(x: torch.Tensor, stride: int, padding: int) -> Tuple[int, int]:
    return tuple((size + 2 * padding - 3) // stride + 1 for size in x.shape[2:])


def _run(lib: ctypes.CDLL, x: torch.Tensor, packed: Tuple[torch.Tensor, torch.Tensor], out_channels: int,
         stride: int, padding: int, relu: bool) -> torch.Tensor:
    batch, _, height, width = x.shape
    oh, ow = _output_size(x, stride, padding)
    out = torch.empty(batch, oh, ow, out_channels).permute(0, 3, 1, 2)  # channels-last (B, N, OH, OW)
    status = lib.vitzoo_image_conv3x3(x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), batch, height, width,
                                      stride, padding, oh, ow, packed[0].data_ptr(), packed[1].data_ptr(),
                                      out_channels, int(relu), out.data_ptr(), torch.get_num_threads())
    if status == -1:
        raise MemoryError("vitzoo image convolution kernel: could not allocate its row of zeros")
    if status != 0:
        raise RuntimeError(f"vitzoo image convolution kernel failed (status {status})")
    return out


def _check_packed(packed: Tuple[torch.Tensor, torch.Tensor], out_channels: int) -> None:
    """The kernel reads ceil(out_channels / 16) blocks of 27 x 16 weights and 16 biases each, as :func:`pack_weight`
    lays them out: anything else (a packing built by hand) is refused, not read past its end (found by an audit)."""
    weight, bias = packed
    for name, t in (("weight", weight), ("bias", bias)):
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"the packed {name} must be a contiguous float32 CPU tensor (from pack_weight), got "
                             f"{t.dtype} on {t.device}{'' if t.is_contiguous() else ', not contiguous'}")
    if weight.dim() != 3 or tuple(weight.shape[1:]) != (27, 16) or bias.shape != (weight.shape[0] * 16,):
        raise ValueError(f"packed weight {tuple(weight.shape)} and bias {tuple(bias.shape)} are not pack_weight's "
                         "(blocks, 27, 16) and (blocks * 16,)")
    if not 0 < out_channels <= bias.numel():  # the kernel reads out_channels weights and biases
        raise ValueError(f"{out_channels} output channels do not fit a weight packed for {bias.numel()} (padded)")


def image_conv3x3(x: torch.Tensor, packed: Tuple[torch.Tensor, torch.Tensor], out_channels: int,
                  stride: Sequence[int], padding: Sequence[int], relu: bool = False) -> torch.Tensor:
    """``relu?(conv3x3(x) + bias)`` of a 3-channel image with zero padding, in IEEE fp32.

    Args:
        x: ``(B, 3, H, W)`` float32 CPU image, best NCHW-contiguous (any layout whose rows are not contiguous is
            copied to NCHW first).
        packed: :func:`pack_weight` of the ``(out_channels, 3, 3, 3)`` weight and the bias.
        out_channels: The weight's first dimension (the packing pads it).
        stride, padding: The convolution's, equal in both dimensions; stride 1 or 2.
        relu: Apply a ReLU last.

    Returns:
        A new channels-last ``(B, out_channels, OH, OW)`` float32 tensor.
    """
    lib = load()
    if lib is None:
        raise RuntimeError(f"the image convolution kernel is not available here: {unavailable_reason()}")
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 4 or x.shape[1] != IN_CHANNELS:
        raise ValueError(f"the image convolution kernel takes a (B, 3, H, W) float32 CPU input, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    if stride[0] != stride[1] or stride[0] not in STRIDES or padding[0] != padding[1]:
        raise ValueError(f"the image convolution kernel takes equal strides of 1 or 2 and equal padding, got "
                         f"stride {tuple(stride)}, padding {tuple(padding)}")
    if min(_output_size(x, stride[0], padding[0])) < 1:
        raise ValueError(f"input of {tuple(x.shape[2:])} (padding {padding[0]}) is smaller than the 3x3 kernel")
    if max(x.shape[2:]) + 2 * padding[0] > 2 ** 31 - 1:  # input coordinates, counted in C ints (found by an audit:
        # an image 2**31 + 1 rows high was read as all padding, the output the bias alone)
        raise ValueError(f"input of {tuple(x.shape[2:])} (padding {padding[0]}) is larger than the image convolution "
                         "kernel counts (a padded height and width of at most 2**31 - 1)")
    if x.shape[0] * _output_size(x, stride[0], padding[0])[0] > 2 ** 31 - 1:  # output rows, counted in a C int
        raise ValueError(f"{x.shape[0]} images of {tuple(x.shape[2:])} are more output rows than the image "
                         "convolution kernel counts (2**31 - 1): split the batch")
    _check_packed(packed, out_channels)
    if x.stride(3) != 1:
        x = x.contiguous()
    return _run(lib, x, packed, out_channels, stride[0], padding[0], relu)
