"""SHViT's single-head attention (SHSA) on vitzoo's own AVX-512 kernel (for :func:`vitzoo.deploy`).

Between its two 1x1 convolutions SHSA is about a dozen small ATen calls per block: the channel split, GroupNorm,
transposes, two batched matmuls, the scale, softmax, ``cat`` and the ReLU. At SHViT's sizes (7x7 and 4x4 tokens at
224) their work is tiny and their cost is per call: Python, dispatch, allocation, and a fixed split of the work
between threads. :class:`KernelSHSA` runs the same block as two kernel calls (``shsa_kernel.c``, next to this file),
whose work items go to whichever thread is free:

* :func:`group_norm1`: the pre-norm (GroupNorm with one group) into a contiguous channels-last tensor, which the
  ``qkv`` convolution reads;
* :func:`shsa_mix`: ``act(cat[softmax(q k^T * scale) v, x2])`` from the ``qkv`` output, for ReLU or no activation.

The ``qkv`` and ``proj`` convolutions stay modules, so ``deploy()``'s oneDNN / AMX rewrite packs them and fuses the
block's residual add into ``proj`` as before. Same maths in IEEE fp32 (exp is a polynomial within ~2 ulp; the
rounding differs from ATen's by ~1e-7), so it is used with either ``fp32_precision``;
``docs/benchmarks.md`` section 12 has what it buys.

The kernel is compiled on first use and cached like the others (:mod:`vitzoo.native_build`) and checked against
float64 before it is used. It needs Linux on x86-64 with AVX-512F/VL, FMA and a C compiler; anywhere else :func:`load`
returns ``None``, :func:`unavailable_reason` says why, and :func:`swap_attention` swaps nothing. Both functions
fall back to PyTorch's ops for inputs the kernel does not take (not float32 on the CPU, a layout whose pixels are
not evenly spaced rows, a tensor that requires grad while grad is on) and while ``torch.jit.trace`` or
``torch.compile`` records the ops, so a model holding ``KernelSHSA`` blocks (the caller's, after
``deploy(..., inplace=True)``) still counts, traces and exports as the original.
"""
from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Optional

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from shvit.attention import SHSA
from timm.layers import GroupNorm1
from timm.models import shvit as timm_shvit

from vitzoo.amx_gemm import pixel_rows
from vitzoo.module_hooks import has_forward_hooks
from vitzoo.native_build import load_once

__all__ = ["KernelSHSA", "REQUIRED_CPU_FLAGS", "group_norm1", "load", "shsa_mix", "swap_attention",
           "unavailable_reason"]

SOURCE = Path(__file__).with_name("shsa_kernel.c")
REQUIRED_CPU_FLAGS = ("avx512f", "avx512vl", "fma")
_FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-mavx512f", "-mavx512vl", "-mfma")

#: The kernel counts pixels (of the whole batch, and an image's rounded up to 64) in C ints: larger inputs go to
#: PyTorch's ops
MAX_PIXELS = 2 ** 31 - 64

_lock = threading.Lock()
_state: dict = {}  # "lib" (CDLL or None) and "reason" (str) once load() has run


def load() -> Optional[ctypes.CDLL]:
    """The kernel library, compiled and checked on the first call; ``None`` where it cannot run here."""
    p, i, i64, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    functions = {"vitzoo_group_norm1": [p, i64, i64, i, i, i, p, p, f, p, i],
                 "vitzoo_shsa_mix": [p, i64, i64, p, i64, i64, i, i, i, i, i, f, i, p, i]}
    return load_once(_state, _lock, SOURCE, _FLAGS, REQUIRED_CPU_FLAGS, functions, _self_check)


def unavailable_reason() -> str:
    """Why :func:`load` returns ``None`` (empty if it does not)."""
    load()
    return _state["reason"]


def reference_mix(qkv: torch.Tensor, x2: torch.Tensor, qk_dim: int, pdim: int, scale: float,
                  relu: bool) -> torch.Tensor:
    """:func:`shsa_mix` in PyTorch's ops (its fallback, and the kernel's self-check in float64)."""
    batch, _, height, width = qkv.shape
    q, k, v = torch.split(qkv.flatten(2), [qk_dim, qk_dim, pdim], dim=1)  # (B, C, N)
    attn = (q.transpose(1, 2) @ k).mul_(scale).softmax(dim=-1)
    mixed = torch.cat([(v @ attn.transpose(1, 2)).reshape(batch, pdim, height, width), x2], dim=1)
    return mixed.relu_() if relu else mixed


