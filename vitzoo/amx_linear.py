"""``nn.Linear`` layers in split bf16 on AMX for :func:`vitzoo.deploy`'s eager backend (ViTs' qkv / proj / MLP).

:func:`swap_linears` replaces every plain ``nn.Linear`` of an fp32 CPU model by an :class:`AmxLinear`, which runs
the product with :func:`vitzoo.amx_gemm.amx_linear` (three bf16 products per fp32 product, ~1e-5 relative error;
2-2.8x oneDNN's fp32 speed on DeiT-S's layers, ``docs/benchmarks.md`` section 8). :func:`restore_linears` undoes it
(``deploy`` does when the bf16x3 model misses its tolerance).
"""
from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vitzoo import amx_gemm
from vitzoo.module_hooks import has_forward_hooks

__all__ = ["AmxLinear", "images_in_call", "restore_linears", "swap_linears"]

#: Layers with fewer inputs stay IEEE fp32 (as for convolutions, ``PackedConv2d._amx_pays_off``).
MIN_IN_FEATURES = 64
#: Inputs with fewer rows (tokens) per image run IEEE fp32, as does a classifier head on pooled features (one row
#: per image). The choice is made per image of the model's input, not per call: an image's output does not depend on
#: the batch it comes in, and deploy's check of its example sees the path every batch takes (until 2026-11-25 it
#: counted the rows of the whole call, so a batch-1 example of a 64x64 ViT checked IEEE fp32 and larger batches ran
#: bf16x3 unchecked: 1.3e-4 off with trained-size logits; until 2026-11-26 it took a layer input's first dimension
#: for the batch, which for a sequence-first ``(tokens, batch, features)`` input is the tokens; both found by audits).
MIN_TOKENS = 128

#: The number of images in the deployed model's current call (:func:`images_in_call`); None outside one.
_IMAGES: ContextVar[Optional[int]] = ContextVar("vitzoo_amx_linear_images", default=None)


@contextlib.contextmanager
def images_in_call(images: int) -> Iterator[None]:
    """Tell the :class:`AmxLinear` layers that the model's input holds ``images`` images (its batch size)."""
    token = _IMAGES.set(images)
    try:
        yield
    finally:
        _IMAGES.reset(token)


def rows_per_image(x: torch.Tensor, in_features: int) -> int:
    """The rows of a linear layer's input ``x`` for one image: inside a deployed model's call, its rows divided by
    the images in the call (a row count the batch does not divide is a tensor shared by the batch: all of it);
    outside, per entry of the first dimension of an input of 3 or more dimensions (1 for a 2-D input)."""
    rows = x.numel() // in_features
    images = _IMAGES.get()
    if images is None:
        return rows // x.shape[0] if x.dim() >= 3 and x.shape[0] else 1
    return rows // images if rows % images == 0 else rows


class AmxLinear(nn.Module):
    """``F.linear`` in bf16x3 on AMX for float32 CPU inputs with at least ``MIN_TOKENS`` rows per image
    (:func:`rows_per_image`); other inputs run ``F.linear``.

    Args:
        linear: The layer to replace; its weight and bias tensors are shared (not copied), and split into bf16
            tiles once (:func:`vitzoo.amx_gemm.pack_weight`).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias: Optional[nn.Parameter] = linear.bias
        self._packed = amx_gemm.pack_weight(linear.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] != self.in_features \
                or rows_per_image(x, self.in_features) < MIN_TOKENS:
            # the layer's own behaviour (and error) for other inputs; and IEEE fp32 for few tokens per image, and
            # for a classifier head on pooled features: AMX gains nothing there, and the head's products are the
            # ones that reach the output unnormalised
            return F.linear(x, self.weight, self.bias)
        out = amx_gemm.amx_linear(x.reshape(-1, self.in_features), self._packed, self.out_features, self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the same (shared) weight and bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, AMX bf16x3"


def _eligible(module: nn.Module) -> bool:
    return (type(module) is nn.Linear and module.in_features >= MIN_IN_FEATURES
            and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"
            and not has_forward_hooks(module))  # replaced, it would lose them


def swap_linears(model: nn.Module, share: float = 1.0) -> int:
    """Replace, in place, eligible ``nn.Linear`` layers (exactly that type, fp32, CPU, >= 64 inputs, no hooks) by
    :class:`AmxLinear` where the AMX kernel is available: the first ``share`` of them in module order (for a ViT,
    the earlier blocks). Returns the number replaced (0 without the kernel)."""
    if amx_gemm.load() is None:
        return 0
    found = [(parent, name, child) for parent in list(model.modules())
             for name, child in list(parent.named_children()) if _eligible(child)]
    chosen = found[:math.ceil(share * len(found))]
    for parent, name, child in chosen:
        setattr(parent, name, AmxLinear(child))
    return len(chosen)


def restore_linears(model: nn.Module) -> int:
    """Undo :func:`swap_linears` in place. Returns the number of layers restored."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, AmxLinear):
                setattr(parent, name, child.to_linear())
                count += 1
    return count
