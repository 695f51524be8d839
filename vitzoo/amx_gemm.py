"""fp32 matrix products in split-bfloat16 ("bf16x3") on Intel AMX, for :func:`vitzoo.deploy`'s convolutions and
linear layers.

Each fp32 operand is split into two bfloat16 numbers, ``hi = bf16(x)`` and ``lo = bf16(x - hi)``, and the
product is accumulated in fp32 from ``A_hi W_hi + A_hi W_lo + A_lo W_hi`` on the AMX tile unit, which multiplies
bf16 at many times the fp32 FMA rate. This is what ``torch.set_float32_matmul_precision("high")`` describes as
"treat each float32 number as the sum of two bfloat16 numbers": ~16 significant bits per operand, a relative
error of about 1e-5 per product (IEEE fp32: ~1e-7). Measured on SHViT: 1.7-2.6x the speed of oneDNN's fp32 kernel
per 1x1 convolution (``docs/benchmarks.md`` section 8), end-to-end output within 1e-5 of the unfused fp32 model
(random weights).

The kernel (``amx_gemm.c``, next to this file) is compiled on first use with the system C compiler and cached
(:mod:`vitzoo.native_build`: ``$CC``, else ``cc``; ``$VITZOO_CACHE_DIR/native``; a sha256 record checked before the
library is opened), and loaded with ctypes; a tiny product is checked against float64 before it is used. It needs
Linux on x86-64 with the ``amx_tile``, ``amx_bf16`` and ``avx512_bf16`` CPU flags and a compiler that knows them
(GCC >= 11, Clang >= 12). Anywhere else :func:`load` returns ``None`` and :func:`unavailable_reason` says why;
callers then use IEEE fp32.
"""
from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

from vitzoo.native_build import load_once

__all__ = ["REQUIRED_CPU_FLAGS", "amx_conv2d", "amx_linear", "amx_pointwise", "load", "pack_conv_weight", "pack_weight",
           "pixel_rows", "unavailable_reason"]

SOURCE = Path(__file__).with_name("amx_gemm.c")
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile", "amx_bf16")
_FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
          "-mamx-tile", "-mamx-bf16")
_ALIGN_K = 32  # the AMX B tile's depth in bf16 elements
_ALIGN_N = 32  # two 16-column tiles per block

_lock = threading.Lock()
_state: dict = {}  # "lib" (CDLL or None) and "reason" (str) once load() has run


