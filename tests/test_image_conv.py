"""The first-convolution kernel (``vitzoo.image_conv``) and its use by ``deploy()``.

Outputs are checked against float64 ``F.conv2d``. The kernel tests need Linux on x86-64 with AVX-512F and a C
compiler (they skip elsewhere, saying why); the eligibility and fallback tests run everywhere.
"""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import vitzoo
from kernels import needs_kernel
from norms import randomize_norms
from vitzoo import image_conv
from vitzoo.onednn_rewrite import PackedConv2d


def _needs_kernel():
    needs_kernel(image_conv, "image convolution kernel")


def _reference(x, weight, bias, stride, padding, relu):
    out = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride, padding)
    return out.relu() if relu else out


@pytest.mark.parametrize("size,stride,padding", [((224, 224), 2, 1), ((17, 12), 1, 1), ((9, 10), 2, 0),
                                                 ((3, 3), 1, 0), ((5, 4), 2, 2), ((1, 7), 1, 1)])
@pytest.mark.parametrize("out_channels,bias,relu", [(16, True, True), (7, False, False), (21, True, False)])
def test_against_float64(size, stride, padding, out_channels, bias, relu):
    _needs_kernel()
    generator = torch.Generator().manual_seed(sum(size) + stride + out_channels)
    x = torch.randn(2, 3, *size, generator=generator)
    weight = torch.randn(out_channels, 3, 3, 3, generator=generator)
    b = torch.randn(out_channels, generator=generator) if bias else None
    got = image_conv.image_conv3x3(x, image_conv.pack_weight(weight, b), out_channels, (stride, stride),
                                   (padding, padding), relu=relu)
    expected = _reference(x, weight, b, stride, padding, relu)
    assert got.shape == expected.shape and got.is_contiguous(memory_format=torch.channels_last)
    # IEEE fp32: one rounding per tap, 28 terms
    bound = 28 * 2.0 ** -24 * F.conv2d(x.double().abs(), weight.double().abs(), None if b is None else b.double().abs(),
                                       stride, padding) + 1e-12
    assert ((got.double() - expected).abs() <= bound).all(), (got.double() - expected).abs().max()


def test_any_input_layout_gives_the_same_result():
    _needs_kernel()
    x = torch.randn(2, 3, 40, 40)
    weight, bias = torch.randn(16, 3, 3, 3), torch.randn(16)
    packed = image_conv.pack_weight(weight, bias)
    plain = image_conv.image_conv3x3(x, packed, 16, (2, 2), (1, 1))
    crop = torch.randn(2, 3, 44, 48)[:, :, 2:42, 5:45].copy_(x)  # rows longer than the image: strided, no copy
    channels_last = x.contiguous(memory_format=torch.channels_last)
    for other in (crop, channels_last):
        assert torch.equal(image_conv.image_conv3x3(other, packed, 16, (2, 2), (1, 1)), plain)


def test_infinity_and_nan_propagate_as_in_fp32():
    _needs_kernel()
    x = torch.randn(1, 3, 8, 8)
    x[0, 1, 3, 4] = float("inf")
    x[0, 2, 0, 0] = float("nan")
    weight = torch.randn(16, 3, 3, 3)
    weight[3] = 0.0  # inf * 0: NaN in fp32 for output channel 3 wherever the window holds the inf
    for relu in (False, True):  # a fused ReLU turned NaN into 0 before 2026-11-26 (found by an audit)
        got = image_conv.image_conv3x3(x, image_conv.pack_weight(weight, None), 16, (1, 1), (1, 1), relu=relu)
        expected = F.conv2d(x, weight, None, 1, 1)
        expected = expected.relu() if relu else expected
        assert expected.isnan().any() and torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got.isposinf(), expected.isposinf()) and torch.equal(got.isneginf(), expected.isneginf())


