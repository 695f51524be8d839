"""SHViT's attention on vitzoo's kernel (``vitzoo.shsa_kernel``) and its use by ``deploy()``.

The kernels are checked against float64 references written here (GroupNorm from its definition, attention with an
explicit exp / sum), and the deployed models against the original models' outputs. The kernel tests need Linux on
x86-64 with AVX-512F/VL and a C compiler (they skip elsewhere, saying why); the fallback tests run everywhere.
"""
import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import LayerNorm2d
from timm.models import shvit as timm_shvit

import vitzoo
from kernels import needs_kernel
from norms import randomize_norms
from shvit.attention import SHSA
from vitzoo import shsa_kernel
from vitzoo.shsa_kernel import KernelSHSA, group_norm1, shsa_mix, swap_attention


def _needs_kernel():
    needs_kernel(shsa_kernel, "SHSA kernel")


def _channels_last(*shape, generator, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=generator) * scale + shift).contiguous(memory_format=torch.channels_last)


def _expected_group_norm(x, weight, bias, eps):
    x = x.double()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.double()[:, None, None] + bias.double()[:, None, None]


def _expected_mix(qkv, x2, qk_dim, pdim, scale, relu):
    """Attention over the H*W tokens of each image in float64, softmax written out."""
    batch, _, height, width = qkv.shape
    tokens = qkv.double().flatten(2)  # (B, C, N)
    q, k, v = tokens[:, :qk_dim], tokens[:, qk_dim:2 * qk_dim], tokens[:, 2 * qk_dim:]
    scores = torch.einsum("bdn,bdm->bnm", q, k) * scale
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    weights = weights / weights.sum(dim=-1, keepdim=True)
    attended = torch.einsum("bnm,bcm->bcn", weights, v).reshape(batch, pdim, height, width)
    out = torch.cat([attended, x2.double()], dim=1)
    return out.clamp_min(0) if relu else out


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("batch,channels,rest,size", [(2, 48, 176, (7, 7)), (3, 19, 2, (9, 8)), (1, 68, 0, (4, 4)),
                                                      (2, 5, 11, (1, 1)), (1, 130, 6, (12, 11))])
def test_group_norm_against_float64(threads, batch, channels, rest, size):
    _needs_kernel()
    generator = torch.Generator().manual_seed(channels + rest)
    x = _channels_last(batch, channels + rest, *size, generator=generator, scale=3.0, shift=2.0)[:, :channels]
    weight, bias = torch.randn(channels, generator=generator), torch.randn(channels, generator=generator)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = group_norm1(x, weight, bias, 1e-5)
    finally:
        torch.set_num_threads(before)
    assert got.shape == x.shape and got.is_contiguous(memory_format=torch.channels_last)
    expected = _expected_group_norm(x, weight, bias, 1e-5)
    assert (got.double() - expected).abs().max() <= 2e-6 * expected.abs().max()


@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("batch,qk_dim,pdim,rest,size", [
    (2, 16, 48, 176, (7, 7)),   # SHViT-S1's stage 2: 49 queries, groups of 4 with a tail
    (3, 16, 68, 252, (4, 4)),   # its stage 3
    (2, 16, 96, 0, (9, 8)),     # every channel attends; 72 tokens: past one block of 64 queries
    (1, 8, 19, 3, (13, 11)),    # channel tails everywhere, 143 tokens
    (2, 16, 64, 5, (1, 1)),     # one token
    (1, 16, 130, 7, (24, 20)),  # 480 tokens, values in more than two passes of 64 channels
])
@pytest.mark.parametrize("relu", [True, False])
def test_mix_against_float64(threads, batch, qk_dim, pdim, rest, size, relu):
    _needs_kernel()
    generator = torch.Generator().manual_seed(batch * 1000 + pdim + rest)
    qkv = _channels_last(batch, 2 * qk_dim + pdim, *size, generator=generator, scale=2.0)
    x2 = _channels_last(batch, pdim + rest, *size, generator=generator)[:, pdim:]  # a channel slice, as in SHSA
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = shsa_mix(qkv, x2, qk_dim, pdim, qk_dim ** -0.5, relu)
    finally:
        torch.set_num_threads(before)
    expected = _expected_mix(qkv, x2, qk_dim, pdim, qk_dim ** -0.5, relu)
    assert got.shape == expected.shape and got.is_contiguous(memory_format=torch.channels_last)
    # fp32: the softmax weights to ~1e-6 relative, each output a convex combination of values of order 1-10
    assert (got.double() - expected).abs().max() <= 2e-5 * max(1.0, expected.abs().max().item())
    if not relu:
        assert torch.equal(got[:, pdim:], x2)  # the skipped channels are copied as they are


