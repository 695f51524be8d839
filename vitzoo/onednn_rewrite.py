"""The ``"eager"`` backend's graph rewrite: every ``nn.Conv2d`` becomes a pre-packed, fused oneDNN convolution.

:func:`onednn_rewrite` traces a fused, channels-last, fp32 CPU model with ``torch.fx`` and replaces each plain
convolution (and timm's TF-"SAME" ``Conv2dSame``) by a :class:`PackedConv2d` (weight reordered once into oneDNN's
blocked layout), then folds a following ReLU and/or residual add into that convolution's kernel. Used by
:func:`vitzoo.deploy` (``backend="eager"``); measurements in ``docs/benchmarks.md`` (sections 6 and 10).
"""
from __future__ import annotations

import collections
import inspect
import math
import operator
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from timm.layers import Conv2dSame, get_notrace_functions, get_notrace_modules
from torch import nn
from torch.utils import _pytree as pytree
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.fx.passes.shape_prop import ShapeProp

from vitzoo import amx_gemm, image_conv
from vitzoo.module_hooks import HookKeepingTracer, has_forward_hooks
from vitzoo.outputs import outputs_close

__all__ = ["FP32_PRECISIONS", "PackedConv2d", "PackedConvPair", "onednn_rewrite"]

#: ``"ieee"``: IEEE fp32 everywhere; ``"bf16x3"``: convolutions in split bf16 on AMX where available and faster.
FP32_PRECISIONS = ("ieee", "bf16x3")

_RELU_TARGETS = (F.relu, torch.relu, torch.relu_)
_ADD_TARGETS = (operator.add, torch.add)
_IN_PLACE_OPERATORS = (
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow,
    operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift, operator.setitem)


