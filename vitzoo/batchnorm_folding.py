"""Fold inference-mode BatchNorm into the convolution or linear layer that feeds it.

``timm.utils.reparameterize_model`` fuses only modules that know how (``fuse()`` / ``reparameterize()``: SHViT,
EfficientViT-M, FastViT's re-param blocks). An ordinary ``Conv2d -> BatchNorm2d`` pair, as in ResNet, MobileNetV3
or EfficientNet, stays two layers, so an "inference-fused" FLOP count would still charge the BatchNorm (two
operations per element in fvcore) and a deployed model would still run it. :func:`fold_batchnorms` folds those pairs
too, after timm's fusion, so that every model is counted and run by the same convention.

A pair is found by running the model once: a BatchNorm whose input, at every call, is the very tensor a
``Conv2d`` / ``Linear`` just returned, and that tensor has no other use (no other op reads it, the model does not
return it), is folded into that layer (weight scaled per output channel, bias shifted) and replaced by
``nn.Identity`` (timm's ``BatchNormAct2d``: by its dropout and activation). Which pairs fold thus depends on the
model's graph only, never on its weights. The folded model is run again on the same input and kept only if it
gives the same output; if it does not, each pair is tried alone and only the pairs that change the output are left
unfolded. Half-precision (fp16 / bf16) models are left unfolded: the folded weights would be rounded to their
8-11-bit mantissa again. :func:`fold_batchnorms_detailed` also says which BatchNorm layers were left, and why.
"""
from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from timm.layers import Conv2dSame, SplitBatchNorm2d
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from vitzoo.module_hooks import deepcopy_sharing_hooks, has_forward_hooks
from vitzoo.outputs import UnsupportedOutputError, check_comparable, outputs_close

__all__ = ["BatchNormFolding", "fold_batchnorms", "fold_batchnorms_detailed"]

# BatchNorm kinds whose eval-mode forward is the affine map of their running statistics (exactly these types; timm's
# BatchNormAct2d / SyncBatchNormAct too, see _is_batchnorm_act). Any other BatchNorm (a BatchNorm3d, a subclass with
# a forward of its own) is named in ``unfolded`` with its type.
_FOLDABLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, SplitBatchNorm2d)
# layers computing ``op(x, weight) + bias``, which a per-output-channel scale and shift fold into; timm's
# ``Conv2dSame`` (TF "SAME" padding, tf_efficientnet_*) only pads differently. Not weight-standardised convs
# (``StdConv2d``): their weight is normalised again on every call, which would undo the scale.
_LAYERS = (nn.Conv2d, nn.Linear, Conv2dSame)


@dataclass
class BatchNormFolding:
    """What :func:`fold_batchnorms_detailed` did.

    Attributes:
        model: The folded deep copy, or the model given when nothing was folded.
        folded: ``{norm name: layer name}`` of the BatchNorm layers folded into the layer before them.
        unfolded: ``{norm name: reason}`` of the BatchNorm layers (any kind) that ran and were left as they are,
            e.g. ``"the output of stem.conv2 is also used elsewhere, which folding would change"``.
    """

    model: nn.Module
    folded: Dict[str, str] = field(default_factory=dict)
    unfolded: Dict[str, str] = field(default_factory=dict)


def fold_batchnorms(model: nn.Module, example_input: torch.Tensor) -> Tuple[nn.Module, int]:
    """Fold every ``Conv2d/Linear -> BatchNorm`` pair of an eval-mode model.

    Args:
        model: The model (eval mode); not modified.
        example_input: An input the model accepts; used to find the pairs and to check the folded model.

    Returns:
        ``(model, 0)`` when nothing folds, else a folded deep copy and the number of BatchNorm layers folded.
    """
    result = fold_batchnorms_detailed(model, example_input)
    return result.model, len(result.folded)


