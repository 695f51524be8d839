"""SHViT numerics against independent references: timm's built-in SHViT, published counts, plain tensor ops."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import timm
from timm.models.shvit import SHViT as TimmSHViT
from timm.utils import reparameterize_model

import shvit
from norms import randomize_norms  # tests/norms.py

SIZES = {'shvit_s1': 224, 'shvit_s2': 224, 'shvit_s3': 224, 'shvit_s4': 256}
PARAMS = {  # (unfused, fused), from the official code / the reference
    'shvit_s1': (6_330_808, 6_308_660),
    'shvit_s2': (11_483_072, 11_453_508),
    'shvit_s3': (14_245_273, 14_210_010),
    'shvit_s4': (16_588_484, 16_546_248),
}


def _timm_reference(variant: str, **kwargs) -> TimmSHViT:
    cfg = shvit.VARIANTS[variant]
    return TimmSHViT(
        embed_dim=cfg['embed_dim'], depth=cfg['depth'], partial_dim=cfg['partial_dim'], types=cfg['types'], **kwargs)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope='module', params=list(SIZES))
def variant_pair(request):
    """(variant, our model with randomised norms, timm's SHViT with the same weights), eval mode."""
    variant = request.param
    torch.manual_seed(0)
    ours = randomize_norms(timm.create_model(variant)).eval()
    with torch.no_grad():  # a trained head's bias (init is 0, which hid a fuse() that dropped it)
        ours.head.l.bias.normal_(0, 0.5)
    ref = _timm_reference(variant).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    return variant, ours, ref


@torch.no_grad()
def test_matches_timm_builtin(variant_pair):
    variant, ours, ref = variant_pair
    x = torch.randn(2, 3, SIZES[variant], SIZES[variant])
    out = ours(x)
    assert out.shape == (2, 1000)
    assert (out - ref(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize('variant', ['shvit_s1', 'shvit_s4'])
def test_norm_init_matches_timm_builtin(variant):
    # norm scales are initialised to constants (0 for the last BN of residual branches), so training from scratch
    # starts where timm's built-in SHViT starts; the random conv / linear weights are not compared
    ours, ref = timm.create_model(variant).state_dict(), _timm_reference(variant).state_dict()
    assert ours.keys() == ref.keys()
    norm_keys = [k for k in ours if k.rsplit('.', 1)[-1] in ('running_mean', 'running_var')]
    checked = 0
    for key in norm_keys:
        prefix = key.rsplit('.', 1)[0]
        for name in ('weight', 'bias', 'running_mean', 'running_var'):
            torch.testing.assert_close(ours[f'{prefix}.{name}'], ref[f'{prefix}.{name}'], rtol=0, atol=0,
                                       msg=lambda m, k=f'{prefix}.{name}': f'{k}: {m}')
            checked += 1
    assert checked > 100
    assert any(not ours[k.rsplit('.', 1)[0] + '.weight'].any() for k in norm_keys)  # zero-init scales exist


def test_param_counts(variant_pair):
    variant, ours, _ = variant_pair
    unfused, fused = PARAMS[variant]
    assert _n_params(ours) == unfused
    assert _n_params(reparameterize_model(ours)) == fused


@torch.no_grad()
def test_fused_close_to_unfused(variant_pair):
    variant, ours, _ = variant_pair
    x = torch.randn(1, 3, SIZES[variant], SIZES[variant])
    fused = reparameterize_model(ours)
    # every BatchNorm is folded away, only the SHSA GroupNorm remains
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in fused.modules())
    assert (fused(x) - ours(x)).abs().max().item() <= 1e-4
    assert isinstance(fused.get_classifier(), nn.Linear)


@torch.no_grad()
@pytest.mark.parametrize('hw', [(64, 96), (200, 320), (97, 64), (32, 32), (17, 23), (1, 8)])  # any size, as timm's
def test_non_square_matches_timm(hw):
    ours = randomize_norms(timm.create_model('shvit_s1')).eval()
    ref = _timm_reference('shvit_s1').eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, *hw)
    assert (ours(x) - ref(x)).abs().max().item() <= 1e-5
    feats = ours.forward_intermediates(x, intermediates_only=True)
    assert [tuple(f.shape[-2:]) for f in feats] == [
        (-(-hw[0] // r), -(-hw[1] // r)) for r in (16, 32, 64)]  # stride-2 pad-1 convs round up


@torch.no_grad()
def test_model_fuse_method_and_reparameterize_agree():
    a = randomize_norms(timm.create_model('shvit_s1', distilled=True)).eval()
    x = torch.randn(1, 3, 128, 128)
    expected = a(x)
    b = reparameterize_model(a)
    a.fuse()
    assert a is not b  # timm copies by default; were it in place, the comparison below would be vacuous
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert (a(x) - expected).abs().max().item() <= 1e-4
    head, head_dist = a.get_classifier()
    assert isinstance(head, nn.Linear) and isinstance(head_dist, nn.Linear)
    # the layers fusing creates keep the model's mode (found by an audit: 74 of S1's were left in training mode)
    assert not any(m.training for m in [*a.modules(), *b.modules()])


@torch.no_grad()
def test_dw_residual_fuse_against_formula():
    """Residual depthwise ConvNorm -> one conv: check against BN folding written out with plain tensor ops."""
    from shvit.layers import DWConvResidual
    unit = randomize_norms(DWConvResidual(8)).eval()
    x = torch.randn(2, 8, 9, 11)
    bn, w = unit.m.bn, unit.m.c.weight
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    ref = x + F.conv2d(x, w, padding=1, groups=8) * scale[:, None, None] + (
        bn.bias - bn.running_mean * scale)[:, None, None]
    torch.testing.assert_close(unit(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unit.fuse()(x), ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_bf16_model_folds_in_float32_rounded_once():
    """Found by an audit: a bf16 model folded its BatchNorms in bf16 arithmetic, rounding at every step (S4's fused
    output 1.17% off its fp32 reference, against 0.66% when folded in fp32 and rounded once). The reference: the
    fold written out in float32 from the bf16 parameters (scale = gamma / sqrt(var + eps), shift = beta - mean *
    scale), rounded to bf16 once; the depthwise residual's identity added before that rounding, the head's
    BatchNorm folded into its Linear likewise."""
    from shvit.layers import DWConvResidual, NormLinear
    torch.manual_seed(0)
    unit = randomize_norms(DWConvResidual(64)).eval().to(torch.bfloat16)
    bn = unit.m.bn
    scale = bn.weight.float() / torch.sqrt(bn.running_var.float() + bn.eps)
    weight = unit.m.c.weight.float() * scale[:, None, None, None]
    weight[:, 0, 1, 1] += 1
    fused = unit.fuse()
    assert fused.weight.dtype == torch.bfloat16
    torch.testing.assert_close(fused.weight, weight.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(fused.bias, (bn.bias.float() - bn.running_mean.float() * scale).bfloat16(),
                               rtol=0, atol=0)
    head = randomize_norms(NormLinear(64, 10)).eval().to(torch.bfloat16)
    bn, w = head.bn, head.l.weight.float()
    scale = bn.weight.float() / torch.sqrt(bn.running_var.float() + bn.eps)
    shift = bn.bias.float() - bn.running_mean.float() * scale
    fused = head.fuse()
    torch.testing.assert_close(fused.weight, (w * scale).bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(fused.bias, (w @ shift + head.l.bias.float()).bfloat16(), rtol=0, atol=0)


@torch.no_grad()
def test_shsa_against_plain_ops():
    """SHSA == the paper's equations written with plain tensor ops (GroupNorm(1) over C,H,W per sample)."""
    from shvit.attention import SHSA
    dim, pdim, qk = 24, 8, 4
    m = randomize_norms(SHSA(dim, qk, pdim)).eval()
    x = torch.randn(2, dim, 5, 6)
    x1, x2 = x[:, :pdim], x[:, pdim:]
    mu = x1.mean(dim=(1, 2, 3), keepdim=True)
    var = x1.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    n = (x1 - mu) / (var + m.pre_norm.eps).sqrt() * m.pre_norm.weight[:, None, None] + m.pre_norm.bias[:, None, None]
    qkv = m.qkv(n).flatten(2)
    q, k, v = qkv[:, :qk], qkv[:, qk:2 * qk], qkv[:, 2 * qk:]
    a = torch.softmax(torch.einsum('bcn,bcm->bnm', q, k) / qk ** 0.5, dim=-1)
    y1 = torch.einsum('bcm,bnm->bcn', v, a).reshape(2, pdim, 5, 6)
    ref = m.proj[1](torch.relu(torch.cat([y1, x2], 1)))
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    # the token-view path (vitzoo.deploy's): same numbers, channels-last in and out, NCHW input works too
    m.nhwc = True
    out = m(x.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_nhwc_attention_matches_timm_builtin():
    """Whole network with SHSA's ``nhwc`` path on a channels-last input vs timm's SHViT (NCHW, official layout)."""
    ours = randomize_norms(timm.create_model('shvit_s2')).eval()
    ref = _timm_reference('shvit_s2').eval()
    ref.load_state_dict(ours.state_dict())
    n = 0
    for m in ours.modules():
        if hasattr(m, 'nhwc'):
            m.nhwc, n = True, n + 1
    assert n == sum(shvit.VARIANTS['shvit_s2']['depth'][1:])  # one SHSA per block of stages 2 and 3
    x = torch.randn(2, 3, 160, 192)
    ours = ours.to(memory_format=torch.channels_last)
    assert (ours(x.contiguous(memory_format=torch.channels_last)) - ref(x)).abs().max().item() <= 1e-5


@torch.no_grad()
def test_distilled_forward_is_mean_of_heads_pair_only_when_asked():
    m = randomize_norms(timm.create_model('shvit_s1', distilled=True, num_classes=7)).eval()
    x = torch.randn(2, 3, 64, 64)
    pooled = m.forward_head(m.forward_features(x), pre_logits=True)
    torch.testing.assert_close(m(x), (m.head(pooled) + m.head_dist(pooled)) / 2)
    m.train()  # timm's DeiT convention: training mode alone still returns the mean (timm's train.py needs a tensor)
    mean = m(x)
    assert isinstance(mean, torch.Tensor) and mean.shape == (2, 7)
    m.set_distilled_training(True)
    out = m(x)
    assert isinstance(out, tuple) and len(out) == 2 and out[0].shape == (2, 7)
    torch.testing.assert_close((out[0] + out[1]) / 2, mean)
    m.eval()
    assert isinstance(m(x), torch.Tensor)  # eval: always the mean


def test_drop_path_schedule_and_behaviour():
    m = timm.create_model('shvit_s1', drop_path_rate=0.1)
    rates = [blk.ffn.drop_path.drop_prob if hasattr(blk.ffn.drop_path, 'drop_prob') else 0.
             for stage in m.stages for blk in stage.blocks]
    assert len(rates) == 11 and rates[0] == 0. and rates[-1] == pytest.approx(0.1)
    assert all(b > a for a, b in zip(rates, rates[1:]))
    m = randomize_norms(m)
    plain = timm.create_model('shvit_s1')
    plain.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), plain.eval()(x), rtol=0, atol=0)  # inactive in eval
        m.train()
        torch.manual_seed(1)
        a = m(x)
        torch.manual_seed(2)
        assert not torch.equal(a, m(x))  # stochastic in training


@torch.no_grad()
def test_downsampling_decided_by_stage_index():
    """Equal widths between stages must still downsample (timm's built-in skips it)."""
    m = timm.create_model(
        'shvit_s1', embed_dim=(64, 64, 64), partial_dim=(16, 16, 16), depth=(1, 1, 1), num_classes=0).eval()
    feats = m.forward_intermediates(torch.randn(1, 3, 128, 128), intermediates_only=True)
    assert [f.shape[-1] for f in feats] == [8, 4, 2]


def test_fvcore_flops_fused_s1():
    fvcore = pytest.importorskip('fvcore.nn')
    m = reparameterize_model(timm.create_model('shvit_s1').eval())
    fca = fvcore.FlopCountAnalysis(m, torch.randn(1, 3, 224, 224))
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    assert round(fca.total() / 1e6, 2) == 241.40
    assert round(shvit.VARIANT_STATS['shvit_s1']['gmacs_fused'] * 1e3, 2) == 241.40


def test_norm_layer_argument_matches_timm_builtin():
    """``norm_layer`` (timm's SHViT argument, the SHSA pre-norm) is accepted and used as timm uses it: was a
    TypeError after ``import shvit`` replaced timm's entries."""
    torch.manual_seed(0)
    ours = randomize_norms(timm.create_model('shvit_s1', norm_layer=timm.layers.LayerNorm2d)).eval()
    ref = _timm_reference('shvit_s1', norm_layer=timm.layers.LayerNorm2d).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert isinstance(ours.stages[2].blocks[0].mixer.m.pre_norm, timm.layers.LayerNorm2d)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-5


def test_hooks_see_module_outputs_as_timm_does():
    """A ConvNorm followed by an activation: forward hooks get the ConvNorm's own output (not the activation's,
    which an in-place ReLU wrote over it), and full backward hooks on it or on SHSA's projection work (they raised
    'a view ... is being modified inplace'); the gradients they see equal those of timm's SHViT."""
    torch.manual_seed(0)
    ours = randomize_norms(timm.create_model('shvit_s1')).eval()
    ref = _timm_reference('shvit_s1').eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    names = ['patch_embed.0', 'stages.0.blocks.0.ffn.m.pw1', 'stages.1.downsample.2.conv1',
             'stages.1.downsample.2.conv2', 'stages.1.blocks.0.mixer.m.proj']
    seen = {}
    for tag, model in (('ours', ours), ('timm', ref)):
        for name in names:
            module = model.get_submodule(name)
            module.register_forward_hook(lambda m, i, o, k=(tag, name): seen.__setitem__(k, o.detach().clone()))
            module.register_full_backward_hook(
                lambda m, gi, go, k=(tag, name, 'grad'): seen.__setitem__(k, go[0].detach().clone()))
    x = torch.randn(2, 3, 96, 96, requires_grad=True)
    for tag, model in (('ours', ours), ('timm', ref)):
        model(x).square().sum().backward()
    assert seen[('ours', 'patch_embed.0')].min() < 0  # the conv's output, before the ReLU
    for name in names:
        torch.testing.assert_close(seen[('ours', name)], seen[('timm', name)], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seen[('ours', name, 'grad')], seen[('timm', name, 'grad')], rtol=1e-4, atol=1e-5)


def test_a_hand_replaced_first_convolution_takes_its_own_channels():
    """Found by an audit: after ``model.patch_embed[0].c = nn.Conv2d(4, ...)`` (adapting channels by hand), the
    input check compared with the constructor's in_chans=3 and refused the 4-channel input timm's SHViT runs. The
    reference is timm's SHViT given the same state dict."""
    torch.manual_seed(0)
    ours = randomize_norms(timm.create_model('shvit_s1')).eval()
    ours.patch_embed[0].c = nn.Conv2d(4, 16, 3, 2, 1, bias=False)
    ref = _timm_reference('shvit_s1', in_chans=4).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
        with pytest.raises(ValueError, match='takes 4-channel input'):
            ours(torch.randn(2, 3, 64, 64))


def test_a_stem_conv_of_another_kind_keeps_the_constructor_s_channels():
    """Found in review: the check took the first nn.Conv2d anywhere in the stem, so a MixedConv2d (its 2-channel
    split) or a hand-written conv module (the next layer's 16) made 3-channel input refused; a LazyConv2d gave 0.
    Reference: timm's SHViT with the same replaced stem and state dict."""
    from timm.layers import MixedConv2d

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    for make in (lambda: MixedConv2d(3, 16, [3, 5], stride=2, padding='', bias=False),
                 lambda: nn.LazyConv2d(16, 3, 2, 1, bias=False)):
        ours = randomize_norms(timm.create_model('shvit_s1')).eval()
        ours.patch_embed[0].c = make()
        ref = _timm_reference('shvit_s1').eval()
        ref.patch_embed[0].c = ours.patch_embed[0].c
        with torch.no_grad():
            got = ours(x)
            ref.load_state_dict(ours.state_dict(), strict=True)
            torch.testing.assert_close(got, ref(x), rtol=0, atol=0)