class PackedConv2d(nn.Module):
    """A 2-D convolution run by oneDNN with a pre-packed weight and fused epilogue (CPU, fp32).

    Computes ``unary(conv(x) + residual)`` (residual optional, unary is ``"none"`` or ``"relu"``) with
    ``torch.ops.mkldnn._convolution_pointwise``, the kernel inductor uses on CPU. Packing the weight once
    removes the per-call weight reorder of ``nn.Conv2d``; fusing the ReLU / add removes one pass over the
    activation each. Numerically identical to the unfused ops up to float rounding.

    oneDNN picks the packed layout for one input shape, and a layout chosen for batch 1 can be much slower at
    batch 16 (measured: 1.8x on SHViT's 128->512 1x1 conv at 14x14, 2 threads;
    ``benchmarks/profile_shvit_layers.py --pack-batch 1``). So the weight is packed for
    ``input_size`` at build time and re-packed once for each new input shape seen (the last few are cached).

    A pointwise convolution (1x1, stride 1, no padding, one group) on a channels-last input is a matrix product
    ``(B*H*W, C_in) @ (C_in, C_out)`` on the same memory, so it runs as a oneDNN linear
    (``torch.ops.mkldnn._linear_pointwise``) on that 2-D view and the result is viewed back as a channels-last
    (B, C_out, H, W) tensor: no copies. oneDNN's matmul kernel was faster than its convolution kernel on these
    shapes in our (one-off) measurements.

    With ``fp32_precision="bf16x3"`` the convolution runs on the CPU's AMX tile unit instead, in split bfloat16
    (``vitzoo.amx_gemm``: three bf16 products per fp32 product, ~1e-5 relative error, 1.6-2.6x faster), where that
    kernel is available (:func:`vitzoo.amx_gemm.load`) and beats oneDNN on such a layer (:meth:`_amx_pays_off`);
    otherwise oneDNN in IEEE fp32. :attr:`amx` says which.

    A model's first convolution, 3x3 over the 3-channel input image into at most 16 channels, can read the NCHW
    image directly with vitzoo's own AVX-512 kernel (:meth:`use_image_kernel`, :mod:`vitzoo.image_conv`, IEEE fp32,
    in either precision); :attr:`image` says so.

    timm's ``Conv2dSame`` (TensorFlow's "SAME" padding, worked out per input size: ``tf_efficientnet_*``,
    ``tf_mobilenetv3_*``, the NFNets' ``dm_`` weights) is taken too: the input is zero-padded the same way
    (:attr:`same`), then convolved without padding.

    Args:
        conv: The convolution to replace (``nn.Conv2d`` with zero padding, or timm's ``Conv2dSame``; float32, CPU).
        input_size: Input shape (B, C, H, W) to pack the weight for first.
        fp32_precision: ``"ieee"`` (default) or ``"bf16x3"``.
    """
    max_cached_shapes = 4

    def __init__(self, conv: nn.Conv2d, input_size: Sequence[int], fp32_precision: str = "ieee"):
        super().__init__()
        if fp32_precision not in FP32_PRECISIONS:
            raise ValueError(f"fp32_precision={fp32_precision!r}; valid values: {', '.join(FP32_PRECISIONS)}.")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"PackedConv2d supports explicit zero padding only, got {conv}.")
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.padding = list(conv.padding)
        self.stride = list(conv.stride)
        self.dilation = list(conv.dilation)
        self.groups = conv.groups
        self.same = type(conv) is Conv2dSame  # its forward pads "SAME" for the input's size; its padding is 0
        self._same_pads: Dict[Tuple[int, ...], Tuple[int, int, int, int]] = {}
        self.unary = "none"
        self.pointwise = (self.kernel_size == (1, 1) and self.stride == [1, 1] and self.padding == [0, 0]
                          and self.groups == 1)
        # the plain weight is kept (a buffer) so the conv can be re-packed; the packed copies are opaque mkldnn
        # tensors held in a plain dict, so they are not part of state_dict()
        self.register_buffer("weight", conv.weight.detach().clone(), persistent=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self._packed: Dict[Tuple[int, ...], torch.Tensor] = {}
        self._output_shapes: Dict[Tuple[int, ...], Tuple[int, ...]] = {}  # input shape -> output shape (per call)
        self._input_size = self._padded_size(tuple(input_size))
        # an infinite weight cannot be split in bf16 parts (pack_weight): such a layer stays IEEE
        self.amx = fp32_precision == "bf16x3" and self._amx_pays_off() and amx_gemm.load() is not None \
            and bool(torch.isfinite(self.weight).all())
        self.image = False  # see use_image_kernel
        if self.amx:  # split and tiled once; plain tensors (not buffers): derived from ``weight``, never saved
            self._amx_weight = amx_gemm.pack_conv_weight(self.weight)
        else:
            self._packed_for(self._input_size)

    def use_ieee(self) -> None:
        """Run this convolution in IEEE fp32 from now on: on oneDNN if it ran on AMX, else unchanged (already IEEE)."""
        if self.amx:
            self.amx = False
            del self._amx_weight
            self._packed_for(self._input_size)

    def use_image_kernel(self) -> bool:
        """Run on vitzoo's image kernel from now on if this is a 3x3 convolution of a 3-channel image into at most
        16 channels (one group, no dilation, equal strides of 1 or 2, equal padding) and the kernel is available;
        returns whether it does. It takes NCHW input without a copy (the caller then stops converting the input
        to channels-last). Measured: SHViT-S1's 3 -> 16 stem convolution +2-14% on the whole model; with more
        output channels the kernel makes one pass per 16 of them, and S4's 3 -> 28 gained nothing
        (``docs/benchmarks.md`` section 9)."""
        eligible = (not self.same and self.in_channels == image_conv.IN_CHANNELS
                    and self.out_channels <= image_conv.MAX_OUT_CHANNELS
                    and self.kernel_size == (3, 3) and self.groups == 1
                    and self.dilation == [1, 1] and self.stride[0] == self.stride[1] in image_conv.STRIDES
                    and self.padding[0] == self.padding[1] and not self.amx)
        if eligible and not self.image and image_conv.load() is not None:
            self.image = True
            self._image_weight = image_conv.pack_weight(self.weight, self.bias)
            self._packed.clear()
        return self.image

    def _amx_pays_off(self) -> bool:
        """Whether the AMX kernel beats oneDNN's fp32 one on this convolution (measured on SHViT's layers,
        ``docs/benchmarks.md``): pointwise ones from 64 input channels; others (whose input rows the kernel
        gathers) with a multiple of 16 input channels and at least 256 products per output."""
        if self.groups != 1:
            return False
        if self.pointwise:
            return self.in_channels >= 64
        depth = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        return self.in_channels % 16 == 0 and depth >= 256

    def _same_padding(self, shape: Tuple[int, ...]) -> Tuple[int, int, int, int]:
        """F.pad's (left, right, top, bottom) for TensorFlow's "SAME" on an input of ``shape``: the output has
        ceil(size / stride) pixels per side; the padding that needs is split with the odd pixel on the right /
        bottom (cached: this runs on every call)."""
        pads = self._same_pads.get(shape)
        if pads is None:
            if len(self._same_pads) >= 16:
                self._same_pads.clear()
            total = [max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0) for n, k, s, d in
                     zip(shape[-2:], self.kernel_size, self.stride, self.dilation)]
            pads = self._same_pads[shape] = (total[1] // 2, total[1] - total[1] // 2,
                                             total[0] // 2, total[0] - total[0] // 2)
        return pads

    def _padded_size(self, shape: Tuple[int, ...]) -> Tuple[int, ...]:
        if not self.same or len(shape) != 4:
            return shape
        left, right, top, bottom = self._same_padding(shape)
        return (*shape[:2], shape[2] + top + bottom, shape[3] + left + right)

    def _packed_for(self, shape: Tuple[int, ...]) -> torch.Tensor:
        packed = self._packed.get(shape)
        if packed is not None and next(reversed(self._packed)) != shape:  # least recently used first (found by
            # an audit: one-off shapes evicted the hot one, first inserted; 53% slower cycling batch sizes 1-8)
            self._packed[shape] = self._packed.pop(shape, packed)
        if packed is None:
            if len(self._packed) >= self.max_cached_shapes:
                self._packed.pop(next(iter(self._packed)))
            if self.pointwise:  # packed for the (B*H*W, C_in) matrix
                rows = shape[0] * shape[2] * shape[3]
                packed = torch.ops.mkldnn._reorder_linear_weight(
                    self.weight.reshape(self.out_channels, self.in_channels), rows)
            else:
                packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                    self.weight.to_mkldnn(), self.padding, self.stride, self.dilation, self.groups, list(shape))
            self._packed[shape] = packed
        return packed

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.same and x.dim() == 4:
            pads = self._same_padding(x.shape)
            if any(pads):
                x = F.pad(x, pads)
        own_kernel = self.amx or self.image
        if own_kernel and (x.dim() != 4 or x.shape[1] != self.in_channels or min(self._output_shape(x)[2:]) < 1):
            # an input this convolution cannot take (wrong channel count, smaller than the kernel): PyTorch's own
            # error, as nn.Conv2d and the oneDNN path give it (the AMX kernel pads its operands and would run)
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        weight = None if own_kernel else self._packed_for(tuple(x.shape))
        if residual is not None and tuple(residual.shape) != self._output_shape(x):
            # the add was fused where both shapes were equal, and here they broadcast (a (B, C, 1, 1) context
            # added to a map that is 1x1 only at the example's size): run it as the model wrote it
            out = self._unfused_add(x, weight, residual)
            return out.relu_() if self.unary == "relu" else out
        if self.image and residual is None:
            return image_conv.image_conv3x3(x, self._image_weight, self.out_channels, self.stride, self.padding,
                                            relu=self.unary == "relu")
        if self.image:
            out = image_conv.image_conv3x3(x, self._image_weight, self.out_channels, self.stride, self.padding)
            out = out + residual
            return out.relu_() if self.unary == "relu" else out
        if self.pointwise:
            return self._pointwise(x, weight, residual)
        if self.amx:
            return amx_gemm.amx_conv2d(x, self._amx_weight, self.out_channels, self.kernel_size, self.stride,
                                       self.padding, self.dilation, self.bias, residual, relu=self.unary == "relu",
                                       in_channels=self.in_channels)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, weight, self.bias, self.padding, self.stride, self.dilation, self.groups, self.unary, [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
            "add", None, None if self.unary == "none" else self.unary, [], None)

    def _output_shape(self, x: torch.Tensor) -> Tuple[int, ...]:
        shape = self._output_shapes.get(x.shape)
        if shape is None:  # computed once per input shape: this runs on every call
            if len(self._output_shapes) >= 16:
                self._output_shapes.clear()
            size = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                    zip(x.shape[2:], self.padding, self.dilation, self.kernel_size, self.stride)]
            shape = self._output_shapes[x.shape] = (x.shape[0], self.out_channels, *size)
        return shape

    def _unfused_add(self, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if self.image:
            out = image_conv.image_conv3x3(x, self._image_weight, self.out_channels, self.stride, self.padding)
        elif self.pointwise:
            out = self._pointwise(x, weight, None, unary="none")
        elif self.amx:
            out = amx_gemm.amx_conv2d(x, self._amx_weight, self.out_channels, self.kernel_size, self.stride,
                                      self.padding, self.dilation, self.bias, in_channels=self.in_channels)
        else:
            out = torch.ops.mkldnn._convolution_pointwise(
                x, weight, self.bias, self.padding, self.stride, self.dilation, self.groups, "none", [], "")
        return out + residual

    def _pointwise(self, x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor],
                   unary: Optional[str] = None) -> torch.Tensor:
        batch, _, height, width = x.shape
        # (B, C, H, W) channels-last -> (B*H*W, C): a view; any other layout is copied by reshape
        if self.amx:  # straight on the channels-last tensors where their pixels are evenly spaced rows
            out = amx_gemm.amx_pointwise(x, self._amx_weight, self.out_channels, self.bias, residual,
                                         relu=(unary or self.unary) == "relu")
            if out is not None:
                return out
        rows = x.permute(0, 2, 3, 1).reshape(-1, self.in_channels)
        if self.amx:
            other = None if residual is None else residual.permute(0, 2, 3, 1).reshape(-1, self.out_channels)
            out = amx_gemm.amx_linear(rows, self._amx_weight, self.out_channels, self.bias, other,
                                      relu=(unary or self.unary) == "relu")
            return out.view(batch, height, width, self.out_channels).permute(0, 3, 1, 2)
        if residual is None:
            out = torch.ops.mkldnn._linear_pointwise(rows, weight, self.bias, unary or self.unary, [], "")
        else:
            other = residual.permute(0, 2, 3, 1).reshape(-1, self.out_channels)
            out = torch.ops.mkldnn._linear_pointwise.binary(rows, other, weight, self.bias, "add")
            if self.unary == "relu":  # the linear kernel takes no unary op after the add
                out = out.relu_()
        return out.view(batch, height, width, self.out_channels).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, unary={self.unary!r}"
                + (", TF 'SAME' padding" if self.same else "") + (", as linear" if self.pointwise else "")
                + (", AMX bf16x3" if self.amx else "")
                + (", vitzoo image kernel (NCHW input)" if self.image else ""))


