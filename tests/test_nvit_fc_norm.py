"""NViT's final norm after pooling (fc_norm), against timm's own VisionTransformer with the same weights."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models._input import get_model_args
from timm.models.vision_transformer import VisionTransformer

import nvit
from nvit.checkpoint import IncompatibleCheckpointError

UNIFORM = nvit.NViTDims.uniform(embed_dim=32, depth=3, heads=2, head_dim=16, mlp_dim=64)
NORM_KEYS = ('norm.weight', 'norm.bias', 'fc_norm.weight', 'fc_norm.bias')


def _norm_keys(model):
    return [k for k in model.state_dict() if k in NORM_KEYS]


def _pair(pool, **kw):
    """An NViT of uniform dims and timm's VisionTransformer of the same shape, with the NViT's weights loaded
    strictly into the ViT (so every key name is timm's); the norms get random affine weights."""
    torch.manual_seed(0)
    model = timm.create_model(
        'nvit_b', dims=UNIFORM, img_size=64, num_classes=5, global_pool=pool, distilled=False, token_mask=False,
        attn_scale=16 ** -0.5, **kw).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in NORM_KEYS:
                p.add_(torch.randn_like(p) * 0.5)
    vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2,
                            num_classes=5, global_pool=pool, **kw).eval()
    vit.load_state_dict(model.state_dict())  # strict
    return vit, model


@pytest.mark.parametrize('fc_norm', [None, True, False])
@pytest.mark.parametrize('pool', ['avg', 'max', 'avgmax', 'token', ''])
def test_norm_placement_keys_and_outputs_match_timm_vit(pool, fc_norm):
    """timm's rule: fc_norm=None puts the final norm after pooling for avg / max / avgmax, before it otherwise;
    the key names (norm.* or fc_norm.*) are timm's, so the ViT takes the NViT's state dict strictly. Before
    2026-11-25 NViT always had norm.* and normalised before pooling: the strict load failed for avg / max."""
    kw = {} if fc_norm is None else dict(fc_norm=fc_norm)
    vit, model = _pair(pool, **kw)
    after_pool = pool in ('avg', 'max', 'avgmax') if fc_norm is None else fc_norm
    assert _norm_keys(model) == _norm_keys(vit) == (
        ['fc_norm.weight', 'fc_norm.bias'] if after_pool else ['norm.weight', 'norm.bias'])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(feats, vit.forward_features(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True),
                                   vit.forward_head(feats, pre_logits=True), rtol=0, atol=1e-5)
        torch.testing.assert_close(model(x), vit(x), rtol=0, atol=1e-5)


@torch.no_grad()
def test_avg_pool_applies_fc_norm_to_the_mean_of_the_patch_tokens():
    """Independent of timm: with fc_norm the tokens come out un-normalised and the LayerNorm is applied to their
    mean (both heads of a distilled model get it)."""
    torch.manual_seed(0)
    model = timm.create_model('nvit_b', dims=UNIFORM, img_size=64, num_classes=5, global_pool='avg').eval()
    assert isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.LayerNorm)
    model.fc_norm.weight.normal_()
    model.fc_norm.bias.normal_()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    pooled = F.layer_norm(feats[:, 2:].mean(1), (32,), model.fc_norm.weight, model.fc_norm.bias, eps=1e-6)
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), pooled, rtol=0, atol=1e-5)
    torch.testing.assert_close(model(x), (model.head(pooled) + model.head_dist(pooled)) / 2, rtol=0, atol=1e-5)


def test_released_models_keep_their_final_norm_on_the_tokens():
    """Class-token pooling (every released model): norm.* as before, no fc_norm tensors."""
    keys = list(timm.create_model('revit_t').state_dict())
    assert 'norm.weight' in keys and not any(k.startswith('fc_norm') for k in keys)


@torch.no_grad()
def test_forward_intermediates_with_fc_norm_are_not_normalised_as_in_timm():
    """timm applies self.norm to the taps with norm=True; with fc_norm that is an Identity, so nothing is applied,
    and the final tokens returned are un-normalised too."""
    vit, model = _pair('avg')
    x = torch.randn(2, 3, 64, 64)
    for norm in (False, True):
        final, taps = model.forward_intermediates(x, indices=[0, 2], norm=norm, output_fmt='NLC')
        ref_final, ref_taps = vit.forward_intermediates(x, indices=[0, 2], norm=norm, output_fmt='NLC')
        torch.testing.assert_close(final, ref_final, rtol=0, atol=1e-5)
        for tap, ref in zip(taps, ref_taps):
            torch.testing.assert_close(tap, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=1e-6)


def test_prune_and_features_only_drop_fc_norm_as_timm_does():
    vit, model = _pair('avg')
    assert model.prune_intermediate_layers([1]) == vit.prune_intermediate_layers([1])
    assert _norm_keys(model) == _norm_keys(vit) == []
    feats = timm.create_model('nvit_b', dims=UNIFORM, img_size=64, global_pool='avg', features_only=True)
    assert not any('norm' in k and not k.startswith('model.blocks') for k in feats.state_dict())
    assert [f.shape for f in feats(torch.randn(1, 3, 64, 64))] == [(1, 32, 4, 4)] * 3


@pytest.mark.parametrize('pool, new_pool', [('avg', 'token'), ('token', 'max')])
def test_reset_classifier_keeps_the_norm_where_it_is_as_timm_does(pool, new_pool):
    """timm's ViT: a new global_pool does not move the final norm; the placement is recorded as fc_norm in the
    model args, so a model rebuilt from them (save_for_hf, local-dir:) has the same tensors."""
    vit, model = _pair(pool)
    vit.reset_classifier(5, new_pool)
    model.reset_classifier(5, new_pool)
    model.head.load_state_dict(vit.head.state_dict())
    assert _norm_keys(model) == _norm_keys(vit)
    assert model._model_args['fc_norm'] == vit._model_args['fc_norm'] == (pool == 'avg')
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit(x), rtol=0, atol=1e-5)
    rebuilt = timm.create_model('nvit_b', **get_model_args(model))  # what save_for_hf writes
    assert rebuilt.global_pool == new_pool and _norm_keys(rebuilt) == _norm_keys(model)