def test_bad_inputs_are_refused_with_a_reason():
    _needs_kernel()
    packed = image_conv.pack_weight(torch.randn(16, 3, 3, 3), None)
    with pytest.raises(ValueError, match="3, H, W"):
        image_conv.image_conv3x3(torch.randn(1, 4, 8, 8), packed, 16, (1, 1), (1, 1))
    with pytest.raises(ValueError, match="smaller than the 3x3 kernel"):
        image_conv.image_conv3x3(torch.randn(1, 3, 2, 8), packed, 16, (1, 1), (0, 0))
    with pytest.raises(ValueError, match="strides of 1 or 2"):
        image_conv.image_conv3x3(torch.randn(1, 3, 8, 8), packed, 16, (3, 3), (1, 1))
    with pytest.raises(ValueError, match=r"\(N, 3, 3, 3\)"):
        image_conv.pack_weight(torch.randn(16, 3, 5, 5), None)
    # found by an audit: the kernel read past the packed weight and bias for more output channels than they hold,
    # and counted output rows in a C int (2**31 of them wrapped around)
    with pytest.raises(ValueError, match=r"bias of shape \(12,\), expected \(16,\)"):
        image_conv.pack_weight(torch.randn(16, 3, 3, 3), torch.randn(12))
    with pytest.raises(ValueError, match="40 output channels do not fit a weight packed for 16"):
        image_conv.image_conv3x3(torch.randn(1, 3, 8, 8), packed, 40, (1, 1), (1, 1))
    # packings built by hand: a weight with fewer blocks than its bias, in another dtype, not contiguous
    x = torch.randn(1, 3, 8, 8)
    for bad, message in (((packed[0][:0], packed[1]), r"not pack_weight's \(blocks, 27, 16\)"),
                         ((packed[0].double(), packed[1]), "contiguous float32 CPU tensor"),
                         ((packed[0].transpose(1, 2).contiguous().transpose(1, 2), packed[1]), "not contiguous"),
                         ((packed[0].reshape(1, 16, 27), packed[1]), r"\(blocks, 27, 16\)")):
        with pytest.raises(ValueError, match=message):
            image_conv.image_conv3x3(x, bad, 16, (1, 1), (1, 1))
    huge = torch.zeros(3).as_strided((2 ** 16, 3, 2 ** 15 + 2, 3), (0, 1, 0, 0))  # 2**31 output rows, 12 bytes
    with pytest.raises(ValueError, match="more output rows than the image convolution kernel counts"):
        image_conv.image_conv3x3(huge, packed, 16, (1, 1), (0, 0))


@pytest.mark.parametrize("conv,eligible", [
    (nn.Conv2d(3, 16, 3, 2, 1), True),
    (nn.Conv2d(3, 8, 3, 1, 1, bias=False), True),
    (nn.Conv2d(3, 32, 3, 2, 1), False),     # two 16-channel passes: no faster than oneDNN (S4's 3 -> 28)
    (nn.Conv2d(4, 16, 3, 2, 1), False),
    (nn.Conv2d(3, 16, 3, 2, 1, dilation=2), False),
    (nn.Conv2d(3, 16, 3, 3, 1), False),
    (nn.Conv2d(3, 16, 5, 2, 2), False),
    (nn.Conv2d(3, 16, 3, (1, 2), 1), False),
])
def test_which_convolutions_take_the_image_kernel(conv, eligible):
    packed = PackedConv2d(conv.eval(), (2, conv.in_channels, 32, 32))
    uses = packed.use_image_kernel()
    assert uses == (eligible and image_conv.load() is not None)
    x = torch.randn(2, conv.in_channels, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), conv(x), atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError):  # a wrong channel count: PyTorch's own error, on either path
        packed(torch.randn(2, conv.in_channels + 1, 32, 32))


