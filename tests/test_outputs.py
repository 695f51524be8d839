"""The output comparison behind every graph rewrite (BatchNorm folding, the oneDNN rewrite, stem slicing, deploy's
check): each way two outputs can differ is caught, with the expected verdict written out by hand."""
import collections
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from vitzoo.inference import _check_close
from vitzoo.outputs import OutputLayout, UnsupportedOutputError, max_abs_diff_of, outputs_close

X = torch.tensor([[1.0, -4.0], [2.0, 0.5]])  # largest absolute value 4


@pytest.mark.parametrize("output, reference, rel, close", [
    (X, X.clone(), 0.0, True),
    (X + torch.tensor([[0.0, 0.0], [0.0, 2**-8]]), X, 2**-10, True),  # 2**-8 <= 2**-10 * 4 (exact in float32)
    (X + torch.tensor([[0.0, 0.0], [0.0, 2**-8 + 2**-12]]), X, 2**-10, False),
    (X.reshape(4), X, 1.0, False),                                    # same values, another shape
    (X.double(), X, 1.0, False),                                      # same values, another dtype
    ((X, X), (X, X.clone()), 0.0, True),
    ((X, X), [X, X], 1.0, False),                                     # a list is not a tuple
    ((X,), (X, X), 1.0, False),                                       # another number of outputs
    ({"a": X, "b": X}, {"a": X, "c": X}, 1.0, False),                 # another key
    ((X, 3), (X, 3), 0.0, True),                                      # non-tensor leaves compared by value
    ((X, 3), (X, 4), 1.0, False),
    ((X, 3), (X, torch.tensor(3)), 1.0, False),                       # a tensor where the reference has a number
    (torch.tensor([1, 2]), torch.tensor([1, 3]), 1.0, False),         # integer tensors must be equal
    (torch.tensor([1, 2]), torch.tensor([1, 2]), 0.0, True),
    (torch.tensor([True]), torch.tensor([False]), 1.0, False),
    (X.new_full((2, 2), math.nan), X, 1e9, False),                    # NaN is never close
    (torch.empty(0, 3), torch.empty(0, 3), 0.0, True),
])
def test_outputs_close_verdicts(output, reference, rel, close):
    assert outputs_close(output, reference, rel) is close


def test_max_abs_diff_of_nested_outputs():
    ref = {"logits": X, "aux": (2 * X, torch.tensor([1, 2]))}
    out = {"logits": X + 0.25, "aux": (2 * X - 0.5, torch.tensor([1, 2]))}
    assert max_abs_diff_of(out, ref) == (0.5, 8.0)  # the largest diff and the largest reference value over leaves


def test_max_abs_diff_of_float64_is_compared_in_float64():
    ref = torch.tensor([1.0, 2.0], dtype=torch.float64)
    out = ref + 1e-12  # lost if both were rounded to float32
    diff, scale = max_abs_diff_of(out, ref)
    assert 0.5e-12 < diff < 2e-12 and scale == 2.0


def test_max_abs_diff_of_a_float64_output_against_a_float32_reference_is_taken_in_float64():
    """Found in review: a float64 output was rounded to the float32 reference's dtype first, so a difference below
    float32's resolution read as none. 1 + 2**-30 is 1.0 in float32; the difference is exactly 2**-30 in float64."""
    ref = torch.tensor([1.0, 2.0])
    out = ref.double() + torch.tensor([2.0 ** -30, 0.0], dtype=torch.float64)
    assert max_abs_diff_of(out, ref) == (2.0 ** -30, 2.0)


def test_max_abs_diff_of_an_output_that_requires_grad_warns_nothing():
    """A model returning a parameter's view (which requires grad even under no_grad) made every deploy print torch's
    "Converting a tensor with requires_grad=True to a scalar" warning, from the comparison's float()."""
    weight = nn.Parameter(X.clone())
    with torch.no_grad():
        output = weight.t()
    assert output.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert max_abs_diff_of(output, X.t() + 0.25) == (0.25, 3.75)  # |-4 + 0.25|


def test_max_abs_diff_of_nan_is_reported_not_hidden():
    diff, _ = max_abs_diff_of((X, X.new_full((2,), math.nan)), (X, X.new_zeros(2)))
    assert diff != diff


INF = math.inf
MASKED = torch.tensor([[1.0, -INF, 3.0]])  # a classifier's -inf logits of disabled classes


@pytest.mark.parametrize("output, reference, expected", [
    (MASKED.clone(), MASKED, (0.0, 3.0)),                      # equal infinities: no difference (inf - inf is NaN)
    (torch.tensor([[1.5, -INF, 3.0]]), MASKED, (0.5, 3.0)),     # the scale is the largest finite value
    (torch.tensor([[1.0, 7.0, 3.0]]), MASKED, (INF, 3.0)),      # a finite value where the reference is -inf
    (torch.tensor([[1.0, INF, 3.0]]), MASKED, (INF, 3.0)),      # the other infinity
    (torch.tensor([[-50.0, 900.0, 3.0]]), torch.tensor([[1.0, 2.0, INF]]), (INF, 2.0)),
    (torch.tensor([[-INF, -INF]]), torch.tensor([[-INF, -INF]]), (0.0, 0.0)),  # no finite value at all
])
def test_max_abs_diff_of_infinities(output, reference, expected):
    """Found by an audit: identical -inf outputs gave "max abs diff nan (> tolerance nan)" and refused every
    backend, and with rtol > 0 one inf in the reference made the tolerance (atol + rtol * largest) infinite, so any
    output passed."""
    assert max_abs_diff_of(output, reference) == expected
    diff, scale = expected
    assert outputs_close(output, reference, rel=1e-3) is (diff <= 1e-3 * scale + 1e-12)


