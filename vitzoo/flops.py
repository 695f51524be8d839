"""FLOP and parameter counting, the papers' way: fvcore on the inference-fused model.

Convention: **one multiply-add is one FLOP** (fvcore's convention; these are MACs). SHViT, NViT/ReViT and DeiT
report this number as "FLOPs". ``torch.utils.flop_counter`` counts two per multiply-add; divide by two to compare.

On top of fvcore's built-in handles this module counts ``aten::scaled_dot_product_attention`` (fvcore skips it,
so every timm ViT with fused attention loses its attention matmuls) and, only when asked, the elementwise ops
(additions, products, activations, softmax, reductions: one per element). They are off by default so that the
published numbers reproduce. Every op that is neither counted nor on fvcore's list of free shape ops is reported
in :attr:`FlopReport.uncounted` with its call count.

Example::

    >>> from vitzoo.flops import count_flops
    >>> report = count_flops("shvit_s4")          # fused, at the model's pretrained input size (256)
    >>> report.total                               # 986431488 MACs
    >>> print(report.table(max_depth=2))
"""
from __future__ import annotations

import copy
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.utils import reparameterize_model

from vitzoo.batchnorm_folding import fold_batchnorms
from vitzoo.models import model_in_chans, model_input_size

with warnings.catch_warnings():
    # fvcore scripts a loss function at import time, which torch 2.14 answers with a deprecation warning
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

__all__ = ["FlopReport", "count_flops", "count_params", "sdpa_flop_jit", "ELEMENTWISE_OPS", "FREE_OPS",
           "FVCORE_SILENT_OPS"]


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: MACs of ``Q K^T`` and ``A V``.

    With q ``[..., L, E]``, k ``[..., S, E]`` and v ``[..., S, Ev]`` that is ``prod(...) * L * S * (E + Ev)``, where
    ``...`` are the batch dims after broadcasting (a q of batch 1 against k/v of batch B attends B times; with
    grouped-query attention q has more heads than k/v, and each q head counts). Scaling, masking and softmax are
    elementwise and not counted here.
    """
    q, k, v = (get_shape(i) for i in inputs[:3])
    lead = max(len(q), len(k), len(v)) - 2
    batch = 1
    for i in range(1, lead + 1):  # batch dims aligned from the right, as broadcasting does
        sizes = [t[-2 - i] for t in (q, k, v) if len(t) - 2 >= i]
        q_size = q[-2 - i] if len(q) - 2 >= i else 1
        batch *= q_size if q_size != 1 else max(sizes)
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def _per_output_element(inputs: List[Any], outputs: List[Any]) -> int:
    return math.prod(get_shape(outputs[0]) or [0])


def _per_input_element(inputs: List[Any], outputs: List[Any]) -> int:
    return math.prod(get_shape(inputs[0]) or [0])


# Elementwise ops counted with ``elementwise=True``: arithmetic and activations cost one per output element,
# reductions and pooling one per input element.
ELEMENTWISE_OPS: Dict[str, Any] = {
    **{
        f"aten::{op}": _per_output_element
        for op in (
            "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg", "exp", "sqrt", "rsqrt",
            "pow", "abs", "tanh", "gelu", "gelu_", "sigmoid", "sigmoid_", "silu", "silu_", "hardswish",
            "hardswish_", "hardsigmoid", "hardsigmoid_", "softmax", "log_softmax", "erf", "clamp_min",
            "leaky_relu", "elu", "mish", "hardtanh", "hardtanh_",
        )
    },
    **{
        f"aten::{op}": _per_input_element
        for op in ("mean", "sum", "avg_pool2d", "max_pool2d", "adaptive_max_pool2d", "linalg_vector_norm", "norm")
    },
}


# Arithmetic ops that fvcore skips without reporting them (its built-in ignore list, next to the real shape ops):
# counted one per element with ``elementwise=True`` (ELEMENTWISE_OPS), otherwise reported in ``uncounted``.
FVCORE_SILENT_OPS = tuple(f"aten::{op}" for op in (
    "relu", "relu_", "clamp", "clamp_", "max", "masked_fill", "floor", "floor_divide", "remainder", "eq", "ge", "gt",
    "__and__", "bitwise_not"))
ELEMENTWISE_OPS.update({op: _per_output_element for op in FVCORE_SILENT_OPS})
ELEMENTWISE_OPS["aten::max"] = _per_input_element  # a reduction, or the elementwise max of equal shapes

# Shape and copy ops missing from fvcore's list of free ops; they cost no arithmetic.
FREE_OPS = ("aten::reshape_as", "aten::view_as", "aten::expand_as", "aten::repeat", "aten::pad", "aten::clone",
            "aten::movedim", "aten::unflatten", "aten::tensor_split", "aten::pixel_shuffle", "aten::pixel_unshuffle")


def _recorded_uncounted(op: str, calls: Counter) -> Any:
    """An fvcore handle that counts nothing and records the call, for :attr:`FlopReport.uncounted`."""
    def handle(inputs: List[Any], outputs: List[Any]) -> int:
        calls[op] += 1
        return 0
    return handle


def count_params(model: nn.Module) -> int:
    """Number of parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters())


