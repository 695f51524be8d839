"""Fold inference-mode BatchNorm into the convolution or linear layer that feeds it.

``timm.utils.reparameterize_model`` fuses only modules that know how (``fuse()`` / ``reparameterize()``: SHViT,
EfficientViT-M, FastViT's re-param blocks). An ordinary ``Conv2d -> BatchNorm2d`` pair, as in ResNet, MobileNetV3
or EfficientNet, stays two layers, so an "inference-fused" FLOP count would still charge the BatchNorm (two
operations per element in fvcore) and a deployed model would still run it. :func:`fold_batchnorms` folds those pairs
too, after timm's fusion, so that every model is counted and run by the same convention.

A pair is found by running the model once: a BatchNorm whose input, at every call, is the very tensor a
``Conv2d`` / ``Linear`` just returned is folded into that layer (weight scaled per output channel, bias shifted),
and is replaced by ``nn.Identity`` (timm's ``BatchNormAct2d``: by its dropout and activation). The folded model is
run again on the same input and kept only if it gives the same output (a layer output that is also used elsewhere
would make it differ); otherwise the model is returned unchanged. Half-precision (fp16 / bf16) models are left
unfolded: the folded weights would be rounded to their 8-11-bit mantissa again.
"""
from __future__ import annotations

import copy
import weakref
from collections import Counter
from typing import Dict, Optional, Tuple

import torch
from timm.layers import Conv2dSame
from torch import nn

from vitzoo.outputs import outputs_close

__all__ = ["fold_batchnorms"]

_FOLDABLE = (nn.BatchNorm1d, nn.BatchNorm2d)
# layers computing ``op(x, weight) + bias``, which a per-output-channel scale and shift fold into; timm's
# ``Conv2dSame`` (TF "SAME" padding, tf_efficientnet_*) only pads differently. Not weight-standardised convs
# (``StdConv2d``): their weight is normalised again on every call, which would undo the scale.
_LAYERS = (nn.Conv2d, nn.Linear, Conv2dSame)


def fold_batchnorms(model: nn.Module, example_input: torch.Tensor) -> Tuple[nn.Module, int]:
    """Fold every ``Conv2d/Linear -> BatchNorm`` pair of an eval-mode model.

    Args:
        model: The model (eval mode); not modified.
        example_input: An input the model accepts; used to find the pairs and to check the folded model.

    Returns:
        ``(model, 0)`` when nothing folds (or the check fails), else a folded deep copy and the number of
        BatchNorm layers folded.
    """
    if not any(type(m) in _FOLDABLE or _is_batchnorm_act(m) for m in model.modules()):
        return model, 0
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
        return model, 0  # folded weights would be rounded to 8-11 bits once more (ONNX Runtime exports in fp32)
    with torch.no_grad():
        pairs, reference = _find_pairs(model, example_input)
        if not pairs:
            return model, 0
        folded = copy.deepcopy(model)
        modules = dict(folded.named_modules())
        for layer_name, norm_name in pairs.items():
            _fold(modules[layer_name], modules[norm_name])
            _replace(folded, norm_name, _after_norm(modules[norm_name]))
        if not outputs_close(folded(example_input), reference, rel=1e-3):
            return model, 0
    return folded, len(pairs)


def _is_batchnorm_act(module: nn.Module) -> bool:
    """timm's ``BatchNormAct2d``: a BatchNorm2d followed by its own ``drop`` and ``act`` modules."""
    return isinstance(module, nn.BatchNorm2d) and isinstance(getattr(module, "act", None), nn.Module) \
        and isinstance(getattr(module, "drop", None), nn.Module)


def _find_pairs(model: nn.Module, example_input: torch.Tensor) -> Tuple[Dict[str, str], object]:
    """``{layer name: norm name}`` for the norms fed only by one layer's output, and the model's output."""
    produced: Dict[int, Tuple[str, weakref.ref]] = {}  # id(output) -> (layer name, weak reference to the output)
    fed_by: Dict[str, Optional[str]] = {}  # norm name -> the layer whose output it received (None: not a layer's)
    calls: Dict[str, int] = {}
    handles = []

    def after_layer(name):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor):
                produced[id(output)] = (name, weakref.ref(output))
        return hook

    def before_norm(name):
        def hook(module, args):
            calls[name] = calls.get(name, 0) + 1
            source = produced.get(id(args[0])) if args and isinstance(args[0], torch.Tensor) else None
            layer = source[0] if source is not None and source[1]() is args[0] else None
            if fed_by.get(name, layer) != layer:
                layer = None  # fed by different tensors at different calls
            fed_by[name] = layer
        return hook

    for name, module in model.named_modules():
        if type(module) in _LAYERS:
            handles.append(module.register_forward_hook(after_layer(name)))
        elif _foldable_norm(module):
            handles.append(module.register_forward_pre_hook(before_norm(name)))
    try:
        output = model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    feeds = Counter(layer for layer in fed_by.values() if layer is not None)
    pairs: Dict[str, str] = {}
    for norm, layer in fed_by.items():
        if layer is None or feeds[layer] != 1 or calls[layer] != calls[norm]:
            continue
        if isinstance(modules[layer], nn.Linear) != isinstance(modules[norm], nn.BatchNorm1d):
            continue  # Linear feeds BatchNorm1d (2-D input), Conv2d feeds BatchNorm2d
        pairs[layer] = norm
    return pairs, output


def _foldable_norm(module: nn.Module) -> bool:
    kind_ok = type(module) in _FOLDABLE or _is_batchnorm_act(module)
    return kind_ok and module.running_mean is not None and module.running_var is not None


def _fold(layer: nn.Module, norm: nn.modules.batchnorm._BatchNorm) -> None:
    """Scale ``layer``'s weight and shift its bias so that it computes ``norm(layer(x))`` (inference statistics)."""
    # in float32, or float64 for a float64 model (whose precision the fold must not lower)
    work = torch.float64 if torch.float64 in (layer.weight.dtype, norm.running_var.dtype) else torch.float32
    scale = torch.rsqrt(norm.running_var.to(work) + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.to(work)
    shift = -norm.running_mean.to(work) * scale
    if norm.bias is not None:
        shift = shift + norm.bias.to(work)
    weight = layer.weight.to(work)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    layer.weight.data = (weight * scale.reshape(shape)).to(layer.weight.dtype)
    bias = shift if layer.bias is None else layer.bias.to(work) * scale + shift
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.data = bias.to(layer.bias.dtype)


def _after_norm(norm: nn.Module) -> nn.Module:
    """What remains of a folded norm: nothing, or timm ``BatchNormAct2d``'s dropout and activation."""
    if _is_batchnorm_act(norm):
        return nn.Sequential(norm.drop, norm.act)
    return nn.Identity()


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
