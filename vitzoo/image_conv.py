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

Where the first convolution writes 16 channels that only a 3x3, stride-2 convolution reads (SHViT-S1/S2's and
EfficientViT-M4's stems: 3 -> 16 -> 32), :func:`image_conv_pair` runs both in one call. Each thread computes a band
of the first convolution's output rows (about :data:`PAIR_BAND_BYTES`) and the second convolution's rows from it
while they are in its cache, so the stem's largest activation (12.8 MB for S1 at batch 16) is never written to
main memory and read back. Also IEEE fp32; the band's edge rows of the first convolution are computed twice.
"""
from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from vitzoo.native_build import load_once

__all__ = ["REQUIRED_CPU_FLAGS", "default_band", "image_conv3x3", "image_conv_pair", "load", "pack_second_weight",
           "pack_weight", "pair_takes", "unavailable_reason"]

SOURCE = Path(__file__).with_name("image_conv.c")
REQUIRED_CPU_FLAGS = ("avx512f", "fma")
_FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-mavx512f", "-mfma")
IN_CHANNELS = 3
#: deploy() uses the kernel up to this many output channels (one 16-lane block; see PackedConv2d.use_image_kernel)
MAX_OUT_CHANNELS = 16
STRIDES = (1, 2)
#: The second convolution image_conv_pair runs: 3x3, stride 2, padding 1, from the first one's 16 channels into a
#: multiple of 16
PAIR_IN_CHANNELS = 16
#: Bytes of the first convolution's output a thread holds at a time in image_conv_pair (a band of its rows): well
#: inside a recent x86 core's L2 share; measured on SHViT-S1's stem, bands of 4 and 7 rows of the second
#: convolution's output (66 and 110 KB) ran level, 14 rows slower
PAIR_BAND_BYTES = 128 * 1024
#: image_conv_pair makes bands narrower where a small batch would give fewer work items than this per thread
PAIR_ITEMS_PER_THREAD = 4

_lock = threading.Lock()
_state: dict = {}  # "lib" (CDLL or None) and "reason" (str) once load() has run


def load() -> Optional[ctypes.CDLL]:
    """The kernel library, compiled and checked on the first call; ``None`` where it cannot run here."""
    p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    functions = {"vitzoo_image_conv3x3": [p, i64, i64, i64, *[i] * 7, p, p, i, i, p, i],
                 "vitzoo_image_conv_pair": [p, i64, i64, i64, *[i] * 7, p, p, i, i, i, p, p, i, i, i, p, i]}
    return load_once(_state, _lock, SOURCE, _FLAGS, REQUIRED_CPU_FLAGS, functions, _self_check)


def unavailable_reason() -> str:
    """Why :func:`load` returns ``None`` (empty if it does not)."""
    load()
    return _state["reason"]


def _self_check(lib: ctypes.CDLL) -> Optional[str]:
    """A small convolution with borders on every side and a channel tail, and a pair of them (48 channels: one
    pass of 32, one of 16; bands of 2 rows, the last one short); ``None`` if both match float64."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 19, 6, generator=generator)
    weight = torch.randn(21, 3, 3, 3, generator=generator)
    bias = torch.randn(21, generator=generator)
    expected = F.conv2d(x.double(), weight.double(), bias.double(), 2, 1).relu()
    got = _run(lib, x, pack_weight(weight, bias), 21, 2, 1, True)
    first, second = weight[:16], torch.randn(48, 16, 3, 3, generator=generator)
    bias2 = torch.randn(48, generator=generator)
    expected_pair = F.conv2d(F.conv2d(x.double(), first.double(), bias[:16].double(), 2, 1), second.double(),
                             bias2.double(), 2, 1).relu()
    got_pair = _run_pair(lib, x, pack_weight(first, bias[:16]), pack_second_weight(second, bias2), 48, 2, 1, False,
                         True, 2)
    for name, out, reference in (("", got, expected), (" (pair)", got_pair, expected_pair)):
        error = (out.double() - reference).abs().max().item()
        if not error <= 1e-5 * max(1.0, reference.abs().max().item()):
            return f"self-check{name} off by {error:.3g}"
    return None


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


def pack_second_weight(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The second convolution's ``(N, 16, 3, 3)`` weight and its bias as :func:`image_conv_pair` reads them:
    ``(3, 3, 16, N)`` (for each tap and input channel, the N output channels in a row) and ``N`` fp32 (no bias:
    zeros); N a multiple of 16."""
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (PAIR_IN_CHANNELS, 3, 3) or weight.shape[0] % 16:
        raise ValueError(f"expected a (N, 16, 3, 3) convolution weight with N a multiple of 16, got "
                         f"{tuple(weight.shape)}")
    if bias is not None and bias.numel() != weight.shape[0]:
        raise ValueError(f"bias of shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    packed_bias = torch.zeros(weight.shape[0]) if bias is None else bias.detach().float().clone().reshape(-1)
    return weight.detach().float().permute(2, 3, 1, 0).contiguous(), packed_bias


def pair_takes(out_channels: int, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int], groups: int, in_channels: int = PAIR_IN_CHANNELS) -> bool:
    """Whether :func:`image_conv_pair` can run a convolution of these settings as the second of a pair."""
    return (in_channels == PAIR_IN_CHANNELS and out_channels > 0 and out_channels % 16 == 0 and groups == 1
            and tuple(kernel_size) == (3, 3) and tuple(stride) == (2, 2) and tuple(padding) == (1, 1)
            and tuple(dilation) == (1, 1))


def _output_size(x: torch.Tensor, stride: int, padding: int) -> Tuple[int, int]:
    return tuple((size + 2 * padding - 3) // stride + 1 for size in x.shape[2:])


def _status(status: int) -> None:
    if status == -1:
        raise MemoryError("vitzoo image convolution kernel: could not allocate its buffers")
    if status != 0:
        raise RuntimeError(f"vitzoo image convolution kernel failed (status {status})")


def _run(lib: ctypes.CDLL, x: torch.Tensor, packed: Tuple[torch.Tensor, torch.Tensor], out_channels: int,
         stride: int, padding: int, relu: bool) -> torch.Tensor:
    batch, _, height, width = x.shape
    oh, ow = _output_size(x, stride, padding)
    out = torch.empty(batch, oh, ow, out_channels).permute(0, 3, 1, 2)  # channels-last (B, N, OH, OW)
    status = lib.vitzoo_image_conv3x3(x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), batch, height, width,
                                      stride, padding, oh, ow, packed[0].data_ptr(), packed[1].data_ptr(),
                                      out_channels, int(relu), out.data_ptr(), torch.get_num_threads())
    _status(status)
    return out


def default_band(batch: int, oh2: int, ow1: int, threads: int) -> int:
    """Rows of the second convolution's output per work item of :func:`image_conv_pair`: as many as keep the
    2 band + 1 rows of the first convolution's output (``ow1`` pixels of 16 floats and a zero pixel each side)
    within :data:`PAIR_BAND_BYTES`, but no more than leave :data:`PAIR_ITEMS_PER_THREAD` work items per thread
    (found by a review: SHViT-S1 at batch 1 made 7 bands, so at most 7 threads worked); at least 1."""
    band = (PAIR_BAND_BYTES // ((ow1 + 2) * PAIR_IN_CHANNELS * 4) - 1) // 2
    bands_per_image = -(-PAIR_ITEMS_PER_THREAD * threads // max(batch, 1))  # an empty batch: no items at all
    return max(1, min(band, oh2 // bands_per_image))


def _run_pair(lib: ctypes.CDLL, x: torch.Tensor, packed: Tuple[torch.Tensor, torch.Tensor],
              packed_second: Tuple[torch.Tensor, torch.Tensor], out_channels: int, stride: int, padding: int,
              relu: bool, relu_second: bool, band: Optional[int]) -> torch.Tensor:
    batch, _, height, width = x.shape
    oh1, ow1 = _output_size(x, stride, padding)
    oh2, ow2 = (oh1 - 1) // 2 + 1, (ow1 - 1) // 2 + 1
    if band is None:
        band = default_band(batch, oh2, ow1, torch.get_num_threads())
    out = torch.empty(batch, oh2, ow2, out_channels).permute(0, 3, 1, 2)
    status = lib.vitzoo_image_conv_pair(
        x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), batch, height, width, stride, padding, oh1, ow1,
        packed[0].data_ptr(), packed[1].data_ptr(), int(relu), oh2, ow2, packed_second[0].data_ptr(),
        packed_second[1].data_ptr(), out_channels, int(relu_second), min(band, oh2), out.data_ptr(),
        torch.get_num_threads())
    _status(status)
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
    lib = _checked_library(x, stride, padding)
    _check_packed(packed, out_channels)
    if x.stride(3) != 1:
        x = x.contiguous()
    return _run(lib, x, packed, out_channels, stride[0], padding[0], relu)


def image_conv_pair(x: torch.Tensor, packed: Tuple[torch.Tensor, torch.Tensor],
                    packed_second: Tuple[torch.Tensor, torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                    relu: bool = False, relu_second: bool = False, band: Optional[int] = None) -> torch.Tensor:
    """``relu_second?(conv2(relu?(conv1(x))))``: the image convolution into 16 channels, then a 3x3, stride-2,
    padding-1 convolution of those, in one kernel call that keeps the first one's output in cache (IEEE fp32).

    Args:
        x: As for :func:`image_conv3x3`.
        packed: :func:`pack_weight` of the first convolution's ``(16, 3, 3, 3)`` weight and its bias (a narrower
            weight packs to 16 channels too, its missing ones zero, and is run as such).
        packed_second: :func:`pack_second_weight` of the second's ``(N, 16, 3, 3)`` weight and its bias.
        stride, padding: The first convolution's, as for :func:`image_conv3x3`.
        relu, relu_second: A ReLU after the first / the second convolution.
        band: Rows of the output each work item computes (default: what fits :data:`PAIR_BAND_BYTES`, fewer where
            the batch would give fewer than :data:`PAIR_ITEMS_PER_THREAD` items per thread).

    Returns:
        A new channels-last ``(B, N, OH, OW)`` float32 tensor.
    """
    lib = _checked_library(x, stride, padding)
    _check_packed(packed, PAIR_IN_CHANNELS)
    if packed[1].numel() != PAIR_IN_CHANNELS:
        raise ValueError(f"the first convolution of a pair writes {PAIR_IN_CHANNELS} channels (pack_weight of a "
                         f"({PAIR_IN_CHANNELS}, 3, 3, 3) weight), but its packing holds {packed[1].numel()}")
    weight, bias = packed_second
    for name, t in (("weight", weight), ("bias", bias)):
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"the second convolution's packed {name} must be a contiguous float32 CPU tensor (from "
                             f"pack_second_weight), got {t.dtype} on {t.device}"
                             f"{'' if t.is_contiguous() else ', not contiguous'}")
    n = bias.numel()
    if weight.shape[:3] != (3, 3, PAIR_IN_CHANNELS) or weight.dim() != 4 or bias.shape != (n,) or n % 16 or \
            weight.shape[3] != n or n == 0:
        raise ValueError(f"packed second weight {tuple(weight.shape)} and bias {tuple(bias.shape)} are not "
                         "pack_second_weight's (3, 3, 16, N) and (N,) with N a multiple of 16")
    if band is not None and (not isinstance(band, int) or isinstance(band, bool) or band < 1):
        raise ValueError(f"band must be a whole number of rows, at least 1, got {band!r}")
    if x.stride(3) != 1:
        x = x.contiguous()
    return _run_pair(lib, x, packed, packed_second, n, stride[0], padding[0], relu, relu_second, band)


def _checked_library(x: torch.Tensor, stride: Sequence[int], padding: Sequence[int]) -> ctypes.CDLL:
    """The kernel library, after checking that it takes ``x`` with this stride and padding (a clear error if not)."""
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
    return lib
