"""timm model contract for NViT on small, uneven dims; from_vit against timm's own DeiT."""
import warnings

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import GluMlp
from timm.models.vision_transformer import ParallelScalingBlock, ParallelThingsBlock, ResPostBlock

import nvit

DIMS = dict(embed_dim=32, heads=[2, 1, 3], qk_dim=[8, 16, 8], v_dim=[16, 8, 8], mlp_dim=[48, 32, 64])
SMALL = dict(dims=DIMS, img_size=64, num_classes=10, token_mask=True)


def small(**kw):
    return timm.create_model('nvit_b', **dict(SMALL, **kw)).eval()


def test_create_and_forward_shapes():
    m = small()
    x = torch.randn(2, 3, 64, 64)
    assert m.forward_features(x).shape == (2, 2 + 16, 32)
    assert m(x).shape == (2, 10)
    assert m.forward_head(m.forward_features(x), pre_logits=True).shape == (2, 32)
    assert isinstance(m.dims, nvit.NViTDims) and m.dims.heads == (2, 1, 3)
    assert m.num_features == m.head_hidden_size == 32
    assert timm.create_model('nvit_b', dims=nvit.NViTDims.from_dict(DIMS).to_json()).dims.depth == 3


def test_distilled_heads_mean_and_training_tuple():
    m = small()
    x = torch.randn(2, 3, 64, 64)
    feats = m.forward_features(x)
    assert torch.allclose(m(x), (m.head(feats[:, 0]) + m.head_dist(feats[:, 1])) / 2, atol=1e-6)
    m.train()
    m.set_distilled_training(True)
    out = m(x)
    assert isinstance(out, tuple) and len(out) == 2
    assert m.get_classifier() == (m.head, m.head_dist)  # both classifiers, as timm's distilled DeiT
    plain = small(distilled=False)
    assert plain.dist_token is None and plain.head_dist is None and plain(x).shape == (2, 10)
    assert plain.get_classifier() is plain.head


def test_avg_pool_and_reset_classifier():
    m = small(global_pool='avg', fc_norm=False)  # final norm on the tokens; fc_norm: tests/test_nvit_fc_norm.py
    x = torch.randn(1, 3, 64, 64)
    feats = m.forward_features(x)
    pooled = feats[:, 2:].mean(1)
    assert torch.allclose(m(x), (m.head(pooled) + m.head_dist(pooled)) / 2, atol=1e-6)
    m.reset_classifier(0)
    assert m(x).shape == (1, 32)
    m.reset_classifier(5, 'token')
    assert m(x).shape == (1, 5) and not m.head.training
    m.reset_classifier(0, '')
    assert m(x).shape == (1, 18, 32)


@pytest.mark.parametrize('fmt', ['NCHW', 'NLC'])
def test_forward_intermediates(fmt):
    m = small()
    x = torch.randn(2, 3, 64, 64)
    final, feats = m.forward_intermediates(x, indices=[0, -1], output_fmt=fmt)
    assert torch.allclose(final, m.forward_features(x), atol=1e-6)
    expect = (2, 32, 4, 4) if fmt == 'NCHW' else (2, 16, 32)
    assert [f.shape for f in feats] == [expect, expect]
    only = m.forward_intermediates(x, indices=2, intermediates_only=True, stop_early=True, output_fmt=fmt)
    assert len(only) == 2 and torch.allclose(only[-1], feats[-1], atol=1e-6)
    pairs = m.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True)
    assert pairs[0][1].shape == (2, 2, 32)


@torch.no_grad()
def test_forward_intermediates_stop_early_and_norm():
    """stop_early runs no block after the last tap and returns that block's normed tokens as the final output
    (timm ViT's behaviour); norm=True applies the final LayerNorm to each tap, norm=False does not."""
    m = small()
    x = torch.randn(1, 3, 64, 64)
    calls = []
    hooks = [blk.register_forward_hook(lambda mod, i, o, n=n: calls.append(n)) for n, blk in enumerate(m.blocks)]
    try:
        final, (raw,) = m.forward_intermediates(x, indices=[0], stop_early=True, output_fmt='NLC')
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0]
    ((patches, prefix),) = m.forward_intermediates(x, indices=[0], output_fmt='NLC', return_prefix_tokens=True,
                                                   intermediates_only=True)  # block 0's tokens from a full run
    tokens = torch.cat([prefix, patches], dim=1)
    torch.testing.assert_close(raw, patches)
    torch.testing.assert_close(final, m.norm(tokens))
    (normed,) = m.forward_intermediates(x, indices=[0], norm=True, output_fmt='NLC', intermediates_only=True)
    torch.testing.assert_close(normed, m.norm(tokens)[:, m.num_prefix_tokens:])
    full, _ = m.forward_intermediates(x, indices=[0])
    torch.testing.assert_close(full, m.forward_features(x))


@torch.no_grad()
def test_forward_intermediates_nchw_non_square():
    """NCHW maps are the NLC token rows laid out row-major on the (H/16, W/16) grid: token r*W + c is pixel (r, c)."""
    m = small(img_size=(48, 80))
    x = torch.randn(1, 3, 48, 80)
    (nlc,) = m.forward_intermediates(x, indices=[0], output_fmt='NLC', intermediates_only=True)
    (nchw,) = m.forward_intermediates(x, indices=[0], output_fmt='NCHW', intermediates_only=True)
    assert nlc.shape == (1, 15, 32) and nchw.shape == (1, 32, 3, 5)
    torch.testing.assert_close(nchw[0, :, 1, 4], nlc[0, 1 * 5 + 4], rtol=0, atol=0)
    torch.testing.assert_close(nchw.flatten(2).transpose(1, 2), nlc, rtol=0, atol=0)


def test_prune_intermediate_layers():
    m = small()
    x = torch.randn(1, 3, 64, 64)
    before = m.forward_intermediates(x, indices=[1], intermediates_only=True)
    taps = m.prune_intermediate_layers([1], prune_norm=True)
    assert taps == [1] and len(m.blocks) == 2
    assert isinstance(m.norm, torch.nn.Identity)  # prune_norm=True: timm ViT replaces the final norm
    # prune_head=True removes the pooling too (timm ViT: reset_classifier(0, '')): all 2 + 16 tokens come out
    assert m(x).shape == (1, 18, 32)
    after = m.forward_intermediates(x, indices=[1], intermediates_only=True)
    assert torch.allclose(before[0], after[0], atol=1e-6)
    m.train()
    m.forward_features(x).sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_pruned_model_describes_its_blocks(tmp_path):
    """After prune_intermediate_layers, model.dims and the recorded model args describe the blocks kept, so a file
    saved from the pruned model with its dims record loads (found by an audit: both stayed at the full depth, and
    the file was refused). The reference: the first 4 blocks' widths of revit_t's own dims, and the model's state."""
    from safetensors.torch import save_file

    m = timm.create_model('revit_t')
    full = m.dims
    m.prune_intermediate_layers([3], prune_head=False)
    assert len(m.blocks) == 4 and m.dims.depth == 4
    assert all(m.dims.block(i) == full.block(i) for i in range(4)) and m.dims.embed_dim == full.embed_dim
    assert len(m._model_args['dims']['heads']) == 4
    path = tmp_path / 'pruned.safetensors'
    save_file(m.state_dict(), str(path), metadata=nvit.dims_metadata(m))
    state, dims, _ = nvit.load_checkpoint(str(path))
    assert dims == m.dims and sorted(state) == sorted(m.state_dict())
    # features_only prunes the same way; the factory's recorded args must not put the full depth back (a review)
    features = timm.create_model('revit_t', features_only=True, out_indices=(3,))
    assert features.model.dims == m.dims and len(features.model._model_args['dims']['heads']) == 4


def test_feature_info_reduction_follows_patch_size():
    """Like timm's ViT, every block's reduction is the patch size (8 here), channels the embedding width."""
    m = small(patch_size=8)
    vit = timm.create_model('vit_tiny_patch16_224', img_size=64, depth=3, patch_size=8)
    assert [f['reduction'] for f in m.feature_info] == [f['reduction'] for f in vit.feature_info] == [8, 8, 8]
    assert [f['module'] for f in m.feature_info] == ['blocks.0', 'blocks.1', 'blocks.2']
    assert {f['num_chs'] for f in m.feature_info} == {32}


def test_features_only_getter():
    m = timm.create_model('nvit_b', features_only=True, out_indices=(0, 2), **SMALL)
    feats = m(torch.randn(1, 3, 64, 64))
    assert [f.shape for f in feats] == [(1, 32, 4, 4)] * 2


