"""FLOP and parameter counting, the papers' way: fvcore on the inference-fused model.

Convention: **one multiply-add is one FLOP** (fvcore's convention; these are MACs). SHViT, NViT/ReViT and DeiT
report this number as "FLOPs". ``torch.utils.flop_counter`` counts two per multiply-add; divide by two to compare.

On top of fvcore's built-in handles this module counts ``aten::scaled_dot_product_attention`` (fvcore skips it,
so every timm ViT with fused attention loses its attention matmuls), recurrent layers, string-padded convolutions,
broadcast / matrix-vector products, the other interpolation modes, RMSNorm and fvcore's norms over inputs of any
rank (:data:`MATRIX_OPS`,
:data:`RESAMPLING_OPS`, :data:`NORM_OPS`) and, only when asked, the elementwise ops (additions, products,
activations, softmax, reductions: one per element). They are off by default so that the published numbers
reproduce. Every op that is neither counted nor on fvcore's list of free shape ops is reported in
:attr:`FlopReport.uncounted` with its call count, and those with no formula here (not elementwise ops left out by
convention) in :attr:`FlopReport.unknown_ops`.

Example::

    >>> from vitzoo.flops import count_flops
    >>> report = count_flops("shvit_s4")          # fused, at the model's pretrained input size (256)
    >>> report.total                               # 986431488 MACs
    >>> print(report.table(max_depth=2))
"""
from __future__ import annotations

import math
import numbers
import string
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from vitzoo.batchnorm_folding import fold_batchnorms_detailed
from vitzoo.mha_fastpath import mha_fastpath_off
from vitzoo.models import _as_dim, first_meta_tensor, model_in_chans, model_input_size
from vitzoo.module_hooks import deepcopy_keeping_modes, deepcopy_sharing_hooks, drop_shared_hooks, reparameterize
from vitzoo.weight_standardisation import standardise_weights

with warnings.catch_warnings():
    # fvcore scripts a loss function at import time, which torch 2.14 answers with a deprecation warning
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

__all__ = ["FlopReport", "count_flops", "count_params", "sdpa_flop_jit", "sdpa_elementwise_flop_jit",
           "ELEMENTWISE_OPS", "FREE_OPS", "FVCORE_SILENT_OPS", "MATRIX_OPS", "NORM_OPS", "RESAMPLING_OPS"]


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


def sdpa_elementwise_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """:func:`sdpa_flop_jit` plus the elementwise work of ``elementwise=True``, as the explicit path counts it.

    One per element of the scaling of q, of the softmax over ``L x S`` scores and, with a mask or ``is_causal``, of
    adding (filling) the mask: the numbers the ops of ``q * scale``, ``(q @ k^T).softmax(-1)`` get when a model
    runs attention without the fused kernel (timm with ``set_fused_attn(False)``).
    """
    q = get_shape(inputs[0])
    matmuls = sdpa_flop_jit(inputs, outputs)
    scores = matmuls // (q[-1] + get_shape(inputs[2])[-1])  # batch * L * S
    masked = get_shape(inputs[3]) is not None if len(inputs) > 3 else False
    if len(inputs) > 5 and not masked:
        causal = inputs[5].toIValue()
        masked = bool(causal) if isinstance(causal, bool) else False
    return matmuls + math.prod(q) + scores * (2 if masked else 1)


def _matmul_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``aten::matmul`` with broadcasting and 1-D operands: every output element costs ``K`` multiply-adds.

    (fvcore's own handle takes the batch from the first operand, so ``x[0] @ x`` counts one batch, and it fails on
    a 1-D second operand.)
    """
    a = get_shape(inputs[0])
    return math.prod(get_shape(outputs[0]) or []) * a[-1]


def _last_dim_flop_jit(operand: int) -> Any:
    """A handle counting ``numel(output) * K``, with ``K`` the last dim of input ``operand`` (baddbmm, addmv)."""
    def handle(inputs: List[Any], outputs: List[Any]) -> int:
        return math.prod(get_shape(outputs[0]) or []) * get_shape(inputs[operand])[-1]
    return handle


def _addbmm_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``addbmm(input, b1 [B, n, m], b2 [B, m, p])``: ``B * n * m * p``."""
    b1, b2 = get_shape(inputs[1]), get_shape(inputs[2])
    return math.prod(b1) * b2[-1]


def _bilinear_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``bilinear(x1 [..., in1], x2 [..., in2], weight [out, in1, in2])``: ``prod(...) * out * in1 * in2``."""
    return math.prod(get_shape(inputs[0])[:-1]) * math.prod(get_shape(inputs[2]))


def _convolution_mode_flop_jit(inputs: List[Any], outputs: List[Any]) -> Counter:
    """``aten::_convolution_mode`` (a convolution with ``padding='same'`` / ``'valid'``): as fvcore's ``conv``."""
    x, w, out = get_shape(inputs[0]), get_shape(inputs[1]), get_shape(outputs[0])
    if len(x) == len(w) - 1:  # unbatched input
        x, out = [1] + x, [1] + out
    return Counter({"conv": x[0] * math.prod(w) * math.prod(out[2:])})