def test_fc_norm_must_be_a_bool():
    with pytest.raises(TypeError, match="fc_norm must be True, False or None.*got 'no'"):
        nvit.NViT(UNIFORM, img_size=64, fc_norm='no')


def test_checkpoint_with_its_norm_elsewhere_names_the_fc_norm_that_loads_it(tmp_path):
    """A released-style checkpoint (norm on the tokens) loaded for avg pooling, where timm's rule puts the norm after
    pooling, is refused with the fc_norm= to pass, not as an incomplete file; and the other way round."""
    tokens = timm.create_model('nvit_b', dims=UNIFORM, img_size=64)
    path = tmp_path / 'tokens.safetensors'
    save_file(tokens.state_dict(), str(path), metadata=nvit.dims_metadata(tokens))
    overlay = dict(file=str(path))
    with pytest.raises(IncompatibleCheckpointError, match=r'final norm on the tokens before pooling \(norm\), the '
                                                          r'model after pooling.*with fc_norm=False to load it'):
        timm.create_model('nvit_b', pretrained=True, global_pool='avg', pretrained_cfg_overlay=overlay)
    loaded = timm.create_model('nvit_b', pretrained=True, global_pool='avg', fc_norm=False,
                               pretrained_cfg_overlay=overlay)
    torch.testing.assert_close(loaded.norm.weight, tokens.norm.weight, rtol=0, atol=0)

    pooled = timm.create_model('nvit_b', dims=UNIFORM, img_size=64, global_pool='avg').eval()
    path = tmp_path / 'pooled.safetensors'
    save_file(pooled.state_dict(), str(path), metadata=nvit.dims_metadata(pooled))
    # the advice names the pooling first (found by an audit: "fc_norm=True" alone kept token pooling, whose outputs
    # differ from the avg-pooled model's)
    advice = (r"after pooling \(fc_norm.*the model on the tokens before pooling \(norm\)\. Create the model with "
              r"the pooling it was trained with: global_pool='avg' \(or 'max', 'avgmax'; ")
    with pytest.raises(IncompatibleCheckpointError, match=advice):
        timm.create_model('nvit_b', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    loaded = timm.create_model('nvit_b', pretrained=True, global_pool='avg', img_size=64,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pooled(x), rtol=0, atol=0)
    loaded = timm.create_model('nvit_b', pretrained=True, fc_norm=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert loaded.global_pool == 'token' and _norm_keys(loaded) == ['fc_norm.weight', 'fc_norm.bias']


@pytest.mark.parametrize('make', [
    lambda: timm.create_model('vit_tiny_patch16_224', depth=3, img_size=64, num_classes=5, global_pool='avg'),
    lambda: timm.create_model('vit_tiny_patch16_224', depth=3, img_size=64, num_classes=5, global_pool='max'),
    lambda: timm.create_model('deit_tiny_patch16_224', depth=3, img_size=64, num_classes=5, global_pool='avgmax'),
    lambda: timm.create_model('vit_tiny_patch16_224', depth=3, img_size=64, num_classes=5, fc_norm=True),
    lambda: VisionTransformer(img_size=64, embed_dim=48, depth=2, num_heads=3, num_classes=7, global_pool='avg'),
], ids=['avg', 'max', 'avgmax', 'token-fc_norm', 'VisionTransformer-avg'])
def test_from_vit_converts_vits_with_fc_norm(make):
    """Before 2026-11-25 from_vit refused a ViT with fc_norm (timm's default for avg / max pooling). Now the NViT
    has the ViT's tensors under the ViT's names (a timm checkpoint maps over strictly) and its outputs."""
    torch.manual_seed(0)
    vit = make().eval()
    with torch.no_grad():
        vit.fc_norm.weight.normal_()
        vit.fc_norm.bias.normal_()
    model = nvit.from_vit(vit).eval()
    assert isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.LayerNorm)
    assert list(model.state_dict()) == list(vit.state_dict())
    copy = make()
    copy.load_state_dict(model.state_dict())  # strict: timm's key names
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit(x), rtol=0, atol=1e-5)
        feats = vit.forward_features(x)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True),
                                   vit.forward_head(feats, pre_logits=True), rtol=0, atol=1e-5)
        final, taps = model.forward_intermediates(x, indices=[0, -1], norm=True)
        ref_final, ref_taps = vit.forward_intermediates(x, indices=[0, -1], norm=True)
        torch.testing.assert_close(final, ref_final, rtol=0, atol=1e-5)
        for tap, ref in zip(taps, ref_taps):
            torch.testing.assert_close(tap, ref, rtol=0, atol=1e-5)
    assert timm.create_model('nvit_b', **get_model_args(model)).fc_norm.weight.shape == vit.fc_norm.weight.shape


def test_from_vit_refuses_fc_norm_on_a_distilled_deit():
    """timm's distilled head never applies fc_norm (its outputs are of un-normalised tokens); NViT would apply it, so
    such a DeiT is refused by name rather than converted with other outputs (0.34 apart in this example)."""
    vit = timm.create_model('deit_tiny_distilled_patch16_224', depth=1, img_size=64, fc_norm=True)
    with pytest.raises(ValueError, match=r'fc_norm on a distilled DeiT \(which timm never applies\)'):
        nvit.from_vit(vit)
