"""Detection backbone: strict weight loading with a caller's num_classes, frozen stages as fixed feature extractors
(found by an audit, 2026-11-26)."""
import copy

import pytest
import timm
import torch
from safetensors.torch import save_file

from vitzoo.detection import BackboneError, build_backbone, build_detector, create_body


def test_backbone_weights_load_strictly_with_num_classes_in_model_kwargs(tmp_path):
    """num_classes in model_kwargs (0 for a backbone) made timm load the file non-strictly (its class count then
    differs from the cfg's): a checkpoint missing a stage, or another model's, loaded without an error and left
    random weights. The load is strict as without it, and the head is sized as asked afterwards."""
    src = timm.create_model('resnet18')
    full = src.state_dict()
    save_file(full, tmp_path / 'full.safetensors')
    save_file({k: v for k, v in full.items() if not k.startswith('layer4.')}, tmp_path / 'partial.safetensors')
    save_file(timm.create_model('shvit_s1').state_dict(), tmp_path / 'shvit.safetensors')
    for classes in (0, 10):
        with pytest.raises(BackboneError, match=r"partial\.safetensors into backbone 'resnet18': 25 missing keys "
                                                r"\(e\.g\. layer4\.0\.conv1\.weight"):
            create_body('resnet18', weights=tmp_path / 'partial.safetensors', model_kwargs=dict(num_classes=classes))
        with pytest.raises(BackboneError, match=r"shvit\.safetensors into backbone 'resnet18': 100 missing keys"):
            create_body('resnet18', weights=tmp_path / 'shvit.safetensors', model_kwargs=dict(num_classes=classes))
        model = create_body('resnet18', weights=tmp_path / 'full.safetensors', model_kwargs=dict(num_classes=classes))
        assert model.num_classes == classes
        body = {k: v for k, v in model.state_dict().items() if not k.startswith('fc.')}
        assert body and all(torch.equal(v, full[k]) for k, v in body.items())
        assert (classes == 0) == (not any(k.startswith('fc.') for k in model.state_dict()))
    with pytest.raises(BackboneError, match='25 missing keys'):
        build_backbone('resnet18', 'retinanet', weights=tmp_path / 'partial.safetensors',
                       model_kwargs=dict(num_classes=0))


def test_frozen_stages_run_as_in_eval_mode_in_training():
    """Frozen stages kept their drop-path (and dropout) active in training: only their BatchNorms went to eval mode,
    so the "frozen" features were random (off by up to 6 where they reach 7.6 here). Reference: the same stages of an
    eval-mode copy, on the same input."""
    torch.manual_seed(0)
    bb = build_backbone('resnet18', 'maskrcnn', out_channels=16, frozen_stages=3, norm_eval=False,
                        model_kwargs=dict(drop_path_rate=0.9, zero_init_last=False))
    det = build_detector('maskrcnn', bb, num_classes=2, min_size=64, max_size=128)
    det.train()
    body = det.backbone.body
    frozen = {n.split('.')[0] for n, p in body.named_parameters() if not p.requires_grad}
    assert frozen == {'conv1', 'bn1', 'layer1', 'layer2'}
    for name, m in body.named_modules():
        if name.split('.')[0] in frozen:
            assert not m.training, name
        elif name.startswith(('layer3.', 'layer4.')):
            assert m.training, name  # trained stages keep their drop-path and BatchNorm training
    reference = copy.deepcopy(body).eval()
    x = torch.randn(4, 3, 64, 96)
    with torch.no_grad():  # the frozen part's output: layer2's map (feature point 2)
        got = body.forward_intermediates(x, indices=[2], intermediates_only=True)[0]
        expected = reference.forward_intermediates(x, indices=[2], intermediates_only=True)[0]
    assert torch.equal(got, expected)


def test_batchnorms_without_parameters_train_in_trained_stages():
    """A BatchNorm without affine parameters was taken for a frozen one (all of its no parameters frozen) and kept
    in eval mode with norm_eval=False and nothing frozen: its statistics never moved. Reference: the same BatchNorm
    in a plain module in training mode."""
    model = timm.create_model('resnet18')
    model.layer3[0].bn1 = torch.nn.BatchNorm2d(model.layer3[0].bn1.num_features, affine=False)
    bb = build_backbone(model, 'retinanet', out_channels=16, norm_eval=False).train()
    bn = bb.body.layer3[0].bn1
    assert bn.training
    ref = copy.deepcopy(bn)
    seen = []
    handle = bn.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    bb(torch.rand(2, 3, 64, 64))
    handle.remove()
    ref.train()(seen[0])
    assert torch.equal(bn.running_mean, ref.running_mean) and not torch.equal(ref.running_mean, torch.zeros_like(
        ref.running_mean))
    # frozen (frozen_stages covering layer3) it is in eval mode, as the stage around it
    frozen = build_backbone(copy.deepcopy(model), 'retinanet', out_channels=16, frozen_stages=4,
                            norm_eval=False).train()
    assert not frozen.body.layer3[0].bn1.training and not frozen.body.layer3.training


def test_weights_with_features_only_and_num_classes_build(tmp_path):
    """Found by a review: with weights, `model_kwargs=dict(features_only=True, num_classes=0)` ended in a raw
    AttributeError (the features_only wrapper has no classifier to reset); timm ignores num_classes there."""
    source = timm.create_model('resnet18')
    save_file(source.state_dict(), str(tmp_path / 'r18.safetensors'))
    body = create_body('resnet18', weights=tmp_path / 'r18.safetensors',
                       model_kwargs=dict(features_only=True, num_classes=0))
    for name, value in body.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[name])