@pytest.mark.parametrize('name', ['revit_t', 'nvit_b'])
def test_features_only_of_a_distilled_model_takes_global_pool_none(name):
    """features_only=True with global_pool='' (the feature getter drops heads and pooling anyway) builds a distilled
    model, whose classifiers otherwise refuse '' (before 2026-11-25: UnsupportedPoolError, as timm's distilled DeiT
    asserts). Its features are the last three blocks' patch tokens, as hooks on a plain model of the same weights see
    them."""
    kwargs = dict(img_size=64, **(dict(dims=DIMS) if name == 'nvit_b' else {}))
    torch.manual_seed(0)
    features = timm.create_model(name, features_only=True, global_pool='', **kwargs).eval()
    torch.manual_seed(0)
    plain = timm.create_model(name, **kwargs).eval()
    assert plain.dist_token is not None
    seen = []
    for block in plain.blocks[-3:]:
        block.register_forward_hook(lambda module, args, out: seen.append(out[:, 2:]))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = features(x)
        plain(x)
    expected = [t.reshape(2, 4, 4, -1).permute(0, 3, 1, 2) for t in seen]
    assert len(got) == 3 and all(torch.equal(g, e) for g, e in zip(got, expected))


def test_group_matcher_and_no_weight_decay():
    m = small()
    names = [n for n, _ in m.named_parameters()]
    from timm.models._manipulate import group_parameters
    groups = group_parameters(m, m.group_matcher())
    assert len(groups) > 1
    import fnmatch
    for pattern in m.no_weight_decay():
        assert any(fnmatch.fnmatch(n, pattern) for n in names), pattern
    assert m.no_weight_decay() == {'pos_embed', 'cls_token', 'dist_token'}


def test_grad_checkpointing_runs_every_block_through_checkpoint_with_the_same_gradients(monkeypatch):
    """Found by an audit: the test compared only outputs, equal with or without checkpointing. Now each block must
    go through timm's checkpoint, and the gradients must equal plain autograd's."""
    import nvit.model

    m = small(drop_path_rate=0.).train()
    x = torch.randn(2, 3, 64, 64)
    m(x).square().sum().backward()
    reference = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)

    calls = []
    real = nvit.model.checkpoint

    def counting(block, *args, **kwargs):
        calls.append(block)
        return real(block, *args, **kwargs)

    monkeypatch.setattr(nvit.model, 'checkpoint', counting)
    m.set_grad_checkpointing(True)
    m(x).square().sum().backward()
    assert calls == list(m.blocks)
    for name, p in m.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], rtol=1e-5, atol=1e-6, msg=name)
    m.set_grad_checkpointing(False)
    calls.clear()
    m(x)
    assert calls == []


def test_grad_checkpointing_of_a_features_only_model_through_its_model(monkeypatch):
    """timm's features_only wrapper (FeatureGetterNet, as for its DeiT) has no set_grad_checkpointing; the one of
    the model inside it is honoured by forward_intermediates (docs/nvit.md), with plain autograd's gradients."""
    import nvit.model

    torch.manual_seed(0)
    m = timm.create_model('nvit_b', features_only=True, **dict(SMALL, num_classes=0)).train()
    assert not hasattr(m, 'set_grad_checkpointing')
    x = torch.randn(2, 3, 64, 64)
    sum(f.square().sum() for f in m(x)).backward()
    reference = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    calls = []
    real = nvit.model.checkpoint
    monkeypatch.setattr(nvit.model, 'checkpoint', lambda block, *a, **k: calls.append(block) or real(block, *a, **k))
    m.model.set_grad_checkpointing(True)
    sum(f.square().sum() for f in m(x)).backward()
    assert calls == list(m.model.blocks)
    for name, p in m.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], rtol=1e-5, atol=1e-6, msg=name)


