"""Comparing (nested) model outputs: the check behind the graph rewrites that must not change a model's result."""
from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

__all__ = ["outputs_close"]


def outputs_close(output: object, reference: object, rel: float) -> bool:
    """Whether ``output`` has ``reference``'s structure and values, each float tensor within ``rel`` times the
    largest absolute value of its reference tensor (float rounding, not a different computation).

    Tensors, tuples, lists and dicts nest as the model returns them; non-float leaves must be equal.
    """
    leaves, spec = pytree.tree_flatten(output)
    ref_leaves, ref_spec = pytree.tree_flatten(reference)
    if spec != ref_spec:
        return False
    for a, b in zip(leaves, ref_leaves):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return False
        if not isinstance(b, torch.Tensor):
            if a != b:
                return False
        elif a.shape != b.shape or a.dtype != b.dtype:
            return False
        elif b.numel() and b.is_floating_point():
            scale = float(b.abs().max())
            if not float((a.float() - b.float()).abs().max()) <= rel * scale + 1e-12:  # NaN: not close
                return False
        elif not torch.equal(a, b):
            return False
    return True