def _self_check(lib: ctypes.CDLL) -> Optional[str]:
    """Run a small product with tails in every dimension; ``None`` if it matches float64, else what went wrong."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(37, 45, generator=generator)
    w = torch.randn(19, 45, generator=generator)
    bias = torch.randn(19, generator=generator)
    expected = (a.double() @ w.double().T + bias.double()).relu()
    got = _run(lib, a, pack_weight(w), 19, bias, None, True)
    error = (got.double() - expected).abs().max().item()
    return None if error <= 1e-4 * max(1.0, expected.abs().max().item()) else f"self-check off by {error:.3g}"


def load() -> Optional[ctypes.CDLL]:
    """The AMX kernel library, compiled and checked on the first call; ``None`` where it cannot run here."""
    p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    functions = {"vitzoo_amx_request": [],
                 "vitzoo_amx_linear_bf16x3": [p, i64, i, i, p, p, i, p, p, i64, i, p, i64, i],
                 "vitzoo_amx_conv2d_bf16x3": [p, i64, i64, i64, *[i] * 14, p, p, i, p, p, i64, i, p, i64, i]}
    return load_once(_state, _lock, SOURCE, _FLAGS, REQUIRED_CPU_FLAGS, functions, _granted_and_checked)


def unavailable_reason() -> str:
    """Why :func:`load` returns ``None`` (empty if it does not)."""
    load()
    return _state["reason"]


def _granted_and_checked(lib: ctypes.CDLL) -> Optional[str]:
    if lib.vitzoo_amx_request() != 0:
        return "the operating system did not grant the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)"
    return _self_check(lib)


def pack_weight(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split an ``(out, in)`` fp32 weight into bf16 hi / lo parts in the kernel's AMX tile layout.

    Zero-padded to multiples of 32 in both dimensions, then laid out as ``(out / 16, in / 32, 16, 16, 2)``: for every
    16 output columns and 32-deep step of the input dimension one AMX B tile, whose row ``r`` holds the pairs
    ``(W[o, 2r], W[o, 2r + 1])`` of its 16 columns (the layout ``_tile_dpbf16ps`` multiplies).
    """
    out_features, in_features = weight.shape
    if not bool(torch.isfinite(weight).all()):
        # an infinite weight cannot be split: whatever its lo part, a_lo * w_hi is inf * 0 = NaN for an input exact
        # in bf16 (found by an audit: [inf, 1] . [1, 2] gave NaN, IEEE fp32 gives inf)
        raise ValueError("the weight holds NaN or infinite values, which bf16x3 cannot split; run this layer in "
                         "IEEE fp32")
    padded = torch.zeros(-(-out_features // _ALIGN_N) * _ALIGN_N, -(-in_features // _ALIGN_K) * _ALIGN_K)
    padded[:out_features, :in_features] = weight.detach().float()
    hi = padded.to(torch.bfloat16)
    # as the kernel splits activations: a finite value that rounds past the bf16 maximum is truncated instead (so
    # that hi + lo stays finite)
    overflow = hi.isinf()
    if overflow.any():
        hi[overflow] = (padded.view(torch.int32) & -65536).view(torch.float32)[overflow].to(torch.bfloat16)
    lo = (padded - hi.float()).to(torch.bfloat16)

    def tiles(t: torch.Tensor) -> torch.Tensor:
        n, k = t.shape
        return t.view(n // 16, 16, k // _ALIGN_K, 16, 2).permute(0, 2, 3, 1, 4).contiguous()

    return tiles(hi), tiles(lo)


def pack_conv_weight(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`pack_weight` of a ``(out, in, kh, kw)`` convolution weight, columns ordered ``(ky, kx, in)`` as the
    kernel gathers a channels-last input."""
    return pack_weight(weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1))


def _run(lib: ctypes.CDLL, rows: torch.Tensor, packed: Tuple[torch.Tensor, torch.Tensor], n: int,
         bias: Optional[torch.Tensor], residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    m, k = rows.shape
    hi, lo = packed
    out = torch.empty(m, n, dtype=torch.float32)
    status = lib.vitzoo_amx_linear_bf16x3(
        rows.data_ptr(), rows.stride(0), m, k, hi.data_ptr(), lo.data_ptr(), n,
        None if bias is None else bias.data_ptr(), None if residual is None else residual.data_ptr(),
        0 if residual is None else residual.stride(0), int(relu), out.data_ptr(), n, torch.get_num_threads())
    _check_status(status)
    return out


#: The kernels count rows (pixels) in C ints, rounded up to blocks of 32: more would wrap around, and leave the
#: output unwritten
MAX_ROWS = 2 ** 31 - 32


#: The convolution kernel counts input coordinates in C ints: a padded height or width above this would wrap around
#: (an input 2**31 + 5 rows high was read as all padding: the output was the bias alone; found by an audit)
MAX_PADDED_SIZE = 2 ** 31 - 1


def _check_rows(m: int) -> None:
    if m > MAX_ROWS:
        raise ValueError(f"{m} input rows (pixels); the AMX kernel takes at most {MAX_ROWS}: split the batch")


def _check_outputs(packed: Tuple[torch.Tensor, torch.Tensor], bias: Optional[torch.Tensor], n: int) -> None:
    """The output count fits the packed weight and the bias has one value per output (found by an audit: the
    kernel read past the end of a shorter bias, or of the weight for more outputs than it holds), and the bias is
    in CPU memory (found by a later audit: a meta bias's null pointer was taken for no bias, and a CUDA bias's
    device pointer would be read as host memory)."""
    if n > packed[0].shape[0] * 16:
        raise ValueError(f"{n} outputs do not fit a weight packed for {packed[0].shape[0] * 16} (padded)")
    if bias is not None and bias.numel() != n:
        raise ValueError(f"bias of shape {tuple(bias.shape)}, expected ({n},)")
    if bias is not None and bias.device.type != "cpu":
        raise TypeError(f"the AMX kernel takes a CPU bias, got one on {bias.device}")


def _check_status(status: int) -> None:
    if status != 0:
        raise MemoryError("vitzoo AMX kernel: out of memory for its row counters or a thread's 2 x 32 rows of bf16 "
                          "panel buffers")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as fp32 rows with unit column stride (a view where it already is one)."""
    if t.dtype != torch.float32 or t.device.type != "cpu":
        raise TypeError(f"the AMX kernel takes float32 CPU tensors, got {t.dtype} on {t.device}")
    return t if t.stride(1) == 1 and t.stride(0) >= t.shape[1] else t.contiguous()


def amx_linear(rows: torch.Tensor, packed: Tuple[torch.Tensor, torch.Tensor], out_features: int,
               bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
               relu: bool = False, in_features: Optional[int] = None) -> torch.Tensor:
    """``relu?(rows @ W.T + bias + residual)`` in bf16x3, W given as :func:`pack_weight` returned it.

    Args:
        rows: ``(M, K)`` float32 CPU input (any row stride, unit column stride, else copied).
        packed: ``pack_weight(W)`` of the ``(out_features, K)`` weight.
        out_features: The weight's first dimension (the packing pads it).
        bias: ``(out_features,)`` or ``None``.
        residual: ``(M, out_features)`` added before the ReLU, or ``None``.
        relu: Apply a ReLU last.
        in_features: The weight's second dimension, checked exactly (the packing pads it to a multiple of 32, so
            without it an input with fewer features that pads to the same size is taken, its missing features as
            zeros).

    Returns:
        A new ``(M, out_features)`` float32 tensor.
    """
    lib = load()
    if lib is None:
        raise RuntimeError(f"the AMX bf16x3 kernel is not available here: {unavailable_reason()}")
    _check_rows(rows.shape[0])  # before _rows may copy them
    rows = _rows(rows)
    k_packed = packed[0].shape[1] * _ALIGN_K
    if in_features is not None and rows.shape[1] != in_features:
        raise ValueError(f"expected an input of {in_features} features, got {rows.shape[1]}")
    if not k_packed - _ALIGN_K < rows.shape[1] <= k_packed or packed[0].shape[0] * 16 < out_features:
        raise ValueError(f"input of {rows.shape[1]} features / {out_features} outputs do not fit a weight packed "
                         f"for {k_packed} x {packed[0].shape[0] * 16} (padded)")
    _check_outputs(packed, bias, out_features)
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.detach().float().contiguous()  # else passed as it is: three dispatcher calls (~3 us) saved
    if residual is not None:
        residual = _rows(residual)
        if tuple(residual.shape) != (rows.shape[0], out_features):
            raise ValueError(f"residual of shape {tuple(residual.shape)}, expected {(rows.shape[0], out_features)}")
    return _run(lib, rows, packed, out_features, bias, residual, relu)


def pixel_rows(t: torch.Tensor) -> Optional[int]:
    """The row stride of a 4-D tensor whose pixels (b, y, x) are evenly spaced rows of unit-stride channels (a
    dense channels-last tensor or a channel slice of one, whatever strides PyTorch gave its size-1 dims), else
    ``None``."""
    batch, channels, height, width = t.shape
    sb, sc, sh, sw = t.stride()
    row = sw if width > 1 else sh if height > 1 else sb if batch > 1 else channels
    evenly = (width == 1 or sw == row) and (height == 1 or sh == width * row) and \
        (batch == 1 or sb == height * width * row)
    return row if evenly and (sc == 1 or channels == 1) and row >= channels else None


def amx_pointwise(x: torch.Tensor, packed: Tuple[torch.Tensor, torch.Tensor], out_channels: int,
                  bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                  relu: bool = False) -> Optional[torch.Tensor]:
    """A 1x1 convolution (:func:`amx_linear` on the pixels) straight on channels-last tensors, for the per-call
    path of ``PackedConv2d``: no views, fewer checks (each costs ~1 us, and SHViT-S1 makes 52 such calls).

    ``x``: ``(B, C, H, W)`` float32 CPU, channels-last; ``residual``: output-shaped or ``None``; ``bias``: float32
    contiguous or ``None``. Returns the channels-last ``(B, out_channels, H, W)`` output, or ``None`` where a tensor
    is not laid out as evenly spaced pixel rows (the caller then goes through :func:`amx_linear`).
    """
    lib = load()
    if lib is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 4:
        return None
    lda = pixel_rows(x)
    ldr = 0 if residual is None else pixel_rows(residual)
    if lda is None or ldr is None or bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        return None
    if residual is not None and (residual.dtype != torch.float32 or residual.device.type != "cpu"):
        return None
    batch, channels, height, width = x.shape
    k_packed = packed[0].shape[1] * _ALIGN_K
    if not k_packed - _ALIGN_K < channels <= k_packed:
        raise ValueError(f"an input of {channels} channels does not fit a weight packed for {k_packed} (padded)")
    if residual is not None and tuple(residual.shape) != (batch, out_channels, height, width):
        raise ValueError(f"residual of shape {tuple(residual.shape)}, expected {(batch, out_channels, height, width)}")
    _check_rows(batch * height * width)
    _check_outputs(packed, bias, out_channels)
    out = torch.empty(batch, height, width, out_channels).permute(0, 3, 1, 2)
    status = lib.vitzoo_amx_linear_bf16x3(
        x.data_ptr(), lda, batch * height * width, channels, packed[0].data_ptr(), packed[1].data_ptr(),
        out_channels, None if bias is None else bias.data_ptr(), None if residual is None else residual.data_ptr(),
        ldr, int(relu), out.data_ptr(), out_channels, torch.get_num_threads())
    _check_status(status)
    return out


def amx_conv2d(x: torch.Tensor, packed: Tuple[torch.Tensor, torch.Tensor], out_channels: int,
               kernel_size: Tuple[int, int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
               bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
               relu: bool = False, in_channels: Optional[int] = None) -> torch.Tensor:
    """A one-group, zero-padded 2-D convolution in bf16x3, ``relu?(conv(x) + bias + residual)``.

    The input's im2col rows are gathered by the kernel from the channels-last input (never materialised).

    Args:
        x: ``(B, C, H, W)`` float32 CPU input, channels-last (other layouts are converted).
        packed: :func:`pack_conv_weight` of the ``(out_channels, C, kh, kw)`` weight.
        out_channels, kernel_size, stride, padding, dilation: The convolution's.
        bias: ``(out_channels,)`` or ``None``.
        residual: Output-shaped tensor added before the ReLU, or ``None``.
        relu: Apply a ReLU last.
        in_channels: The weight's input channels, checked exactly (the packing pads them, so without it an input
            with a few channels fewer would be taken).

    Returns:
        A new channels-last ``(B, out_channels, OH, OW)`` float32 tensor.
    """
    lib = load()
    if lib is None:
        raise RuntimeError(f"the AMX bf16x3 kernel is not available here: {unavailable_reason()}")
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 4:
        raise TypeError(f"the AMX kernel takes a 4-D float32 CPU input, got {x.dtype} {tuple(x.shape)} on {x.device}")
    if x.stride(1) != 1:
        x = x.contiguous(memory_format=torch.channels_last)
    batch, channels, height, width = x.shape
    kh, kw = kernel_size
    if in_channels is not None and channels != in_channels:
        raise ValueError(f"expected an input of {in_channels} channels, got {channels} (input {tuple(x.shape)})")
    k = kh * kw * channels
    if not packed[0].shape[1] * _ALIGN_K - _ALIGN_K < k <= packed[0].shape[1] * _ALIGN_K:
        raise ValueError(f"an input of {channels} channels does not fit a weight packed for "
                         f"{packed[0].shape[1] * _ALIGN_K // (kh * kw)} (padded)")
    oh = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"input of {height}x{width} (padded {height + 2 * padding[0]}x{width + 2 * padding[1]}) "
                         f"is smaller than the {kh}x{kw} kernel (dilation {tuple(dilation)})")
    padded = (height + 2 * padding[0], width + 2 * padding[1])
    if max(padded) > MAX_PADDED_SIZE:
        raise ValueError(f"input of {height}x{width} (padded {padded[0]}x{padded[1]}); the AMX kernel takes a padded "
                         f"height and width of at most {MAX_PADDED_SIZE}")
    _check_rows(batch * oh * ow)
    _check_outputs(packed, bias, out_channels)
    out = torch.empty(batch, oh, ow, out_channels).permute(0, 3, 1, 2)  # channels-last (B, N, OH, OW)
    other = None
    if residual is not None:
        if tuple(residual.shape) != tuple(out.shape):
            raise ValueError(f"residual of shape {tuple(residual.shape)}, expected {tuple(out.shape)}")
        other = _rows(residual.permute(0, 2, 3, 1).reshape(-1, out_channels))
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.detach().float().contiguous()  # else passed as it is: three dispatcher calls (~3 us) saved
    status = lib.vitzoo_amx_conv2d_bf16x3(
        x.data_ptr(), x.stride(0), x.stride(2), x.stride(3), batch, height, width, channels, kh, kw,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], oh, ow,
        packed[0].data_ptr(), packed[1].data_ptr(), out_channels, None if bias is None else bias.data_ptr(),
        None if other is None else other.data_ptr(), 0 if other is None else other.stride(0), int(relu),
        out.data_ptr(), out_channels, torch.get_num_threads())
    _check_status(status)
    return out