def test_meta_device_and_dtype():
    m = timm.create_model('nvit_b', device='meta', **SMALL)
    assert all(p.device.type == 'meta' for p in m.parameters())
    m16 = timm.create_model('nvit_b', dtype=torch.bfloat16, **SMALL).eval()
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    assert m16(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_builds_under_a_meta_device_context():
    # timm's test_model_default_cfgs builds models inside `with torch.device('meta')`, where no tensor has data
    with torch.device('meta'):
        m = timm.create_model('revit_t', drop_path_rate=0.1)
    assert all(p.device.type == 'meta' for p in m.parameters())
    rates = [getattr(blk.drop_path1, 'drop_prob', 0.0) for blk in m.blocks]  # rate 0: nn.Identity
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and len(rates) == 12


@pytest.mark.parametrize('feature_cls', ['fx', 'hook'])
def test_features_only_graph_and_hook_wrappers(feature_cls):
    """timm's other feature wrappers build from the factory as they do for timm's DeiT (found by an audit: the
    factory read .dims from the wrapper, an AttributeError) and return the chosen blocks' outputs (all tokens, as
    timm's DeiT's do), as hooks on a plain model of the same weights see them; the wrapper records the dims to
    rebuild it."""
    torch.manual_seed(0)
    features = timm.create_model('revit_t', features_only=True, feature_cls=feature_cls, out_indices=(2, 5),
                                 img_size=64).eval()
    torch.manual_seed(0)
    plain = timm.create_model('revit_t', img_size=64).eval()
    seen = []
    for block in (plain.blocks[2], plain.blocks[5]):
        block.register_forward_hook(lambda module, args, out: seen.append(out))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = features(x)
        plain(x)
    assert len(got) == 2 and all(torch.equal(g, e) for g, e in zip(got, seen))
    assert features._model_args['dims']['heads'] == list(plain.dims.heads)


@pytest.mark.parametrize('distilled', [True, False])
def test_cfg_classifier_names_the_models_heads(distilled):
    """timm's tools find the classifier through pretrained_cfg['classifier']; every name there is a module of the
    model (found by an audit: a model built with distilled=False named head_dist, which it does not have)."""
    m = timm.create_model('revit_t', distilled=distilled, img_size=64)
    names = m.pretrained_cfg['classifier']
    names = [names] if isinstance(names, str) else list(names)
    assert names == (['head', 'head_dist'] if distilled else ['head'])
    assert all(isinstance(m.get_submodule(n), nn.Linear) for n in names)


def test_cfg_marks_the_input_size_fixed():
    # as timm's DeiT cfgs: without dynamic_img_size the position embedding fixes the input size, and timm's tooling
    # (its test suite, benchmark scripts) reads this flag instead of trying a smaller size
    for name in ('revit_t', 'nvit_b.in1k'):
        assert timm.models.get_pretrained_cfg(name).fixed_input_size


def test_unknown_kwarg_is_type_error():
    with pytest.raises(TypeError, match='not_a_model_arg'):
        small(not_a_model_arg=1)


def test_missing_dims_error_says_how():
    with pytest.raises(ValueError, match=r"(?s)pretrained=True.*pretrained_cfg_overlay=dict\(file=.*dims="):
        timm.create_model('nvit_s')


def test_torchscript():
    m = small()
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        scripted = torch.jit.script(m)
        dyn = small(dynamic_img_size=True)
        scripted_dyn = torch.jit.script(dyn)
    assert torch.allclose(scripted(x), m(x), atol=1e-6)
    y = torch.randn(1, 3, 48, 80)
    assert torch.allclose(scripted_dyn(y), dyn(y), atol=1e-6)


@pytest.mark.parametrize('kwargs, sizes', [
    (dict(), [(64, 64)]),
    (dict(out_indices=(0, -1), distilled=False, token_mask=False), [(64, 64)]),
    (dict(img_size=70, dynamic_img_size=True, dynamic_img_pad=True), [(70, 70), (40, 56), (64, 16)]),
])
def test_features_only_torchscript_and_trace_match_eager(kwargs, sizes):
    """Before 2026-11-25 torch.jit.script of a features_only NViT failed (an f-string with !r in
    forward_intermediates, which TorchScript does not compile), as it does for timm's DeiT."""
    f = timm.create_model('nvit_b', features_only=True, **dict(SMALL, **kwargs)).eval()
    with torch.no_grad():
        for p in f.parameters():
            p.normal_(0, 0.2)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        scripted = torch.jit.script(f)
        traced = torch.jit.trace(f, torch.randn(1, 3, *sizes[0]))
    for size in sizes:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            eager, script_out = f(x), scripted(x)
        assert len(script_out) == len(eager) == len(f.feature_info.channels())
        for got, want in zip(script_out, eager):
            assert got.shape == want.shape == (2, 32, -(-size[0] // 16), -(-size[1] // 16))
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    x = torch.randn(2, 3, *sizes[0])
    with torch.no_grad():
        for got, want in zip(traced(x), f(x)):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_fx():
    from timm.models._features_fx import create_feature_extractor
    m = small()
    x = torch.randn(1, 3, 64, 64)
    fx = create_feature_extractor(m, return_nodes={'head': 'out'})
    assert fx(x)['out'].shape == (1, 10)
    traced = torch.fx.symbolic_trace(m)
    assert torch.equal(traced(x), m(x))


@pytest.mark.parametrize('name', ['nvit_b', 'revit_t'])
def test_fx_with_dynamic_img_size(name):
    """timm's FX feature extractor traces a dynamic-size model, as it does timm's DeiT (found by the known-gaps
    list: the token-scale resampling compared traced sizes in Python and tracing failed), and the traced graph
    runs at the built size and at others with the eager model's features; the token scales are randomised so a
    skipped resampling would show."""
    from timm.models._features_fx import create_feature_extractor
    torch.manual_seed(0)
    m = small(dynamic_img_size=True) if name == 'nvit_b' else timm.create_model(
        name, dynamic_img_size=True, img_size=64, num_classes=10).eval()
    with torch.no_grad():
        for blk in m.blocks:
            if blk.attn.token_mask is not None:
                blk.attn.token_mask.uniform_(0.5, 1.5)
    graph = create_feature_extractor(m, return_nodes={'norm': 'tokens'})
    for size in [(64, 64), (48, 80)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            assert torch.equal(graph(x)['tokens'], m.forward_features(x))


def test_torch_export_with_dynamic_height_and_width():
    """torch.export with dynamic H/W: the exported graph runs at other sizes than its example, as timm's ViT's does
    (found by an audit: a size-match shortcut for the token scales specialised the graph to the example's grid, so
    every other size failed a guard)."""
    from torch.export import Dim
    torch.manual_seed(0)
    m = small(dynamic_img_size=True)
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.token_mask.uniform_(0.5, 1.5)
    sizes = ({2: Dim('h', min=1, max=8) * 16, 3: Dim('w', min=1, max=8) * 16},)
    exported = torch.export.export(m, (torch.randn(1, 3, 64, 64),), dynamic_shapes=sizes).module()
    for size in [(64, 64), (48, 80), (112, 32)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), m(x), rtol=1e-5, atol=1e-6)


def test_token_scales_keep_autocast_dtype(monkeypatch):
    """Under autocast q/k/v reach the attention kernel in the autocast dtype (found by an audit: multiplying by the
    fp32 token scale promoted them back to fp32, so the fp16/bf16 kernels were never used), and the result stays near
    the fp32 one."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    m = small()
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.token_mask.uniform_(0.5, 1.5)
    dtypes, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        dtypes.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, 'scaled_dot_product_attention', spy)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = m(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            dtypes.clear()
            got = m(x)
    assert dtypes and set(dtypes) == {(torch.bfloat16,) * 3}, dtypes
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)


def test_from_vit_deit_tiny_and_errors():
    vit = timm.create_model('deit_tiny_distilled_patch16_224').eval()
    model = nvit.from_vit(vit)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), vit(x), atol=1e-5)
    assert model.dims == nvit.NViTDims.uniform(192, 12, 3, 64, 768)
    with pytest.raises(TypeError, match='VisionTransformer'):
        nvit.from_vit(nn.Linear(2, 2))
    with pytest.raises(ValueError, match='register tokens'):
        nvit.from_vit(timm.create_model('vit_small_patch16_224', reg_tokens=4, depth=1, embed_dim=64, num_heads=2))


def test_from_vit_keeps_tanh_gelu_and_every_dropout_rate():
    """Same outputs in eval, and in train mode the same random draws: the converted model trains like the ViT."""
    import functools
    vit = timm.create_model(
        'vit_tiny_patch16_224', depth=3, num_classes=5, act_layer=functools.partial(nn.GELU, approximate='tanh'),
        drop_rate=0.3, drop_path_rate=0.2, attn_drop_rate=0.1, proj_drop_rate=0.1, pos_drop_rate=0.1).double()
    model = nvit.from_vit(vit)
    assert model.training
    x = torch.randn(3, 3, 224, 224, dtype=torch.float64)
    torch.manual_seed(1)
    expected = vit(x)
    torch.manual_seed(1)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    vit.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize('pool', ['max', 'avgmax'])
def test_from_vit_converts_max_pooling_vits(pool):
    """NViT pools with 'max' / 'avgmax' like timm's ViT now; a ViT built with them (without fc_norm) converts."""
    vit = timm.create_model('vit_tiny_patch16_224', depth=2, num_classes=5, global_pool=pool, fc_norm=False).eval()
    model = nvit.from_vit(vit).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize('kwargs, named', [
    (dict(proj_bias=False), 'proj_bias=False'),
    (dict(scale_mlp_norm=True), 'scale_mlp_norm'),
    # found by an audit: converted without a word, outputs off by up to 7e-3
    (dict(global_pool='avg', pool_include_prefix=True), r'pool_include_prefix=True\), which'),
    # found by an audit: residual post-norm blocks converted without a word, outputs off by 0.18; the parallel blocks
    # raised AttributeError ('no attribute norm1'), a GLU MLP or differential attention torch's size-mismatch list
    (dict(block_fn=ResPostBlock), r'uses ResPostBlock blocks, which'),
    (dict(block_fn=ParallelScalingBlock), r'uses ParallelScalingBlock blocks, which'),
    (dict(block_fn=ParallelThingsBlock), r'uses ParallelThingsBlock blocks, which'),
    (dict(mlp_layer=GluMlp), r'uses GluMlp MLP, which'),
    (dict(attn_layer='diff'), r'uses DiffAttention attention, which'),
])
def test_from_vit_names_what_it_refuses(kwargs, named):
    vit = timm.create_model('vit_tiny_patch16_224', depth=1, **kwargs)
    with pytest.raises(ValueError, match=named):
        nvit.from_vit(vit)


@pytest.mark.slow
def test_from_vit_deit_base_distilled():
    vit = timm.create_model('deit_base_distilled_patch16_224').eval()
    model = nvit.from_vit(vit)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (model(x) - vit(x)).abs().max().item() <= 1e-5
        assert torch.allclose(model.forward_features(x), vit.forward_features(x), atol=1e-4)


def test_padded_head_dims_match_the_unpadded_attention():
    # DIMS has qk < v (block 0), qk > v (block 1) and qk == v (block 2); padding must be exact in every case
    m = small()
    for p in m.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = m(x)
        for blk in m.blocks:
            blk.attn.pad_head_dims = True
        padded = m(x)
        scripted = torch.jit.script(m)(x)
    torch.testing.assert_close(padded, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(scripted, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize('shape,match', [
    ((3, 64, 64), '4-D .*unsqueeze'),
    ((1, 1, 64, 64), '3-channel images .*in_chans=1'),
    ((1, 3, 48, 64), 'built for 64x64 images, got 48x64.*dynamic_img_size=True'),
    # not whole patches: img_size=(70, 40) alone would leave the partial patches out, so the advice pads them
    ((1, 3, 70, 40), r'built for 64x64 images, got 70x40\. .*img_size=\(70, 40\), dynamic_img_pad=True '
                     r'\(zero-pads them to 80x48\), or with dynamic_img_size=True, dynamic_img_pad=True to accept'),
])
def test_bad_input_is_a_clear_value_error(shape, match):
    with pytest.raises(ValueError, match=match):
        small()(torch.randn(shape))


def test_a_hand_replaced_patch_embedding_takes_its_own_channels():
    """As a timm ViT does: after ``patch_embed.proj = nn.Conv2d(4, ...)`` the model takes 4 channels (the check
    compared with the constructor's in_chans). The reference is the model built with in_chans=4 given the same
    state dict. A 5-D input is not told to unsqueeze(0) (that makes it 6-D)."""
    torch.manual_seed(0)
    m = small()
    m.patch_embed.proj = nn.Conv2d(4, m.patch_embed.proj.out_channels, 16, 16)
    ref = small(in_chans=4)
    ref.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match='takes 4-channel images'):
        m(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r'got 5-D with shape \[1, 1, 3, 64, 64\]\.$'):
        m(torch.randn(1, 1, 3, 64, 64))


def test_dynamic_size_needs_whole_patches_unless_padded():
    m = small(dynamic_img_size=True)
    assert m(torch.randn(1, 3, 16, 48)).shape == (1, 10)
    for h, w in ((8, 48), (40, 48)):
        with pytest.raises(ValueError, match=f'multiples of the 16-pixel patch, got {h}x{w}.*dynamic_img_pad=True'):
            m(torch.randn(1, 3, h, w))


def test_dynamic_img_pad_is_zero_padding_to_whole_patches():
    """timm ViT's dynamic_img_pad: the same as zero-padding right and bottom to a multiple of 16 by hand."""
    padded = small(dynamic_img_size=True, dynamic_img_pad=True)
    plain = small(dynamic_img_size=True)
    plain.load_state_dict(padded.state_dict())
    x = torch.randn(2, 3, 40, 7)
    by_hand = torch.nn.functional.pad(x, (0, 9, 0, 8))  # 40x7 -> 48x16
    with torch.no_grad():
        torch.testing.assert_close(padded(x), plain(by_hand), atol=0, rtol=0)
    # from_vit carries the flag over from timm's ViT
    vit = timm.create_model('vit_tiny_patch16_224', dynamic_img_size=True, dynamic_img_pad=True, depth=1)
    assert nvit.from_vit(vit).dynamic_img_pad


def test_dims_object_survives_save_for_hf(tmp_path):
    """dims= given as an NViTDims (as docs/nvit.md shows) is written to config.json and rebuilt from it."""
    dims = nvit.NViTDims.from_dict(DIMS)
    m = timm.create_model('nvit_b', dims=dims, img_size=64, num_classes=10).eval()
    timm.models.save_for_hf(m, str(tmp_path / 'hf'), safe_serialization=True)
    again = timm.create_model(f'local-dir:{tmp_path / "hf"}', pretrained=True).eval()
    assert again.dims == dims
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), m(x))


def test_non_square_checkpoint_resampled_from_its_recorded_size(tmp_path):
    """A 32x48 checkpoint loaded at 64x64 through local-dir: resampled from its own 2x3 grid, as timm's ViT does."""
    from timm.layers import resample_abs_pos_embed
    src = small(img_size=(32, 48))
    timm.models.save_for_hf(src, str(tmp_path / 'hf'), safe_serialization=True)
    model = timm.create_model(f'local-dir:{tmp_path / "hf"}', pretrained=True, img_size=64)
    expected = resample_abs_pos_embed(src.pos_embed.detach(), new_size=[4, 4], old_size=[2, 3], num_prefix_tokens=2)
    torch.testing.assert_close(model.pos_embed.detach(), expected, atol=0, rtol=0)
    mask = src.blocks[0].attn.token_mask.detach()  # [2 + 6, 1]: kept prefix entries, 2x3 grid resized like pos_embed
    expected_mask = resample_abs_pos_embed(mask[None], new_size=[4, 4], old_size=[2, 3], num_prefix_tokens=2)[0]
    torch.testing.assert_close(model.blocks[0].attn.token_mask.detach(), expected_mask, atol=0, rtol=0)
    # the bare weights file has no size record: a non-square token count is refused in words
    with pytest.raises(ValueError, match=r'6 patch tokens, which is not a square grid.*local-dir:'):
        timm.create_model('nvit_b', **dict(SMALL, dims=DIMS), pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'hf' / 'model.safetensors')))


