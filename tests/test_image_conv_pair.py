"""vitzoo.image_conv.image_conv_pair: a stem's first two convolutions in one kernel call, band by band, against
float64 convolutions written with torch's own ops; and deploy()'s use of it (PackedConvPair)."""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import vitzoo
from kernels import needs_kernel
from norms import randomize_norms
from vitzoo import image_conv
from vitzoo.onednn_rewrite import PackedConv2d, PackedConvPair

U = 2.0 ** -24  # fp32's unit roundoff


def _needs_kernel():
    needs_kernel(image_conv, "image convolution kernel")


def _weights(out_channels, generator, bias=True):
    w1, w2 = torch.randn(16, 3, 3, 3, generator=generator), torch.randn(out_channels, 16, 3, 3, generator=generator)
    b1 = torch.randn(16, generator=generator) if bias else None
    b2 = torch.randn(out_channels, generator=generator) if bias else None
    return w1, b1, w2, b2


def _reference(x, w1, b1, w2, b2, stride, padding, relu, relu_second):
    """float64 result and an error bound for IEEE fp32: 28 roundings per first-layer output, carried through the
    second layer's weights, plus 145 roundings per second-layer output."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    a = lambda t: None if t is None else t.double().abs()  # noqa: E731
    first = F.conv2d(x.double(), w1.double(), d(b1), stride, padding)
    first = first.relu() if relu else first
    out = F.conv2d(first, w2.double(), d(b2), 2, 1)
    out = out.relu() if relu_second else out
    first_bound = 28 * U * F.conv2d(x.double().abs(), a(w1), a(b1), stride, padding)
    bound = F.conv2d(first_bound, a(w2), None, 2, 1) + 145 * U * F.conv2d(first.abs(), a(w2), a(b2), 2, 1)
    return out, 2 * bound + 1e-12


@pytest.mark.parametrize("size,stride,padding", [((224, 224), 2, 1), ((17, 12), 1, 1), ((9, 10), 2, 0),
                                                 ((3, 3), 1, 0), ((5, 4), 2, 2), ((1, 7), 1, 1), ((31, 30), 2, 1)])
@pytest.mark.parametrize("out_channels,bias,relus", [(32, True, (True, True)), (16, False, (False, False)),
                                                     (48, True, (True, False)), (64, True, (False, True))])
def test_against_float64(size, stride, padding, out_channels, bias, relus):
    _needs_kernel()
    generator = torch.Generator().manual_seed(sum(size) + stride + out_channels)
    x = torch.randn(3, 3, *size, generator=generator)
    w1, b1, w2, b2 = _weights(out_channels, generator, bias)
    got = image_conv.image_conv_pair(x, image_conv.pack_weight(w1, b1), image_conv.pack_second_weight(w2, b2),
                                     (stride, stride), (padding, padding), relu=relus[0], relu_second=relus[1])
    expected, bound = _reference(x, w1, b1, w2, b2, stride, padding, *relus)
    assert got.shape == expected.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert ((got.double() - expected).abs() <= bound).all(), (got.double() - expected).abs().max()


def test_bands_threads_and_input_layouts_give_the_same_bits():
    """Each output is computed by one thread, the same way whatever the band (the first layer's rows at a band's
    edge are computed again, identically) and whatever the input's strides."""
    _needs_kernel()
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, 45, 38, generator=generator)
    w1, b1, w2, b2 = _weights(32, generator)
    packed, second = image_conv.pack_weight(w1, b1), image_conv.pack_second_weight(w2, b2)

    def run(inputs, band, threads):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return image_conv.image_conv_pair(inputs, packed, second, (2, 2), (1, 1), relu=True, relu_second=True,
                                              band=band)
        finally:
            torch.set_num_threads(old)

    plain = run(x, None, 1)
    expected, bound = _reference(x, w1, b1, w2, b2, 2, 1, True, True)
    assert ((plain.double() - expected).abs() <= bound).all()
    crop = torch.randn(3, 3, 50, 44)[:, :, 2:47, 5:43].copy_(x)
    for inputs, band, threads in ((x, 1, 2), (x, 5, 3), (x, 12, 2), (x, 100, 1), (crop, 2, 2),
                                  (x.contiguous(memory_format=torch.channels_last), 3, 2)):
        assert torch.equal(run(inputs, band, threads), plain), (band, threads)


