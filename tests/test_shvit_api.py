"""The timm model contract for SHViT: features, intermediates, heads, optimizer hooks, devices, scripting, tracing."""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import timm
from timm.optim import create_optimizer_v2

import shvit
from shvit.model import check_input

from norms import randomize_norms  # tests/norms.py: every branch active (SHViT zero-inits its branch BNs)


@pytest.fixture(scope='module')
def s1():
    torch.manual_seed(0)
    return randomize_norms(timm.create_model('shvit_s1')).eval()


def test_registry_replaces_timm_builtin_and_keeps_tags():
    entry = timm.models.model_entrypoint('shvit_s4')
    assert entry.__module__ == 'shvit.shvit'
    assert {'shvit_s1', 'shvit_s2', 'shvit_s3', 'shvit_s4'} <= set(timm.list_models(module='shvit'))
    m = timm.create_model('shvit_s4.in1k', device='meta')  # resolves the tag, no download (pretrained=False)
    cfg = m.pretrained_cfg
    assert isinstance(m, shvit.SHViT)
    assert cfg['hf_hub_id'] == 'timm/shvit_s4.in1k' and cfg['tag'] == 'in1k'
    assert cfg['input_size'] == (3, 256, 256) and cfg['crop_pct'] == 0.875 and cfg['interpolation'] == 'bicubic'
    assert cfg['first_conv'] == 'patch_embed.0.c' and cfg['classifier'] == 'head.l' and cfg['license'] == 'mit'
    assert cfg['paper_ids'] == 'arXiv:2401.16456' and cfg['pool_size'] == (4, 4)
    assert timm.models.get_pretrained_cfg('shvit_s1').hf_hub_id == 'timm/shvit_s1.in1k'  # the default tag
    official = timm.models.get_pretrained_cfg('shvit_s2.in1k_official')
    assert official.url == 'https://github.com/ysj9909/SHViT/releases/download/v1.0/shvit_s2.pth'


def test_import_emits_no_warning():
    code = ('import warnings\nwarnings.simplefilter("always")\n'
            'with warnings.catch_warnings(record=True) as w:\n    import shvit\n'
            'print(len(w), [str(x.message) for x in w])')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.startswith('0 '), out


def test_unknown_kwarg_raises_type_error():
    with pytest.raises(TypeError, match='not_a_model_arg'):
        timm.create_model('shvit_s1', not_a_model_arg=1)


def test_meta_device_and_dtype():
    m = timm.create_model('shvit_s2', device='meta', dtype=torch.float64)
    tensors = [*m.parameters(), *m.buffers()]
    assert all(t.device.type == 'meta' for t in tensors)
    assert all(t.dtype == torch.float64 for t in m.parameters())
    with torch.device('meta'):
        m = timm.create_model('shvit_s1', drop_path_rate=0.1).eval()
    assert m(torch.empty(1, 3, 224, 224, device='meta')).shape == (1, 1000)


@pytest.mark.parametrize('name, kwargs', [('shvit_s1', {}), ('shvit_s4', dict(distilled=True, num_classes=5)),
                                          ('shvit_s2', dict(num_classes=0))])
def test_init_weights_after_to_empty_is_the_constructors_init(name, kwargs):
    """Found by an audit: SHViT had no init_weights, so a model built on the meta device (timm's convention:
    to_empty, then init_weights) kept garbage; resetting each layer instead gave BN scales of 1 where the official
    init has 0 (residual branches) and PyTorch's Linear init for the head. The constructor's init is the reference:
    with the same seed, every parameter and buffer equals it bit for bit."""
    torch.manual_seed(0)
    reference = timm.create_model(name, **kwargs).state_dict()
    torch.manual_seed(0)  # a meta build draws no random numbers
    model = timm.create_model(name, device='meta', **kwargs).to_empty(device='cpu')
    with torch.no_grad():  # poisoned, so that a tensor left out cannot pass by chance
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(float('nan') if tensor.is_floating_point() else 7)
    model.init_weights()
    state = model.state_dict()
    assert state.keys() == reference.keys()
    assert [k for k in state if not torch.equal(state[k], reference[k])] == []
    # the official zero-init BN scales: each BasicBlock's depthwise conv and FFN output, the SHSA projection of the
    # blocks of stages 2 and 3 (types i, s, s), the two FFNs around each of the two downsamplings
    zero_scales = [k for k, v in state.items() if k.endswith('bn.weight') and not v.any()]
    assert len(zero_scales) == 2 * sum(model.depth) + sum(model.depth[1:]) + 2 * 2