@dataclass
class FlopReport:
    """What :func:`count_flops` measured.

    Attributes:
        total: FLOPs (multiply-adds) of one forward pass at ``input_size`` and ``batch_size``.
        params: Parameters of the model as given (unfused).
        params_fused: Parameters after ``timm.utils.reparameterize_model`` (equal to ``params`` when nothing fuses).
        input_size: ``(C, H, W)`` counted at.
        batch_size: Batch counted at.
        fused: Whether the count is of the fused model.
        elementwise: Whether elementwise ops were counted.
        by_module: FLOPs per module name (``""`` is the whole model), in module order.
        by_operator: FLOPs per operator (``conv``, ``linear``, ``matmul``, ``scaled_dot_product_attention``...).
        uncounted: Ops that were executed but not counted, with their call counts.
        module_params: Parameters per module name of the counted model (for :meth:`table`).
    """

    total: int
    params: int
    params_fused: int
    input_size: Tuple[int, int, int]
    batch_size: int = 1
    fused: bool = True
    elementwise: bool = False
    by_module: Dict[str, int] = field(default_factory=dict)
    by_operator: Dict[str, int] = field(default_factory=dict)
    uncounted: Dict[str, int] = field(default_factory=dict)
    module_params: Dict[str, int] = field(default_factory=dict)

    def table(self, max_depth: int = 2) -> str:
        """Per-module breakdown as a fixed-width text table, modules nested down to ``max_depth`` levels."""
        rows = [("module", "#params", "FLOPs (MACs)")]
        for name, flops in self.by_module.items():
            depth = 0 if name == "" else name.count(".") + 1
            if depth > max_depth:
                continue
            label = "  " * (depth - 1) + name if name else "model"
            rows.append((label, _human(self.module_params.get(name, 0)), _human(flops)))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)

    def summary(self) -> str:
        """One paragraph: totals, per-operator split and the uncounted ops."""
        kind = "fused" if self.fused else "unfused"
        ops = ", ".join(f"{k} {_human(v)}" for k, v in sorted(self.by_operator.items(), key=lambda kv: -kv[1]))
        skipped = ", ".join(f"{k} x{v}" for k, v in sorted(self.uncounted.items())) or "none"
        return (
            f"FLOPs (MACs, {kind}, batch {self.batch_size}, input {tuple(self.input_size)}): {_human(self.total)}\n"
            f"params: {self.params:,} (fused {self.params_fused:,})\n"
            f"by operator: {ops}\n"
            f"uncounted ops: {skipped}"
        )

    def __str__(self) -> str:
        return self.summary()


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(int(n))


def _input_size(model: nn.Module, input_size: Union[None, int, Sequence[int]]) -> Tuple[int, int, int]:
    if input_size is None:
        size = model_input_size(model)
        if size is None:
            raise ValueError(
                f"{type(model).__name__} has no pretrained_cfg['input_size']; pass input_size=(C, H, W) or an int"
            )
        return size
    if isinstance(input_size, int):
        size = (model_in_chans(model), input_size, input_size)
    else:
        size = tuple(int(v) for v in input_size)
        size = (model_in_chans(model),) + size if len(size) == 2 else size
    if len(size) != 3 or min(size) <= 0:
        raise ValueError(f"input_size must be an int, (H, W) or (C, H, W) of positive ints, got {input_size!r}")
    return size


def count_flops(
    model: Union[nn.Module, str],
    input_size: Union[None, int, Sequence[int]] = None,
    *,
    batch_size: int = 1,
    fused: bool = True,
    elementwise: bool = False,
) -> FlopReport:
    """Count FLOPs (multiply-adds) and parameters of a model with fvcore.

    The model is never modified: counting runs on a deep copy, fused with ``timm.utils.reparameterize_model``
    unless ``fused=False``, in eval mode, on CPU.

    Args:
        model: An ``nn.Module`` or a timm model name (``arch`` or ``arch.tag``; built without weights).
        input_size: ``(C, H, W)``, ``(H, W)`` or a square size; default: the model's ``pretrained_cfg['input_size']``.
        batch_size: Batch size of the traced input (FLOPs scale linearly with it).
        fused: Count the inference-fused model (the papers' convention) rather than the model as given.
        elementwise: Also count elementwise ops (one per element). Off by default: papers do not count them.

    Returns:
        A :class:`FlopReport`.

    Raises:
        TypeError: ``model`` is neither a module nor a name.
        ValueError: No input size is given and the model has none in its cfg, or the size is malformed.
        Exception: Whatever the model's own forward raises for this input (e.g. a ViT given less than one patch).
    """
    if isinstance(model, str):
        from vitzoo.models import create

        model = create(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or a timm model name, got {type(model).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size = _input_size(model, input_size)

    params = count_params(model)
    unfused = copy.deepcopy(model).to("cpu").eval()
    example = torch.randn(batch_size, *size, dtype=next(unfused.parameters(), torch.empty(0)).dtype)
    with torch.no_grad():
        # one eager call first: checks that a model skips while traced (SHViT's minimum size, its channel count)
        # raise the model's own error here instead of a count for an input it would reject
        unfused(example)
    fused_model = reparameterize_model(copy.deepcopy(unfused), inplace=True)
    fused_model, _ = fold_batchnorms(fused_model, example)
    params_fused = count_params(fused_model)
    counted = fused_model if fused else unfused
    analysis = FlopCountAnalysis(counted, example)
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    analysis.set_op_handle(**{op: None for op in FREE_OPS})
    silent: Counter = Counter()
    if elementwise:
        analysis.set_op_handle(**ELEMENTWISE_OPS)
    else:
        analysis.set_op_handle(**{op: _recorded_uncounted(op, silent) for op in FVCORE_SILENT_OPS})
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace deprecation and tracer warnings
        total = int(analysis.total())
        by_module = {name: int(v) for name, v in analysis.by_module().items()}
        by_operator = {name: int(v) for name, v in analysis.by_operator().items() if v}
        uncounted = dict(Counter(analysis.unsupported_ops()) + silent)

    return FlopReport(
        total=total,
        params=params,
        params_fused=params_fused,
        input_size=size,
        batch_size=batch_size,
        fused=fused,
        elementwise=elementwise,
        by_module=by_module,
        by_operator=by_operator,
        uncounted=uncounted,
        module_params={name: count_params(m) for name, m in counted.named_modules()},
    )