def _plain_nvit_forward(m, x, scales):
    """Distilled NViT forward written with plain tensor ops from the state dict (explicit softmax over keys)."""
    sd = {k: v.detach() for k, v in m.state_dict().items()}
    eps = m.norm.eps
    t = torch.nn.functional.conv2d(x, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=16)
    t = t.flatten(2).transpose(1, 2)
    B = t.shape[0]
    t = torch.cat([sd['cls_token'].expand(B, -1, -1), sd['dist_token'].expand(B, -1, -1), t], 1) + sd['pos_embed']
    N, C = t.shape[1], t.shape[2]
    dims = m.dims
    for i in range(dims.depth):
        p = f'blocks.{i}.'
        heads, qk, v_w = dims.heads[i], dims.qk_dim[i], dims.v_dim[i]
        h = torch.nn.functional.layer_norm(t, (C,), sd[p + 'norm1.weight'], sd[p + 'norm1.bias'], eps)
        qkv = h @ sd[p + 'attn.qkv.weight'].T + sd[p + 'attn.qkv.bias']
        if p + 'attn.token_mask' in sd:
            qkv = qkv * sd[p + 'attn.token_mask']
        q = qkv[..., :heads * qk].reshape(B, N, heads, qk).permute(0, 2, 1, 3)
        k = qkv[..., heads * qk:2 * heads * qk].reshape(B, N, heads, qk).permute(0, 2, 1, 3)
        v = qkv[..., 2 * heads * qk:].reshape(B, N, heads, v_w).permute(0, 2, 1, 3)
        logits = torch.einsum('bhqd,bhkd->bhqk', q, k) * scales[i]
        weights = logits.exp() / logits.exp().sum(-1, keepdim=True)  # normalised over the keys
        a = torch.einsum('bhqk,bhkd->bhqd', weights, v).permute(0, 2, 1, 3).reshape(B, N, heads * v_w)
        t = t + a @ sd[p + 'attn.proj.weight'].T + sd[p + 'attn.proj.bias']
        h = torch.nn.functional.layer_norm(t, (C,), sd[p + 'norm2.weight'], sd[p + 'norm2.bias'], eps)
        h = torch.nn.functional.gelu(h @ sd[p + 'mlp.fc1.weight'].T + sd[p + 'mlp.fc1.bias'])
        t = t + h @ sd[p + 'mlp.fc2.weight'].T + sd[p + 'mlp.fc2.bias']
    t = torch.nn.functional.layer_norm(t, (C,), sd['norm.weight'], sd['norm.bias'], eps)
    cls = t[:, 0] @ sd['head.weight'].T + sd['head.bias']
    dist = t[:, 1] @ sd['head_dist.weight'].T + sd['head_dist.bias']
    return (cls + dist) / 2


def test_unfused_attention_matches_fused_with_uneven_block_dims():
    """The explicit-softmax path (fused_attn=False) must give the fused path's output, block dims all different."""
    torch.manual_seed(0)
    dims = nvit.NViTDims(32, (2, 1), (8, 16), (16, 8), (64, 48))
    m = timm.create_model('nvit_b', dims=dims, img_size=64, num_classes=7).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.2)  # far from uniform attention, so that a wrong softmax axis shows
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.fused_attn = True
        fused = m(x)
        for blk in m.blocks:
            blk.attn.fused_attn = False
        unfused = m(x)
        reference = _plain_nvit_forward(m, x, [64 ** -0.5] * 2)
    torch.testing.assert_close(unfused, fused, atol=1e-5, rtol=0)
    torch.testing.assert_close(unfused, reference, atol=1e-4, rtol=1e-4)


def test_torch_onnx_export_runs_in_onnxruntime_with_the_plain_forward(tmp_path):
    """torch.onnx.export (its TorchScript exporter, the one that needs no onnxscript) exports the model as it does
    timm's DeiT, and ONNX Runtime gives the plain-tensor forward's output at another batch size (found by an audit:
    the exporter passes forward's default ``is_causal=False`` as a tensor, which reached
    scaled_dot_product_attention and failed; vitzoo's exporter hid it by retrying unfused)."""
    ort = pytest.importorskip('onnxruntime')
    torch.manual_seed(0)
    m = small()
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.token_mask.uniform_(0.5, 1.5)
    path = str(tmp_path / 'm.onnx')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(m, (torch.randn(1, 3, 64, 64),), path, dynamo=False, input_names=['x'],
                          dynamic_axes={'x': {0: 'batch'}})
    x = torch.randn(3, 3, 64, 64)
    out = ort.InferenceSession(path, providers=['CPUExecutionProvider']).run(None, {'x': x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), _plain_nvit_forward(m, x, [64 ** -0.5] * 3),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('mask', ['bool', 'float', 'causal'])
def test_attention_masks_and_output_dict_match_timms_deit(fused, mask):
    """timm's ViT takes attn_mask / is_causal in forward, forward_features and forward_intermediates, and
    output_dict=True in forward_intermediates; NViT refused them (TypeError) before 2026-11-25, found by an audit.
    Against timm's distilled DeiT, converted by from_vit, on both attention paths."""
    torch.manual_seed(0)
    vit = timm.create_model('deit_tiny_distilled_patch16_224', img_size=64, depth=2).eval()
    model = nvit.from_vit(vit).eval()
    for blk in [*vit.blocks, *model.blocks]:
        blk.attn.fused_attn = fused
    tokens = 2 + 16
    if mask == 'causal':
        kwargs = dict(is_causal=True)
    elif mask == 'bool':  # True: may attend; each token may attend to itself, so no row is all masked
        kwargs = dict(attn_mask=(torch.rand(2, 1, tokens, tokens) > 0.5) | torch.eye(tokens, dtype=torch.bool))
    else:
        kwargs = dict(attn_mask=torch.randn(2, 1, tokens, tokens))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(model(x, **kwargs), model(x), atol=1e-3)  # the mask changes the output
        torch.testing.assert_close(model(x, **kwargs), vit(x, **kwargs), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.forward_features(x, **kwargs), vit.forward_features(x, **kwargs),
                                   atol=1e-5, rtol=0)
        ours = model.forward_intermediates(x, indices=2, return_prefix_tokens=True, output_dict=True, **kwargs)
        theirs = vit.forward_intermediates(x, indices=2, return_prefix_tokens=True, output_dict=True, **kwargs)
        assert ours.keys() == theirs.keys() == {'image_intermediates', 'image_intermediates_prefix', 'image_features'}
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        only = model.forward_intermediates(x, indices=1, output_dict=True, intermediates_only=True, **kwargs)
        assert only.keys() == {'image_intermediates'}
        torch.testing.assert_close(only['image_intermediates'], theirs['image_intermediates'][-1:], atol=1e-5, rtol=0)
        if 'attn_mask' in kwargs:  # timm's get_intermediate_layers takes attn_mask too (an audit found it refused)
            torch.testing.assert_close(model.get_intermediate_layers(x, 2, norm=True, **kwargs),
                                       vit.get_intermediate_layers(x, 2, norm=True, **kwargs), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match='give attn_mask or is_causal=True, not both'):
        model(x, attn_mask=torch.zeros(tokens, tokens), is_causal=True)


def test_attn_scale_none_is_per_head_qk_width():
    """attn_scale=None: block i scales logits by qk_dim[i] ** -0.5, qk_dim being the per-head q/k width."""
    torch.manual_seed(0)
    # per-head q/k widths 4 and 16 (totals 8 and 16), v widths 16 and 4: scales 1/2 and 1/4 by hand
    dims = nvit.NViTDims(32, (2, 1), (4, 16), (16, 4), (64, 48))
    # built directly: timm.create_model drops None-valued kwargs, so attn_scale=None would become the default
    m = nvit.NViT(dims, img_size=64, num_classes=7, attn_scale=None).double().eval()
    for p in m.parameters():
        p.data.normal_(0, 0.2)
    assert [blk.attn.scale for blk in m.blocks] == [0.5, 0.25]
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        out = m(x)
        expected = _plain_nvit_forward(m, x, [0.5, 0.25])
        wrong = _plain_nvit_forward(m, x, [0.25, 0.5])  # the v widths' scales
    assert (wrong - expected).abs().max() > 1e-4  # far above the tolerance below: the test tells them apart
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)