def test_infinity_and_nan_propagate_as_in_fp32():
    """Through both layers, and into the second layer's padding columns and rows (0 * inf = NaN there, as the
    image kernel gives it in the first layer's borders)."""
    _needs_kernel()
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 12, 14, generator=generator)
    x[0, 1, 5, 6] = float("inf")
    x[1, 2, 0, 0] = float("nan")
    w1, b1, w2, b2 = _weights(32, generator)
    w1[3] = 0.0  # inf * 0 in the first layer
    w2[7, 2, 0, 0] = float("inf")  # the second layer's top-left tap: NaN along its top and left padding
    w2[20, 9, 2, 1] = -float("inf")
    for relu in (False, True):
        got = image_conv.image_conv_pair(x, image_conv.pack_weight(w1, b1), image_conv.pack_second_weight(w2, b2),
                                         (2, 2), (1, 1), relu=relu, relu_second=relu)
        # float64, whose convolution multiplies the padding too (torch's fp32 one skips padding taps on CPU: 30.2
        # where 0 * inf makes it NaN)
        expected = _reference(x, w1, b1, w2, b2, 2, 1, relu, relu)[0]
        assert expected.isnan().any() and expected.isinf().any()
        for check in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(check(got), check(expected)), (relu, check)


def test_bad_inputs_are_refused_with_a_reason():
    _needs_kernel()
    packed = image_conv.pack_weight(torch.randn(16, 3, 3, 3), None)
    second = image_conv.pack_second_weight(torch.randn(32, 16, 3, 3), None)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\(N, 16, 3, 3\) convolution weight with N a multiple of 16"):
        image_conv.pack_second_weight(torch.randn(24, 16, 3, 3), None)
    with pytest.raises(ValueError, match=r"\(N, 16, 3, 3\)"):
        image_conv.pack_second_weight(torch.randn(32, 8, 3, 3), None)
    with pytest.raises(ValueError, match=r"bias of shape \(16,\), expected \(32,\)"):
        image_conv.pack_second_weight(torch.randn(32, 16, 3, 3), torch.randn(16))
    with pytest.raises(ValueError, match="3, H, W"):
        image_conv.image_conv_pair(torch.randn(1, 4, 8, 8), packed, second, (2, 2), (1, 1))
    with pytest.raises(ValueError, match="strides of 1 or 2"):
        image_conv.image_conv_pair(x, packed, second, (3, 3), (1, 1))
    with pytest.raises(ValueError, match="smaller than the 3x3 kernel"):
        image_conv.image_conv_pair(torch.randn(1, 3, 2, 8), packed, second, (1, 1), (0, 0))
    with pytest.raises(ValueError, match=r"writes 16 channels \(pack_weight of a \(16, 3, 3, 3\) weight\), but its "
                                         "packing holds 32"):
        image_conv.image_conv_pair(x, image_conv.pack_weight(torch.randn(32, 3, 3, 3), None), second, (2, 2), (1, 1))
    for bad, message in (((second[0].double(), second[1]), "contiguous float32 CPU tensor"),
                         ((second[0][..., :16], second[1]), "contiguous float32 CPU tensor"),
                         ((second[0][..., :16].contiguous(), second[1]), r"not pack_second_weight's \(3, 3, 16, N\)"),
                         ((second[0].reshape(3, 3, 32, 16), second[1]), r"\(3, 3, 16, N\)"),
                         ((second[0][..., :24].contiguous(), second[1][:24]), "multiple of 16")):
        with pytest.raises(ValueError, match=message):
            image_conv.image_conv_pair(x, packed, bad, (2, 2), (1, 1))
    for band in (0, 2.5, True):  # a float reached ctypes' own ArgumentError (found by a review)
        with pytest.raises(ValueError, match=f"band must be a whole number of rows, at least 1, got {band}"):
            image_conv.image_conv_pair(x, packed, second, (2, 2), (1, 1), band=band)
    with pytest.raises(ValueError, match="not contiguous"):
        image_conv.image_conv_pair(x, packed, (second[0][..., :16], second[1][:16]), (2, 2), (1, 1))