def test_scores_far_apart_give_the_largest_ones_weight():
    """Scores spread over hundreds (exp underflows below -87): the softmax is one-hot where torch's is."""
    _needs_kernel()
    generator = torch.Generator().manual_seed(3)
    qkv = _channels_last(1, 2 * 16 + 24, 6, 6, generator=generator, scale=30.0)
    x2 = _channels_last(1, 4, 6, 6, generator=generator)
    got = shsa_mix(qkv, x2, 16, 24, 0.25, False)
    expected = _expected_mix(qkv, x2, 16, 24, 0.25, False)
    assert (got.double() - expected).abs().max() <= 2e-5 * expected.abs().max()


def test_nan_and_infinity_give_what_torch_gives():
    """A NaN key makes every row NaN; an infinite query makes its own row NaN (inf - inf in the softmax); an infinite
    value makes its channel infinite; the skipped channels keep their values; as torch's fp32 ops."""
    _needs_kernel()
    generator = torch.Generator().manual_seed(4)
    for position, value in (((0, 20, 1, 1), float("nan")), ((1, 3, 2, 0), float("inf")),
                            ((0, 5, 0, 0), -float("inf")), ((1, 40, 3, 3), float("inf"))):
        qkv = _channels_last(2, 2 * 16 + 48, 4, 4, generator=generator)
        x2 = _channels_last(2, 8, 4, 4, generator=generator)
        qkv[position] = value
        got = shsa_mix(qkv, x2, 16, 48, 0.25, True)
        reference = shsa_kernel.reference_mix(qkv, x2, 16, 48, 0.25, True)
        assert not reference.isfinite().all()  # the case is one that gives NaN or infinity
        assert torch.equal(got.isnan(), reference.isnan()), position
        assert torch.allclose(got.nan_to_num(), reference.nan_to_num(), atol=1e-5), position


def test_inputs_the_kernel_does_not_take_go_to_torch():
    """NCHW tensors, float64, and tensors that need grad are computed by PyTorch's ops (same result, grad kept)."""
    generator = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 2 * 16 + 48, 5, 5, generator=generator)
    x2 = torch.randn(2, 10, 5, 5, generator=generator)
    expected = _expected_mix(qkv, x2, 16, 48, 0.25, True)
    for a, b in ((qkv, x2), (qkv.double(), x2.double())):
        assert (shsa_mix(a, b, 16, 48, 0.25, True).double() - expected).abs().max() < 1e-5
    leaf = qkv.contiguous(memory_format=torch.channels_last).requires_grad_()
    out = shsa_mix(leaf, x2.contiguous(memory_format=torch.channels_last), 16, 48, 0.25, True)
    out.sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    weight, bias = torch.rand(48) + 0.5, torch.randn(48)
    x = torch.randn(2, 48, 5, 5, generator=generator)
    assert (group_norm1(x, weight, bias, 1e-5).double() - _expected_group_norm(x, weight, bias, 1e-5)).abs().max() \
        < 1e-5


def test_shapes_that_do_not_fit_are_refused():
    qkv = torch.randn(1, 2 * 16 + 48, 4, 4)
    with pytest.raises(ValueError, match=r"do not fit qk_dim=16, pdim=40"):
        shsa_mix(qkv, torch.randn(1, 8, 4, 4), 16, 40, 0.25, True)
    with pytest.raises(ValueError, match=r"expected \(B, 80, H, W\) and \(B, rest, H, W\)"):
        shsa_mix(qkv, torch.randn(1, 8, 4, 5), 16, 48, 0.25, True)