def _self_check(lib: ctypes.CDLL) -> Optional[str]:
    """Both kernels on odd sizes (tokens past one query block, channel tails) against float64; ``None`` if they
    match."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 21, 9, 8, generator=generator).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(19, generator=generator), torch.randn(19, generator=generator)
    x1, x2 = x[:, :19], x[:, 19:]
    expected = F.group_norm(x1.double(), 1, weight.double(), bias.double(), 1e-5)
    error = (_run_group_norm1(lib, x1, weight, bias, 1e-5).double() - expected).abs().max().item()
    qkv = torch.randn(2, 2 * 5 + 19, 9, 8, generator=generator).contiguous(memory_format=torch.channels_last)
    expected = reference_mix(qkv.double(), x2.double(), 5, 19, 5 ** -0.5, True)
    error = max(error, (_run_mix(lib, qkv, x2, 5, 19, 5 ** -0.5, True).double() - expected).abs().max().item())
    return None if error <= 1e-5 else f"self-check off by {error:.3g}"


def _recording() -> bool:
    """Whether ``torch.jit.trace`` (fvcore's FLOP counting, ONNX export) or ``torch.compile`` is recording the ops:
    then PyTorch's ops run, since a ctypes call is invisible to them (found by a review: a traced model returned the
    uninitialised output)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def _takes(*tensors: torch.Tensor) -> bool:
    """Whether the kernel takes these 4-D tensors as they are (else the caller falls back to PyTorch)."""
    grad = torch.is_grad_enabled()
    # an empty batch goes to PyTorch's ops, which return the empty output (found by a review: x[0] of no sample)
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() == 4 and t.numel() > 0
               and pixel_rows(t) is not None
               and not (grad and t.requires_grad) and t.shape[0] * t.shape[2] * t.shape[3] <= MAX_PIXELS
               for t in tensors)


def _check_status(status: int) -> None:
    if status == -1:
        raise MemoryError("vitzoo SHSA kernel: out of memory for a thread's working buffers")
    if status != 0:
        raise RuntimeError(f"vitzoo SHSA kernel failed (status {status})")


def _run_group_norm1(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     eps: float) -> torch.Tensor:
    batch, channels, height, width = x.shape
    out = torch.empty(batch, height, width, channels).permute(0, 3, 1, 2)
    if weight.dtype != torch.float32 or bias.dtype != torch.float32 or not weight.is_contiguous() or \
            not bias.is_contiguous():  # else passed as they are: dispatcher calls saved on every block
        weight, bias = weight.detach().float().contiguous(), bias.detach().float().contiguous()
    _check_status(lib.vitzoo_group_norm1(x.data_ptr(), x.stride(0), pixel_rows(x), batch, height * width, channels,
                                         weight.data_ptr(), bias.data_ptr(), eps, out.data_ptr(),
                                         torch.get_num_threads()))
    return out


def _run_mix(lib: ctypes.CDLL, qkv: torch.Tensor, x2: torch.Tensor, qk_dim: int, pdim: int, scale: float,
             relu: bool) -> torch.Tensor:
    batch, _, height, width = qkv.shape
    rest = x2.shape[1]
    out = torch.empty(batch, height, width, pdim + rest).permute(0, 3, 1, 2)
    x2_rows = pixel_rows(x2) if rest else 0
    _check_status(lib.vitzoo_shsa_mix(qkv.data_ptr(), qkv.stride(0), pixel_rows(qkv),
                                      x2.data_ptr() if rest else None, x2.stride(0), x2_rows, batch, height * width,
                                      qk_dim, pdim, rest, scale, int(relu), out.data_ptr(), torch.get_num_threads()))
    return out