def test_attn_scale_per_block_through_timm():
    """timm.create_model drops keyword arguments set to None, so attn_scale=None could not reach the model through
    the factory; 'per_block' can, and means the same."""
    dims = nvit.NViTDims(32, (2, 1), (4, 16), (16, 4), (64, 48))
    m = timm.create_model('nvit_b', dims=dims, img_size=64, attn_scale='per_block')
    assert [blk.attn.scale for blk in m.blocks] == [0.5, 0.25]  # 4 ** -0.5, 16 ** -0.5
    assert [blk.attn.scale for blk in timm.create_model('nvit_b', dims=dims, img_size=64).blocks] == [0.125] * 2
    with pytest.raises(ValueError, match="attn_scale must be a number or 'per_block'"):
        timm.create_model('nvit_b', dims=dims, img_size=64, attn_scale='qk')


def test_non_square_state_dict_without_size_record_loads_at_its_own_size():
    """A 10x12-grid state dict (120 tokens: no square grid) with no config loads unchanged into a 160x192 model.

    num_classes=10 in the cfg overlay too, else timm drops the 10-class heads as a classifier-size change."""
    torch.manual_seed(0)
    src = small(img_size=(160, 192))
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    model = timm.create_model('nvit_b', **dict(SMALL, img_size=(160, 192)), pretrained=True,
                              pretrained_cfg_overlay=dict(state_dict=sd, num_classes=10)).eval()
    torch.testing.assert_close(model.pos_embed.detach(), src.pos_embed.detach(), atol=0, rtol=0)
    x = torch.randn(2, 3, 160, 192)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), atol=0, rtol=0)


def test_from_vit_uses_the_vits_head_dim_for_the_scale():
    """head_dim 32 (96 wide, 3 heads): the converted model must scale by 32 ** -0.5, as the ViT does."""
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224', embed_dim=96, num_heads=3, depth=2, num_classes=5).eval()
    assert vit.blocks[0].attn.head_dim == 32
    for blk in vit.blocks:
        blk.attn.qkv.weight.data.normal_(0, 0.1)  # attention logits of order one, so that the scale matters
    model = nvit.from_vit(vit)
    assert [blk.attn.scale for blk in model.blocks] == [32 ** -0.5] * 2
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit(x), atol=1e-5, rtol=0)


def test_from_vit_takes_each_blocks_own_widths():
    """Found by an audit: every block got block 0's heads, head width and MLP width, so a ViT whose block 1 has 6
    heads of 32 (same tensor shapes) converted without a word, off by 0.13, and one with other widths failed with
    torch's size-mismatch list. The reference is the ViT's own output."""
    from timm.layers import Attention, Mlp

    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224', img_size=64, depth=3, num_classes=5).eval()
    vit.blocks[1].attn = Attention(192, 6, qkv_bias=True)  # heads of 32
    vit.blocks[2].attn = Attention(192, 2, attn_head_dim=64, qkv_bias=True)  # 128 wide, not 192
    vit.blocks[2].mlp = Mlp(192, 384)
    for blk in vit.blocks:
        blk.attn.qkv.weight.data.normal_(0, 0.1)  # attention logits of order one, so that the scale matters
    model = nvit.from_vit(vit).eval()
    assert model.dims.heads == (3, 6, 2) and model.dims.qk_dim == model.dims.v_dim == (64, 32, 64)
    assert model.dims.mlp_dim == (768, 768, 384)
    assert [blk.attn.scale for blk in model.blocks] == [64 ** -0.5, 32 ** -0.5, 64 ** -0.5]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize('fused', [True, False])
def test_from_vit_takes_the_scale_each_attention_path_applies(fused):
    """Found by a review: timm's fused attention path calls F.scaled_dot_product_attention without attn.scale (so
    head_dim ** -0.5 applies whatever attn.scale says), its explicit path multiplies by attn.scale; from_vit took
    attn.scale for both, so a ViT with another attn.scale on the fused path converted off by 0.09. The reference is
    the ViT's own output."""
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224', img_size=64, depth=2, num_classes=5).eval()
    for blk in vit.blocks:
        blk.attn.fused_attn = fused
        blk.attn.scale = 0.1
        blk.attn.qkv.weight.data.normal_(0, 0.1)  # attention logits of order one, so that the scale matters
    model = nvit.from_vit(vit).eval()
    assert [blk.attn.scale for blk in model.blocks] == [64 ** -0.5 if fused else 0.1] * 2
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit(x), atol=1e-5, rtol=0)


def test_from_vit_refuses_what_any_block_has():
    """Found by an audit: the feature checks read block 0 only (layer scale in block 2 converted without it), a
    hybrid ViT raised AttributeError ('HybridEmbed' object has no attribute 'norm'), and gated attention got the
    generic "weights do not map one-to-one"."""
    from timm.layers import Attention, LayerScale

    def vit_with(change):
        vit = timm.create_model('vit_tiny_patch16_224', img_size=64, depth=3)
        change(vit.blocks)
        return vit

    def scale_of_block_1(blocks):  # on timm's explicit path, which applies attn.scale
        blocks[1].attn.fused_attn = False
        blocks[1].attn.scale = 0.3

    cases = [
        (vit_with(lambda blocks: setattr(blocks[2], 'ls1', LayerScale(192))), r'uses layer scale, which'),
        (vit_with(lambda blocks: setattr(blocks[1], 'attn', Attention(192, 3, qkv_bias=True, gated=True))),
         r'uses gated attention \(gated=True\), which'),
        (vit_with(lambda blocks: setattr(blocks[1], 'attn', Attention(192, 3))),
         r'uses q/k/v bias in some blocks only'),
        (vit_with(scale_of_block_1), r'uses attention scales other than head_dim \*\* -0.5 that differ between blocks'),
        (timm.create_model('vit_tiny_r_s16_p8_224'), r'uses HybridEmbed patch embedding, which'),
    ]
    for vit, named in cases:
        with pytest.raises(ValueError, match=named):
            nvit.from_vit(vit)


def test_from_vit_keeps_the_vits_train_or_eval_mode():
    vit = timm.create_model('vit_tiny_patch16_224', depth=2, num_classes=5)
    model = nvit.from_vit(vit.eval())
    assert model.training is False
    assert not any(m.training for m in model.modules())
    model = nvit.from_vit(vit.train())
    assert model.training is True
    assert all(m.training for m in model.modules())


def test_from_vit_keeps_the_layernorm_eps():
    """A ViT with LayerNorm eps 1e-5 (timm's default is 1e-6) and near-constant norm inputs, where the eps matters."""
    import functools
    torch.manual_seed(0)
    vit = timm.create_model(
        'vit_tiny_patch16_224', embed_dim=64, num_heads=2, depth=2, num_classes=5,
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-5)).double().eval()
    assert vit.blocks[0].norm1.eps == 1e-5
    with torch.no_grad():
        # tokens of standard deviation about 1e-3: variance 1e-6, so eps 1e-5 vs 1e-6 changes every norm's output
        vit.patch_embed.proj.weight.mul_(1e-3)
        vit.patch_embed.proj.bias.zero_()
        vit.cls_token.normal_(0, 1e-3)
        vit.pos_embed.normal_(0, 1e-3)
        for blk in vit.blocks:
            for layer in (blk.attn.proj, blk.mlp.fc2):
                layer.weight.mul_(1e-3)
                layer.bias.zero_()
        for norm in [vit.norm] + [n for blk in vit.blocks for n in (blk.norm1, blk.norm2)]:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.1)
    model = nvit.from_vit(vit)
    assert [m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)] == [1e-5] * 5
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        expected = vit(x)
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)
        for m in model.modules():  # the check above can tell the eps apart: 1e-6 moves the logits well past 1e-6
            if isinstance(m, nn.LayerNorm):
                m.eps = 1e-6
        assert (model(x) - expected).abs().max().item() > 1e-3


