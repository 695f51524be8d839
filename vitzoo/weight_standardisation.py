"""Standardise the weights of weight-standardised convolutions once, for inference.

timm's ``StdConv2d`` / ``StdConv2dSame`` (BiT, the hybrid ViTs) and ``ScaledStdConv2d`` / ``ScaledStdConv2dSame``
(NFNets) normalise their weight on every call: a ``batch_norm`` over each output channel's fan-in, then, for the
scaled kinds, a gain per output channel. In inference the weight is fixed, so that work is the same at every call.
:func:`standardise_weights` replaces each such layer by a plain ``nn.Conv2d`` (timm's ``Conv2dSame`` where the layer
pads "SAME" at run time) holding the weight the layer itself would compute, by the same op: the replacement's
output is bit-for-bit the layer's (timm's layers always pad with zeros, whatever their ``padding_mode``, and so
does the replacement). Then the layer is a convolution like any other: a BatchNorm after it folds, the oneDNN
rewrite packs a plain ``nn.Conv2d`` (not ``Conv2dSame``), and FLOP counts no longer charge the standardisation on
every call (fvcore's ``batch_norm``: 2.2-3.2% of these models at their cfg size).

Only exactly these four types are replaced (a subclass may compute its weight differently), and never a layer that
carries forward hooks (:mod:`vitzoo.module_hooks`).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from torch import nn

from vitzoo.module_hooks import has_forward_hooks

__all__ = ["standardise_weights", "standardised_weight"]

_PLAIN = (StdConv2d, StdConv2dSame)
_SCALED = (ScaledStdConv2d, ScaledStdConv2dSame)


def standardised_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The weight ``conv`` (one of the four types) convolves with at every call."""
    weight = conv.weight
    gain = (conv.gain * conv.scale).view(-1) if type(conv) in _SCALED else None
    flat = weight.reshape(1, conv.out_channels, -1)
    return F.batch_norm(flat, None, None, weight=gain, training=True, momentum=0.0, eps=conv.eps).reshape_as(weight)


def _plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    dynamic_same = getattr(conv, "same_pad", False)
    kind = Conv2dSame if dynamic_same else nn.Conv2d
    plain = kind(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                 padding=0 if dynamic_same else conv.padding, dilation=conv.dilation, groups=conv.groups,
                 bias=conv.bias is not None, device="meta", dtype=conv.weight.dtype)
    with torch.no_grad():
        plain.weight = nn.Parameter(standardised_weight(conv).detach().clone(),
                                    requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        plain.bias = conv.bias
    plain.train(conv.training)
    return plain


def standardise_weights(model: nn.Module) -> Tuple[nn.Module, int]:
    """Replace, in place, every weight-standardised convolution of ``model`` (without forward hooks) by a plain
    convolution with its standardised weight. Returns ``(model, number replaced)``; ``model`` itself when it is
    such a convolution is returned replaced."""
    if type(model) in _PLAIN + _SCALED:
        return (model, 0) if has_forward_hooks(model) else (_plain_conv(model), 1)
    plain = {}  # one replacement per layer, also where a layer is used at several places
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if type(child) in _PLAIN + _SCALED and not has_forward_hooks(child):
                if id(child) not in plain:
                    plain[id(child)] = _plain_conv(child)
                setattr(parent, name, plain[id(child)])
    return model, len(plain)
