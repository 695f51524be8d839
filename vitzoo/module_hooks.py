"""Forward hooks through :func:`vitzoo.deploy`: a module that carries one is kept as it is, so its hooks run.

deploy's eager backend replaces layers (fused units, packed convolutions, AMX linear layers) and traces models
with torch.fx, which runs a module's ``forward`` without its hooks. A hook on a replaced layer was lost: one that
changes the output gave wrong outputs (found by an audit, 2026-11-26), one that records was never called. The
passes here and in :mod:`vitzoo.onednn_rewrite`, :mod:`vitzoo.amx_linear` and :mod:`vitzoo.batchnorm_folding` leave
such modules alone: :func:`reparameterize` fuses around them, :class:`HookKeepingTracer` keeps them whole in the
graph, and :func:`lost_hooks` checks that every hook is still attached to the deployed model.
"""
from __future__ import annotations

import copy
import functools
import inspect
from typing import Any, Callable, Dict, List, Optional, Set, TypeVar

import torch.fx as fx
from torch import nn

__all__ = ["HookKeepingTracer", "deepcopy_keeping_modes", "deepcopy_sharing_hooks", "drop_shared_hooks",
           "has_forward_hooks", "hook_ids", "lost_hooks", "reparameterize"]

M = TypeVar("M", bound=nn.Module)


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward or forward pre-hooks of its own."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def hook_ids(model: nn.Module) -> Dict[int, str]:
    """``{hook handle id: name of the module it is on}`` for every forward (pre-)hook in ``model``; the ids survive
    ``copy.deepcopy`` and moving a module elsewhere in the tree."""
    return {hook: name or "the model itself" for name, module in model.named_modules()
            for hook in [*module._forward_hooks, *module._forward_pre_hooks]}


def lost_hooks(before: Dict[int, str], model: nn.Module) -> List[str]:
    """Names (in ``before``'s model) of the modules whose hooks from ``before`` are no longer in ``model``."""
    kept = hook_ids(model)
    return sorted({name for hook, name in before.items() if hook not in kept})


def deepcopy_sharing_hooks(model: M) -> M:
    """``copy.deepcopy(model)`` whose forward (pre-)hooks are the caller's objects, not copies: ``deepcopy`` keeps a
    plain function, but copies a bound method's object and a ``functools.partial``'s arguments, so a recorder's
    hook on the copy recorded into a copy of the recorder (found by a review). A hook that is a method of the model
    itself (of one of its modules, or of an object a module holds, such as the collector of timm's
    ``FeatureHookNet``; also through a ``functools.partial``) is copied with it: shared, the copy's features were
    collected by the original, and the copy returned none (found by an audit: ``deploy`` of ``features_only=True,
    feature_cls='hook'`` returned ``[]``). A partial's arguments do not decide it: ``partial(record, model.layer2,
    acts)`` names a layer but records into the caller's ``acts``, and stays shared."""
    own = _objects_held(model)
    hooks = [hook for module in model.modules()
             for hook in (*module._forward_hooks.values(), *module._forward_pre_hooks.values())
             if _method_of(hook) is None or id(_method_of(hook)) not in own]
    return deepcopy_keeping_modes(model, {id(hook): hook for hook in hooks})


def deepcopy_keeping_modes(model: M, memo: Optional[Dict[int, Any]] = None) -> M:
    """``copy.deepcopy(model, memo)`` with every module in the training / eval mode it has in ``model``.

    ``copy.deepcopy`` of a ``torch.fx.GraphModule`` rebuilds it in training mode: timm's ``features_only=True,
    feature_cls='fx'`` models (a torchvision ``DualGraphModule``, which runs its *training* graph then) came back
    with DropPath dropping at random and BatchNorm on batch statistics although the model was in eval mode (found by
    a breadth test: ``count_flops`` refused them as "not in eval mode", BatchNorm folding judged every fold to
    change the output, and ``deploy`` could return a copy that dropped paths). Each copy whose mode differs is set
    with its own ``train(mode)``, parents before children, so that such a module switches its graph too."""
    copied = copy.deepcopy(model, memo)
    copies = dict(copied.named_modules(remove_duplicate=False))
    for name, module in model.named_modules(remove_duplicate=False):
        twin = copies.get(name)
        if twin is not None and twin.training != module.training:
            twin.train(module.training)
    return copied


