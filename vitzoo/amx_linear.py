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
from typing import Dict, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vitzoo import amx_gemm
from vitzoo.module_hooks import has_forward_hooks

__all__ = ["AmxLinear", "classify_rows", "images_in_call", "restore_linears", "rows_per_image", "swap_linears"]

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


#: How a layer's input rows grow with the model's batch (:func:`classify_rows`): in proportion (``IMAGE``), not at
#: all (``SHARED``: a table the whole batch shares, such as SwinV2's position-bias MLP input), or both at different
#: calls (``MIXED``: such a layer stays IEEE fp32, whose path cannot depend on the batch).
IMAGE, SHARED, MIXED = "image", "shared", "mixed"
#: A layer that ran with fewer than ``MIN_TOKENS`` rows per image on deploy's example (a ViT deployed at 64x64): it
#: stays ``nn.Linear``, as it ran in deploy's check; swapped, it took the AMX path at larger images, unchecked
#: (past the 1e-4 check for DeiT-T deployed at 64 and called at 224 with trained-size logits; found by an audit).
UNCHECKED = "unchecked"


def rows_per_image(x: torch.Tensor, in_features: int, rows_kind: Optional[str] = None) -> int:
    """The rows of a linear layer's input ``x`` for one image (0 for a ``MIXED`` layer).

    Inside a deployed model's call: its rows divided by the images in the call, or all of them for a ``SHARED``
    layer; a layer not classified (``rows_kind`` None) counts a row count the batch does not divide as shared.
    Outside: per entry of the first dimension of an input of 3 or more dimensions (1 for a 2-D input)."""
    rows = x.numel() // in_features
    images = _IMAGES.get()
    if images is None:
        return rows // x.shape[0] if x.dim() >= 3 and x.shape[0] else 1
    if rows_kind == MIXED or images == 0:  # an empty batch (found by an audit: a ZeroDivisionError)
        return 0
    if rows_kind == SHARED or rows_kind is None and rows % images:
        return rows
    return rows // images


def classify_rows(model: nn.Module, example_input: torch.Tensor) -> Dict[nn.Module, str]:
    """For each layer :func:`swap_linears` would replace: how its input rows grow with the model's batch, found by
    running ``model`` on the example's first image alone and twice over (``IMAGE``, ``SHARED`` or ``MIXED``;
    ``UNCHECKED`` for one that ran with fewer than ``MIN_TOKENS`` rows per image at some call). deploy
    fixes each layer's kind so, and its path is then the same at every batch (a guess from one call's shapes took
    SwinV2's position-bias table of 225 rows for per-image rows at batch 3, 5, ..., and for a shared table at other
    batches: found by a review). Layers that did not run, or a model that fails at batch 2, are left out."""
    layers = [m for m in model.modules() if _eligible(m)]
    rows: Dict[nn.Module, list] = {layer: [[], []] for layer in layers}
    run = [0]

    def record(module, args):
        if args and isinstance(args[0], torch.Tensor):
            rows[module][run[0]].append(args[0].numel() // module.in_features)

    handles = [layer.register_forward_pre_hook(record) for layer in layers]
    one = example_input[:1]
    try:
        with torch.inference_mode():
            model(one)
            run[0] = 1
            model(torch.cat([one, one]))
    except Exception:  # noqa: BLE001  a model that takes only its example's batch: no classification
        return {}
    finally:
        for handle in handles:
            handle.remove()
    kinds: Dict[nn.Module, str] = {}
    for layer, (single, double) in rows.items():
        if single and len(single) == len(double):
            found = {IMAGE if b == 2 * a else SHARED if b == a else MIXED for a, b in zip(single, double)}
            kinds[layer] = found.pop() if len(found) == 1 else MIXED
            # the rows of one image, or of a shared table, at every call of the layer (a call below the threshold
            # would run AMX unchecked at larger images)
            if kinds[layer] != MIXED and min(single) < MIN_TOKENS:
                kinds[layer] = UNCHECKED
    return kinds


class AmxLinear(nn.Module):
    """``F.linear`` in bf16x3 on AMX for float32 CPU inputs with at least ``MIN_TOKENS`` rows per image
    (:func:`rows_per_image`); other inputs run ``F.linear``.

    Args:
        linear: The layer to replace; its weight and bias tensors are shared (not copied), and split into bf16
            tiles once (:func:`vitzoo.amx_gemm.pack_weight`).
        rows_kind: How its input rows grow with the batch (:func:`classify_rows`); None: not known.
    """

    def __init__(self, linear: nn.Linear, rows_kind: Optional[str] = None):
        super().__init__()
        self.rows_kind = rows_kind
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias: Optional[nn.Parameter] = linear.bias
        self._packed = amx_gemm.pack_weight(linear.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] != self.in_features \
                or rows_per_image(x, self.in_features, self.rows_kind) < MIN_TOKENS:
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
            and not has_forward_hooks(module)  # replaced, it would lose them
            and bool(torch.isfinite(module.weight).all()))  # an infinite weight cannot be split (pack_weight)


def swap_linears(model: nn.Module, share: float = 1.0, rows_kinds: Optional[Dict[nn.Module, str]] = None) -> int:
    """Replace, in place, eligible ``nn.Linear`` layers (exactly that type, fp32, CPU, >= 64 inputs, no hooks) by
    :class:`AmxLinear` where the AMX kernel is available: the first ``share`` of them in module order (for a ViT,
    the earlier blocks), each with its kind from ``rows_kinds`` (:func:`classify_rows`), except ``UNCHECKED`` ones.
    Returns the number replaced (0 without the kernel)."""
    if amx_gemm.load() is None:
        return 0
    kinds = rows_kinds or {}
    found = [(parent, name, child) for parent in list(model.modules())
             for name, child in list(parent.named_children()) if _eligible(child)]
    chosen = [(parent, name, child) for parent, name, child in found[:math.ceil(share * len(found))]
              if kinds.get(child) != UNCHECKED]
    for parent, name, child in chosen:
        setattr(parent, name, AmxLinear(child, kinds.get(child)))
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