@pytest.mark.parametrize("batch,oh2,ow1,threads,band", [
    (16, 56, 112, 2, 8),  # S1 at 224: 17 rows of 114 x 16 floats = 124 KB; 16 x 7 items for 2 threads
    (1, 56, 112, 2, 7),  # batch 1: 8 bands of 7 rows, 4 items per thread
    (1, 56, 112, 16, 1),  # 64 items wanted, 56 rows: one row each
    (3, 56, 112, 4, 8),  # 6 bands per image wanted: 9 rows would do, the cache budget gives 8
    (2, 10, 200, 1, 4),  # 10 rows of 202 x 16 floats fit 128 KB: bands of 4 (9 rows)
    (1, 4, 2000, 1, 1),  # one row of 2002 x 16 floats fills the budget: still one row
])
def test_default_band_fits_the_cache_and_feeds_every_thread(batch, oh2, ow1, threads, band):
    """Worked out by hand: (131072 // (64 (ow1 + 2)) - 1) // 2 rows, at most oh2 // ceil(4 threads / batch)."""
    assert image_conv.default_band(batch, oh2, ow1, threads) == band


def _deployed_pairs(deployed):
    return [m for m in deployed.modules() if isinstance(m, PackedConvPair)]


@pytest.mark.parametrize("name", ["shvit_s1", "efficientvit_m4"])
def test_deploy_runs_the_stem_pair_within_the_contract(name):
    _needs_kernel()
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model(name, num_classes=10)).eval()
    x = torch.randn(3, 3, 96, 96)
    deployed = vitzoo.deploy(model, x)
    pairs = _deployed_pairs(deployed)
    assert len(pairs) == 1 and (pairs[0].first.in_channels, pairs[0].second.in_channels) == (3, 16)
    assert any("second convolution runs in the same kernel call" in o for o in deployed.optimizations)
    with torch.no_grad():
        expected = model(x)
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(deployed(x), expected, atol=1e-4, rtol=0)
        for other in (torch.randn(1, 3, 64, 80), torch.randn(2, 3, 33, 47)):  # odd sizes, another batch
            torch.testing.assert_close(deployed(other), model(other), atol=1e-4, rtol=0)


class _Stem(nn.Module):
    """3 -> 16 -> 32 like SHViT-S1's stem, with variations that rule the pair out."""

    def __init__(self, second_stride=2, tap=False, shortcut=False, residual=False, second_in=16):
        super().__init__()
        self.first = nn.Conv2d(3, second_in, 3, 2, 1)
        self.second = nn.Conv2d(second_in, 32, 3, second_stride, 1)
        self.tap, self.shortcut, self.residual = tap, shortcut, residual
        self.from_first = nn.Conv2d(second_in, 32, 2, 2)
        self.from_image = nn.Conv2d(3, 32, 4, 4)

    def forward(self, x):
        h = self.first(x).relu()
        out = self.second(h)
        if self.shortcut:  # a second reader of the first layer's output
            out = out + self.from_first(h)
        if self.residual:  # an add the rewrite fuses into the second convolution (its second argument)
            out = out + self.from_image(x)
        return (out.relu(), h.mean()) if self.tap else out.relu()


@pytest.mark.parametrize("kwargs,paired", [
    ({}, True),
    ({"second_stride": 1}, False),  # not a stride-2 second layer
    ({"tap": True}, False),  # the first layer's output is read elsewhere too
    ({"shortcut": True}, False),  # read by a shortcut as well
    ({"residual": True}, False),  # the second convolution has a residual fused in
    ({"second_in": 8}, False),  # the image kernel's output is not 16 channels
])
def test_which_stems_are_paired(kwargs, paired):
    torch.manual_seed(0)
    model = _Stem(**kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    deployed = vitzoo.deploy(model, x)
    assert bool(_deployed_pairs(deployed)) == (paired and image_conv.load() is not None)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(1, 4, 16, 16), (1, 3, 2, 2)])
def test_inputs_a_pair_cannot_take_raise_as_nn_conv2d_does(shape):
    """A wrong channel count, an image smaller than the first (unpadded) kernel: nn.Conv2d's own error (found by a
    review: the small image got the image kernel's ValueError). A deployed model refuses inputs of other ranks."""
    convs = nn.Conv2d(3, 16, 3, 2, 0).eval(), nn.Conv2d(16, 32, 3, 2, 1).eval()
    first = PackedConv2d(convs[0], (1, 3, 16, 16))
    if not first.use_image_kernel():
        pytest.skip("image kernel unavailable here")
    pair = PackedConvPair(first, PackedConv2d(convs[1], (1, 16, 7, 7)))
    x = torch.randn(*shape)
    with pytest.raises(Exception) as expected:
        convs[1](convs[0](x))
    with pytest.raises(type(expected.value)) as got:
        pair(x)
    assert str(got.value) == str(expected.value)