class PackedConvPair(nn.Module):
    """A stem's first two convolutions in one call of vitzoo's image kernel (:func:`vitzoo.image_conv.image_conv_pair`).

    ``first`` reads the NCHW image into 16 channels (:meth:`PackedConv2d.use_image_kernel`), and ``second``, a 3x3,
    stride-2 convolution, is its only reader. The kernel computes them band by band, so that the first one's output
    stays in the CPU's cache (SHViT-S1/S2, EfficientViT-M4). Both keep their ReLU (``unary``). An input the kernel
    does not take runs through the two modules, which give PyTorch's errors.
    """

    def __init__(self, first: PackedConv2d, second: PackedConv2d):
        super().__init__()
        self.first = first
        self.second = second
        self._second_weight = image_conv.pack_second_weight(second.weight, second.bias)
        second._packed.clear()  # its oneDNN packing: re-made only if an input goes through the modules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.first.in_channels or min(self.first._output_shape(x)[2:]) < 1:
            # what the first convolution cannot take (found by a review: an image smaller than its kernel got the
            # image kernel's ValueError, not nn.Conv2d's error)
            return self.second(self.first(x))
        return image_conv.image_conv_pair(x, self.first._image_weight, self._second_weight, self.first.stride,
                                          self.first.padding, relu=self.first.unary == "relu",
                                          relu_second=self.second.unary == "relu")