def fold_batchnorms_detailed(model: nn.Module, example_input: torch.Tensor) -> BatchNormFolding:
    """:func:`fold_batchnorms`, saying which BatchNorm layers were folded into which layer and why the others were
    not (see :class:`BatchNormFolding`)."""
    norms = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return BatchNormFolding(model)
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
        # folded weights would be rounded to 8-11 bits once more (ONNX Runtime exports in fp32)
        return BatchNormFolding(model, unfolded={n: "half-precision (fp16 / bf16) model: not folded" for n in norms})
    training = [name for name, m in model.named_modules() if m.training and name in norms]
    if training:  # found by an audit: it normalised with the example's statistics and updated the caller's running
        # ones (the discovery run is the caller's model's)
        raise ValueError(f"fold_batchnorms needs an eval-mode model (BatchNorm {training[0]} is in training mode): "
                         "call model.eval() first")
    with torch.no_grad():
        # each run gets its own copy of the example: a model may change its input in place (x.sub_(mean))
        pairs, reference, unfolded = _find_pairs(model, example_input.clone())
        try:
            check_comparable(reference)
        except UnsupportedOutputError as e:  # the check after folding could not run: nothing is folded
            unfolded.update((norm, f"not checkable: {e}") for norm in pairs.values())
            return BatchNormFolding(model, {}, dict(sorted(unfolded.items(), key=lambda kv: norms.index(kv[0]))))
        folded = _folded_copy(model, pairs)
        if pairs and not outputs_close(folded(example_input.clone()), reference, rel=1e-3):
            kept = {}
            for layer, norm in pairs.items():  # only the pairs that change the output on their own are left
                if outputs_close(_folded_copy(model, {layer: norm})(example_input.clone()), reference, rel=1e-3):
                    kept[layer] = norm
                else:
                    unfolded[norm] = f"folding it into {layer} changed the model's output"
            folded = _folded_copy(model, kept)
            if kept and not outputs_close(folded(example_input.clone()), reference, rel=1e-3):
                for layer, norm in kept.items():
                    unfolded[norm] = "folding every pair together changed the model's output (each alone did not)"
                kept, folded = {}, model
            pairs = kept
    return BatchNormFolding(folded if pairs else model, {norm: layer for layer, norm in pairs.items()},
                            dict(sorted(unfolded.items(), key=lambda kv: norms.index(kv[0]))))


def _folded_copy(model: nn.Module, pairs: Dict[str, str]) -> nn.Module:
    """A deep copy of ``model`` with each ``{layer: norm}`` pair folded (``model`` itself when there is none)."""
    if not pairs:
        return model
    folded = deepcopy_sharing_hooks(model)
    modules = dict(folded.named_modules())
    for layer_name, norm_name in pairs.items():
        _fold(modules[layer_name], modules[norm_name])
        _replace(folded, norm_name, _after_norm(modules[norm_name]))
    return folded


def _is_batchnorm_act(module: nn.Module) -> bool:
    """timm's ``BatchNormAct2d`` / ``SyncBatchNormAct``: a BatchNorm followed by its own ``drop`` and ``act``."""
    return isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)) \
        and isinstance(getattr(module, "act", None), nn.Module) and isinstance(getattr(module, "drop", None), nn.Module)


class _Produced:
    """One tensor a layer returned: which layer, a weak reference to it, the norm it was given to (if any) and
    whether anything else read it."""

    __slots__ = ("layer", "ref", "norm", "other_use", "hooked", "channels_at_dim1")

    def __init__(self, layer: str, tensor: torch.Tensor, channels_at_dim1: bool):
        self.layer, self.ref = layer, weakref.ref(tensor)
        self.norm: Optional[str] = None
        self.other_use = False
        self.hooked: Optional[str] = None  # a module whose forward (pre-)hook is given this tensor
        # whether dim 1, the one a BatchNorm normalises, holds the layer's output channels: a convolution's always,
        # a Linear's only on a 2-D output (on [B, N, C] it is the tokens)
        self.channels_at_dim1 = channels_at_dim1


class _UseRecorder(TorchDispatchMode):
    """Marks every tracked layer output that an op reads outside the BatchNorm it was given to, and every layer
    whose weight or bias an op reads outside that layer's own forward (a weight shared with another layer, or
    read by the model's own code: folding would change it there too).

    At the dispatcher every op is seen, views, in-place updates and ops inside scripted code included, and shape
    queries are not (they do not read the data)."""

    def __init__(self, produced: Dict[int, _Produced], active: List[str], params: Dict[int, Tuple[str, Any]],
                 shared: set):
        super().__init__()
        self.produced, self.active, self.params, self.shared = produced, active, params, shared

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        current = self.active[-1] if self.active else None
        for leaf in pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                record = _tracked(self.produced, leaf)
                if record is not None and (current is None or record.norm != current):
                    record.other_use = True
                owner = self.params.get(id(leaf))
                if owner is not None and owner[1] is leaf and owner[0] != current:
                    self.shared.add(owner[0])
        return func(*args, **kwargs)