def _recurrent_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``aten::lstm`` / ``gru`` / ``rnn_tanh`` / ``rnn_relu``: the gate matrix products at every time step.

    Every weight matrix of every layer and direction (``W_ih``, ``W_hh`` and an LSTM's projection ``W_hr``, the 2-D
    tensors of the ``params`` list) is applied once per time step and sequence, so the count is (time steps x
    batch) x the matrices' elements. The gates' own elementwise work is not counted (as for any layer here).
    """
    steps = math.prod(get_shape(inputs[0])[:-1])  # [T, B, I], [B, T, I], unbatched [T, I] or packed [sum T, I]
    weights = 0
    for value in inputs:
        if value.node().kind() == "prim::ListConstruct":
            for item in value.node().inputs():
                shape = get_shape(item)
                if shape is not None and len(shape) == 2:
                    weights += shape[0] * shape[1]
    return steps * weights


def _elements(value: Any) -> int:
    """Elements of a traced tensor value (1 for a 0-d tensor; 0 when its shape is unknown)."""
    shape = get_shape(value)
    return 0 if shape is None else math.prod(shape)  # math.prod([]) is 1: a scalar is one element


def _per_output_element_times(ops: int) -> Any:
    def handle(inputs: List[Any], outputs: List[Any]) -> int:
        return ops * _elements(outputs[0])
    return handle


# Always counted, as fvcore counts its 2-D nearest / bilinear upsampling (1 and 4 per output element): the other
# interpolation modes, by the number of input points each output element weighs.
RESAMPLING_OPS: Dict[str, Any] = {
    "aten::upsample_nearest1d": _per_output_element_times(1),
    "aten::upsample_nearest3d": _per_output_element_times(1),
    "aten::upsample_linear1d": _per_output_element_times(2),
    "aten::upsample_trilinear3d": _per_output_element_times(8),
    "aten::upsample_bicubic2d": _per_output_element_times(16),
    # ``mode="nearest-exact"``: one input point per output element, as "nearest" (found missing by an audit)
    **{f"aten::_upsample_nearest_exact{n}d": _per_output_element_times(1) for n in (1, 2, 3)},
    # ``antialias=True`` (dynamic-size ViTs resizing pos_embed): counted as without it, by convention; when it
    # downsamples, the filter in fact widens with the scale factor and weighs more input points
    "aten::_upsample_bilinear2d_aa": _per_output_element_times(4),
    "aten::_upsample_bicubic2d_aa": _per_output_element_times(16),
}


def _dot_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``aten::dot`` / ``vdot`` of two n-vectors: n multiply-adds."""
    return _elements(inputs[0])


def _linear_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``aten::linear(x, w, b)``: each output element sums over x's last dim (fvcore's own handle multiplies x's
    elements by ``w.shape[0]``, which for a 1-D ``w`` is the input width again: found by an audit, 6x too many for a
    6-wide score vector)."""
    return _elements(outputs[0]) * get_shape(inputs[0])[-1]


def _tensordot_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``aten::tensordot(a, b, dims_a, dims_b)``: each output element sums over the contracted dims of ``a``."""
    shape = get_shape(inputs[0])
    return _elements(outputs[0]) * math.prod(shape[d] for d in _int_list(inputs[2]))


# Matrix products fvcore has no handle for (or a wrong one), all in fvcore's convention (one per multiply-add).
MATRIX_OPS: Dict[str, Any] = {
    "aten::matmul": _matmul_flop_jit,
    "aten::baddbmm": _last_dim_flop_jit(1),
    "aten::addmv": _last_dim_flop_jit(1),
    "aten::mv": _last_dim_flop_jit(0),
    "aten::addbmm": _addbmm_flop_jit,
    "aten::bilinear": _bilinear_flop_jit,
    "aten::_convolution_mode": _convolution_mode_flop_jit,
    "aten::linear": _linear_flop_jit,
    # found missing by an audit (reported as ops without a formula)
    "aten::dot": _dot_flop_jit,
    "aten::vdot": _dot_flop_jit,
    "aten::tensordot": _tensordot_flop_jit,
    **{f"aten::{op}": _recurrent_flop_jit for op in ("lstm", "gru", "rnn_tanh", "rnn_relu")},
}