@pytest.mark.parametrize("act,norm", [(nn.ReLU, None), (nn.GELU, None), (nn.ReLU, LayerNorm2d)])
def test_kernel_block_computes_the_block(act, norm):
    """Another activation runs as a module after the mix, another pre-norm as a module before it."""
    _needs_kernel()
    torch.manual_seed(6)
    kwargs = {} if norm is None else {"norm_layer": norm}
    block = randomize_norms(SHSA(224, 16, 48, act_layer=act, **kwargs)).eval()
    kernel_block = KernelSHSA(block)
    assert kernel_block.relu == (act is nn.ReLU) and kernel_block.norm_kernel == (norm is None)
    x = _channels_last(3, 224, 7, 7, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected, got = block(x), kernel_block(x)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("name,timm_class", [("shvit_s1", False), ("shvit_s2", True)])
@pytest.mark.parametrize("precision", ["bf16x3", "ieee"])
def test_deploy_runs_shvit_attention_on_the_kernel(name, timm_class, precision):
    """Ours and timm's SHViT (``timm.models.shvit``), both precisions: every attention block swapped, the output
    within deploy's 1e-4 of the original model's."""
    _needs_kernel()
    torch.manual_seed(8)
    model = randomize_norms(timm_shvit.shvit_s2() if timm_class else timm.create_model(name)).eval()
    blocks = sum(isinstance(m, (SHSA, timm_shvit.SHSA)) for m in model.modules())
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(9))
    deployed = vitzoo.deploy(model, x, fp32_precision=precision)
    assert any(f"on vitzoo's AVX-512 kernel: {blocks} blocks" in note for note in deployed.optimizations), \
        deployed.optimizations
    with torch.no_grad():
        expected = model(x)
        for batch in (x, x[:1]):
            assert (deployed(batch) - expected[:len(batch)]).abs().max() <= 1e-4


def test_a_hooked_block_is_kept_and_its_hook_runs():
    _needs_kernel()
    model = randomize_norms(timm.create_model("shvit_s1")).eval()
    blocks = [m for m in model.modules() if isinstance(m, SHSA)]
    seen = []
    blocks[2].pre_norm.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    x = torch.randn(1, 3, 224, 224)
    deployed = vitzoo.deploy(model, x)
    assert any(f"kernel: {len(blocks) - 1} blocks" in note for note in deployed.optimizations), deployed.optimizations
    seen.clear()
    deployed(x)
    assert seen == [torch.Size([1, 48, 7, 7])]


def test_nothing_is_swapped_without_the_kernel(monkeypatch):
    monkeypatch.setattr(shsa_kernel, "load", lambda: None)
    model = timm.create_model("shvit_s1")
    assert swap_attention(model) == 0
    assert not any(isinstance(m, KernelSHSA) for m in model.modules())


def test_group_norm_of_a_constant_sample_is_its_bias():
    """Zero variance, every value 0.1 (which fp32 cannot hold exactly): the output is the bias to within 1e-5. With
    rstd = 1/sqrt(eps) ~ 316, a mean off by 3e-8 (fp32 summation) would move it by ~1e-5; torch's is off by ~3e-5."""
    _needs_kernel()
    x = torch.full((2, 24, 5, 5), 0.1).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(24, generator=torch.Generator().manual_seed(0)) + 0.5, torch.randn(24)
    assert torch.allclose(group_norm1(x, weight, bias, 1e-5), bias[None, :, None, None].expand(2, 24, 5, 5),
                          atol=1e-5)


def test_group_norm_of_large_nearly_equal_values_stays_finite():
    """Found by a review: x = 2.06e6 throughout gave NaN (the mean, summed in fp32 as it was, came out ~0.1 off and
    the variance below 0); torch gives a finite result. Sums are now centred on the sample's first value, and the
    mean is taken off each value before it is scaled (torch's fp32, which scales first, is off by up to ~40 here)."""
    _needs_kernel()
    weight, bias = torch.rand(80, generator=torch.Generator().manual_seed(1)) + 0.5, torch.randn(80)
    for value in (2060374.639, 6.1e4, 5.3e6):
        x = torch.full((1, 80, 7, 7), value).contiguous(memory_format=torch.channels_last)
        x[0, 3, 2, 2] += value * 1e-6  # one value apart: a variance far below eps
        expected = _expected_group_norm(x, weight, bias, 1e-5)
        got = group_norm1(x, weight, bias, 1e-5)
        assert got.isfinite().all(), value
        assert (got.double() - expected).abs().max() <= 1e-3, value