def _tracked(produced: Dict[int, _Produced], value: Any) -> Optional[_Produced]:
    """The record of ``value`` if it is a layer output still alive (an id can be reused once its tensor is gone)."""
    record = produced.get(id(value))
    return record if record is not None and record.ref() is value else None


def _find_pairs(model: nn.Module, example_input: torch.Tensor) -> Tuple[Dict[str, str], object, Dict[str, str]]:
    """``{layer name: norm name}`` for the norms fed only by one layer's output that nothing else uses, the
    model's output, and ``{norm name: reason}`` for the norms that ran and are not paired."""
    produced: Dict[int, _Produced] = {}  # id(output) -> the layer output's record
    fed_by: Dict[str, Optional[str]] = {}  # norm name -> the layer whose output it received (None: not a layer's)
    records: List[_Produced] = []
    mixed: set = set()  # norms fed by different layers, or by a layer's output and another op's, at different calls
    calls: Dict[str, int] = {}
    active: List[str] = []  # the layers and norms whose forward is running, innermost last
    params: Dict[int, Tuple[str, Any]] = {}  # id(weight or bias of a layer) -> (layer name, the tensor)
    shared: set = set()  # layers whose output or weights are read by more than their norm / themselves
    others: Dict[int, Tuple[Any, str]] = {}  # id(output) -> (weak ref, "name (Type)") of other modules' outputs
    fed_by_other: Dict[str, str] = {}  # norm name -> the other module whose output it received
    across: set = set()  # norms fed a layer's output whose dim 1 is not the layer's channels (a Linear's tokens)
    handles = []

    def after_other(name):
        def hook(module, args, output):
            known = others.get(id(output))
            if isinstance(output, torch.Tensor) and (known is None or known[0]() is not output):
                others[id(output)] = (weakref.ref(output), f"{name} ({type(module).__name__})")  # innermost kept
        return hook

    def before_layer(name):
        def hook(module, args):
            active.append(name)
        return hook

    def after_layer(name):
        def hook(module, args, output):
            active.pop()
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor):
                record = _Produced(name, output, not isinstance(module, nn.Linear) or output.dim() == 2)
                produced[id(output)] = record
                records.append(record)
        return hook

    def before_norm(name):
        def hook(module, args):
            calls[name] = calls.get(name, 0) + 1
            record = _tracked(produced, args[0]) if args else None
            layer = record.layer if record is not None else None
            if record is not None:
                if not record.channels_at_dim1:
                    across.add(name)
                if record.norm is not None and record.norm != name:
                    record.other_use = True  # given to two norms
                record.norm = name
            if record is None and args:
                other = others.get(id(args[0]))
                if other is not None and other[0]() is args[0]:
                    fed_by_other[name] = other[1]
            if fed_by.get(name, layer) != layer:
                mixed.add(name)  # fed by different layers (or by a layer and by another op) at different calls
            fed_by[name] = layer if name not in mixed else None
            active.append(name)
        return hook

    def after_norm(module, args, output):
        active.pop()

    def seen_by_hooks_of(name):
        """Marks the layer outputs a module with a hook of the caller's is given or returns (found by an audit: a
        hook on a Sequential holding only the conv, or a pre-hook on one starting with the BatchNorm, keeps a
        reference to the conv's output; folded, it got the BatchNorm's, overwritten by an in-place ReLU)."""
        def mark(values):
            for leaf in pytree.tree_leaves(values):
                record = _tracked(produced, leaf) if isinstance(leaf, torch.Tensor) else None
                if record is not None and record.hooked is None:
                    record.hooked = name or "the model itself"
        return mark

    for name, module in model.named_modules():
        if has_forward_hooks(module) and not isinstance(module, torch.jit.ScriptModule):
            mark = seen_by_hooks_of(name)
            if module._forward_pre_hooks:  # with its keyword arguments: a hook may take them (with_kwargs=True)
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, kwargs, mark=mark: mark((args, kwargs)), with_kwargs=True))
            if module._forward_hooks:
                handles.append(module.register_forward_hook(lambda m, args, out, mark=mark: mark(out)))
        if isinstance(module, torch.jit.ScriptModule):
            # takes no hooks (found by an audit: any model holding a scripted part and a BatchNorm failed to
            # deploy); opaque here, so its layers are not folded, and a fold its uses would break fails the check
            continue
        if type(module) in _LAYERS:
            handles.append(module.register_forward_pre_hook(before_layer(name)))
            handles.append(module.register_forward_hook(after_layer(name)))
            for tensor in (module.weight, module.bias):
                if tensor is not None:
                    if id(tensor) in params:  # one tensor in two layers
                        shared.update((name, params[id(tensor)][0]))
                    params[id(tensor)] = (name, tensor)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_pre_hook(before_norm(name)))
            handles.append(module.register_forward_hook(after_norm))
        elif module is not model:
            handles.append(module.register_forward_hook(after_other(name)))
    try:
        with _UseRecorder(produced, active, params, shared):
            output = model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    for leaf in pytree.tree_leaves(output):  # a layer output the model returns is used by the caller
        record = _tracked(produced, leaf)
        if record is not None:
            record.other_use = True
    shared.update(record.layer for record in records if record.other_use)
    hooked_by = {record.layer: record.hooked for record in records if record.hooked is not None}
    modules = dict(model.named_modules())
    feeds = Counter(layer for layer in fed_by.values() if layer is not None)
    pairs: Dict[str, str] = {}
    unfolded: Dict[str, str] = {}
    for norm, layer in fed_by.items():
        if not _known_kind(modules[norm]):
            unfolded[norm] = (f"a {type(modules[norm]).__name__}: only BatchNorm1d / BatchNorm2d / SyncBatchNorm (and "
                              "timm's BatchNormAct2d) fold here, not other kinds or subclasses (whose forward may "
                              "differ)")
        elif not _foldable_norm(modules[norm]):
            unfolded[norm] = "it has no running statistics (track_running_stats=False)"
        elif norm in mixed:
            unfolded[norm] = "its input is not the output of the same Conv2d / Linear at every call"
        elif layer is None and norm in fed_by_other:
            unfolded[norm] = f"its input is the output of {fed_by_other[norm]}, not of a Conv2d / Linear"
        elif layer is None:
            unfolded[norm] = "its input is not the output of a Conv2d / Linear (an activation's, an addition's...)"
        elif norm in across:
            unfolded[norm] = (f"it normalises dim 1 of {layer}'s {modules[layer].out_features}-feature output, not its "
                              "features (a token dimension)")
        elif feeds[layer] != 1:
            unfolded[norm] = f"the output of {layer} feeds more than one BatchNorm"
        elif has_forward_hooks(modules[layer]) or has_forward_hooks(modules[norm]):
            hooked = layer if has_forward_hooks(modules[layer]) else norm
            unfolded[norm] = f"{hooked} has a forward hook, which sees the unfolded output"
        elif layer in hooked_by:
            unfolded[norm] = (f"a forward hook on {hooked_by[layer]} is given the output of {layer}, which folding "
                              "would change")
        elif calls[layer] != calls[norm]:
            unfolded[norm] = f"{layer} also runs without this BatchNorm after it"
        elif layer in shared:
            unfolded[norm] = f"the output or the weights of {layer} are also used elsewhere, which folding would change"
        elif not isinstance(modules[norm], nn.SyncBatchNorm) \
                and isinstance(modules[layer], nn.Linear) != isinstance(modules[norm], nn.BatchNorm1d):
            # Linear feeds BatchNorm1d (2-D input), Conv2d feeds BatchNorm2d
            kinds = type(modules[layer]).__name__, type(modules[norm]).__name__
            unfolded[norm] = f"{kinds[0]} {layer} does not fold into a {kinds[1]}"
        else:
            pairs[layer] = norm
    return pairs, output, unfolded


def _known_kind(module: nn.Module) -> bool:
    return type(module) in _FOLDABLE or _is_batchnorm_act(module)


def _foldable_norm(module: nn.Module) -> bool:
    return _known_kind(module) and module.running_mean is not None and module.running_var is not None


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