def test_deploy_reads_the_nchw_image_and_stays_within_the_contract():
    _needs_kernel()
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model("shvit_s1", num_classes=10)).eval()
    x = torch.randn(3, 3, 96, 96)
    deployed = vitzoo.deploy(model, x)
    assert deployed.memory_format == torch.contiguous_format
    assert any("reads the NCHW image directly" in o for o in deployed.optimizations), deployed.optimizations
    firsts = [m for m in deployed.modules() if isinstance(m, PackedConv2d) and m.image]
    assert len(firsts) == 1 and firsts[0].in_channels == 3
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(deployed(x), expected, atol=1e-4, rtol=0)
    # a channels-last input is converted, with the same result; other sizes work too
    torch.testing.assert_close(deployed(x.contiguous(memory_format=torch.channels_last)), deployed(x), atol=0, rtol=0)
    y = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(deployed(y), model(y), atol=1e-4, rtol=0)


class _TwoUses(nn.Module):
    """The input feeds the stem and a second branch: the image kernel would leave that branch a NCHW input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.side = nn.Conv2d(3, 16, 2, 2)

    def forward(self, x):
        return self.stem(x) + self.side(x)


def test_no_image_kernel_when_the_input_has_other_users():
    deployed = vitzoo.deploy(_TwoUses().eval(), torch.randn(2, 3, 16, 16))
    assert deployed.memory_format == torch.channels_last
    assert not any(isinstance(m, PackedConv2d) and m.image for m in deployed.modules())


def test_without_the_kernel_deploy_keeps_the_channels_last_copy(monkeypatch):
    monkeypatch.setattr(image_conv, "_state", {"lib": None, "reason": "the CPU lacks avx512f"})
    torch.manual_seed(0)
    # norms randomised: at default init the logits are ~5e-5, and an all-zero output passed atol 1e-4 (an audit)
    model = randomize_norms(timm.create_model("shvit_s1", num_classes=10)).eval()
    deployed = vitzoo.deploy(model, torch.randn(2, 3, 64, 64))
    assert deployed.memory_format == torch.channels_last
    assert not any("NCHW image" in o for o in deployed.optimizations)
    x = torch.randn(2, 3, 64, 64)  # not the example deploy checked itself on
    with torch.no_grad():
        expected = model(x)
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(deployed(x), expected, atol=1e-4, rtol=0)


# --- found by an audit (2026-11-26) ------------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 2])
def test_non_finite_weights_give_what_fp32_gives_in_the_border_columns(stride):
    """A tap left or right of the image was skipped, not multiplied by 0: an infinite or NaN weight gave finite
    outputs in the border columns where fp32 (and the rows of zeros above and below the image) give 0 * inf = NaN."""
    _needs_kernel()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 9)
    weight = torch.randn(16, 3, 3, 3)
    weight[2, 0, 1, 0] = float("inf")  # left tap: NaN in the left column
    weight[5, 2, 2, 2] = -float("inf")  # bottom right tap: NaN in the right column and the bottom row
    weight[9, 1, 1, 2] = float("nan")
    for relu in (False, True):
        got = image_conv.image_conv3x3(x, image_conv.pack_weight(weight, None), 16, (stride, stride), (1, 1),
                                       relu=relu)
        expected = _reference(x, weight, None, stride, 1, relu)
        assert expected[:, 2, :, 0].isnan().all() and not expected[:, 2, :, 1:].isnan().any()
        for check in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(check(got), check(expected)), check


def test_images_whose_coordinates_a_c_int_cannot_count_are_refused():
    """An image higher than 2**31 - 1 (padded) was passed to the kernel's C ints wrapped around: every row read as
    padding, the output the bias alone (2**31 + 1 rows: 1.72 where the image gives -6.19). Refused now; without the
    check this test runs the whole 2**30-row convolution (~40 s, 4 GB) before it fails."""
    _needs_kernel()
    packed = image_conv.pack_weight(torch.randn(1, 3, 3, 3), torch.randn(1))
    for height, padding in ((2 ** 31 + 1, 0), (2 ** 31 - 2, 1)):
        x = torch.randn(3, 4).as_strided((1, 3, height, 4), (0, 4, 0, 1))  # one row repeated: no memory behind it
        with pytest.raises(ValueError, match=r"padded height and width of at most 2\*\*31 - 1"):
            image_conv.image_conv3x3(x, packed, 1, (2, 2), (padding, padding))