def group_norm1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.group_norm(x, 1, weight, bias, eps)`` of a ``(B, C, H, W)`` tensor; on the kernel (a new contiguous
    channels-last tensor) where it takes ``x``: a channels-last float32 CPU tensor or a channel slice of one."""
    lib = load()
    if _recording() or lib is None or not _takes(x) or x[0].numel() < 2 or weight.shape != (x.shape[1],) or \
            bias.shape != (x.shape[1],) or (weight.requires_grad or bias.requires_grad) and torch.is_grad_enabled() \
            or weight.device.type != "cpu" or bias.device.type != "cpu":
        # (fewer than 2 values per sample, or weights elsewhere: torch's own result or error)
        return F.group_norm(x, 1, weight, bias, eps)
    return _run_group_norm1(lib, x, weight, bias, eps)


def shsa_mix(qkv: torch.Tensor, x2: torch.Tensor, qk_dim: int, pdim: int, scale: float,
             relu: bool) -> torch.Tensor:
    """``act(cat[softmax(q k^T * scale) v, x2])``, SHSA between its ``qkv`` and ``proj`` convolutions.

    Args:
        qkv: ``(B, 2 * qk_dim + pdim, H, W)``, the ``qkv`` convolution's output: queries, keys, values.
        x2: ``(B, rest, H, W)``, the channels that skip attention (``rest`` may be 0).
        qk_dim, pdim: Query / key width and value width.
        scale: Multiplies ``q k^T`` before the softmax.
        relu: ReLU as the activation, else none.

    Returns:
        ``(B, pdim + rest, H, W)``; on the kernel (a new contiguous channels-last tensor) where it takes both
        tensors (channels-last float32 CPU tensors or channel slices of them), else from PyTorch's ops.
    """
    if _recording():
        return reference_mix(qkv, x2, qk_dim, pdim, scale, relu)
    if qkv.dim() != 4 or qkv.shape[1] != 2 * qk_dim + pdim or x2.dim() != 4 or \
            (x2.shape[0], *x2.shape[2:]) != (qkv.shape[0], *qkv.shape[2:]):
        raise ValueError(f"shsa_mix: qkv {tuple(qkv.shape)} and x2 {tuple(x2.shape)} do not fit qk_dim={qk_dim}, "
                         f"pdim={pdim}: expected (B, {2 * qk_dim + pdim}, H, W) and (B, rest, H, W)")
    lib = load()
    tensors = (qkv, x2) if x2.shape[1] else (qkv,)
    if lib is None or not _takes(*tensors) or qkv.numel() == 0:
        return reference_mix(qkv, x2, qk_dim, pdim, scale, relu)
    return _run_mix(lib, qkv, x2, qk_dim, pdim, scale, relu)


# leaves of deploy()'s torch.fx trace: called as they are, not traced into
torch.fx.wrap("group_norm1")
torch.fx.wrap("shsa_mix")


class KernelSHSA(nn.Module):
    """An SHSA block (``shvit.SHSA`` or timm's ``timm.models.shvit.SHSA``) run through :func:`group_norm1` and
    :func:`shsa_mix`, holding the block's own modules: ``pre_norm``, ``qkv``, and ``proj``'s activation and
    convolution as ``act`` and ``proj``.

    The pre-norm goes to the kernel if it is a ``GroupNorm`` with one group and an affine (SHViT's ``GroupNorm1``),
    else it runs as a module; the activation before ``proj`` goes into :func:`shsa_mix` if it is a ReLU, else it
    runs as a module. Built by :func:`swap_attention`.
    """

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.dim, self.pdim, self.qk_dim = attention.dim, attention.pdim, attention.qk_dim
        self.scale = float(attention.scale)
        self.pre_norm, self.qkv = attention.pre_norm, attention.qkv
        self.act, self.proj = attention.proj  # the activation and the output convolution
        norm = self.pre_norm
        self.norm_kernel = type(norm) in (nn.GroupNorm, GroupNorm1) and norm.num_groups == 1 and norm.affine
        self.relu = type(self.act) is nn.ReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = torch.split(x, [self.pdim, self.dim - self.pdim], dim=1)
        if self.norm_kernel:
            x1 = group_norm1(x1, self.pre_norm.weight, self.pre_norm.bias, self.pre_norm.eps)
        else:
            x1 = self.pre_norm(x1)
        mixed = shsa_mix(self.qkv(x1), x2, self.qk_dim, self.pdim, self.scale, self.relu)
        return self.proj(mixed if self.relu else self.act(mixed))


def _is_shsa(module: nn.Module) -> bool:
    """SHViT's SHSA, ours or timm's (both compute the same block from the same attributes)."""
    return type(module) in (SHSA, timm_shvit.SHSA) and isinstance(module.proj, nn.Sequential) and len(module.proj) == 2


def swap_attention(model: nn.Module) -> int:
    """Replace every SHSA block in ``model`` by a :class:`KernelSHSA` (in place) where the kernel is available;
    returns how many blocks ``model`` then runs on the kernel (those swapped before included: deploy's bf16x3
    fallback builds again on the same model). A block whose forward (pre-)hooks, or those of its pre-norm, ``proj``
    or activation, would then not run is kept as it is."""
    if load() is None:
        return 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_shsa(child) and not any(map(has_forward_hooks, (child, child.pre_norm, child.proj,
                                                                   child.proj[0]))):
                setattr(parent, name, KernelSHSA(child))
    return sum(isinstance(module, KernelSHSA) for module in model.modules())
