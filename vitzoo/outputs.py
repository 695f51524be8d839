"""Comparing (nested) model outputs: the check behind the graph rewrites that must not change a model's result."""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
from torch.utils import _pytree as pytree

__all__ = ["OutputLayout", "UnsupportedOutputError", "check_comparable", "outputs_close", "max_abs_diff_of",
           "WRONG_RESULT_RTOL"]

#: A float32 output that differs from its reference by more than this times the reference's largest value is a
#: different computation, not rounding, even when the difference is within an absolute tolerance: a model with
#: random weights may output values below 1e-4, where an all-zero output would pass ``atol=1e-4`` alone.
WRONG_RESULT_RTOL = 1e-3


def _holds_tensor(value: object) -> bool:
    """Whether ``value`` (a leaf of an output: no tuple, list, dict or namedtuple) keeps a tensor in its attributes
    (a dataclass, a ``SimpleNamespace``, an object with slots)."""
    fields = dict(getattr(value, "__dict__", {}) or {})
    for slot in getattr(type(value), "__slots__", ()):
        if isinstance(slot, str) and hasattr(value, slot):
            fields[slot] = getattr(value, slot)
    return any(isinstance(v, torch.Tensor) or isinstance(v, (tuple, list, dict)) and
               any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(v)) for v in fields.values())


def check_comparable(output: object) -> None:
    """Raise :class:`UnsupportedOutputError` if ``output`` keeps tensors in an object the output comparison cannot
    look into (found by an audit: a dataclass or ``SimpleNamespace`` output failed deploy with torch's "Boolean value
    of Tensor with more than one value is ambiguous")."""
    for path, leaf in pytree.tree_flatten_with_path(output)[0]:
        if not isinstance(leaf, torch.Tensor) and _holds_tensor(leaf):
            raise UnsupportedOutputError(
                f"the model's output{pytree.keystr(path)} is a {type(leaf).__name__} holding tensors, which cannot "
                "be compared with the original's: return the tensors in a tuple, list, dict or namedtuple (or "
                "register the class with torch.utils._pytree)")


def _leaf_diff(a: torch.Tensor, b: torch.Tensor) -> Tuple[float, float]:
    """``(max abs diff, largest finite abs value of b)`` of a float tensor and its reference (same shape).

    Equal values count as no difference, equal infinities included (a classifier's ``-inf`` logits of disabled
    classes: ``inf - inf`` would be NaN); an infinity against anything else is an infinite difference, and a NaN
    on either side gives NaN. The scale is taken over the finite values, so that a relative tolerance stays finite
    (found by an audit: with ``rtol > 0`` one infinite value in the reference let any output pass).
    """
    # in the wider of the two dtypes, at least float32: a float64 output is compared in float64 with a float32
    # reference too (it was rounded to float32 first, hiding differences below float32's resolution)
    work = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a, b = a.to(b.device, work), b.to(work)
    delta = (a - b).abs()
    delta = torch.where(a == b, torch.zeros_like(delta), delta)
    finite = b[torch.isfinite(b)]
    return float(delta.max()), float(finite.abs().max()) if finite.numel() else 0.0


@torch.no_grad()
def outputs_close(output: object, reference: object, rel: float) -> bool:
    """Whether ``output`` has ``reference``'s structure and values, each float tensor within ``rel`` times the
    largest absolute value of its reference tensor (float rounding, not a different computation).

    Tensors, tuples, lists and dicts nest as the model returns them; non-float leaves must be equal.
    """
    check_comparable(reference)
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
            diff, scale = _leaf_diff(a, b)
            if not diff <= rel * scale + 1e-12:  # NaN: not close
                return False
        elif not torch.equal(a, b):
            return False
    return True


