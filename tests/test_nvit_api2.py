"""NViT classifier dropout in training mode, against hand-written references and timm's distilled DeiT."""
import pytest
import timm
import torch
import torch.nn.functional as F

import nvit

DIMS = nvit.NViTDims(embed_dim=32, heads=[2, 1, 3], qk_dim=[8, 16, 8], v_dim=[16, 8, 16], mlp_dim=[48, 64, 40])
P = 0.5


def _distilled(pool):
    torch.manual_seed(0)
    return timm.create_model('nvit_b', dims=DIMS, img_size=64, num_classes=7, global_pool=pool, drop_rate=P,
                             distilled=True, token_mask=False).train()


@pytest.mark.parametrize('pool', ['avg', 'max', 'avgmax'])
def test_distilled_pooled_head_dropout_one_mask_per_head(pool):
    """A distilled NViT with a pool of the patch tokens feeds the same pooled vector to both heads; in training each
    head draws its own dropout mask of it, in the order cls then dist, as timm's distilled DeiT drops its two tokens
    (one ``head_drop`` call per head). ``pre_logits`` is the mean of the two dropped copies, as in DeiT."""
    model = _distilled(pool)
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 64, 64))
        patches = feats[:, 2:]
        pooled = {'avg': patches.mean(1), 'max': patches.amax(1),
                  'avgmax': 0.5 * (patches.mean(1) + patches.amax(1))}[pool]
        pooled = F.layer_norm(pooled, (32,), model.fc_norm.weight, model.fc_norm.bias, eps=1e-6)

        torch.manual_seed(5)
        d_cls = F.dropout(pooled, P, training=True)
        d_dist = F.dropout(pooled, P, training=True)
        assert not torch.equal(d_cls, d_dist)  # independent masks
        ref_cls, ref_dist = F.linear(d_cls, model.head.weight, model.head.bias), \
            F.linear(d_dist, model.head_dist.weight, model.head_dist.bias)

        torch.manual_seed(5)
        torch.testing.assert_close(model.forward_head(feats), (ref_cls + ref_dist) / 2, rtol=0, atol=1e-6)
        model.set_distilled_training(True)
        torch.manual_seed(5)
        out_cls, out_dist = model.forward_head(feats)
        torch.testing.assert_close(out_cls, ref_cls, rtol=0, atol=1e-6)
        torch.testing.assert_close(out_dist, ref_dist, rtol=0, atol=1e-6)
        torch.manual_seed(5)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), (d_cls + d_dist) / 2, rtol=0,
                                   atol=1e-6)
        model.eval()  # no dropout: both heads read the pooled vector itself
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), pooled, rtol=0, atol=1e-6)


def test_distilled_token_head_dropout_matches_deit():
    """With token pooling the same seed gives timm's distilled DeiT's training outputs exactly: its head dropout,
    pair and mean, and ``pre_logits``."""
    torch.manual_seed(0)
    deit = timm.create_model('deit_tiny_distilled_patch16_224', img_size=64, num_classes=7, drop_rate=P).train()
    model = nvit.from_vit(deit).train()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = deit.forward_features(x)
        for pre_logits in (False, True):
            torch.manual_seed(3)
            expected = deit.forward_head(feats, pre_logits=pre_logits)
            torch.manual_seed(3)
            torch.testing.assert_close(model.forward_head(feats, pre_logits=pre_logits), expected, rtol=0, atol=0)
        deit.set_distilled_training(True)
        model.set_distilled_training(True)
        torch.manual_seed(3)
        expected = deit(x)
        torch.manual_seed(3)
        for got, exp in zip(model(x), expected):
            torch.testing.assert_close(got, exp, rtol=0, atol=0)