def test_init_weights_of_a_fused_model_is_refused():
    """Found by a review: after fuse() the ConvNorms are plain Conv2d, which init_weights reset to PyTorch's
    default init (random weights where the constructor puts zero BatchNorm scales)."""
    model = timm.create_model('shvit_s1').eval().fuse()
    with pytest.raises(RuntimeError, match=r"^SHViT\.init_weights\(\) needs the unfused model: this one is fused"):
        model.init_weights()
    model.init_weights(needs_reset=False)  # nothing to do, nothing refused


def test_init_weights_in_float64_on_meta_gives_finite_outputs():
    model = timm.create_model('shvit_s1', device='meta', dtype=torch.float64).to_empty(device='cpu').eval()
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.fill_(float('nan'))
    model.init_weights()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert torch.isfinite(model(torch.randn(1, 3, 64, 64, dtype=torch.float64))).all()


@torch.no_grad()
def test_bfloat16():
    m = randomize_norms(timm.create_model('shvit_s1')).eval()
    x = torch.randn(1, 3, 96, 128)
    ref = m(x)
    out = m.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


@torch.no_grad()
def test_features_only():
    m = timm.create_model('shvit_s1', features_only=True).eval()
    assert m.feature_info.reduction() == [16, 32, 64]
    assert m.feature_info.channels() == [128, 224, 320]
    feats = m(torch.randn(2, 3, 224, 224))
    assert [tuple(f.shape) for f in feats] == [(2, 128, 14, 14), (2, 224, 7, 7), (2, 320, 4, 4)]
    m = timm.create_model('shvit_s4', features_only=True, out_indices=(1, 2)).eval()
    feats = m(torch.randn(1, 3, 256, 256))
    assert [tuple(f.shape) for f in feats] == [(1, 336, 8, 8), (1, 448, 4, 4)]
    assert m.feature_info.reduction() == [32, 64]