@torch.no_grad()  # an output may be a parameter's view, which requires grad even under no_grad: no graph, no warning
def max_abs_diff_of(output: object, reference: object) -> Tuple[float, float]:
    """``(max abs diff, largest abs value of the reference)`` over the float tensors of two (nested) outputs.

    Raises:
        ValueError: The structures differ (another nesting, number or shape of tensors), or non-float leaves
            differ; the message says where.
    """
    check_comparable(reference)
    leaves, spec = pytree.tree_flatten(output)
    ref_leaves, ref_spec = pytree.tree_flatten(reference)
    if spec != ref_spec:
        raise ValueError(f"the output's structure differs from the original's: {_describe(output)} instead of "
                         f"{_describe(reference)}")
    diff, scale = 0.0, 0.0
    for i, (a, b) in enumerate(zip(leaves, ref_leaves)):
        where = f"output {i}" if len(ref_leaves) > 1 else "the output"
        if isinstance(b, torch.Tensor) and isinstance(a, torch.Tensor):
            if tuple(a.shape) != tuple(b.shape):
                raise ValueError(f"{where} has shape {tuple(a.shape)}, the original's {tuple(b.shape)}")
            if b.is_floating_point() and b.numel():
                d, s = _leaf_diff(a, b)
                scale = max(scale, s)
                if d != d:  # NaN: no tolerance passes it
                    return d, scale
                diff = max(diff, d)
            elif not torch.equal(a.to(b.device), b):
                raise ValueError(f"{where} ({b.dtype}) differs from the original's")
        elif isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor) or a != b:
            raise ValueError(f"{where} is {a!r}, the original's {b!r}")
    return diff, scale


def _describe(output: object) -> str:
    if isinstance(output, torch.Tensor):
        return f"a tensor {tuple(output.shape)}"
    if isinstance(output, dict):
        return f"a dict with keys {list(output)}"
    if isinstance(output, (tuple, list)):
        return f"a {type(output).__name__} of {len(output)}"
    return type(output).__name__


class UnsupportedOutputError(ValueError):
    """A model's output holds a value that a traced graph (TorchScript, ONNX) cannot return."""


class OutputLayout:
    """Where the tensors of a model's output sit in its nesting (tuples, lists, dicts, namedtuples), for the traced
    backends: a TorchScript or ONNX graph returns the tensors alone (:meth:`flat`), and :meth:`nest` puts them back
    in the model's own structure, ``None`` entries included (a model returning ``(logits, None)``).

    Raises:
        UnsupportedOutputError: The output holds a value other than a tensor or None (``{"logits": t, "n": 3}``):
            a graph would give back the value it saw when traced, whatever its input; the message says where.
    """

    def __init__(self, output: object):
        for path, leaf in pytree.tree_flatten_with_path(output)[0]:
            if leaf is not None and not isinstance(leaf, torch.Tensor):
                text = repr(leaf) if len(repr(leaf)) <= 40 else repr(leaf)[:37] + "..."
                raise UnsupportedOutputError(
                    f"the model's output{pytree.keystr(path)} is {text} ({type(leaf).__name__}), not a tensor: a "
                    "traced graph returns tensors only (and keeps None entries), so it would give back the value "
                    "it saw when traced, whatever the input")
        leaves, self.spec = pytree.tree_flatten(output)
        self.is_tensor = tuple(isinstance(leaf, torch.Tensor) for leaf in leaves)

    @staticmethod
    def flat(output: object) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
        """The output's tensors in nesting order: a tensor output as itself, any other as a tuple."""
        if isinstance(output, torch.Tensor):
            return output
        return tuple(leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor))

    def nest(self, tensors: Union[torch.Tensor, Sequence[torch.Tensor]]) -> object:
        """The output of :meth:`flat` (or a graph's list of outputs) in the model's own nesting."""
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        if len(tensors) != sum(self.is_tensor):
            raise ValueError(f"got {len(tensors)} tensors for an output that holds {sum(self.is_tensor)}")
        found = iter(tensors)
        return pytree.tree_unflatten([next(found) if is_tensor else None for is_tensor in self.is_tensor], self.spec)
