"""Detection backbones and detectors: FPN math, feature hand-off, detectors in train / eval mode, options."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vitzoo.detection import DETECTOR_STRIDES, ExtraLevelFPN, SimpleFeaturePyramid, build_backbone, build_detector

TOKEN_MODEL = 'revit_t'  # registered by conftest's `import nvit`
SMALL = dict(out_channels=32, min_size=96, max_size=160)


def _small(kind, score_thresh=0.05):
    prefix = '' if kind == 'retinanet' else 'box_'
    extra = {} if kind == 'retinanet' else dict(rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100)
    return dict(SMALL, **extra, **{f'{prefix}detections_per_img': 20, f'{prefix}score_thresh': score_thresh})


def _targets(sizes, masks=False):
    out = []
    for i, (h, w) in enumerate(sizes):
        t = dict(boxes=torch.tensor([[8.0, 10.0, w / 2, h / 2 + 5], [w / 3, h / 4, w - 4.0, h - 6.0]]),
                 labels=torch.tensor([1, 2 + i % 2]))
        if masks:
            m = torch.zeros(2, h, w, dtype=torch.uint8)
            m[0, 10:h // 2 + 5, 8:w // 2] = 1
            m[1, h // 4:h - 6, w // 3:w - 4] = 1
            t['masks'] = m
        out.append(t)
    return out


def _reference_fpn(fpn: ExtraLevelFPN, feats):
    """Plain functional re-computation of the paper's FPN from the module's weights."""
    def conv(m, x, **kw):
        return F.conv2d(x, m.weight, m.bias, **kw)
    lat = [conv(m, f) for m, f in zip(fpn.lateral_convs, feats)]
    for i in reversed(range(1, len(lat))):
        lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], scale_factor=2.0, mode='nearest')
    out = {s: conv(m, x, padding=1) for s, m, x in zip(fpn.in_strides, fpn.output_convs, lat)}
    x = lat[0]
    for s, up, c in zip(fpn.finer_strides, fpn.up_convs, fpn.up_output_convs):
        x = F.conv_transpose2d(x, up.weight, up.bias, stride=2)
        out[s] = conv(c, x, padding=1)
    x = feats[-1]
    for s, d in zip(fpn.coarser_strides, fpn.down_convs):
        x = conv(d, x, stride=2, padding=1)
        out[s] = x
    return out


@pytest.mark.parametrize('kind', ['retinanet', 'maskrcnn'])
def test_fpn_matches_functional_reference(kind):
    strides = DETECTOR_STRIDES[kind]
    fpn = ExtraLevelFPN([24, 40, 56], [16, 32, 64], strides, out_channels=16)
    for p in fpn.parameters():  # non-zero biases so a missing bias would show
        torch.nn.init.normal_(p, std=0.1)
    feats = [torch.randn(2, c, 16 // s, 24 // s) for c, s in zip([24, 40, 56], [1, 2, 4])]
    out = fpn(feats)
    ref = _reference_fpn(fpn, feats)
    assert list(out) == [f'p{s.bit_length() - 1}' for s in strides]
    base = feats[0].shape[-1] * 16  # padded image width
    for s, (name, x) in zip(strides, out.items()):
        assert x.shape[-1] * s == base, (name, x.shape)
        torch.testing.assert_close(x, ref[s], rtol=1e-5, atol=1e-5)
    if kind == 'retinanet':  # the stride-128 level comes from the raw last map (448-ch in S4), not the lateral
        assert fpn.down_convs[0].in_channels == 56 and len(fpn.up_convs) == 1
    else:
        assert len(fpn.up_convs) == 2 and not fpn.coarser_strides


def test_fpn_rejects_bad_strides():
    with pytest.raises(ValueError, match='must contain every backbone stride'):
        ExtraLevelFPN([8, 8], [16, 32], (32, 64))
    with pytest.raises(ValueError, match='factor of 2'):
        ExtraLevelFPN([8, 8], [16, 64], (16, 32, 64))


def test_simple_pyramid_shapes():
    sfp = SimpleFeaturePyramid(64, 16, (4, 8, 16, 32, 64))
    outs = sfp(torch.randn(1, 64, 8, 12))
    assert [tuple(o.shape[1:]) for o in outs] == [(16, 32, 48), (32, 16, 24), (64, 8, 12), (64, 4, 6), (64, 2, 3)]
    assert sfp.out_channels == [16, 32, 64, 64, 64]


def _reference_simple_pyramid(sfp: SimpleFeaturePyramid, x):
    """The documented ViTDet simple pyramid, step by step with torch.nn.functional and the module's own weights:
    finer strides: k2 s2 transposed convs (channels halved each), LayerNorm over channels + exact GELU between two;
    the native stride: the map itself; coarser strides: 2x2 max-pooling (stride 2) once per factor of 2."""
    def channel_norm(norm, t):  # LayerNorm over the channel dimension of a [B, C, H, W] map
        t = F.layer_norm(t.permute(0, 2, 3, 1), (t.shape[1],), norm.weight, norm.bias, eps=1e-6)
        return t.permute(0, 3, 1, 2)

    outs = []
    for stride, branch in zip(sfp.out_strides, sfp.branches):
        deconvs = [m for m in branch.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
        norms = [m for m in branch.modules() if 'Norm' in type(m).__name__]
        y = x
        if stride < sfp.in_stride:
            ups = (sfp.in_stride // stride).bit_length() - 1
            assert len(deconvs) == ups and len(norms) == ups - 1, (stride, branch)
            for i, up in enumerate(deconvs):
                if i:
                    y = F.gelu(channel_norm(norms[i - 1], y))
                y = F.conv_transpose2d(y, up.weight, up.bias, stride=2)
        else:
            assert not list(branch.parameters()), (stride, branch)  # identity / pooling: nothing learned
            for _ in range((stride // sfp.in_stride).bit_length() - 1):
                y = F.max_pool2d(y, kernel_size=2, stride=2)
        outs.append(y)
    return outs


def test_simple_pyramid_matches_functional_reference():
    """Numbers, not only shapes: each level against the ViTDet recipe of docs/detection.md (found by an audit: GELU ->
    ReLU or max- -> average pooling left every detection test passing)."""
    torch.manual_seed(0)
    sfp = SimpleFeaturePyramid(24, 16, (4, 8, 16, 32, 64)).eval()
    for p in sfp.parameters():  # non-trivial norm affine and deconv biases, so a dropped one would show
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 24, 8, 12)
    with torch.no_grad():
        out = sfp(x)
        ref = _reference_simple_pyramid(sfp, x)
    assert sfp.out_channels == [6, 12, 24, 24, 24]
    assert [tuple(o.shape) for o in out] == [(2, 6, 32, 48), (2, 12, 16, 24), (2, 24, 8, 12), (2, 24, 4, 6),
                                             (2, 24, 2, 3)]
    for stride, o, r in zip(sfp.out_strides, out, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5, msg=lambda m: f'stride {stride}: {m}')
    torch.testing.assert_close(out[2], x, rtol=0, atol=0)  # the native stride is the input map itself


def _capture_fpn_inputs(detector, module):
    seen = {}
    h1 = detector.backbone.register_forward_pre_hook(lambda m, args: seen.__setitem__('image', args[0]))
    h2 = module.register_forward_pre_hook(lambda m, args: seen.__setitem__('feats', args[0]))
    return seen, (h1, h2)


@pytest.mark.parametrize('name', ['shvit_s1', TOKEN_MODEL])
def test_fpn_gets_exactly_forward_intermediates(name):
    body = timm.create_model(name, **({} if name.startswith('shvit') else dict(dynamic_img_size=True)))
    body.eval()
    reference = copy.deepcopy(body)
    det = build_detector('retinanet', body, 3, **SMALL).eval()
    token = det.backbone.is_token_model
    assert token == (name == TOKEN_MODEL)
    seen, hooks = _capture_fpn_inputs(det, det.backbone.pyramid if token else det.backbone.fpn)
    with torch.no_grad():
        det([torch.rand(3, 100, 150)])
    for h in hooks:
        h.remove()
    image = seen['image']
    assert image.shape[-2] % 128 == 0 and image.shape[-1] % 128 == 0  # padded to the largest stride
    with torch.no_grad():
        if token:
            expected = reference.forward_intermediates(image, indices=1, output_fmt='NCHW', intermediates_only=True)
            got = [seen['feats']]
        else:
            expected = reference.forward_intermediates(image, intermediates_only=True)
            got = seen['feats']
            assert [f.shape[-1] for f in got] == [image.shape[-1] // s for s in (16, 32, 64)]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def _train_and_eval(det, sizes, masks=False):
    det.train()
    images = [torch.rand(3, h, w) for h, w in sizes]
    losses = det(images, _targets(sizes, masks))
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    det.eval()
    with torch.no_grad():
        outs = det(images)
    for (h, w), o in zip(sizes, outs):
        assert o['boxes'].shape[1] == 4 and len(o['labels']) == len(o['scores']) == len(o['boxes'])
        if len(o['boxes']):
            assert o['boxes'][:, 2].max() <= w and o['boxes'][:, 3].max() <= h
        if masks:
            assert o['masks'].shape[1:] == (1, h, w)
    return losses, outs


@pytest.mark.parametrize('kind,backbone', [
    ('retinanet', 'shvit_s1'), ('fasterrcnn', 'shvit_s1'), ('maskrcnn', 'shvit_s1'), ('fasterrcnn', TOKEN_MODEL),
])
def test_detectors_train_and_eval_non_square(kind, backbone):
    det = build_detector(kind, backbone, 3, **_small(kind, 0.0))
    losses, outs = _train_and_eval(det, [(96, 160), (112, 80)], masks=kind == 'maskrcnn')
    expected = {'retinanet': {'classification', 'bbox_regression'},
                'fasterrcnn': {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}}
    expected['maskrcnn'] = expected['fasterrcnn'] | {'loss_mask'}
    assert set(losses) == expected[kind]
    assert det.backbone.out_strides == list(DETECTOR_STRIDES[kind])
    assert any(len(o['boxes']) for o in outs)  # score_thresh 0: something is returned


def test_features_only_timm_model_backbone():
    body = timm.create_model('mobilenetv3_small_100', features_only=True, out_indices=(1, 2, 3, 4))
    det = build_detector('retinanet', body, 2, **_small('retinanet'))
    assert det.backbone.mode == 'features_only'
    assert det.backbone.fpn.in_strides == [8, 16, 32]  # stride-4 level is below RetinaNet's range
    _train_and_eval(det, [(128, 96)])


def test_anchor_and_roi_levels_follow_pyramid():
    ret = build_detector('retinanet', 'shvit_s1', 2, **SMALL)
    assert [s[0] for s in ret.anchor_generator.sizes] == [32, 64, 128, 256, 512]
    mask = build_detector('maskrcnn', 'shvit_s1', 2, **_small('maskrcnn'))
    assert [s[0] for s in mask.rpn.anchor_generator.sizes] == [32, 64, 128, 256, 512]
    assert mask.roi_heads.box_roi_pool.featmap_names == ['p2', 'p3', 'p4', 'p5']
    assert mask.roi_heads.mask_roi_pool.featmap_names == ['p2', 'p3', 'p4', 'p5']
    assert mask.transform.size_divisible == 64 and ret.transform.size_divisible == 128
    assert ret.head.classification_head.num_classes == 3  # 2 categories + background label 0
    # MMDetection's RetinaNet (the paper's): three octave scales, not truncated to whole pixels as in torchvision's
    # recipe (the anchors themselves: test_detection_mmdet); ratios (0.5, 1, 2) in this order (the head's anchor
    # slots); MMDetection's Mask R-CNN: 7x7 box and 14x14 mask RoIAlign, aligned, adaptive sampling (its pooling
    # itself: test_detection_mmdet)
    assert [s[1:] for s in ret.anchor_generator.sizes] == [
        pytest.approx((x * 1.2599210, x * 1.5874011)) for x in [32, 64, 128, 256, 512]]
    assert ret.anchor_generator.aspect_ratios == ((0.5, 1.0, 2.0),) * 5
    assert mask.rpn.anchor_generator.aspect_ratios == ((0.5, 1.0, 2.0),) * 5
    assert mask.roi_heads.box_roi_pool.output_size == (7, 7) and mask.roi_heads.box_roi_pool.sampling_ratio == 0
    assert mask.roi_heads.mask_roi_pool.output_size == (14, 14) and mask.roi_heads.mask_roi_pool.sampling_ratio == 0
    assert mask.roi_heads.box_predictor.cls_score.out_features == 3
    assert mask.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 3
    # COCO's 100 detections per image in every detector (torchvision's RetinaNet keeps 300; found by an audit)
    assert ret.detections_per_img == 100  # (the Mask R-CNN here is built with _small's 20)
    assert build_detector('fasterrcnn', 'shvit_s1', 2, **SMALL).roi_heads.detections_per_img == 100


def test_retinanet_never_detects_the_background_label():
    """Found by an audit: RetinaNet's head has an output for label 0 (background) and turned it into detections
    (95 of 300 with score_thresh=0), which the evaluation could not map to a category."""
    torch.manual_seed(0)
    model = build_detector('retinanet', 'shvit_s1', 2, **_small('retinanet', score_thresh=0.0)).eval()
    head = model.head.classification_head
    with torch.no_grad():  # make the background output the highest score of every anchor
        head.cls_logits.bias.view(-1, head.num_classes)[:, 0] = 10.0
        out = model([torch.rand(3, 96, 128)])[0]
    assert len(out['labels']) == 20 and set(out['labels'].tolist()) <= {1, 2}, out['labels']
    assert len(out['boxes']) == len(out['scores']) == 20


@pytest.mark.parametrize('value', [-3, 1.5, True])
def test_frozen_stages_out_of_range_is_refused(value):
    """Found by an audit: frozen_stages=-3 froze nothing without a word (the CLI refused it, Python did not)."""
    with pytest.raises(ValueError, match=r'frozen_stages must be -1 \(nothing frozen\), 0 \(the stem\) or a number of '
                                         rf'stages, got {value!r}'):
        build_backbone('shvit_s1', 'retinanet', frozen_stages=value, out_channels=16)


def test_frozen_stages_beyond_the_backbone_names_the_range():
    with pytest.raises(ValueError, match=r'frozen_stages=7 but the backbone has 3 stages: use -1 \(nothing frozen\), 0 '
                                         r'\(the stem\) or 1\.\.3 \(vitzoo finetune-det: --frozen-stages\)'):
        build_backbone('shvit_s1', 'retinanet', frozen_stages=7, out_channels=16)


def test_a_vit_of_14_pixel_patches_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"the backbone's map has stride 14, .* a single-scale backbone needs a "
                                         r'power-of-two patch size'):
        build_backbone('vit_tiny_patch16_224', 'retinanet', out_channels=16, model_kwargs=dict(patch_size=14, depth=2))


@pytest.mark.parametrize('name, advice', [
    ('levit_128s', 'it runs at one input size only, or at sizes a detector does not give it'),  # fixed to 224
    ('pit_ti_224', 'it runs at one input size only, or at sizes a detector does not give it'),
    ('maxvit_nano_rw_256', 'padded to multiples of 256 it runs: pass size_divisible=256 to build_detector'),
])
def test_backbones_that_do_not_run_at_detector_sizes_are_refused_when_built(name, advice):
    """Found by an audit: such backbones built, then failed at the first image with a shape error from inside the
    model (a traceback from finetune-det). Each really fails on the probed size, and MaxViT really runs at the
    padding named (the references: the bare timm models)."""
    from vitzoo.detection import BackboneError

    with pytest.raises(BackboneError, match=rf'the backbone {name} fails on a 256x384 input .*{advice}'):
        build_detector('retinanet', name, num_classes=2, **SMALL)
    body = timm.create_model(name, features_only=True).eval()
    with torch.no_grad(), pytest.raises((RuntimeError, AssertionError)):
        body(torch.zeros(1, 3, 256, 384))
    if name.startswith('maxvit'):
        model = build_detector('retinanet', name, num_classes=2, size_divisible=256, **SMALL).eval()
        with torch.no_grad():
            assert len(model([torch.rand(3, 100, 150)])) == 1


@pytest.mark.parametrize('sizes, match', [
    (dict(min_size=0), r'min_size must be an int >= 32 .* got 0'),
    (dict(min_size=1, max_size=1), r'min_size must be an int >= 32 .* got 1'),  # 0 px in torchvision's resize
    (dict(min_size=()), r'min_size must be an int >= 32 .* got \(\)'),
    (dict(max_size=-1), r'max_size must be an int >= 32 .* got -1'),
])
def test_bad_resize_sizes_are_refused_when_built(sizes, match):
    """Found by an audit: torchvision takes them unchecked and failed at the first image."""
    with pytest.raises(ValueError, match=match):
        build_detector('retinanet', 'shvit_s1', num_classes=2, **{**SMALL, **sizes})


def test_frozen_stages_and_norm_eval():
    bb = build_backbone('shvit_s1', 'retinanet', frozen_stages=1, norm_eval=False, out_channels=16)
    frozen = {n for n, p in bb.body.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(('patch_embed.', 'stages.0.')) for n in frozen)
    assert all(p.requires_grad for n, p in bb.body.named_parameters() if n.startswith('stages.1.'))
    assert all(p.requires_grad for p in bb.fpn.parameters())
    bb.train()
    bns = {n: m for n, m in bb.body.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert not bns['patch_embed.0.bn'].training and bns['stages.1.blocks.0.conv.m.bn'].training

    bb = build_backbone('shvit_s1', 'retinanet', out_channels=16)  # paper default: norm_eval, nothing frozen
    bb.train()
    assert all(p.requires_grad for p in bb.parameters())
    assert not any(m.training for m in bb.body.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bb.fpn.training
    before = bb.body.patch_embed[0].bn.running_mean.clone()
    bb(torch.rand(2, 3, 64, 64))
    assert torch.equal(before, bb.body.patch_embed[0].bn.running_mean)


def test_pretrained_local_weights_and_dropped_head(tmp_path):
    src = timm.create_model('shvit_s1')
    for p in src.parameters():
        torch.nn.init.normal_(p)
    file = tmp_path / 'cls.safetensors'
    save_file(src.state_dict(), str(file))
    bb = build_backbone('shvit_s1', 'maskrcnn', weights=file, out_channels=16)
    assert bb.dropped_keys and all(k.startswith('head.') for k in bb.dropped_keys)
    body_sd = bb.body.state_dict()
    assert set(body_sd) | set(bb.dropped_keys) == set(src.state_dict())
    for k, v in body_sd.items():
        assert torch.equal(v, src.state_dict()[k]), k

    wrong = tmp_path / 'wrong.safetensors'
    save_file(timm.create_model('resnet18').state_dict(), str(wrong))
    with pytest.raises(RuntimeError, match="could not load .*wrong.safetensors.* into backbone 'shvit_s1'"):
        build_backbone('shvit_s1', weights=wrong)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        build_backbone('shvit_s1', weights=tmp_path / 'missing.pth')


def test_a_detectors_checkpoint_gives_the_backbone_its_weights(tmp_path):
    """The official retinanet_shvit_s4_1x_coco.pth layout (MMDetection: the SHViT under 'backbone.', beside the neck
    and heads) as --backbone-weights: the backbone gets the SHViT's tensors, the neck's are named and left out."""
    src = timm.create_model('shvit_s1')
    for p in src.parameters():
        torch.nn.init.normal_(p)
    sd = {'backbone.' + k: v for k, v in src.state_dict().items() if not k.startswith('head.')}
    sd['neck.fpn_convs.0.conv.weight'] = torch.randn(4, 4, 3, 3)
    torch.save({'meta': {'epoch': 12}, 'state_dict': sd}, tmp_path / 'retinanet.pth')
    with pytest.warns(UserWarning, match=r"under 'backbone\.' .*\['neck\.fpn_convs\.0\.conv\.weight'\]\) and are "
                                         r"left out"):
        bb = build_backbone('shvit_s1', 'retinanet', weights=tmp_path / 'retinanet.pth', out_channels=16)
    for k, v in bb.body.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k


def test_backbone_name_and_build_errors():
    from vitzoo.detection import BackboneError
    from vitzoo.models import UnknownModelError

    with pytest.raises(UnknownModelError, match="unknown model 'shvit_s9'; closest matches: shvit_s4"):
        build_backbone('shvit_s9')  # not "could not load the default pretrained weights": none were asked for
    with pytest.raises(BackboneError, match="cannot build backbone 'nvit_b': nvit_b: the per-block dims"):
        build_backbone('nvit_b')


def test_anchor_generators_and_roi_pools_of_the_caller_replace_ours():
    """Found by an audit: the docs and the unknown-argument error list anchor_generator / rpn_anchor_generator /
    box_roi_pool / mask_roi_pool as accepted, but passing one raised "got multiple values for keyword argument"."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((1.0,),) * 5)
    retina = build_detector('retinanet', 'shvit_s1', 3, out_channels=16, anchor_generator=anchors)
    assert retina.anchor_generator is anchors
    box_pool = MultiScaleRoIAlign(['p3'], output_size=7, sampling_ratio=2)
    mask_pool = MultiScaleRoIAlign(['p3'], output_size=14, sampling_ratio=2)
    mask = build_detector('maskrcnn', 'shvit_s1', 3, out_channels=16, rpn_anchor_generator=anchors,
                          box_roi_pool=box_pool, mask_roi_pool=mask_pool)
    assert mask.rpn.anchor_generator is anchors and mask.roi_heads.box_roi_pool is box_pool
    assert mask.roi_heads.mask_roi_pool is mask_pool
    mask.eval()
    with torch.no_grad():
        out = mask([torch.rand(3, 96, 128)])
    assert set(out[0]) >= {'boxes', 'labels', 'scores', 'masks'}