@pytest.mark.parametrize('kwargs', [{}, {'global_pool': ''}])
@torch.no_grad()
def test_features_only_state_dict_is_timms(kwargs):
    # the same wrapper and keys as timm's built-in SHViT, so saved features_only backbones load both ways; with
    # global_pool='' too, which the features (no head) do not use (before 2026-11-25 ours refused it: a head needs
    # pooling)
    theirs = timm.models.shvit.shvit_s1(features_only=True, **kwargs).eval()  # timm's own constructor, not the registry
    ours = timm.create_model('shvit_s1', features_only=True, **kwargs).eval()
    assert type(ours) is type(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(randomize_norms(theirs).state_dict())
    x = torch.randn(1, 3, 96, 128)
    for a, b in zip(ours(x), theirs(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@torch.no_grad()
def test_forward_intermediates_and_prune(s1):
    x = torch.randn(1, 3, 128, 160)
    final, inter = s1.forward_intermediates(x)
    torch.testing.assert_close(final, s1.forward_features(x), rtol=0, atol=0)
    assert [f.shape[1] for f in inter] == [128, 224, 320]
    assert len(s1.forward_intermediates(x, indices=1, intermediates_only=True)) == 1
    early = s1.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
    final0, _ = s1.forward_intermediates(x, indices=[0])  # without stop_early the final output is the last stage's
    torch.testing.assert_close(final0, inter[-1], rtol=0, atol=0)
    torch.testing.assert_close(early[0], inter[0], rtol=0, atol=0)
    import copy
    pruned = copy.deepcopy(s1)
    assert pruned.prune_intermediate_layers([1]) == [1]
    assert len(pruned.stages) == 2 and pruned.num_features == 224
    torch.testing.assert_close(pruned.forward_features(x), inter[1], rtol=0, atol=0)
    assert pruned(x).shape == (1, 224, 4, 5)  # head and pooling removed
    with pytest.raises(ValueError, match='NCHW'):
        s1.forward_intermediates(x, output_fmt='NHWC')


@torch.no_grad()
def test_prune_keeping_head_truncates_widths(s1):
    """prune_head=False on a truncating prune must still drop the 320-wide head (it cannot take 224 channels), and
    num_features / head_hidden_size must both follow the last kept stage so a new head fits."""
    import copy
    x = torch.randn(1, 3, 128, 160)
    inter = s1.forward_intermediates(x, intermediates_only=True)
    pruned = copy.deepcopy(s1)
    assert pruned.prune_intermediate_layers([1], prune_head=False) == [1]
    assert (pruned.num_features, pruned.head_hidden_size, pruned.num_classes) == (224, 224, 0)
    torch.testing.assert_close(pruned(x), inter[1], rtol=0, atol=0)  # maps, no pooling / head
    pruned.reset_classifier(10)
    assert pruned.get_classifier().in_features == 224 and pruned(x).shape == (1, 10)


@torch.no_grad()
def test_forward_head_and_reset_classifier():
    m = randomize_norms(timm.create_model('shvit_s1')).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = m.forward_features(x)
    pre = m.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, 320) and m.head_hidden_size == 320
    torch.testing.assert_close(m.forward_head(feats), m(x))
    m.to(torch.float64)
    m.reset_classifier(10)
    assert m.get_classifier().out_features == 10 and m.get_classifier().weight.dtype == torch.float64
    assert all(not mod.training for mod in m.modules())  # new head follows the model's eval mode
    assert m.global_pool.pool_type == 'avg'  # None keeps the pooling
    m.reset_classifier(0)
    assert m(x.double()).shape == (2, 320) and isinstance(m.get_classifier(), nn.Identity)
    m.reset_classifier(0, '')
    assert m(x.double()).shape == (2, 320, 1, 1)
    with pytest.raises(ValueError, match='pooled width'):
        m.reset_classifier(5, 'catavgmax')
    with pytest.raises(ValueError, match="unknown global_pool='token'"):  # timm's SHViT: a bare AssertionError
        m.reset_classifier(5, 'token')
    with pytest.raises(ValueError, match="unknown global_pool='token'"):
        timm.create_model('shvit_s1', global_pool='token')
    # a head and no pooling asked for together: a clear error (timm's own SHViT fails in BatchNorm1d at the first
    # forward), and the model is left as it was
    with pytest.raises(ValueError, match=r"head \(5 classes\) needs pooled features.*num_classes=0"):
        m.reset_classifier(5, '')
    assert m.num_classes == 0 and m(x.double()).shape == (2, 320, 1, 1)
    m.reset_classifier(5)  # a head after the pooling was removed brings back 'avg' (timm's would fail at forward)
    assert m.global_pool.pool_type == 'avg' and m(x.double()).shape == (2, 5)
    m.reset_classifier(0, '')
    with pytest.raises(ValueError, match=r"head \(1000 classes\) needs pooled features"):
        timm.create_model('shvit_s1', global_pool='')
    import inspect
    assert inspect.signature(m.reset_classifier).parameters['global_pool'].default is None


def test_get_classifier_without_classes_and_after_fuse():
    m = timm.create_model('shvit_s1', num_classes=0).eval()
    assert isinstance(m.get_classifier(), nn.Identity)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 320)
    m = timm.create_model('shvit_s1').eval().fuse()
    assert isinstance(m.get_classifier(), nn.Linear)


@torch.no_grad()
def test_distilled_without_classes_reports_both_heads_as_deit():
    """A distilled model reports the pair ``(head, head_dist)`` also without classes, as timm's distilled DeiT:
    ``(Identity(), Identity())``, with no state-dict keys, after fusing and after ``reset_classifier(0)``."""
    def kinds(classifier):
        return tuple(type(c) for c in classifier) if isinstance(classifier, tuple) else type(classifier)

    deit = timm.create_model('deit_tiny_distilled_patch16_224', num_classes=0)
    assert kinds(deit.get_classifier()) == (nn.Identity, nn.Identity)
    torch.manual_seed(0)
    m = randomize_norms(timm.create_model('shvit_s1', distilled=True, num_classes=0)).eval()
    assert kinds(m.get_classifier()) == kinds(deit.get_classifier())
    plain = timm.create_model('shvit_s1', num_classes=0)
    assert m.state_dict().keys() == plain.state_dict().keys()  # Identity heads add no keys
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(m(x), m.forward_features(x).mean((2, 3)), rtol=0, atol=1e-6)  # pooled features
    m.train()
    m.set_distilled_training(True)
    deit.train()
    deit.set_distilled_training(True)
    pair, deit_pair = m(x), deit(torch.randn(2, 3, 224, 224))
    assert isinstance(pair, tuple) and isinstance(deit_pair, tuple) and len(pair) == len(deit_pair) == 2
    m.eval()
    m.reset_classifier(7)  # back to classes: both heads
    assert [c.out_features for c in m.get_classifier()] == [7, 7]
    m.reset_classifier(0)
    deit.reset_classifier(0)
    assert kinds(m.get_classifier()) == kinds(deit.get_classifier()) == (nn.Identity, nn.Identity)
    assert kinds(m.fuse().get_classifier()) == (nn.Identity, nn.Identity)
    m.reset_classifier(7)
    m.prune_intermediate_layers(1)
    assert kinds(m.get_classifier()) == (nn.Identity, nn.Identity)
    assert kinds(timm.create_model('shvit_s1', num_classes=0).get_classifier()) == nn.Identity  # not distilled


def test_grad_checkpointing_same_output_and_grads():
    torch.manual_seed(0)
    m = randomize_norms(timm.create_model('shvit_s1', num_classes=5)).train()
    x = torch.randn(2, 3, 64, 64)
    out = m(x)
    out.sum().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.set_grad_checkpointing(True)
    out2 = m(x)
    out2.sum().backward()
    torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-5)
    for g, p in zip(grads, m.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def _two_steps(model, checkpointing):
    model.set_grad_checkpointing(checkpointing)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for step in range(2):
        torch.manual_seed(step)  # the same drop-path draws in both runs
        model(x).sum().backward()
    return model.state_dict(), {n: p.grad for n, p in model.named_parameters()}


def test_grad_checkpointing_updates_batchnorm_statistics_once_per_step():
    """Found by an audit: recomputing a checkpointed block in backward ran its BatchNorms in training mode a second
    time, so each step moved their running statistics twice and counted two batches (timm's SHViT does too). The
    reference is the model without checkpointing: after two steps, buffers and gradients are the same bit for bit."""
    torch.manual_seed(0)
    plain = timm.create_model('shvit_s1', num_classes=5, drop_path_rate=0.2).train()
    checkpointed = copy.deepcopy(plain)
    buffers, grads = _two_steps(plain, False)
    buffers_ckpt, grads_ckpt = _two_steps(checkpointed, True)
    assert buffers['stages.0.blocks.0.conv.m.bn.num_batches_tracked'] == 2
    assert [k for k in buffers if not torch.equal(buffers[k], buffers_ckpt[k])] == []
    assert [n for n in grads if not torch.equal(grads[n], grads_ckpt[n])] == []


def test_reentrant_grad_checkpointing_follows_timms_setting(monkeypatch):
    """timm's ``set_reentrant_ckpt(True)`` is honoured: gradients stay exact; torch runs no context around a
    reentrant recomputation, so there the statistics are updated twice (docs/shvit.md)."""
    import shvit.stage
    monkeypatch.setattr(shvit.stage, 'use_reentrant_ckpt', lambda: True)
    torch.manual_seed(0)
    plain = timm.create_model('shvit_s1', num_classes=5).train()
    checkpointed = copy.deepcopy(plain)
    buffers, grads = _two_steps(plain, False)
    buffers_ckpt, grads_ckpt = _two_steps(checkpointed, True)
    assert [n for n in grads if not torch.allclose(grads[n], grads_ckpt[n], rtol=1e-5, atol=1e-7)] == []
    assert buffers_ckpt['stages.1.blocks.0.conv.m.bn.num_batches_tracked'] == 4


def test_group_matcher_layer_decay_and_no_weight_decay(s1):
    from timm.models import group_parameters
    groups = group_parameters(s1, s1.group_matcher(coarse=False))
    assert len(groups) > 4
    assert len(group_parameters(s1, s1.group_matcher(coarse=True))) == 5  # stem, 3 stages, head
    opt = create_optimizer_v2(s1, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scales = {g['lr_scale'] for g in opt.param_groups}
    assert len(scales) > 4 and max(scales) == 1.0
    assert s1.no_weight_decay() == set()


@torch.no_grad()
def test_torchscript(s1):
    x = torch.randn(1, 3, 96, 64)
    scripted = torch.jit.script(s1)
    torch.testing.assert_close(scripted(x), s1(x))
    with pytest.raises(Exception, match='-channel input'):
        scripted(torch.randn(1, 1, 96, 64))


@torch.no_grad()
def test_fx_trace(s1):
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    from timm.models import get_notrace_functions, get_notrace_modules
    x = torch.randn(1, 3, 128, 128)
    traced = torch.fx.symbolic_trace(s1)
    torch.testing.assert_close(traced(x), s1(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match='-channel input'):
        traced(torch.randn(1, 2, 128, 128))  # the check survives tracing
    kw = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    _, eval_nodes = get_graph_node_names(s1, tracer_kwargs=kw)
    fx = create_feature_extractor(s1, return_nodes=[eval_nodes[-1]], tracer_kwargs=kw)
    torch.testing.assert_close(list(fx(x).values())[0], s1(x), rtol=0, atol=0)


@pytest.mark.parametrize('shape,match', [
    ((3, 224, 224), '4-D'),
    ((1, 3, 1, 224, 224), '4-D'),
    ((1, 1, 224, 224), 'takes 3-channel input .* in_chans=1 '),
])
def test_bad_input_value_errors(s1, shape, match):
    with pytest.raises(ValueError, match=match):
        s1(torch.randn(*shape))
    with pytest.raises(ValueError, match=match):
        s1.forward_intermediates(torch.randn(*shape))


def test_only_a_3d_input_is_told_to_add_a_batch_dimension(s1):
    """Found by an audit: a 5-D input was told to unsqueeze(0), which makes it 6-D."""
    with pytest.raises(ValueError, match=r'got a 5-D tensor of shape \[1, 1, 3, 64, 64\]\.$'):
        s1(torch.randn(1, 1, 3, 64, 64))
    with pytest.raises(ValueError, match=r'3-D .* x\.unsqueeze\(0\)\.$'):
        s1(torch.randn(3, 64, 64))


def test_check_input_passes_good_input_through():
    x = torch.randn(1, 2, 64, 70)
    assert check_input(x, 2) is x


def test_in_chans_and_num_classes_without_weights():
    m = timm.create_model('shvit_s1', in_chans=1, num_classes=10).eval()
    assert m(torch.randn(2, 1, 64, 64)).shape == (2, 10)


@torch.no_grad()
def test_reset_classifier_zero_keeps_removed_pooling():
    # timm: global_pool=None keeps the current pooling; without a head nothing needs pooled features
    m = timm.create_model('shvit_s1').eval()
    m.reset_classifier(0, '')
    m.reset_classifier(0)
    assert m.global_pool.is_identity()
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 320, 1, 1)


def test_group_matcher_puts_downsample_with_first_block_of_its_stage(s1):
    from timm.models._manipulate import group_with_matcher
    groups = group_with_matcher(s1.named_parameters(), s1.group_matcher(), reverse=False)
    gid = {name: g for g, names in groups.items() for name in names}

    def group_of(prefix):
        ids = {g for name, g in gid.items() if name.startswith(prefix + '.')}
        assert len(ids) == 1, (prefix, ids)
        return ids.pop()

    # stem, 2 + 4 + 5 blocks (each downsample joins its stage's block 0, as timm's own SHViT), head
    assert len(groups) == 1 + 2 + 4 + 5 + 1
    assert group_of('stages.0.blocks.1') < group_of('stages.1.downsample') == group_of('stages.1.blocks.0')
    assert group_of('stages.1.blocks.0') < group_of('stages.1.blocks.1')
    assert group_of('stages.1.blocks.3') < group_of('stages.2.downsample') == group_of('stages.2.blocks.0')


def test_grad_checkpointing_sets_every_stage_and_uses_checkpoint(monkeypatch):
    import shvit.stage
    m = timm.create_model('shvit_s1', num_classes=5).train()
    assert not any(stage.grad_checkpointing for stage in m.stages)
    m.set_grad_checkpointing(True)
    assert [stage.grad_checkpointing for stage in m.stages] == [True, True, True]
    calls = []
    real = shvit.stage.checkpoint

    def counting(block, x, *args, **kwargs):
        calls.append(block)
        return real(block, x, *args, **kwargs)

    monkeypatch.setattr(shvit.stage, 'checkpoint', counting)
    m(torch.randn(2, 3, 64, 64)).sum().backward()
    assert calls == [block for stage in m.stages for block in stage.blocks]
    m.set_grad_checkpointing(False)
    assert not any(stage.grad_checkpointing for stage in m.stages)
    calls.clear()
    m(torch.randn(2, 3, 64, 64))
    assert calls == []


@pytest.mark.parametrize('variant', ['shvit_s1', 'shvit_s2', 'shvit_s3', 'shvit_s4'])
@torch.no_grad()
def test_pretrained_cfg_norm_and_pool_size(variant):
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    for tag in ('in1k', 'in1k_official'):
        cfg = timm.models.get_pretrained_cfg(f'{variant}.{tag}').to_dict()
        assert tuple(cfg['mean']) == tuple(IMAGENET_DEFAULT_MEAN)
        assert tuple(cfg['std']) == tuple(IMAGENET_DEFAULT_STD)
        m = timm.create_model(variant).eval()
        feats = m.forward_features(torch.zeros(1, *cfg['input_size']))
        assert tuple(cfg['pool_size']) == tuple(feats.shape[-2:])


@pytest.mark.parametrize('name', ['stages.0.blocks.0.ffn.m', 'stages.1.blocks.0.mixer.m', 'stages.1.blocks.0.conv.m',
                                  'stages.2.blocks.4.ffn.m.pw2'])
def test_hooks_on_a_residual_branch_see_its_own_output(name):
    """Found by an audit: the residual was added in place into the branch's output, so a forward hook on the branch
    saw branch + x (0.4-0.56 off) and a backward hook raised "a view ... is being modified inplace". Grad-CAM,
    activation statistics and feature distillation hook these modules; timm's own SHViT has no such problem."""
    model = timm.create_model('shvit_s1').eval()
    module = model.get_submodule(name)
    seen = {}

    def forward_hook(mod, inputs, output):
        seen['input'], seen['output'] = inputs[0].detach().clone(), output.detach().clone()

    module.register_forward_hook(forward_hook)
    module.register_full_backward_hook(lambda mod, grad_in, grad_out: seen.update(backward=grad_out[0].shape))
    x = torch.randn(2, 3, 96, 96, requires_grad=True)
    model(x).sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(seen['output'], module(seen['input']), rtol=0, atol=0)
    assert seen['backward'] == seen['output'].shape and x.grad is not None


def test_unsupported_pool_is_an_assertion_error_as_in_timm_and_a_value_error():
    """timm's own SHViT (and its test_catavgmax_unsupported) raise AssertionError for a pool the head cannot take;
    ours said ValueError only (found by an audit), which `except AssertionError` code missed."""
    model = timm.create_model('shvit_s1')
    for exc in (AssertionError, ValueError):
        with pytest.raises(exc, match="global_pool='catavgmax' changes the pooled width"):
            model.reset_classifier(7, 'catavgmax')
        with pytest.raises(exc, match="unknown global_pool='nope'"):
            timm.create_model('shvit_s1', global_pool='nope')
    with pytest.raises(AssertionError):  # timm's own model, the behaviour matched
        timm.models.shvit.shvit_s1().reset_classifier(7, 'catavgmax')


@pytest.mark.parametrize("package", ["shvit", "nvit"])
def test_every_error_class_the_loaders_raise_is_exported_by_the_package(package):
    """The errors that `shvit_*` / `nvit_*` raise for weights are importable from the package itself, as the docs
    name them (`shvit.InputChannelsError`); before 2026-11-25 the newer ones were only in `<package>.checkpoint`."""
    import importlib
    import inspect

    top = importlib.import_module(package)
    checkpoint = importlib.import_module(f"{package}.checkpoint")
    errors = {name for name, obj in vars(checkpoint).items()
              if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == checkpoint.__name__}
    assert len(errors) >= 3
    assert errors <= set(top.__all__), sorted(errors - set(top.__all__))
    assert all(getattr(top, name) is getattr(checkpoint, name) for name in errors)


def test_act_layer_reaches_every_ffn_unlike_timms_basic_blocks():
    """docs/shvit.md: ours applies act_layer to every activation; timm 1.0.31's SHViT leaves the FFNs of its
    BasicBlocks at ReLU (if timm changes that, the documented difference is stale)."""
    from timm.models.shvit import SHViT as TimmSHViT
    ours = timm.create_model('shvit_s1', act_layer=nn.GELU)
    theirs = TimmSHViT(embed_dim=(128, 224, 320), partial_dim=(32, 48, 68), depth=(2, 4, 5),
                       types=("i", "s", "s"), act_layer=nn.GELU)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    # the squeeze-excite modules of the patch mergings keep their own ReLU in both (the official code's)
    assert [n for n, m in ours.named_modules() if isinstance(m, nn.ReLU) and '.se.' not in n] == []
    theirs_relu = sorted(n for n, m in theirs.named_modules() if isinstance(m, nn.ReLU) and '.se.' not in n)
    assert theirs_relu and all('.blocks.' in n and '.ffn.' in n for n in theirs_relu)
    assert len(theirs_relu) == sum(len(s.blocks) for s in theirs.stages)