class _RewriteTracer(HookKeepingTracer):
    """:class:`HookKeepingTracer` with timm's ``Conv2dSame`` as a leaf (its forward branches on the input's size,
    which torch.fx cannot trace; the rewrite packs it whole), and with ``timm_leaves`` every module and function
    timm registers as not traceable, as timm's own feature extraction traces."""

    def __init__(self, timm_leaves: bool = False):
        functions = tuple(f for f in get_notrace_functions() if callable(f)) if timm_leaves else ()
        super().__init__(autowrap_functions=functions)
        self.leaves = (Conv2dSame, *get_notrace_modules()) if timm_leaves else (Conv2dSame,)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module, timm_leaves: bool) -> fx.GraphModule:
    tracer = _RewriteTracer(timm_leaves)
    return fx.GraphModule(model, tracer.trace(model), type(model).__name__)


def _hooked(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """Whether ``node`` calls a module with forward hooks: no pass may remove, replace or merge such a call."""
    return node.op == "call_module" and has_forward_hooks(modules[node.target])


def _is_relu(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """A ReLU call that a pass may merge into a convolution or run in place (not one with hooks)."""
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU) and not _hooked(node, modules)
    if node.op == "call_function":
        return node.target in _RELU_TARGETS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _add_operands(node: fx.Node) -> List[Tuple[object, object]]:
    """For a plain 2-operand add node: the (branch, residual) orders it may be fused in, else ``[]``.

    An in-place ``a.add_(b)`` may only be fused with ``a`` as the convolution output (``b`` must stay intact).
    """
    if len(node.args) != 2 or node.kwargs:
        return []
    a, b = node.args
    if node.op == "call_function" and node.target in _ADD_TARGETS or node.op == "call_method" and node.target == "add":
        return [(a, b), (b, a)]
    if (node.op == "call_function" and node.target is operator.iadd
            or node.op == "call_method" and node.target == "add_"):
        return [(a, b)]
    return []


def _mutates_in_place(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """True if ``node`` may write into one of its inputs (``x.relu_()``, ``x += y``, ``nn.ReLU(inplace=True)``,
    ``F.relu(x, inplace=True)``, ``x[i] = y``); unknown callables with an ``inplace`` argument set count too."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__") or node.target == "__setitem__"
    if node.op == "call_module":
        return getattr(modules.get(node.target), "inplace", False) is True
    if node.op != "call_function":
        return False
    if node.target in _IN_PLACE_OPERATORS or getattr(node.target, "__name__", "").endswith("_"):
        return True
    if node.kwargs.get("inplace") is True:
        return True
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # builtins without a signature, or arguments that do not bind
        return False
    return bound.arguments.get("inplace") is True


def _mutation_between(first: fx.Node, last: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """True if a node strictly between ``first`` and ``last`` (graph order) may modify a tensor in place."""
    node = first.next
    while node is not last and node.op != "root":
        if _mutates_in_place(node, modules):
            return True
        node = node.next
    return False


_OTHER_BATCH = "vitzoo_shape_at_other_batch"  # node.meta key (copied with the meta when a node is replaced)


def _same_tensor_meta(a: fx.Node, b: object) -> bool:
    """``a`` and ``b`` have the same shape and dtype at the example's batch size and at another one.

    Equal shapes at one batch size are not enough: a ``(1, C, H, W)`` parameter added to a conv output matches it
    at batch 1 but broadcasts at any other. Without shapes at a second batch size (the model did not run at one,
    see :func:`_record_shapes_at_other_batch`) nothing is fused.
    """
    if not isinstance(b, fx.Node):
        return False
    ma, mb = a.meta.get("tensor_meta"), b.meta.get("tensor_meta")
    other_a, other_b = a.meta.get(_OTHER_BATCH), b.meta.get(_OTHER_BATCH)
    return ma is not None and mb is not None and getattr(mb, "shape", None) == ma.shape and mb.dtype == ma.dtype \
        and other_a is not None and other_a == other_b


def _record_shapes_at_other_batch(gm: fx.GraphModule, example_input: torch.Tensor) -> None:
    """Store every node's output shape with one more image in the batch than ``example_input`` in its meta.

    A model that does not run at that batch size gets none recorded, and no residual add is fused.
    """
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.cat([example_input, example_input[:1]]))
    except Exception:  # a model that only runs at its example's batch size
        return
    for node in gm.graph.nodes:
        node.meta[_OTHER_BATCH] = getattr(node.meta.get("tensor_meta"), "shape", None)


def _drop_identities(gm: fx.GraphModule, modules: Dict[str, nn.Module]) -> None:
    """Bypass ``nn.Identity`` calls (e.g. disabled drop-path) so that conv -> add patterns become adjacent."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and type(modules.get(node.target)) is nn.Identity and len(node.args) == 1 \
                and not _hooked(node, modules):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _pack_convolutions(gm: fx.GraphModule, modules: Dict[str, nn.Module], fp32_precision: str,
                       amx_share: float = 1.0) -> Dict[fx.Node, PackedConv2d]:
    """Replace every call of an ``nn.Conv2d`` module by a fresh :class:`PackedConv2d` submodule; of those that run
    on AMX, only the first ``amx_share`` in graph order keep doing so (the others, nearest the output, IEEE fp32)."""
    packed: Dict[fx.Node, PackedConv2d] = {}
    for node in list(gm.graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if type(conv) not in (nn.Conv2d, Conv2dSame) or isinstance(conv.padding, str) or conv.padding_mode != "zeros" \
                or _hooked(node, modules):
            continue
        input_meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
        if input_meta is None or len(node.args) != 1 or node.kwargs:
            continue
        name = f"packed_{len(packed)}"
        gm.add_submodule(name, PackedConv2d(conv, input_meta.shape, fp32_precision))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (node.args[0],))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        packed[new] = gm.get_submodule(name)
    on_amx = [conv for conv in packed.values() if conv.amx]
    for conv in on_amx[math.ceil(amx_share * len(on_amx)):]:
        conv.use_ieee()
    return packed


def _read_image_directly(gm: fx.GraphModule, packed: Dict[fx.Node, PackedConv2d]) -> bool:
    """If the model's input feeds only a convolution that vitzoo's image kernel can run, switch that convolution
    to it and set ``gm.input_memory_format`` to ``torch.contiguous_format`` (else ``torch.channels_last``)."""
    gm.input_memory_format = torch.channels_last
    inputs = [node for node in gm.graph.nodes if node.op == "placeholder"]
    source = inputs[0] if len(inputs) == 1 else None
    users = list(source.users) if source is not None else []
    # through an input check that returns its input (SHViT's check_input), which sees the same tensor
    while len(users) == 1 and getattr(users[0].target, "returns_its_input", False) and users[0].args[0] is source:
        source = users[0]
        users = list(source.users)
    if len(users) == 1 and users[0] in packed and users[0].args[0] is source \
            and packed[users[0]].use_image_kernel():
        gm.input_memory_format = torch.contiguous_format
        return True
    return False


def _fuse_image_pair(gm: fx.GraphModule, packed: Dict[fx.Node, PackedConv2d]) -> bool:
    """If the convolution on the image kernel writes 16 channels that only a convolution
    :func:`vitzoo.image_conv.image_conv_pair` can run reads (no residual, IEEE fp32), run both as one
    :class:`PackedConvPair`; returns whether it did."""
    first_node = next((node for node, conv in packed.items() if conv.image and node in gm.graph.nodes), None)
    if first_node is None or len(first_node.users) != 1 or len(first_node.args) != 1 or first_node.kwargs:
        return False
    first, second_node = packed[first_node], next(iter(first_node.users))
    second = packed.get(second_node)
    if second is None or second_node.args != (first_node,) or second_node.kwargs or first.out_channels != 16 \
            or second.amx or second.same or not image_conv.pair_takes(
                second.out_channels, second.kernel_size, second.stride, second.padding, second.dilation,
                second.groups, second.in_channels):
        return False
    gm.add_submodule("packed_pair", PackedConvPair(first, second))
    with gm.graph.inserting_after(second_node):
        pair = gm.graph.call_module("packed_pair", first_node.args)
    pair.meta = dict(second_node.meta)
    second_node.replace_all_uses_with(pair)
    gm.graph.erase_node(second_node)
    gm.graph.erase_node(first_node)
    return True


def _plain_containers(value: Any) -> Any:
    """``value`` with torch.fx's ``immutable_list`` / ``immutable_dict`` (what its interpreter returns for a list or
    dict output) as plain lists and dicts, which pytree tells apart from them (found by an audit: every model
    returning a list or dict, timm's ``features_only`` models among them, was reported as not reproduced by its
    trace, and not rewritten)."""
    if isinstance(value, immutable_list):
        return [_plain_containers(v) for v in value]
    if isinstance(value, immutable_dict):
        return {k: _plain_containers(v) for k, v in value.items()}
    if type(value) is tuple or isinstance(value, tuple) and hasattr(value, "_fields"):  # may hold fx's lists
        items = [_plain_containers(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value  # anything else as it is (found by a review: topk's torch.return_types became a plain tuple)


def _return_ordered_dict(gm: fx.GraphModule, traced: dict) -> collections.OrderedDict:
    """Make ``gm`` return an OrderedDict where torch.fx wrote the model's OrderedDict output as a dict literal
    (found by a review: torchvision's ``IntermediateLayerGetter`` and ``BackboneWithFPN`` return one, and such
    models were skipped as "in-place updates that torch.fx cannot record"); ``traced`` as the new graph returns it."""
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    with gm.graph.inserting_before(output):
        ordered = gm.graph.call_function(collections.OrderedDict, (output.args[0],))
    output.args = (ordered,)
    gm.recompile()
    return collections.OrderedDict(traced)


def _containers(value: Any) -> str:
    """The container types of a (nested) output, e.g. ``dict(Tensor, list(Tensor))``, for the skip message."""
    if isinstance(value, dict):
        return f"{type(value).__name__}({', '.join(_containers(v) for v in value.values())})"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}({', '.join(_containers(v) for v in value)})"
    return type(value).__name__


def _fuse_residual_adds(
        gm: fx.GraphModule, packed: Dict[fx.Node, PackedConv2d], modules: Dict[str, nn.Module]) -> int:
    """``conv(x) + r`` (same shape at any batch size, conv used only by the add) -> ``PackedConv2d(x, r)``.

    The fused conv runs where the add was, so that ``r`` is ready; it is fused only if nothing between the conv and
    the add modifies a tensor in place (that could be ``x`` or ``r``), and an in-place add only if it writes into the
    conv's output (``conv(x) += r``), never into ``r``, which other names may still refer to.
    """
    fused = 0
    for node in list(gm.graph.nodes):
        for conv_node, residual in _add_operands(node):
            if conv_node in packed and residual is not conv_node and len(conv_node.users) == 1 \
                    and len(conv_node.args) == 1 \
                    and packed[conv_node].unary == "none" and _same_tensor_meta(conv_node, residual) \
                    and not _mutation_between(conv_node, node, modules):
                # the residual may be computed after the conv (``y = conv(x); r = f(x); y + r``): run the conv
                # where the add was, after both operands (its only user is the add, so nothing earlier needs it)
                node.prepend(conv_node)
                conv_node.args = (conv_node.args[0], residual)
                # the add's output shape/dtype equal the conv's, so conv_node's meta stays valid
                node.replace_all_uses_with(conv_node)
                gm.graph.erase_node(node)
                fused += 1
                break
    return fused


def _fuse_relus(gm: fx.GraphModule, packed: Dict[fx.Node, PackedConv2d], modules: Dict[str, nn.Module]) -> int:
    """``relu(PackedConv2d(...))`` with the conv used only by the relu -> unary relu inside the conv."""
    fused = 0
    for node in list(gm.graph.nodes):
        if not _is_relu(node, modules):
            continue
        source = node.args[0] if node.args else None
        if source in packed and len(source.users) == 1 and packed[source].unary == "none":
            packed[source].unary = "relu"
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            fused += 1
    return fused


def _relus_in_place(gm: fx.GraphModule, modules: Dict[str, nn.Module]) -> int:
    """An out-of-place ReLU of a ``torch.cat`` result that nothing else uses -> ``torch.relu_`` on it.

    ``cat`` returns a new tensor that no other name refers to, so overwriting it is safe and saves a buffer and a
    pass of writes (SHViT's SHSA: ``proj(relu(cat([x1, x2])))``, where the ReLU cannot go into a conv epilogue).
    """
    done = 0
    for node in list(gm.graph.nodes):
        if not _is_relu(node, modules) or _mutates_in_place(node, modules) or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if isinstance(source, fx.Node) and source.op == "call_function" and source.target is torch.cat \
                and len(source.users) == 1:
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(torch.relu_, (source,))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            done += 1
    return done


def _eliminate_dead_code(gm: fx.GraphModule) -> None:
    """Remove nodes whose results nothing uses, keeping every in-place statement and every hooked module's call.

    ``fx.Graph.eliminate_dead_code`` treats ``y.add_(z)`` or ``nn.ReLU(inplace=True)(y)`` whose return value is
    not used as dead and removes it, although it writes into ``y``: a model doing ``y.add_(other)`` as a statement
    lost the addition.
    """
    modules = dict(gm.named_modules())
    for node in reversed(list(gm.graph.nodes)):
        if node.op in ("placeholder", "output") or node.users or node.is_impure() or _mutates_in_place(node, modules) \
                or _hooked(node, modules):
            continue
        gm.graph.erase_node(node)


def onednn_rewrite(model: nn.Module, example_input: torch.Tensor, fp32_precision: str = "ieee",
                   amx_share: float = 1.0) -> Tuple[nn.Module, List[str]]:
    """Trace ``model`` with torch.fx and swap its convolutions for fused, pre-packed oneDNN ones.

    Args:
        model: An eval-mode, fused, fp32 CPU model (not modified).
        example_input: Input used to record shapes (its memory format should be the one used at inference).
        fp32_precision: ``"bf16x3"`` runs convolutions in split bf16 on AMX where the kernel is available and
            faster (see :class:`PackedConv2d`); ``"ieee"`` (default) keeps IEEE fp32.
        amx_share: With ``"bf16x3"``, the share of the AMX-eligible convolutions (the first ones in graph order)
            that run on AMX; the rest, nearest the output, run IEEE fp32.

    Returns:
        The rewritten ``fx.GraphModule`` and a list describing what was done. If the model cannot be traced
        or has no plain convolutions, the model is returned unchanged with an explanation.
    """
    if has_forward_hooks(model):
        return model, ["oneDNN rewrite skipped: the model itself has forward hooks, which a traced graph would lose"]
    done = []
    try:  # tracing arbitrary user models can fail in many ways
        gm = _trace(model, timm_leaves=False)
    except Exception as e:
        try:  # as timm's feature extraction does: what timm marks untraceable kept whole (its convs not packed)
            gm = _trace(model, timm_leaves=True)
            done.append("traced with the modules timm marks untraceable kept whole (their convolutions not packed)")
        except Exception:
            return model, [f"oneDNN rewrite skipped: torch.fx could not trace the model ({type(e).__name__}: {e})"]
    _record_shapes_at_other_batch(gm, example_input)  # first: the propagation below sets the meta used later
    with torch.no_grad():
        traced = _plain_containers(ShapeProp(gm).propagate(example_input.clone()))  # a copy each: in-place inputs
        reference = model(example_input.clone())
        if type(reference) is collections.OrderedDict and type(traced) is dict:
            traced = _return_ordered_dict(gm, traced)
        if pytree.tree_structure(traced) != pytree.tree_structure(reference):
            return model, [f"oneDNN rewrite skipped: the torch.fx trace returns {_containers(traced)} where the model "
                           f"returns {_containers(reference)}"]
        if not outputs_close(traced, reference, rel=1e-5):
            # torch.fx records ``y += t`` on a tensor as ``y = y + t``; when another name still refers to ``y``
            # (or the model mutates tensors in other ways fx cannot see) the trace computes something else
            return model, ["oneDNN rewrite skipped: the torch.fx trace does not reproduce the model's output "
                           "(in-place updates that torch.fx cannot record)"]
    modules = dict(gm.named_modules())
    _drop_identities(gm, modules)
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision={fp32_precision!r}; valid values: {', '.join(FP32_PRECISIONS)}.")
    packed = _pack_convolutions(gm, modules, fp32_precision, amx_share)
    if not packed:
        return model, ["oneDNN rewrite skipped: no plain nn.Conv2d found"]
    n_add = _fuse_residual_adds(gm, packed, modules)
    n_relu = _fuse_relus(gm, packed, modules)
    n_in_place = _relus_in_place(gm, modules)
    _eliminate_dead_code(gm)
    image = _read_image_directly(gm, packed)
    pair = image and _fuse_image_pair(gm, packed)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    gm.pretrained_cfg = getattr(model, "pretrained_cfg", None)
    done.append(f"oneDNN pre-packed convolutions: {len(packed)} (fused ReLU: {n_relu}, fused residual add: {n_add})")
    n_amx = sum(conv.amx for conv in packed.values())
    if n_amx:
        done.append(f"convolutions in split bf16 (bf16x3) on AMX: {n_amx} of {len(packed)}")
    if image:
        done.append("first convolution reads the NCHW image directly (vitzoo's AVX-512 image kernel, IEEE fp32): "
                    "no channels-last copy of the input")
    if pair:
        done.append("the second convolution runs in the same kernel call, on bands of the first one's output rows "
                    "while they are in cache (IEEE fp32)")
    if n_in_place:
        done.append(f"ReLUs run in place on the torch.cat result only they use: {n_in_place}")
    return gm, done