def test_build_detector_argument_errors():
    with pytest.raises(ValueError, match='unknown detector kind'):
        build_detector('yolo', 'shvit_s1', 3)
    with pytest.raises(TypeError, match="unknown arguments \\['scor_thresh'\\]"):
        build_detector('retinanet', 'shvit_s1', 3, scor_thresh=0.1)
    bb = build_backbone('shvit_s1', 'retinanet', out_channels=16)
    with pytest.raises(ValueError, match='do not fit maskrcnn'):
        build_detector('maskrcnn', bb, 3)


@pytest.mark.parametrize('name, stem', [
    ('resnet18', {'conv1.weight', 'bn1.weight', 'bn1.bias'}),  # feature_info[0] is the stem's act1
    ('mobilenetv3_small_100', {'conv_stem.weight', 'bn1.weight', 'bn1.bias'}),  # ... its bn1 (BatchNormAct2d)
])
def test_frozen_stages_freeze_the_whole_stem_of_timm_cnns(name, stem):
    """Found by an audit: frozen_stages=1 froze nothing on ResNet (its stage 0 is act1, which has no parameters),
    and frozen_stages=0 left MobileNetV3's stem BatchNorm trainable."""
    frozen = {}
    for stages in (0, 1, 2):
        bb = build_backbone(name, 'retinanet', frozen_stages=stages, out_channels=16)
        frozen[stages] = {n for n, p in bb.body.named_parameters() if not p.requires_grad}
    assert frozen[0] == frozen[1] == stem
    assert frozen[2] > stem