@pytest.mark.parametrize('where', ['blocks.1.norm2', 'norm'])
def test_from_vit_refuses_layernorms_of_different_eps_by_name(where):
    """NViT builds all its LayerNorms with one eps; a hand-built ViT with one other norm was converted with the eps
    of blocks[0].norm1 everywhere, silently (before 2026-11-25)."""
    vit = timm.create_model('vit_tiny_patch16_224', embed_dim=64, num_heads=2, depth=2, num_classes=5)
    vit.get_submodule(where).eps = 1e-5
    with pytest.raises(ValueError, match=rf'LayerNorms of different eps \(eps 1e-06: 4 norms \(blocks.0.norm1, '
                                         rf'\.\.\.\); eps 1e-05: {where}\), which NViT does not support'):
        nvit.from_vit(vit)


def test_from_vit_keeps_distilled_training():
    """A distilled DeiT in distilled-training mode returns (class logits, distillation logits) in train mode."""
    torch.manual_seed(0)
    vit = timm.create_model('deit_tiny_distilled_patch16_224', depth=1, num_classes=5)
    vit.set_distilled_training(True)
    x = torch.randn(2, 3, 224, 224)
    model = nvit.from_vit(vit)
    assert model.training and model.distilled_training is True
    with torch.no_grad():
        expected = vit(x)
        out = model(x)
    assert isinstance(expected, tuple) and isinstance(out, tuple) and len(out) == 2
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    vit.set_distilled_training(False)
    model = nvit.from_vit(vit)
    assert model.distilled_training is False
    with torch.no_grad():
        assert isinstance(vit(x), torch.Tensor) and isinstance(model(x), torch.Tensor)


def test_init_weights_after_to_empty_leaves_nothing_uninitialised():
    """timm's test_model_init_weights_after_to_empty procedure (found failing by an audit): the patch embedding,
    every LayerNorm and the token scales stayed NaN, and the output was not finite."""
    m = timm.create_model('revit_t', device='meta', num_classes=5).to_empty(device='cpu')
    for t in list(m.parameters()) + list(m.buffers()):
        t.data.fill_(float('nan'))
    m.init_weights()
    for name, t in list(m.named_parameters()) + list(m.named_buffers()):
        assert torch.isfinite(t).all(), name
    for block in m.blocks:
        assert torch.equal(block.norm1.weight, torch.ones_like(block.norm1.weight))
        scales = block.attn.token_mask
        assert scales is None or torch.equal(scales, torch.ones_like(scales))
    assert torch.isfinite(m.eval()(torch.randn(1, 3, 224, 224))).all()
    with pytest.raises(ValueError, match="mode 'jax' is not implemented"):
        m.init_weights(mode='jax')


def test_unsupported_pool_is_an_assertion_error_as_in_timm_and_a_value_error():
    """timm's ViT asserts on a global_pool it does not know; ours is both an AssertionError and a ValueError."""
    for exc in (AssertionError, ValueError):
        with pytest.raises(exc, match="global_pool must be 'token', 'avg', 'max', 'avgmax' or '' .*got 'map'"):
            timm.create_model('revit_t', global_pool='map')
        with pytest.raises(exc, match="got 'catavgmax'.$") as info:
            timm.create_model('revit_t').reset_classifier(3, 'catavgmax')
        assert 'attention pools' not in str(info.value)  # named only for 'map' / 'prr', which are timm's
    with pytest.raises(AssertionError):
        timm.create_model('deit_tiny_patch16_224', global_pool='nope')


UNPOOLED_HEAD = r"distilled NViT's classifier heads \(5 classes\) need pooled features.*global_pool=''.*num_classes=0"


@torch.no_grad()
def test_distilled_heads_without_pooling_are_an_error_as_in_deit():
    """Found by an audit: a distilled model with global_pool='' and classes averaged the two heads' logits of every
    token (cls and dist included), e.g. (1, 198, 10) for revit_t. timm's distilled DeiT asserts there; ours is an
    UnsupportedPoolError (a ValueError and an AssertionError), at construction and in reset_classifier, and the
    model is left as it was."""
    with pytest.raises(AssertionError, match='distilled head reads the class and distillation tokens'):
        timm.create_model('deit_tiny_distilled_patch16_224', depth=1, global_pool='', num_classes=5)
    for exc in (ValueError, AssertionError):
        with pytest.raises(exc, match=UNPOOLED_HEAD):
            small(global_pool='', num_classes=5)
        with pytest.raises(exc, match=UNPOOLED_HEAD):
            small().reset_classifier(5, '')
    with pytest.raises(nvit.model.UnsupportedPoolError, match=r"\(10 classes\).*pool type \('token'"):
        timm.create_model('revit_t', global_pool='', num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    m = small()
    logits = m(x)
    with pytest.raises(ValueError, match=UNPOOLED_HEAD):
        m.reset_classifier(5, '')
    assert m.num_classes == 10 and m.global_pool == 'token'
    torch.testing.assert_close(m(x), logits, rtol=0, atol=0)
    # the pooling removed (reset_classifier(0, ''), prune_intermediate_layers): classes need a pool along with them
    for remove in (lambda: m.reset_classifier(0, ''), lambda: m.prune_intermediate_layers(2)):
        remove()
        with pytest.raises(ValueError, match=UNPOOLED_HEAD):
            m.reset_classifier(5)
        assert m.num_classes == 0 and m.global_pool == ''
        assert [type(h) for h in m.get_classifier()] == [nn.Identity, nn.Identity]
        m.reset_classifier(5, 'token')
        assert m(x).shape == (1, 5)
    assert small(global_pool='', num_classes=0)(x).shape == (1, 2 + 16, 32)  # unpooled tokens: allowed


@torch.no_grad()
def test_non_distilled_heads_without_pooling_classify_every_token_as_timm_vit():
    """Not distilled, global_pool='' with classes stays timm ViT's per-token head: same outputs as the timm ViT."""
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224', depth=2, img_size=64, num_classes=5, global_pool='').eval()
    model = nvit.from_vit(vit).eval()
    assert model.global_pool == '' and model.dist_token is None
    x = torch.randn(2, 3, 64, 64)
    assert vit(x).shape == (2, 1 + 16, 5)
    torch.testing.assert_close(model(x), vit(x), rtol=0, atol=1e-5)
    assert small(distilled=False, global_pool='', num_classes=5)(x).shape == (2, 1 + 16, 5)
    vit.reset_classifier(7)
    model.reset_classifier(7)
    model.head.load_state_dict(vit.head.state_dict())
    torch.testing.assert_close(model(x), vit(x), rtol=0, atol=1e-5)


@torch.no_grad()
def test_distilled_reset_classifier_zero_unpooled_returns_tokens_unlike_deit():
    """reset_classifier(0, '') (and prune_intermediate_layers) on a distilled model: ours returns the unpooled tokens,
    as timm's ViT does; timm's distilled DeiT ignores the '' and still returns the mean of its cls and dist tokens
    (documented in docs/nvit.md)."""
    deit, model = _vit_pair()
    x = torch.randn(2, 3, 64, 64)
    deit.reset_classifier(0, '')
    model.reset_classifier(0, '')
    tokens = deit.forward_features(x)
    assert tokens.shape == (2, 2 + 16, 192)
    torch.testing.assert_close(model(x), tokens, rtol=0, atol=1e-5)
    torch.testing.assert_close(deit(x), tokens[:, :2].mean(1), rtol=0, atol=1e-6)
    deit.prune_intermediate_layers(4)
    model.prune_intermediate_layers(4)
    torch.testing.assert_close(model(x), deit.forward_features(x), rtol=0, atol=1e-5)


def _vit_pair(**kw):
    torch.manual_seed(0)
    vit = timm.create_model('deit_tiny_distilled_patch16_224', depth=4, img_size=64, num_classes=5, **kw).eval()
    return vit, nvit.from_vit(vit).eval()


def _assert_same(a, b):
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for u, v in zip(a, b):
            _assert_same(u, v)
    else:
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize('kwargs', [
    dict(n=2), dict(n=[0, 3]), dict(n=(0, -1), reshape=True), dict(n=2, norm=True),
    dict(n=[1, 3], reshape=True, norm=True, return_prefix_tokens=True), dict(return_prefix_tokens=True)])
def test_get_intermediate_layers_matches_timm_vit(kwargs):
    vit, model = _vit_pair()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, out = vit.get_intermediate_layers(x, **kwargs), model.get_intermediate_layers(x, **kwargs)
    _assert_same(ref, out)
    if kwargs.get('return_prefix_tokens'):
        assert out[0][1].shape == (2, 2, 192)  # class and distillation tokens
    if kwargs.get('reshape'):
        assert out[0][0].shape[-2:] == (4, 4) if kwargs.get('return_prefix_tokens') else out[0].shape[-2:] == (4, 4)


def test_set_input_size_matches_timm_vit():
    vit, model = _vit_pair()
    vit.set_input_size(img_size=(48, 80))
    model.set_input_size(img_size=(48, 80))
    assert model.patch_embed.grid_size == (3, 5) and model.pos_embed.shape == (1, 2 + 15, 192)
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        assert torch.allclose(model(x), vit(x), atol=1e-5)
    with pytest.raises(ValueError, match='48x80'):
        model(torch.randn(1, 3, 64, 64))
    assert model._model_args['img_size'] == (48, 80)


def test_set_input_size_resamples_token_scales_like_dynamic_size():
    torch.manual_seed(0)
    model = timm.create_model('revit_t').eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.token_mask.uniform_(0.5, 1.5)
    dynamic = timm.create_model('revit_t', dynamic_img_size=True).eval()
    dynamic.load_state_dict(model.state_dict())
    model.set_input_size(img_size=(160, 192))
    assert model.blocks[0].attn.token_mask.shape == (2 + 10 * 12, 1)
    assert isinstance(model.blocks[0].attn.token_mask, nn.Parameter)
    x = torch.randn(1, 3, 160, 192)
    with torch.no_grad():
        assert torch.allclose(model(x), dynamic(x), atol=1e-5)


def test_set_input_size_patch_size():
    vit, model = _vit_pair()
    vit.set_input_size(patch_size=8)
    model.set_input_size(patch_size=8)
    assert model.feature_info[0]['reduction'] == 8
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), vit(x), atol=1e-5)
    with pytest.raises(NotImplementedError, match='square'):
        model.set_input_size(patch_size=(8, 16))