def _method_of(hook: object) -> object:
    """The object ``hook`` is a method of (through ``functools.partial``s), else None."""
    while isinstance(hook, functools.partial):
        hook = hook.func
    return getattr(hook, "__self__", None)


# torch's own hook registries on every module: what they hold is registered there, not held by the model (a
# caller's hook object and a hook bound to it counted as the model's, so the bound one was copied with the model;
# found by an audit)
_HOOK_REGISTRIES = frozenset(name for name in vars(nn.Module()) if "hook" in name)


def _objects_held(model: nn.Module) -> Set[int]:
    """ids of ``model``'s modules and of the objects they hold as attributes (directly or in a list / dict), torch's
    hook registries left out."""
    held = set()
    for module in model.modules():
        held.add(id(module))
        for name, value in vars(module).items():
            if name in _HOOK_REGISTRIES:
                continue
            held.add(id(value))
            if isinstance(value, (list, tuple)):
                held.update(map(id, value))
            elif isinstance(value, dict):
                held.update(map(id, value.values()))
    return held


def drop_shared_hooks(copied: M, original: nn.Module) -> M:
    """Remove from ``copied`` (a ``copy.deepcopy`` of ``original``) the forward (pre-)hooks it shares with
    ``original``, in place, and return it: on a copy that runs on made-up input (FLOP counting) such a hook is the
    caller's code, and a hook recording features recorded the copy's. Copy with :func:`deepcopy_sharing_hooks`, so
    that the caller's bound methods, ``functools.partial``s and objects are shared too (``deepcopy`` shares only a
    plain function: the others ran on the copy, and one holding a lock or an open file made the copy fail; found by
    an audit). Hooks the copy has its own copy of (methods of objects the model holds, such as timm's
    ``FeatureHookNet`` collectors) belong to the copy and stay."""
    for mine, theirs in zip(copied.modules(), original.modules()):
        for attr in ("_forward_hooks", "_forward_pre_hooks"):
            shared = {key for key, hook in getattr(mine, attr).items()
                      if getattr(theirs, attr).get(key) is hook}
            for key in shared:
                del getattr(mine, attr)[key]
                for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                              "_forward_pre_hooks_with_kwargs"):
                    getattr(mine, extra).pop(key, None)
    return copied


def _contains_hooks(module: nn.Module) -> bool:
    return any(has_forward_hooks(m) for m in module.modules())


def reparameterize(model: nn.Module, keep_hooked: bool = True) -> nn.Module:
    """Fuse ``model`` in place as ``timm.utils.reparameterize_model`` does (each child with ``fuse()`` replaced by
    its result, else ``reparameterize()`` / ``switch_to_deploy()`` called, then the children of the child it had
    likewise), except that with ``keep_hooked`` a child holding a hooked module, itself or below it, is not fused
    itself: only its children are. A block that already holds its fused ``reparam_conv`` (timm's convention: FastViT,
    MobileOne) is not fused again; timm's FastViT ``RepMixer`` fails when it is (found by an audit: a FastViT the
    user had fused could not be counted, deployed or exported). Returns ``model``."""
    for name, child in list(model.named_children()):
        if not (keep_hooked and _contains_hooks(child)):
            fuse = _no_argument_method(child, "fuse")
            if fuse is not None:
                fused = fuse()
                if isinstance(fused, nn.Module):  # a fuse() that works in place and returns None keeps the child
                    setattr(model, name, fused)
                    child = fused
            elif not isinstance(getattr(child, "reparam_conv", None), nn.Module):
                for other in ("reparameterize", "switch_to_deploy"):
                    method = _no_argument_method(child, other)
                    if method is not None:
                        method()
                        break
        reparameterize(child, keep_hooked)
    return model


def _no_argument_method(module: nn.Module, name: str) -> Optional[Callable[[], Any]]:
    """``module``'s method ``name`` if it is one that can be called without arguments, else None (found by an audit:
    a submodule named ``fuse``, as fusion convolutions often are, or a ``fuse(x, y)`` method was called as the
    fusion step and crashed deploy)."""
    method = getattr(module, name, None)
    if not inspect.ismethod(method):
        return None
    try:
        inspect.signature(method).bind()
    except (TypeError, ValueError):
        return None
    return method


class HookKeepingTracer(fx.Tracer):
    """torch.fx's tracer, with a hooked module as a leaf: called whole in the graph, so its hooks run."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return has_forward_hooks(m) or super().is_leaf_module(m, module_qualified_name)