@pytest.mark.parametrize("output, reference, message", [
    ((X, X), X, r"structure differs from the original's: a tuple of 2 instead of a tensor \(2, 2\)"),
    ({"a": X}, {"b": X}, r"a dict with keys \['a'\] instead of a dict with keys \['b'\]"),
    ([X], [X, X], r"a list of 1 instead of a list of 2"),
    ((X, X.reshape(4)), (X, X), r"output 1 has shape \(4,\), the original's \(2, 2\)"),
    (torch.tensor([1, 2]), torch.tensor([1, 3]), r"the output \(torch.int64\) differs from the original's"),
    ((X, "a"), (X, "b"), r"output 1 is 'a', the original's 'b'"),
    ((X, 1), (X, torch.tensor(1)), r"output 1 is 1, the original's tensor\(1\)"),
])
def test_max_abs_diff_of_says_where_structures_differ(output, reference, message):
    with pytest.raises(ValueError, match=message):
        max_abs_diff_of(output, reference)


class _Returns(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return self.value


def test_deploy_check_reports_another_output_structure():
    """A backend whose output has another structure fails deploy's check with the reason, not a wrong result."""
    with pytest.raises(RuntimeError, match=r"deploy\(backend='eager'\): the output's structure differs from the "
                                           r"original's: a tuple of 2 instead of a tensor \(2, 2\)\. Use another"):
        _check_close(X, _Returns((X, X)), X, atol=1e-4, rtol=0.0, backend="eager")
    assert _check_close(X, _Returns(X + 1e-5), X, atol=1e-4, rtol=0.0, backend="eager") == pytest.approx(1e-5, rel=1e-2)


_Pair = collections.namedtuple("_Pair", "logits aux")
Y = 2 * X


@pytest.mark.parametrize("output, flat", [
    (X, X),                                                           # a tensor stays itself
    ((X,), (X,)),
    (_Pair(X, Y), (X, Y)),
    ([None, {"b": Y, "a": (X, None)}], (Y, X)),                       # dict order as given, None left out
])
def test_output_layout_flattens_the_tensors_and_nests_them_back(output, flat):
    layout = OutputLayout(output)
    got = OutputLayout.flat(output)
    assert type(got) is type(flat) and len(pytree.tree_leaves(got)) == len(pytree.tree_leaves(flat))
    assert all(a is b for a, b in zip(pytree.tree_leaves(got), pytree.tree_leaves(flat)))
    nested = layout.nest(list(flat) if isinstance(flat, tuple) else flat)
    assert pytree.tree_structure(nested) == pytree.tree_structure(output)
    assert type(nested) is type(output)
    assert all(a is b for a, b in zip(pytree.tree_leaves(nested), pytree.tree_leaves(output)))


@pytest.mark.parametrize("output, message", [
    ({"logits": X, "n": 3}, r"the model's output\['n'\] is 3 \(int\), not a tensor"),
    ((X, [X, "tag"]), r"the model's output\[1\]\[1\] is 'tag' \(str\), not a tensor"),
    (_Pair(X, 0.5), r"the model's output.aux is 0.5 \(float\), not a tensor"),
    ((X, "x" * 100), r"the model's output\[1\] is 'xxxxxxxxx[x]*\.\.\. \(str\)"),     # a long value is cut short
])
def test_output_layout_names_a_value_a_trace_cannot_return(output, message):
    with pytest.raises(UnsupportedOutputError, match=message):
        OutputLayout(output)


def test_output_layout_refuses_another_number_of_tensors():
    with pytest.raises(ValueError, match="got 1 tensors for an output that holds 2"):
        OutputLayout((X, None, X)).nest([X])


def test_deploys_check_refuses_a_wrong_output_beside_an_infinite_reference_with_rtol():
    """Found by a review (end to end, through the check deploy runs): with rtol > 0 an inf in the reference made the
    tolerance atol + rtol * inf infinite, so any output passed; identical infinities must still pass."""
    reference = torch.tensor([[1.0, -INF, 3.0]])
    with pytest.raises(RuntimeError, match="differs from the original model by max abs diff inf"):
        _check_close(reference, _Returns(torch.tensor([[-50.0, 9.0, 900.0]])), X, atol=1e-4, rtol=1e-3,
                     backend="eager")
    assert _check_close(reference, _Returns(reference.clone()), X, atol=1e-4, rtol=1e-3, backend="eager") == 0.0