@pytest.mark.parametrize('pool', ['max', 'avgmax'])
def test_max_and_avgmax_pool_match_timm_vit(pool):
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224', depth=2, img_size=64, num_classes=5).eval()
    model = nvit.from_vit(vit).eval()
    vit.reset_classifier(5, pool)  # keeps timm's fc_norm off (Identity): the pooled tokens are compared as they are
    model.reset_classifier(5, pool)
    model.head.load_state_dict(vit.head.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.forward_head(model.forward_features(x), pre_logits=True),
                              vit.forward_head(vit.forward_features(x), pre_logits=True), atol=1e-5)
        assert torch.allclose(model(x), vit(x), atol=1e-5)


@pytest.mark.parametrize('pool', ['max', 'avgmax'])
def test_max_pools_exclude_the_prefix_tokens_and_feed_both_heads(pool):
    m = small(global_pool=pool, fc_norm=False)  # the pooled tokens as they are (fc_norm: test_nvit_fc_norm.py)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = m.forward_features(x)
        feats[:, :2] = 1e4  # prefix tokens larger than any patch token: they must not reach the max
        patches = feats[:, 2:]
        pooled = patches.amax(1) if pool == 'max' else (patches.amax(1) + patches.mean(1)) / 2
        assert torch.allclose(m.forward_head(feats, pre_logits=True), pooled, atol=1e-6)
        assert torch.allclose(m.forward_head(feats), (m.head(pooled) + m.head_dist(pooled)) / 2, atol=1e-5)
    assert timm.create_model('nvit_b', **dict(SMALL, global_pool=pool)).global_pool == pool


def test_from_vit_keeps_the_vits_preprocessing_and_saves_for_hf(tmp_path):
    """Found by an audit: from_vit gave the NViT no pretrained_cfg, so timm's data config fell back to ImageNet's
    mean/std (an augreg ViT uses 0.5/0.5, crop 0.9) and save_for_hf raised AttributeError. The NViT now has the ViT's
    preprocessing and an NViT architecture name, and a save_for_hf folder rebuilds it through local-dir:."""
    from timm.data import resolve_model_data_config
    from timm.models import save_for_hf

    vit = timm.create_model('vit_tiny_patch16_224.augreg_in21k_ft_in1k', img_size=32, depth=2, num_classes=4,
                            act_layer='gelu').eval()
    model = nvit.from_vit(vit)
    config = resolve_model_data_config(model)
    assert config == resolve_model_data_config(vit)
    assert config['mean'] == (0.5, 0.5, 0.5) and config['crop_pct'] == 0.9  # the augreg cfg, not ImageNet's
    assert model.pretrained_cfg['architecture'] == 'nvit_b' and 'hf_hub_id' not in model.pretrained_cfg
    save_for_hf(model, tmp_path / 'm')
    loaded = timm.create_model(f'local-dir:{tmp_path / "m"}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), vit(x))
    assert loaded.dims == model.dims and resolve_model_data_config(loaded)['mean'] == [0.5, 0.5, 0.5]


@pytest.mark.parametrize('name, approximate', [('gelu', 'none'), ('gelu_tanh', 'tanh')])
def test_act_layer_by_timm_name(name, approximate):
    """Found by an audit: act_layer='gelu' (a timm activation name, as timm's ViT takes) was "'str' object is not
    callable", and from_vit refused timm's own GELU layers as "non-GELU"."""
    import functools
    named = small(act_layer=name)
    by_class = small(act_layer=functools.partial(nn.GELU, approximate=approximate))
    by_class.load_state_dict(named.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(named(x), by_class(x))
        vit = timm.create_model('vit_tiny_patch16_224', img_size=32, depth=2, act_layer=name).eval()
        assert torch.equal(nvit.from_vit(vit)(x[..., :32, :32]), vit(x[..., :32, :32]))
    with pytest.raises(ValueError, match="act_layer='nope' is not a timm activation name"):
        small(act_layer='nope')


def test_from_vit_keeps_gradient_checkpointing():
    """Found by an audit: a ViT set to checkpoint its blocks converted into an NViT that did not (more memory in
    training than the user asked for)."""
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, depth=2)
    vit.set_grad_checkpointing(True)
    assert nvit.from_vit(vit).grad_checkpointing is True
    vit.set_grad_checkpointing(False)
    assert nvit.from_vit(vit).grad_checkpointing is False


# ---- dynamic_img_pad with an img_size that is not a multiple of the patch: 70 = 4 whole 16-pixel patches + 6 pixels,
# zero-padded to 80, a 5x5 grid. The reference is the plain-tensor forward on the image padded by hand.

def _randomised(m):
    """``m`` in float64 with every tensor far from its init (token scales around 1), so that a misplaced position
    embedding row or token scale shows."""
    m = m.double()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.empty_like(p).uniform_(0.5, 1.5) if name.endswith('token_mask') else p.normal_(0, 0.2))
    return m


def _pad_by_hand(x, multiple=16):
    h, w = x.shape[-2:]
    return torch.nn.functional.pad(x, (0, -w % multiple, 0, -h % multiple))


def _resize_grid(t, old, new, prefix=2):
    """A ``[1, prefix + H*W, C]`` position embedding (or token scale ``[prefix + H*W, 1]``) resized from grid ``old``
    to ``new`` with F.interpolate (bicubic, antialias), prefix entries kept."""
    squeeze = t.dim() == 2
    t = t[None] if squeeze else t
    grid = t[:, prefix:].reshape(1, old[0], old[1], -1).permute(0, 3, 1, 2).float()
    grid = torch.nn.functional.interpolate(grid, size=new, mode='bicubic', align_corners=False, antialias=True)
    out = torch.cat([t[:, :prefix], grid.to(t.dtype).permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1)], 1)
    return out[0] if squeeze else out


def _plain_forward_resized(m, x, old, new):
    """The plain forward of ``m`` with its position embedding and token scales resized by hand from ``old`` to
    ``new`` (what a dynamic-size model does at run time, or a loader for another grid)."""
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    sd['pos_embed'] = _resize_grid(sd['pos_embed'], old, new)
    for k in [k for k in sd if k.endswith('attn.token_mask')]:
        sd[k] = _resize_grid(sd[k], old, new)
    ref = small(img_size=[16 * n for n in new]).double()
    ref.load_state_dict(sd)
    return _plain_nvit_forward(ref, x, [64 ** -0.5] * 3)


@pytest.mark.parametrize('img_size, grid', [(70, (5, 5)), ((70, 40), (5, 3))])
@torch.no_grad()
def test_dynamic_img_pad_sizes_the_grid_for_the_padded_image(img_size, grid):
    """Before 2026-11-25 the grid counted whole patches only (4x4 for 70x70) and every forward failed with a raw
    shape error; now the position embedding and token scales are laid out for the padded grid."""
    m = _randomised(small(img_size=img_size, dynamic_img_pad=True))
    n = grid[0] * grid[1]
    assert m.patch_embed.grid_size == grid and m.patch_embed.num_patches == n
    assert m.pos_embed.shape == (1, 2 + n, 32) and m.blocks[0].attn.token_mask.shape == (2 + n, 1)
    size = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    reference = _plain_nvit_forward(m, _pad_by_hand(x), [64 ** -0.5] * 3)
    torch.testing.assert_close(m(x), reference, atol=1e-9, rtol=0)
    # the feature maps have the padded grid, token for token the padded image's
    final, maps = m.forward_intermediates(x, indices=[0, 2], norm=True)
    assert [f.shape for f in maps] == [(2, 32, *grid)] * 2
    static = small(img_size=[16 * g for g in grid]).double()  # the same weights, built for the padded size
    static.load_state_dict(m.state_dict())
    _, expected = static.forward_intermediates(_pad_by_hand(x), indices=[0, 2], norm=True)
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=0)
    assert [f['reduction'] for f in m.feature_info] == [16] * 3
    # TorchScript keeps it
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.testing.assert_close(torch.jit.script(m)(x), reference, atol=1e-9, rtol=0)