def _rms_norm_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``aten::rms_norm(input, normalized_shape, weight, eps)``: 3 per input element with a weight, 2 without.

    Derived as fvcore's ``layer_norm`` (5 per element with the affine, 4 without) is: a LayerNorm takes the mean
    (1), subtracts it (1), squares and sums for the variance (1), scales by ``1 / std`` (1) and applies
    ``weight * x + bias`` (1, a multiply-add). RMSNorm has no mean to take or subtract: it squares and sums (1),
    scales by ``1 / rms`` (1) and multiplies by its weight (1, no bias).
    """
    return _elements(inputs[0]) * (3 if get_shape(inputs[2]) is not None else 2)


def _norm_flop_jit(weight: int) -> Any:
    """fvcore's estimate for ``layer_norm`` / ``group_norm`` / ``instance_norm``: 5 per input element with the
    affine ``weight`` (argument ``weight``), 4 without; for an input of any rank (fvcore's own handle asserts 2 to
    5 dims, so a LayerNorm over a 1-D or a 6-D tensor, which torch runs, failed the whole count with a bare
    ``AssertionError``: found by an audit)."""
    def handle(inputs: List[Any], outputs: List[Any]) -> int:
        return _elements(inputs[0]) * (5 if get_shape(inputs[weight]) is not None else 4)
    return handle


def _batch_norm_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``aten::batch_norm`` as fvcore counts it, for an input of any rank: in training mode (weight
    standardisation computes its statistics so) as a LayerNorm, 5 per element with the affine weight, 4 without; in
    eval mode a scale and a shift, 2 per element with the weight, 1 without."""
    affine = get_shape(inputs[1]) is not None
    if inputs[5].toIValue():
        return _elements(inputs[0]) * (5 if affine else 4)
    return _elements(inputs[0]) * (2 if affine else 1)


# Normalisation layers, always counted: RMSNorm, which fvcore has no handle for, and fvcore's own four with its
# numbers, without its rank limit.
NORM_OPS: Dict[str, Any] = {
    "aten::rms_norm": _rms_norm_flop_jit,
    "aten::layer_norm": _norm_flop_jit(2),
    "aten::group_norm": _norm_flop_jit(2),
    "aten::instance_norm": _norm_flop_jit(1),
    "aten::batch_norm": _batch_norm_flop_jit,
}


def _per_output_element(inputs: List[Any], outputs: List[Any]) -> int:
    return _elements(outputs[0])


def _per_input_element(inputs: List[Any], outputs: List[Any]) -> int:
    return _elements(inputs[0])


def _int_list(value: Any) -> List[int]:
    """A traced ``int[]`` argument: a constant list, or a list built from constants."""
    constant = value.toIValue()
    if constant is not None:
        return list(constant)
    return [item.toIValue() for item in value.node().inputs()]