def test_group_norm_with_weights_elsewhere_gives_torchs_error():
    """Found by a review: a weight on another device was passed to the kernel as a pointer (meta: a segfault)."""
    x = torch.randn(1, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    with pytest.raises((RuntimeError, ValueError), match="meta"):
        group_norm1(x, torch.ones(8, device="meta"), torch.zeros(8, device="meta"), 1e-5)
    with pytest.raises(ValueError, match="more than 1 value"):  # torch's error for one value per sample
        group_norm1(torch.randn(1, 1, 1, 1), torch.ones(1), torch.zeros(1), 1e-5)


def test_an_infinite_value_under_an_underflowing_weight_is_infinite():
    """Found by a review: exp was flushed to 0 below -87, so a weight of e^-100 times an infinite value gave NaN where
    torch's denormal weight gives inf."""
    _needs_kernel()
    qkv = torch.zeros(1, 3, 1, 3)  # qk_dim 1, pdim 1; tokens 0-2: q = 1, k = (0, 100, 0), v = (inf, 1, 1)
    qkv[0, 0] = 1.0
    qkv[0, 1, 0, 1] = 100.0
    qkv[0, 2] = torch.tensor([float("inf"), 1.0, 1.0])
    qkv = qkv.contiguous(memory_format=torch.channels_last)
    x2 = torch.zeros(1, 0, 1, 3)
    reference = shsa_kernel.reference_mix(qkv, x2, 1, 1, 1.0, False)
    assert torch.isinf(reference).all()
    assert torch.equal(shsa_mix(qkv, x2, 1, 1, 1.0, False), reference)


def test_a_hook_on_the_output_projection_keeps_its_block():
    """Found by a review: a hook on ``proj`` (the activation + convolution ``nn.Sequential``) was not looked at, and
    deploy() then failed with "lost the forward hooks"."""
    _needs_kernel()
    model = randomize_norms(timm.create_model("shvit_s1")).eval()
    blocks = [m for m in model.modules() if isinstance(m, SHSA)]
    seen = []
    blocks[4].proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    deployed = vitzoo.deploy(model, torch.randn(1, 3, 224, 224))
    assert any(f"kernel: {len(blocks) - 1} blocks" in note for note in deployed.optimizations), deployed.optimizations
    seen.clear()
    deployed(torch.randn(1, 3, 224, 224))
    assert seen == [torch.Size([1, 320, 4, 4])]


def test_the_note_survives_the_bf16x3_fallback():
    """Found by a review: the fallback builds again on the same (already swapped) model, and the note was lost."""
    _needs_kernel()
    torch.manual_seed(8)
    model = randomize_norms(timm.create_model("shvit_s1")).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(9))
    deployed = vitzoo.deploy(model, x, atol=3e-6)  # tight enough that bf16x3 (where there is AMX) must step back
    assert any("AVX-512 kernel: 9 blocks" in note for note in deployed.optimizations), deployed.optimizations


def test_the_callers_model_after_inplace_deploy_counts_and_traces_as_before():
    """Found by a review: after ``deploy(model, inplace=True)`` the caller's model holds KernelSHSA blocks, whose
    ctypes calls torch.jit.trace could not see: FLOPs came out 0.3% low and a traced copy returned garbage."""
    _needs_kernel()
    torch.manual_seed(10)
    model = randomize_norms(timm.create_model("shvit_s1")).eval()
    x = torch.randn(1, 3, 224, 224)
    flops = vitzoo.count_flops(model).total
    vitzoo.deploy(model, x, inplace=True)
    assert any(isinstance(m, KernelSHSA) for m in model.modules())
    assert vitzoo.count_flops(model).total == flops
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        other = torch.randn(2, 3, 224, 224)
        assert (traced(other) - model(other)).abs().max() <= 1e-4