@torch.no_grad()
def test_dynamic_img_pad_with_dynamic_img_size_keeps_timms_whole_patch_grid():
    """With dynamic_img_size the position embedding keeps timm's whole-patch grid (4x4 for 70x70, timm ViT's state
    dict shapes) and is resampled to the padded grid of every input, as in timm's ViT."""
    m = _randomised(small(img_size=70, dynamic_img_size=True, dynamic_img_pad=True))
    assert m.patch_embed.grid_size == (4, 4)
    vit = timm.create_model('vit_tiny_patch16_224', img_size=70, dynamic_img_size=True, dynamic_img_pad=True, depth=1)
    assert m.pos_embed.shape[1] - m.num_prefix_tokens == vit.pos_embed.shape[1] - vit.num_prefix_tokens == 16
    for size, grid in (((70, 70), (5, 5)), ((40, 56), (3, 4))):  # padded to 80x80 / 48x64
        y = torch.randn(1, 3, *size, dtype=torch.float64)
        expected = _plain_forward_resized(m, _pad_by_hand(y), (4, 4), grid)
        torch.testing.assert_close(m(y), expected, atol=1e-6, rtol=0)
        (feat,) = m.forward_intermediates(y, indices=[2], intermediates_only=True)
        assert feat.shape == (1, 32, *grid)


def test_features_only_with_dynamic_img_pad_reports_the_padded_grid():
    kwargs = dict(SMALL, img_size=(70, 40), dynamic_img_pad=True)
    f = timm.create_model('nvit_b', features_only=True, out_indices=(0, 2), **kwargs)
    assert f.feature_info.reduction() == [16, 16] and f.feature_info.channels() == [32, 32]
    assert [t.shape for t in f(torch.randn(1, 3, 70, 40))] == [(1, 32, 5, 3)] * 2


def test_flops_of_a_padded_model_are_those_of_the_padded_size():
    from vitzoo.flops import count_flops
    padded = count_flops(small(img_size=70, dynamic_img_pad=True))
    assert padded.input_size == (3, 70, 70)
    assert padded.total == count_flops(small(img_size=80)).total  # the same 5x5 patches (the padding is free)


@torch.no_grad()
def test_dynamic_img_pad_loads_weights_of_another_grid(tmp_path):
    """A checkpoint trained at 64x64 (4x4 grid) loaded into a 70x70 padded model: resampled to the 5x5 grid, as
    loading at any other size is."""
    src = _randomised(small()).float()
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    m = timm.create_model('nvit_b', **dict(SMALL, img_size=70, dynamic_img_pad=True), pretrained=True,
                          pretrained_cfg_overlay=dict(state_dict=sd, num_classes=10)).eval()
    torch.testing.assert_close(m.pos_embed, _resize_grid(sd['pos_embed'], (4, 4), (5, 5)), atol=1e-6, rtol=0)
    torch.testing.assert_close(m.blocks[1].attn.token_mask, _resize_grid(sd['blocks.1.attn.token_mask'], (4, 4),
                                                                         (5, 5)), atol=1e-6, rtol=0)
    x = torch.randn(1, 3, 70, 70)
    expected = _plain_forward_resized(src.double(), _pad_by_hand(x).double(), (4, 4), (5, 5))
    torch.testing.assert_close(m(x).double(), expected, atol=1e-4, rtol=1e-4)
    # set_input_size takes a built model to such a size the same way
    built = small(dynamic_img_pad=True)
    built.load_state_dict(sd)
    built.set_input_size(img_size=70)
    assert built.patch_embed.grid_size == (5, 5)
    torch.testing.assert_close(built(x), m(x), atol=1e-6, rtol=0)


@torch.no_grad()
def test_padded_source_resampled_from_its_padded_grid_through_local_dir(tmp_path):
    """A 70x40 padded model (5x3 grid, 15 tokens) saved with save_for_hf: reloaded as it is, and at 40x70 (3x5, also
    15 tokens) resampled from its 5x3 grid, not taken for a 3x5 one."""
    src = _randomised(small(img_size=(70, 40), dynamic_img_pad=True)).float()
    timm.models.save_for_hf(src, str(tmp_path / 'hf'), safe_serialization=True)
    again = timm.create_model(f'local-dir:{tmp_path / "hf"}', pretrained=True).eval()
    x = torch.randn(1, 3, 70, 40)
    torch.testing.assert_close(again(x), src(x), atol=0, rtol=0)
    turned = timm.create_model(f'local-dir:{tmp_path / "hf"}', pretrained=True, img_size=(40, 70)).eval()
    assert turned.patch_embed.grid_size == (3, 5)
    pos = src.pos_embed.detach()
    torch.testing.assert_close(turned.pos_embed, _resize_grid(pos, (5, 3), (3, 5)), atol=1e-6, rtol=0)
    mask = src.blocks[2].attn.token_mask.detach()
    torch.testing.assert_close(turned.blocks[2].attn.token_mask, _resize_grid(mask, (5, 3), (3, 5)), atol=1e-6, rtol=0)


@torch.no_grad()
def test_from_vit_with_dynamic_img_pad_at_a_size_not_a_multiple_of_the_patch():
    # with dynamic_img_size, the ViT resamples its whole-patch (4x4) position embedding at run time: so does the
    # NViT, built for those whole patches, at every size
    torch.manual_seed(0)
    vit = timm.create_model('deit_tiny_distilled_patch16_224', depth=2, img_size=70, num_classes=5,
                            dynamic_img_size=True, dynamic_img_pad=True).eval()
    model = nvit.from_vit(vit).eval()
    assert model.patch_embed.grid_size == (4, 4) and model.dynamic_img_pad
    for size in ((70, 70), (64, 64), (40, 56)):
        x = torch.randn(1, 3, *size)
        torch.testing.assert_close(model(x), vit(x), atol=1e-5, rtol=0)
    # fixed-size, timm's ViT fails on every input (its 4x4 position embedding, a 5x5 padded grid); the NViT has the
    # embedding resampled to 5x5, as a checkpoint loaded at that size: timm's ViT built for 80x80 with that embedding
    fixed = timm.create_model('deit_tiny_distilled_patch16_224', depth=2, img_size=70, num_classes=5,
                              dynamic_img_pad=True).eval()
    model = nvit.from_vit(fixed).eval()
    assert model.patch_embed.grid_size == (5, 5)
    reference = timm.create_model('deit_tiny_distilled_patch16_224', depth=2, img_size=80, num_classes=5).eval()
    sd = fixed.state_dict()
    sd['pos_embed'] = _resize_grid(sd['pos_embed'], (4, 4), (5, 5))
    reference.load_state_dict(sd)
    x = torch.randn(1, 3, 70, 70)
    torch.testing.assert_close(model(x), reference(_pad_by_hand(x)), atol=1e-5, rtol=0)


@pytest.mark.parametrize('in_chans', [48, 768])
def test_a_one_pixel_patch_model_reloads_its_own_folder(tmp_path, in_chans):
    """Found by an audit: the official 1x1 patch embedding's conversion ran on every checkpoint, so our own
    patch_size=1 model with 48 or 768 input channels (3 * p * p for p = 4 / 16) was refused on reload as taking 3
    channels. The reference is the saved model's own output."""
    torch.manual_seed(0)
    dims = dict(embed_dim=48, heads=[2, 3], qk_dim=[8, 16], v_dim=[16, 8], mlp_dim=[64, 32])
    model = timm.create_model('nvit_b', dims=dims, img_size=8, patch_size=1, in_chans=in_chans).eval()
    timm.models.save_for_hf(model, str(tmp_path / 'hf'), safe_serialization=True)
    reloaded = timm.create_model(f'local-dir:{tmp_path / "hf"}', pretrained=True).eval()
    x = torch.randn(2, in_chans, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), atol=0, rtol=0)


def test_patches_are_square_or_refused():
    """Found by an audit: patch_size=(16, 8) was built, and then an input of 224x200 (a multiple of 8 in width) was
    refused as not a multiple of the 16-pixel patch. (8, 8) is the int 8: a 200-pixel side passes."""
    with pytest.raises(ValueError, match=r'only square patches are supported, got patch_size=\(16, 8\)'):
        timm.create_model('revit_t', patch_size=(16, 8), dynamic_img_size=True)
    import numpy as np
    assert timm.create_model('revit_t', patch_size=np.int64(16)).patch_embed.patch_size == (16, 16)  # review
    model = timm.create_model('revit_t', patch_size=(8, 8), dynamic_img_size=True).eval()
    assert model.patch_embed.patch_size == (8, 8)
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 48, 40)).shape[1] == 2 + 6 * 5