def _col2im_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``aten::col2im`` (``F.fold``; VOLO's outlooker): the additions where patches overlap.

    Every element of a patch that lands inside the output (not in its padding) is summed into its place, so an
    output element that ``n >= 1`` patch elements land on costs ``n - 1`` additions. Without padding, and with
    every output element covered, that is input elements - output elements. Coverage is counted per dimension
    from the output's size, ``kernel_size``, ``dilation``, ``padding`` and ``stride`` (an output element's
    coverage is the product of its row's and its column's).
    """
    kernel, dilation, padding, stride = (_int_list(v) for v in inputs[2:6])
    size = get_shape(outputs[0])[-2:]  # output_size may be computed from shapes at run time (VOLO)
    coverage = []
    for out, k, d, p, s in zip(size, kernel, dilation, padding, stride):
        blocks = (out + 2 * p - d * (k - 1) - 1) // s + 1
        covered = [0] * out
        for b in range(blocks):
            for i in range(k):
                position = b * s - p + i * d
                if 0 <= position < out:
                    covered[position] += 1
        coverage.append(covered)
    per_map = sum(max(h * w - 1, 0) for h in coverage[0] for w in coverage[1])
    shape = get_shape(inputs[0])
    maps = math.prod(shape[:-1]) // (kernel[0] * kernel[1])  # batch x channels ([N,] C * kh * kw, L)
    return maps * per_map


# Elementwise ops counted with ``elementwise=True``: arithmetic and activations cost one per output element,
# reductions and pooling one per input element.
ELEMENTWISE_OPS: Dict[str, Any] = {
    **{
        f"aten::{op}": _per_output_element
        for op in (
            "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg", "exp", "sqrt", "rsqrt",
            "pow", "abs", "tanh", "gelu", "gelu_", "sigmoid", "sigmoid_", "silu", "silu_", "hardswish",
            "hardswish_", "hardsigmoid", "hardsigmoid_", "softmax", "log_softmax", "erf", "clamp_min",
            "leaky_relu", "leaky_relu_", "elu", "elu_", "mish", "hardtanh", "hardtanh_", "sin", "cos", "square",
            "ceil", "round", "sign", "reciprocal", "log", "softplus", "clamp_max", "minimum", "maximum", "where",
            "addcmul", "addcdiv", "lerp", "lt", "le", "ne", "prelu",
            "glu",  # the product of the two halves: one per output element
            # activations and arithmetic found reported without a formula by an audit (F.relu6, nn.SELU, nn.CELU,
            # nn.LogSigmoid, nn.Threshold, nn.RReLU, torch.fmod ...), and their siblings
            "relu6", "selu", "celu", "log_sigmoid", "threshold", "rrelu", "fmod", "trunc", "frac", "exp2", "expm1",
            "log1p", "log2", "log10", "erfinv", "atan2", "atan", "tan", "__or__", "bitwise_or", "bitwise_and",
            "logical_and", "logical_or", "logical_not",
        )
    },
    "aten::col2im": _col2im_flop_jit,  # additions of overlapping patches
    **{
        f"aten::{op}": _per_input_element
        for op in ("mean", "sum", "avg_pool2d", "max_pool2d", "adaptive_max_pool2d", "linalg_vector_norm", "norm",
                   "amax", "amin", "min", "cumsum", "prod", "var", "std", "logsumexp", "avg_pool1d", "avg_pool3d",
                   "max_pool1d", "max_pool3d", "adaptive_avg_pool1d", "adaptive_max_pool1d", "adaptive_avg_pool3d",
                   "var_mean", "std_mean", "linalg_norm")
    },
}


# Arithmetic ops that fvcore skips without reporting them (its built-in ignore list, next to the real shape ops):
# counted one per element with ``elementwise=True`` (ELEMENTWISE_OPS), otherwise reported in ``uncounted``.
FVCORE_SILENT_OPS = tuple(f"aten::{op}" for op in (
    "relu", "relu_", "clamp", "clamp_", "max", "masked_fill", "floor", "floor_divide", "remainder", "eq", "ge", "gt",
    "__and__", "bitwise_not"))
ELEMENTWISE_OPS.update({op: _per_output_element for op in FVCORE_SILENT_OPS})
ELEMENTWISE_OPS["aten::max"] = _per_input_element  # a reduction, or the elementwise max of equal shapes
# in-place variants (``x.tanh_()``, ``x.masked_fill_(m, v)``, ``x.lt_(0)``) cost what the out-of-place op costs:
# every elementwise op above with an in-place form in this torch's aten
ELEMENTWISE_OPS.update({
    f"{op}_": handle for op, handle in list(ELEMENTWISE_OPS.items())
    if handle is _per_output_element and not op.endswith("_") and hasattr(torch.ops.aten, op[len("aten::"):] + "_")
})

# Shape and copy ops missing from fvcore's list of free ops; they cost no arithmetic.
# Dropout is the identity in eval mode.
FREE_OPS = ("aten::reshape_as", "aten::view_as", "aten::expand_as", "aten::repeat", "aten::pad", "aten::clone",
            "aten::movedim", "aten::unflatten", "aten::tensor_split", "aten::pixel_shuffle", "aten::pixel_unshuffle",
            "aten::repeat_interleave", "aten::unfold", "aten::im2col", "aten::dropout_",
            "aten::feature_dropout", "aten::feature_dropout_", "aten::alpha_dropout", "aten::alpha_dropout_",
            "aten::flip", "aten::roll", "aten::tile", "aten::meshgrid",
            "aten::unsafe_chunk", "aten::unsafe_split",  # how nn.LSTMCell / GRUCell split their gates
            # transposes, views and selections written in other ways (x.T, x.mT, x.mH, diagonal, index_select,
            # tril / triu masks, ones_like), found missing by an audit: they were reported as ops without a formula
            "aten::numpy_T", "aten::mT", "aten::mH", "aten::adjoint", "aten::swapaxes", "aten::swapdims",
            "aten::moveaxis", "aten::squeeze_", "aten::unsqueeze_", "aten::alias", "aten::lift_fresh", "aten::conj",
            "aten::resolve_conj", "aten::diagonal", "aten::diag", "aten::index_select", "aten::take_along_dim",
            "aten::masked_select", "aten::scatter", "aten::narrow_copy", "aten::tril", "aten::triu",
            "aten::ones_like", "aten::new_ones", "aten::empty_like",
            # a permutation of channels, table lookups and complex numbers' parts (timm's gemma4_vit_167m uses
            # one_hot): reported as ops without a formula before 2026-11-26 (found by an audit)
            "aten::channel_shuffle", "aten::native_channel_shuffle", "aten::embedding", "aten::one_hot",
            "aten::real", "aten::imag", "aten::complex", "aten::view_as_real", "aten::view_as_complex")


def _einsum_terms(equation: str) -> Tuple[List[str], str]:
    """An einsum equation's operand subscripts and output subscripts, ``...`` written as ``.``; in implicit mode
    (no ``->``) the output is the ellipsis and the letters that occur once, in alphabetical order (torch's rule)."""
    lhs, arrow, rhs = equation.replace(" ", "").replace("...", ".").partition("->")
    if not arrow:
        letters = [c for c in lhs if c.isalpha()]
        rhs = ("." if "." in lhs else "") + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    return lhs.split(","), rhs


def _einsum_explicit(terms: List[str], output: str,
                     shapes: List[List[int]]) -> Tuple[List[str], str, Dict[str, int]]:
    """An einsum with its ellipsis written out as letters the equation does not use (aligned right, as its dims
    broadcast), and every letter's size (the largest of its dims: a size-1 dim broadcasts)."""
    used = set("".join(terms) + output)
    free = [c for c in string.ascii_letters if c not in used]
    ranks = [len(shape) - len(term) + 1 if "." in term else 0 for term, shape in zip(terms, shapes)]  # ellipsis dims
    width = max(ranks, default=0)
    if width > len(free):  # torch runs such an einsum; numpy (and so fvcore) take 52 letters at most
        raise ValueError(f"einsum {','.join(terms).replace('.', '...')}: with its {width} ellipsis dims it has more "
                         "than 52 indices, which the FLOP count cannot name; count this model without it")
    ellipsis = "".join(free[:width])
    explicit = [term.replace(".", ellipsis[width - rank:]) for term, rank in zip(terms, ranks)]
    sizes: Dict[str, int] = {}
    for term, shape in zip(explicit, shapes):
        for letter, size in zip(term, shape):
            sizes[letter] = max(sizes.get(letter, 1), size)
    return explicit, output.replace(".", ellipsis), sizes


def _einsum_contraction_macs(terms: List[str], output: str, sizes: Dict[str, int]) -> int:
    """Multiply-adds of an einsum with two or more operands, contracted pair by pair in the cheapest order (numpy's
    optimal path, ``np.einsum_path``, which fvcore counts along too; ``torch.einsum`` takes opt_einsum's path when
    that package is installed, else goes left to right): each step costs one multiply-add per combination of the
    indices of the operands it joins. With two operands that is the product of every index's size. Exact: fvcore
    reads the path's total back from numpy's printout, rounded to 4 significant digits (12,290 for 12,288)."""
    if len(terms) == 2:
        return math.prod(sizes.values())
    views = [np.broadcast_to(np.zeros(()), [sizes[c] for c in term]) for term in terms]  # shapes only, no memory
    path = np.einsum_path(",".join(terms) + "->" + output, *views, optimize="optimal")[0][1:]
    operands, total = list(terms), 0
    for step in path:
        joined = [operands[i] for i in step]
        for i in sorted(step, reverse=True):
            del operands[i]
        letters = set("".join(joined))
        total += math.prod(sizes[c] for c in letters) * max(len(joined) - 1, 1)
        kept = letters & set("".join(operands) + output)
        operands.append("".join(sorted(kept)))
    return total


def _einsum_handle(elementwise: bool, calls: Counter) -> Any:
    """fvcore handle for ``aten::einsum``, by what the equation does.

    * A contraction of two or more operands (an index summed away: ``bhqd,bhkd->bhqk``) costs multiply-adds,
      always counted (:func:`_einsum_contraction_macs`): with two operands, the product of every index's size;
      with more, the same for each pairwise step of numpy's optimal contraction path. fvcore counts along the same
      path but reads the total back from numpy's printout, rounded to 4 significant digits: 12,290 for 12,288.
    * No index summed (``bchw,bchw->bchw``, the outer product ``bc,bd->bcd``): elementwise products, one per
      output element with ``elementwise=True``, otherwise listed in ``uncounted`` (fvcore counted half that).
    * One operand: summing an index away (``bchw->bc``) is a reduction, one per input element with
      ``elementwise=True`` (like ``sum``), otherwise listed in ``uncounted``; a permutation or a diagonal
      (``bchw->bhwc``, ``ii->i``) moves data and costs nothing.
    """
    def handle(inputs: List[Any], outputs: List[Any]) -> int:
        operands = list(inputs[1].node().inputs())
        terms, output = _einsum_terms(inputs[0].toIValue())
        summed = set("".join(terms)) - set(output)
        if len(terms) >= 2 and summed:
            return _einsum_contraction_macs(*_einsum_explicit(terms, output, [get_shape(v) for v in operands]))
        if len(terms) == 1 and not summed:
            return 0
        if elementwise:
            return _elements(operands[0]) if len(terms) == 1 else _elements(outputs[0])
        calls["aten::einsum"] += 1
        return 0
    return handle


# Ops that a handle here lists in ``uncounted`` only for their elementwise work, left out by convention: an einsum
# without a contraction (see :func:`_einsum_handle`).
_ELEMENTWISE_FORMS = ("aten::einsum",)


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
        params_fused: Parameters of the fused model (equal to ``params`` when nothing fuses): after
            ``timm.utils.reparameterize_model``, weight standardisation computed once (an NFNet's per-channel
            gains merged into the weight) and BatchNorm folding.
        input_size: ``(C, H, W)`` counted at.
        batch_size: Batch counted at.
        fused: Whether the count is of the fused model.
        elementwise: Whether elementwise ops were counted.
        by_module: FLOPs per module name (``""`` is the whole model), in module order.
        by_operator: FLOPs per operator (``conv``, ``linear``, ``matmul``, ``scaled_dot_product_attention``...).
        uncounted: Ops that were executed but not counted, with their call counts.
        module_params: Parameters per module name of the counted model (for :meth:`table`).
        unfolded_norms: With ``fused=True``, the BatchNorm layers (``BatchNorm1d`` / ``2d``, timm's
            ``BatchNormAct2d``) left in the fused model, each with why it could not be folded into the layer
            before it (``{"stages.0.blocks.0.conv.pre_norm": "the output or the weights of stem.conv2 are also
            used elsewhere, which folding would change"}``); they are counted as fvcore's ``batch_norm``. Empty
            with ``fused=False``.
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
    unfolded_norms: Dict[str, str] = field(default_factory=dict)

    @property
    def unknown_ops(self) -> Dict[str, int]:
        """The uncounted ops that are not elementwise ops left out by convention: ops with no FLOP formula here,
        whose work (if any) is missing from :attr:`total`. Empty for every model of the zoo and the common timm
        families."""
        return {op: n for op, n in self.uncounted.items() if op not in ELEMENTWISE_OPS and op not in _ELEMENTWISE_FORMS}

    def table(self, max_depth: Optional[int] = 2) -> str:
        """Per-module breakdown as a fixed-width text table, modules nested down to ``max_depth`` levels (0: the
        model's row only; None: every level).

        The rows under a module add up to its row: where a module shown with its submodules also has parameters
        or FLOPs of its own (a ViT's ``pos_embed`` and ``cls_token``, a layer-scale ``gamma``, an op in its own
        ``forward``), they get a row of their own after it, ``(model's own)`` for the model and ``NAME (own)``
        below it. A tensor shared by two submodules is in both their rows and once in their parent's, so its own
        row is then negative."""
        if max_depth is None:
            max_depth = max((name.count(".") + 1 for name in self.by_module if name), default=0)
        if isinstance(max_depth, bool) or not isinstance(max_depth, numbers.Integral):
            raise TypeError(f"max_depth must be an int >= 0 or None (every level), got {max_depth!r}.")
        if max_depth < 0:
            raise ValueError(f"max_depth must be >= 0 (0: the model's row only) or None (every level), got "
                             f"{max_depth}.")
        rows = [("module", "#params", "FLOPs (MACs)")]
        for name, flops in self.by_module.items():
            depth = 0 if name == "" else name.count(".") + 1
            if depth > max_depth:
                continue
            label = "  " * (depth - 1) + name if name else "model"
            rows.append((label, _human(self.module_params.get(name, 0)), _human(flops)))
            prefix = f"{name}." if name else ""
            children = [c for c in self.by_module if c.startswith(prefix) and c.count(".") == depth and c != name]
            if depth < max_depth and children:
                own_params = self.module_params.get(name, 0) - sum(self.module_params.get(c, 0) for c in children)
                own_flops = flops - sum(self.by_module[c] for c in children)
                if own_params or own_flops:
                    own = "  " * depth + (f"{name} (own)" if name else "(model's own)")
                    rows.append((own, _human(own_params), _human(own_flops)))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)

    def summary(self) -> str:
        """One paragraph: totals, per-operator split and the uncounted ops."""
        kind = "fused" if self.fused else "unfused"
        ops = ", ".join(f"{k} {_human(v)}" for k, v in sorted(self.by_operator.items(), key=lambda kv: -kv[1]))
        skipped = ", ".join(f"{k} x{v}" for k, v in sorted(self.uncounted.items())) or "none"
        unknown = ", ".join(f"{k} x{v}" for k, v in sorted(self.unknown_ops.items()))
        return (
            f"FLOPs (MACs, {kind}, batch {self.batch_size}, input {tuple(self.input_size)}): {_human(self.total)}\n"
            f"params: {self.params:,} (fused {self.params_fused:,})\n"
            f"by operator: {ops}\n"
            f"uncounted ops: {skipped}"
            + (f"\nno FLOP formula (their work is missing from the total): {unknown}" if unknown else "")
            + (f"\nBatchNorm not folded ({len(self.unfolded_norms)}, counted as batch_norm): " + "; ".join(
                f"{name}: {why}" for name, why in list(self.unfolded_norms.items())[:3])
               + ("; ..." if len(self.unfolded_norms) > 3 else "") if self.unfolded_norms else "")
        )

    def __str__(self) -> str:
        return self.summary()


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(int(n))


def _size_tuple(input_size: Any) -> Optional[Tuple[int, ...]]:
    """``input_size`` as 1 (an int), 2 or 3 positive ints, or None when it is none of those."""
    if _as_dim(input_size) is not None:
        return (_as_dim(input_size),)
    if isinstance(input_size, (str, bytes)) or not isinstance(input_size, Iterable):
        return None
    dims = tuple(_as_dim(v) for v in input_size)
    return dims if len(dims) in (2, 3) and None not in dims else None  # type: ignore[return-value]


def _build_size(input_size: Union[None, int, Sequence[int]]) -> Tuple[Union[None, int, Tuple[int, int]], Any]:
    """``(img_size, in_chans)`` to build a model named by a string for ``input_size``: its ``H, W`` part (an int
    stays an int) and its ``C`` (None unless given as ``(C, H, W)``); ``(None, None)`` when none is given or it is
    malformed (:func:`_input_size` then says what is wrong)."""
    size = _size_tuple(input_size)
    if size is None:
        return None, None
    if len(size) == 1:
        return size[0], None
    return (size[-2], size[-1]), (size[0] if len(size) == 3 else None)


def _input_size(model: nn.Module, input_size: Union[None, int, Sequence[int]],
                name: str = "input_size") -> Tuple[int, int, int]:
    if input_size is None:
        size = model_input_size(model)
        if size is None:
            raise ValueError(
                f"{type(model).__name__} has no pretrained_cfg['input_size']; pass input_size=(C, H, W) or an int"
            )
        return size
    dims = _size_tuple(input_size)
    if dims is None:
        raise ValueError(f"{name} must be an int, (H, W) or (C, H, W) of positive ints, got {input_size!r}")
    if len(dims) == 1:
        return model_in_chans(model), dims[0], dims[0]
    return ((model_in_chans(model),) + dims) if len(dims) == 2 else dims  # type: ignore[return-value]


def _countable(model: nn.Module) -> nn.Module:
    """The module to count: a ``torch.compile``d module's original (``_orig_mod``; its compiled graph cannot be
    traced), a ``DataParallel`` / ``DistributedDataParallel`` wrapper's ``module`` (found by an audit: the wrapper
    has no pretrained cfg, so its input size was "not known"); a ``vitzoo.deploy``ed model is refused (its backends
    run compiled graphs, oneDNN tensors or an ONNX Runtime session, none of which fvcore can trace)."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while isinstance(getattr(model, "_orig_mod", None), nn.Module) or isinstance(model, wrappers):
        model = model.module if isinstance(model, wrappers) else model._orig_mod  # _orig_mod: torch._dynamo's
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError(
            f"cannot count FLOPs of a TorchScript module ({type(model).__name__}, from torch.jit.script / trace): "
            "fvcore traces the model with forward hooks, which TorchScript modules do not take. Count the "
            "nn.Module it was made from")
    # recognised by its attributes: counting does not import the deployment module (oneDNN / ONNX Runtime code)
    if type(model).__name__ == "DeployedModel" and hasattr(model, "backend") and hasattr(model, "optimizations"):
        raise ValueError(
            f"cannot count FLOPs of a model deployed by vitzoo.deploy (backend {model.backend!r}): count the "
            "original model instead, before deploying it (count_flops fuses it the same way deploy does)")
    return model


def _input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the random example: the model's first floating-point parameter's, else buffer's, else torch's
    default (found by an audit: the first parameter's, which for a model holding an integer index table first was
    int64, and randn failed)."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def _compiled_children_unwrapped(model: nn.Module) -> nn.Module:
    """``model`` (a copy) with every ``torch.compile``d submodule replaced by its original (``_orig_mod``), as
    :func:`_countable` unwraps a compiled model (found by an audit: a compiled block failed in the trace with
    torch's "using FX to torch.jit.trace a dynamo-optimized function")."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            while isinstance(getattr(child, "_orig_mod", None), nn.Module):
                child = child._orig_mod
            setattr(parent, name, child)
    return model


def _check_no_script_children(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if name and isinstance(module, torch.jit.ScriptModule):
            raise ValueError(
                f"cannot count FLOPs of a model holding a TorchScript module ({name}: {type(module).__name__}, from "
                "torch.jit.script / trace): fvcore traces the model with forward hooks, which TorchScript modules do "
                "not take. Count the model built with the nn.Module it was made from")


def _check_materialised(model: nn.Module) -> None:
    """A model on the ``meta`` device cannot be counted: PyTorch's meta convolutions fail under fvcore's trace
    (torch 2.14), and fusing it needs values (BatchNorm folding checks its result)."""
    meta = first_meta_tensor(model)
    if meta is not None:
        raise ValueError(
            f"cannot count FLOPs of a model on the 'meta' device (its {meta} is; the model is not "
            "materialised): fvcore traces the model by running it, which meta tensors cannot. Build it on "
            "the CPU (random weights count the same, e.g. timm.create_model(name) or count_flops(name)), or "
            "materialise it with model.to_empty(device='cpu') then model.load_state_dict(weights)")


def _tensors_only(module: nn.Module, args: Any, output: Any) -> Tuple[torch.Tensor, ...]:
    """Forward hook: the output's tensors alone. The trace fvcore counts on can return only tensors (in tuples,
    lists, dicts) that depend on the input; a model that also returns other values (``{"logits": t, "n": 3}``) is
    counted on its tensors, which changes no count."""
    return tuple(leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor))


def count_flops(
    model: Union[nn.Module, str],
    input_size: Union[None, int, Sequence[int]] = None,
    *,
    img_size: Union[None, int, Sequence[int]] = None,
    batch_size: int = 1,
    fused: bool = True,
    elementwise: bool = False,
) -> FlopReport:
    """Count FLOPs (multiply-adds) and parameters of a model with fvcore.

    The model is never modified: counting runs on a deep copy, fused unless ``fused=False`` (as
    :func:`vitzoo.deploy` fuses: ``timm.utils.reparameterize_model``, weight-standardised convolutions made plain,
    BatchNorm folded into the layer before it), in eval mode, on CPU, in the model's own dtype (autocast is off),
    without the forward hooks that are the caller's functions (the copies run on random input, which those must not
    see; see :func:`vitzoo.module_hooks.drop_shared_hooks`), and the global random state is as it was before.

    Args:
        model: An ``nn.Module`` or a timm model name (``arch`` or ``arch.tag``; built without weights).
        input_size: ``(C, H, W)``, ``(H, W)`` or a square size; default: the model's ``pretrained_cfg['input_size']``.
        img_size: The same as ``input_size``, under the name timm and :func:`vitzoo.compare.compare` use; give one
            of the two.
        batch_size: Batch size of the traced input (FLOPs scale linearly with it).
        fused: Count the inference-fused model (the papers' convention) rather than the model as given.
        elementwise: Also count elementwise ops: arithmetic and activations one per output element, reductions and
            pooling one per input element. Off by default: papers do not count them.

    Returns:
        A :class:`FlopReport`.

    Raises:
        TypeError: ``model`` is neither a module nor a name.
        TypeError: Both ``input_size`` and ``img_size`` are given.
        ValueError: ``model`` is a ``vitzoo.deploy``ed model (count the original; a ``torch.compile``d module is
            counted as its original).
        ValueError: No input size is given and the model has none in its cfg, or the size is malformed.
        TypeError: ``batch_size`` is not an int (``2.0``, ``True``).
        ValueError: ``batch_size`` is below 1.
        ValueError: The model is on the ``meta`` device (not materialised; counting runs it).
        ValueError: The model holds a tensor computed with autograd (``torch.nn.utils.prune``), which cannot be
            copied; the message says how to count it.
        Exception: Whatever the model's own forward raises for this input (e.g. a ViT given less than one patch).
    """
    size_name = "input_size"
    if img_size is not None:
        if input_size is not None:
            raise TypeError(f"count_flops() got both input_size={input_size!r} and img_size={img_size!r}; img_size is "
                            "another name for input_size: pass one of them")
        input_size, size_name = img_size, "img_size"
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"batch_size must be an int >= 1, got {batch_size!r} ({type(batch_size).__name__})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for flag, value in (("fused", fused), ("elementwise", elementwise)):
        if not isinstance(value, bool):  # "no" is truthy (found by a review: fused="no" counted the fused model)
            raise TypeError(f"{flag} must be True or False, got {value!r} ({type(value).__name__})")
    # a model built here and the random example draw from the global generator: counting must not change a
    # seeded run (found by an audit); autocast would make fvcore's trace hold tensors that need grad
    with torch.random.fork_rng(devices=[]), torch.autocast("cpu", enabled=False):
        return _count(model, input_size, size_name, batch_size, fused, elementwise)


def _count(model: Union[nn.Module, str], input_size: Union[None, int, Sequence[int]], size_name: str,
           batch_size: int, fused: bool, elementwise: bool) -> FlopReport:
    if isinstance(model, str):
        from vitzoo.models import create

        img_size, in_chans = _build_size(input_size)
        model = create(model, img_size=img_size, in_chans=in_chans)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or a timm model name, got {type(model).__name__}")
    model = _countable(model)
    _check_no_script_children(model)
    _check_materialised(model)
    size = _input_size(model, input_size, size_name)

    params = count_params(model)
    # the caller's hooks (functions, bound methods, partials, objects) stay shared by the copy, then are removed
    try:
        copied = deepcopy_sharing_hooks(model)
    except RuntimeError as e:
        if "graph leaves" not in str(e):
            raise
        raise ValueError(  # found by an audit: torch's own words name weight_norm only
            "cannot count FLOPs of this model: it holds a tensor computed with autograd, which cannot be copied "
            "(the `weight` that torch.nn.utils.prune or the old torch.nn.utils.weight_norm compute in a forward "
            "with grad). Run the model once under torch.no_grad(), or make the change permanent "
            "(torch.nn.utils.prune.remove(module, 'weight'); torch.nn.utils.parametrizations.weight_norm instead of "
            "weight_norm), then count") from e
    unfused = _compiled_children_unwrapped(drop_shared_hooks(copied, model)).to("cpu").eval()
    example = torch.randn(batch_size, *size, dtype=_input_dtype(unfused))
    with torch.no_grad():
        # one eager call first: checks that a model skips while traced (SHViT's minimum size, its channel count)
        # raise the model's own error here instead of a count for an input it would reject
        unfused(example)
    fused_model, _ = standardise_weights(reparameterize(deepcopy_keeping_modes(unfused), keep_hooked=False))
    folding = fold_batchnorms_detailed(fused_model, example)
    fused_model = folding.model
    params_fused = count_params(fused_model)
    counted = fused_model if fused else unfused
    counted.register_forward_hook(_tensors_only)  # a copy: the caller's model gets no hook
    analysis = FlopCountAnalysis(counted, example)
    analysis.set_op_handle("aten::scaled_dot_product_attention",
                           sdpa_elementwise_flop_jit if elementwise else sdpa_flop_jit)
    analysis.set_op_handle(**MATRIX_OPS, **RESAMPLING_OPS, **NORM_OPS)
    analysis.set_op_handle(**{op: None for op in FREE_OPS})
    silent: Counter = Counter()
    analysis.set_op_handle("aten::einsum", _einsum_handle(elementwise, silent))
    if elementwise:
        analysis.set_op_handle(**ELEMENTWISE_OPS)
    else:
        analysis.set_op_handle(**{op: _recorded_uncounted(op, silent) for op in FVCORE_SILENT_OPS})
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with torch.no_grad(), mha_fastpath_off(), warnings.catch_warnings():
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
        unfolded_norms=folding.unfolded if fused else {},
    )