@pytest.mark.parametrize('name, stem', [
    (TOKEN_MODEL, {'cls_token', 'dist_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias'}),
    ('deit_tiny_patch16_224', {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias'}),
])
def test_frozen_stages_zero_freezes_only_the_stem_of_token_models(name, stem):
    """Found by an audit: frozen_stages=0 also froze blocks.0 (a ViT block holds no Sequential / ModuleList, so it
    was taken for a single stem layer), i.e. 0 and 1 froze the same parameters."""
    frozen = {}
    for stages in (0, 1):
        bb = build_backbone(name, 'retinanet', frozen_stages=stages, out_channels=16)
        frozen[stages] = {n for n, p in bb.body.named_parameters() if not p.requires_grad}
    assert frozen[0] == stem
    assert frozen[1] == stem | {n for n, _ in bb.body.named_parameters() if n.startswith('blocks.0.')}


@pytest.mark.parametrize('name', ['shvit_s1', TOKEN_MODEL])
def test_backbone_checkpoint_without_classifier_loads_strictly(tmp_path, name):
    """Found by an audit: a checkpoint saved from timm.create_model(name, num_classes=0), or with its head.* keys
    removed, was refused (missing head keys) although the detector drops the head anyway."""
    src = timm.create_model(name, num_classes=0)
    for p in src.parameters():
        torch.nn.init.normal_(p)
    expected = {k: v.clone() for k, v in src.state_dict().items()}
    full = timm.create_model(name)
    headless = {k: v for k, v in full.state_dict().items() if not k.startswith(('head.', 'head_dist.'))}
    save_file(expected, str(tmp_path / 'nc0.safetensors'))
    save_file({k: v.contiguous() for k, v in headless.items()}, str(tmp_path / 'nohead.safetensors'))
    bb = build_backbone(name, 'retinanet', weights=tmp_path / 'nc0.safetensors', out_channels=16)
    body = bb.body.state_dict()
    assert body and set(body) <= set(expected)
    for k, v in body.items():
        assert torch.equal(v, expected[k]), k
    bb = build_backbone(name, 'retinanet', weights=tmp_path / 'nohead.safetensors', out_channels=16)
    for k, v in bb.body.state_dict().items():
        assert torch.equal(v, headless[k]), k
    # still strict for the body: a missing body key is an error, named, in one line without Python-only advice
    weights = [k for k in expected if k.endswith('.weight')]
    gone = weights[len(weights) // 2]
    save_file({k: v for k, v in expected.items() if k != gone}, str(tmp_path / 'partial.safetensors'))
    with pytest.raises(RuntimeError) as info:
        build_backbone(name, 'retinanet', weights=tmp_path / 'partial.safetensors')
    message = str(info.value)
    assert gone in message and '\n' not in message and 'pretrained=False' not in message, message
    assert message.startswith(f"could not load {tmp_path / 'partial.safetensors'} into backbone '{name}': ")
    assert message.endswith(f'the file must hold {name} weights (with or without its classifier), or choose the '
                            'backbone it was saved from.')


def test_backbone_checkpoint_of_another_class_count_loads_strictly(tmp_path):
    """A classifier fine-tuned on 10 classes: loaded in full (the head then dropped), not refused or partly loaded."""
    src = timm.create_model('resnet18', num_classes=10)
    file = tmp_path / 'c10.safetensors'
    save_file(src.state_dict(), str(file))
    bb = build_backbone('resnet18', 'retinanet', weights=file, out_channels=16)
    for k, v in bb.body.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k
    partial = {k: v for k, v in src.state_dict().items() if not k.startswith('layer4.1.')}
    save_file(partial, str(tmp_path / 'partial.safetensors'))
    with pytest.raises(RuntimeError, match=r'layer4\.1\.'):  # missing keys are still an error
        build_backbone('resnet18', 'retinanet', weights=tmp_path / 'partial.safetensors')


def test_model_objects_and_built_backbones_are_checked():
    from vitzoo.detection import build_detector

    with pytest.raises(ValueError, match=r'dynamic_img_size=False.*dynamic_img_size=True'):
        build_backbone(timm.create_model('revit_t'))
    # found by an audit: inside a features_only wrapper the fixed-size ViT passed, and the first forward failed
    with pytest.raises(ValueError, match=r'FeatureGetterNet \(its VisionTransformer\) was created for one input size'):
        build_detector('retinanet', timm.create_model('deit_tiny_patch16_224', features_only=True), 3)
    assert build_backbone(timm.create_model('revit_t', dynamic_img_size=True), out_channels=16).is_token_model
    bb = build_backbone('shvit_s1', 'retinanet', out_channels=16)
    with pytest.raises(ValueError, match=r'weights, frozen_stages apply when build_detector builds the backbone'):
        build_detector('retinanet', bb, 3, weights='w.pth', frozen_stages=2)
    with pytest.raises(ValueError, match=r'size_divisible=32 must be a positive int multiple of the coarsest pyramid '
                                         r'stride 128'):
        build_detector('retinanet', bb, 3, size_divisible=32)


def test_neck_follows_the_body_dtype():
    """model_kwargs=dict(dtype=torch.float64): the FPN is built in float64 too, so the first forward works."""
    bb = build_backbone('shvit_s1', 'retinanet', out_channels=16, model_kwargs=dict(dtype=torch.float64)).eval()
    assert {p.dtype for p in bb.parameters()} == {torch.float64}
    with torch.no_grad():
        assert all(v.dtype == torch.float64 for v in bb(torch.randn(1, 3, 128, 128, dtype=torch.float64)).values())


@pytest.mark.parametrize('kind', ['retinanet', 'maskrcnn'])
def test_detector_heads_follow_the_backbone_dtype(kind):
    """Found by an audit: on a float64 backbone the heads were built in float32, so the first forward failed."""
    from vitzoo.detection import build_detector
    bb = build_backbone('shvit_s1', kind, out_channels=16, model_kwargs=dict(dtype=torch.float64))
    model = build_detector(kind, bb, 3, min_size=64, max_size=96)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    with torch.no_grad():
        (out,) = model.eval()([torch.rand(3, 64, 80, dtype=torch.float64)])
    assert out['boxes'].dtype == out['scores'].dtype == torch.float64


def test_backbone_checkpoint_whose_classifier_timm_renames_loads(tmp_path):
    """Found by a review: an official ConvNeXt checkpoint names its classifier 'head.*' (timm's filter makes it
    'head.fc.*'); taken for a checkpoint without a classifier, it was built headless and refused."""
    import re
    source = timm.create_model('convnext_atto')
    for p in source.parameters():
        torch.nn.init.normal_(p)
    timm_layout = source.state_dict()
    official = {}  # the facebookresearch/ConvNeXt key names
    for k, v in timm_layout.items():
        k = k.replace('head.fc.', 'head.').replace('head.norm.', 'norm.')
        k = re.sub(r'^stem\.', 'downsample_layers.0.', k)
        k = re.sub(r'^stages\.(\d+)\.downsample\.', r'downsample_layers.\1.', k)
        k = re.sub(r'^stages\.(\d+)\.blocks\.(\d+)\.', r'stages.\1.\2.', k)
        k = k.replace('conv_dw', 'dwconv').replace('mlp.fc1', 'pwconv1').replace('mlp.fc2', 'pwconv2')
        official[k] = v.reshape(-1) if k.endswith('gamma') else v
    assert 'head.weight' in official and 'head.fc.weight' not in official
    torch.save({'model': official}, tmp_path / 'official.pth')
    bb = build_backbone('convnext_atto', 'retinanet', weights=tmp_path / 'official.pth', out_channels=16)
    body = bb.body.state_dict()
    assert body
    for k, v in body.items():
        assert torch.equal(v, timm_layout[k]), k


@pytest.mark.parametrize('kind,expected', [('retinanet', [8, 16, 32, 64]), ('fasterrcnn', [4, 8, 16, 32, 64])])
def test_token_model_pyramid_reaches_four_times_the_patch_stride(kind, expected):
    """A stride-16 token model: the simple feature pyramid builds the levels up to 4 x 16 = 64 (down-sampled twice);
    the FPN adds only the coarser ones (RetinaNet's 128)."""
    bb = build_backbone(TOKEN_MODEL, kind=kind, out_channels=32, model_kwargs=dict(dynamic_img_size=True))
    assert bb.is_token_model
    assert bb.pyramid.out_strides == expected
    assert bb.fpn.in_strides == expected and bb.fpn.coarser_strides == [s for s in DETECTOR_STRIDES[kind] if s > 64]


@pytest.mark.parametrize('out_indices', [(11,), (-1,), (5, 11)])
def test_features_only_token_model_with_any_out_indices_gets_the_simple_pyramid(out_indices):
    """Found by an audit: a token model was told by repeated strides among the returned maps, so a features_only
    model returning one block's map (out_indices=(11,)) went without the ViTDet simple pyramid: the FPN got only
    stride 16 and made 8 by one transposed conv instead."""
    model = timm.create_model('revit_t', features_only=True, dynamic_img_size=True, out_indices=out_indices)
    assert model.feature_info.reduction() == [16] * len(out_indices)
    bb = build_backbone(model, 'retinanet', out_channels=16)
    assert bb.is_token_model and bb.pyramid is not None
    assert bb.pyramid.out_strides == bb.fpn.in_strides == [8, 16, 32, 64]
    assert bb.indices == [len(out_indices) - 1]  # the last returned map (block 11)
    with torch.no_grad():
        out = bb.eval()(torch.randn(1, 3, 64, 96))
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {
        'p3': (8, 12), 'p4': (4, 6), 'p5': (2, 3), 'p6': (1, 2), 'p7': (1, 1)}


def test_backbone_weights_with_nan_are_refused_by_name(tmp_path):
    """Found by an audit: finetune-det trained on them and stopped at a NaN loss advising a lower learning rate."""
    from vitzoo.detection import BackboneError
    from vitzoo.detection.backbone import create_body

    state = timm.create_model('shvit_s1').state_dict()
    state['patch_embed.0.c.weight'][0, 0, 0, 0] = float('nan')
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / 'nan.safetensors'))
    with pytest.raises(BackboneError) as caught:
        create_body('shvit_s1', weights=tmp_path / 'nan.safetensors')
    assert str(caught.value).startswith(
        f"could not load {tmp_path / 'nan.safetensors'} into backbone 'shvit_s1': 1 tensor(s) hold NaN or infinite "
        "values (patch_embed.0.c.weight)")


def test_bad_detector_arguments_are_named_when_built():
    """Found by an audit: size_divisible=0 / -128 passed the check and failed at the first forward (a division by
    zero, a size mismatch), out_channels=0 / -1 / 3.5 and num_classes=2.5 failed inside layer initialisation, and
    dynamic_img_size=False in model_kwargs failed at the first forward."""
    for kwargs, says in ((dict(size_divisible=0), 'size_divisible=0 must be a positive int multiple'),
                         (dict(size_divisible=-128), 'size_divisible=-128 must be a positive int multiple'),
                         (dict(size_divisible=128.0), 'size_divisible=128.0 must be a positive int multiple')):
        with pytest.raises(ValueError, match=says):
            build_detector('retinanet', 'shvit_s1', 3, **kwargs)
    with pytest.raises(ValueError, match=r'num_classes must be an int >= 1 \(object categories, background '
                                         r'excluded\), got 2.5'):
        build_detector('retinanet', 'shvit_s1', 2.5)
    for out_channels in (0, -1, 3.5, True):
        with pytest.raises(ValueError, match=rf'out_channels must be an int >= 1 \(the channels of every pyramid '
                                             rf'level\), got {out_channels}'):
            build_backbone('shvit_s1', out_channels=out_channels)
    with pytest.raises(ValueError, match='dynamic_img_size=False.*leave dynamic_img_size out of model_kwargs'):
        build_backbone('deit_tiny_patch16_224', model_kwargs=dict(dynamic_img_size=False))


def test_a_backbone_for_other_input_channels_needs_their_normalisation():
    """Found by an audit: a backbone built with in_chans=1 got the pretrained cfg's 3-value image_mean / image_std,
    and torchvision broadcast each 1-channel image to 3 channels, so the first forward failed blaming the image.
    The detector is refused when built, saying what to pass; with 1-value statistics it detects on 1-channel
    images, normalised as torchvision's transform does by hand."""
    torch.manual_seed(0)
    backbone = build_backbone('shvit_s1', 'retinanet', model_kwargs=dict(in_chans=1))
    with pytest.raises(ValueError, match=r"the backbone takes 1-channel images, but the backbone's pretrained cfg "
                                         r"mean \[0.485, 0.456, 0.406\] has 3 values; pass image_mean and "
                                         r"image_std with 1 values each"):
        build_detector('retinanet', backbone, 3)
    with pytest.raises(ValueError, match=r'image_mean=\[0.5, 0.5\] has 2 values'):
        build_detector('retinanet', backbone, 3, image_mean=[0.5, 0.5], image_std=[0.25])
    detector = build_detector('retinanet', backbone, 3, image_mean=[0.5], image_std=[0.25], min_size=128,
                              max_size=192).eval()
    image = torch.rand(1, 100, 120)
    with torch.no_grad():
        (result,) = detector([image])
        normalised, _ = detector.transform([image])
    assert set(result) == {'boxes', 'scores', 'labels'} and normalised.tensors.shape[1] == 1
    resized = F.interpolate(image[None], size=normalised.image_sizes[0], mode='bilinear', align_corners=False)
    torch.testing.assert_close(normalised.tensors[:, :, :resized.shape[-2], :resized.shape[-1]],
                               (resized - 0.5) / 0.25, atol=1e-5, rtol=0)


@pytest.mark.parametrize('name, multiple', [('shvit_s1', 64), ('resnet18', 32), ('convnext_atto', 32),
                                            ('revit_t', 16)])
def test_a_backbone_takes_sizes_its_levels_divide(name, multiple):
    """Found by an audit: at 97x130 the stride-8 level was 14x18 for SHViT, 13x17 for ResNet and 12x16 for
    ConvNeXt, each model rounding its own way. Sizes that are not multiples of the body's coarsest stride are
    refused, naming it; at multiples of it every level is the size divided by its stride (p6 / p7 rounded up)."""
    backbone = build_backbone(name).eval()
    assert backbone.size_multiple == multiple
    with pytest.raises(ValueError, match=rf'multiples of {multiple} \(its coarsest stride\), got 97x130; pad them'):
        backbone(torch.randn(1, 3, 97, 130))
    h, w = 2 * multiple, 3 * multiple
    with torch.no_grad():
        levels = backbone(torch.randn(1, 3, h, w))
    for level, stride in zip(levels.values(), backbone.out_strides):
        assert tuple(level.shape[-2:]) == (-(-h // stride), -(-w // stride)), (name, stride, level.shape)


def test_backbone_weights_that_are_a_folder_are_named_so(tmp_path):
    """Found by an audit: a folder given as --backbone-weights was said not to exist."""
    from vitzoo.detection.backbone import create_body
    with pytest.raises(FileNotFoundError, match=r"backbone weights file .* is a folder, not a file; give a "
                                                r"\.safetensors or \.pth file"):
        create_body('shvit_s1', weights=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"backbone weights file .*missing\.pth does not exist"):
        create_body('shvit_s1', weights=tmp_path / 'missing.pth')


@pytest.mark.parametrize('model_kwargs', [{}, dict(num_classes=5)])
@pytest.mark.parametrize('name', ['shvit_s1', 'resnet18'])
def test_backbone_weights_that_hold_no_state_dict_are_named_so(tmp_path, name, model_kwargs):
    """Found by a review: a .pth holding a list or a tensor failed with timm's "'list' object has no attribute
    'items'" as the whole message, and with num_classes given as an AttributeError that escaped create_body."""
    from vitzoo.detection import BackboneError
    from vitzoo.detection.backbone import create_body
    for held, kind in (([1, 2, 3], 'list'), (torch.zeros(3), 'Tensor')):
        torch.save(held, tmp_path / 'held.pth')
        with pytest.raises(BackboneError, match=rf"could not load .*held\.pth into backbone '{name}': the file holds "
                                                rf"no state dict \('{kind}' object has no attribute 'items'\); give "
                                                r"a state dict of tensors"):
            create_body(name, weights=tmp_path / 'held.pth', model_kwargs=model_kwargs)


# --- found by an audit (2026-11-26) ------------------------------------------------------------------------------


def test_frozen_batchnorms_keep_their_statistics_from_the_start():
    """The BatchNorms were put in eval mode only by train(): a training step right after building (a new module is
    in training mode) moved the statistics of frozen ones, and with norm_eval of all of them."""
    BN = torch.nn.modules.batchnorm._BatchNorm
    bb = build_backbone('shvit_s1', 'retinanet', frozen_stages=1, norm_eval=False, out_channels=16)
    frozen = [m for m in bb.body.modules() if isinstance(m, BN) and not m.weight.requires_grad]
    free = [m for m in bb.body.modules() if isinstance(m, BN) and m.weight.requires_grad]
    assert frozen and free and bb.training
    before = [m.running_mean.clone() for m in frozen + free]
    bb(torch.rand(2, 3, 64, 64))
    moved = [not torch.equal(b, m.running_mean) for b, m in zip(before, frozen + free)]
    assert moved == [False] * len(frozen) + [True] * len(free)
    det = build_detector('retinanet', 'shvit_s1', 3, **SMALL)  # norm_eval: every backbone BatchNorm
    bns = [m for m in det.backbone.body.modules() if isinstance(m, BN)]
    before = [m.running_mean.clone() for m in bns]
    det([torch.rand(3, 64, 96)], _targets([(64, 96)]))
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bns))


def test_roi_pools_keep_the_pyramid_scales_whatever_the_first_batch():
    """torchvision's RoIAlign inferred its scales from the first batch and kept them: a wide first image (resized to
    40 px high, maps padded to 64) gave twice the real ones for good, and other boxes on every later image. The
    reference is torchvision's own inference from an ordinary image, on a copy whose pools have not run."""
    torch.manual_seed(0)
    det = build_detector('maskrcnn', 'shvit_s1', 2, out_channels=16, min_size=128, max_size=400).eval()
    fresh = copy.deepcopy(det)
    for pool in (fresh.roi_heads.box_roi_pool, fresh.roi_heads.mask_roi_pool):
        pool.scales, pool.map_levels = None, None  # torchvision infers them at the first call
    wide, normal = torch.rand(3, 100, 1000), torch.rand(3, 200, 300)
    with torch.no_grad():
        det([wide])
        got, expected = det([normal])[0], fresh([normal])[0]
    assert det.roi_heads.box_roi_pool.scales == det.roi_heads.mask_roi_pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    assert fresh.roi_heads.box_roi_pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    assert len(expected['boxes']) > 0
    for key in ('boxes', 'scores', 'labels', 'masks'):
        assert torch.equal(got[key], expected[key]), key
