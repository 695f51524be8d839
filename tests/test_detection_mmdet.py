"""MMDetection RetinaNet checkpoints (the SHViT paper's layout) in build_detector's RetinaNet.

The references are written here from MMDetection's definitions, independently of the code under test: the neck
(EfficientViT's FPN with one transposed conv, the SHViT RetinaNet config), RetinaHead, MMDetection's anchor
generator and its test-time post-processing (sigmoid scores, score threshold and top 1000 per level, delta decoding,
class-wise NMS, 100 per image), all as functional torch code on the file's own tensors; the backbone's features
come from a timm SHViT holding the tensors before they were put into the official layout.
"""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision

import shvit  # noqa: F401  registers the models
from vitzoo.cli import main
from vitzoo.detection import MMDetWeightsError, build_detector, load_mmdet_detector
from vitzoo.detection.synthetic import make_shapes_dataset

CHANNELS = 16  # FPN channels of the test files (the paper's are 256)
S1_DIMS = (128, 224, 320)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _to_official(timm_sd):
    """timm's SHViT keys -> the official blocks1/2/3 layout (the inverse of the documented rules)."""
    out = {}
    for k, v in timm_sd.items():
        parts = k.split('.')
        if parts[0] != 'stages':
            out[k] = v
            continue
        s, kind, i, rest = int(parts[1]), parts[2], int(parts[3]), '.'.join(parts[4:])
        if kind == 'blocks':
            out[f'blocks{s + 1}.{i + (3 if s else 0)}.{rest}'] = v
        elif i < 2:
            out[f'blocks{s + 1}.0.{i}.{rest}'] = v
        elif i == 2:
            out[f'blocks{s + 1}.1.{rest}'] = v
        else:
            out[f'blocks{s + 1}.2.{i - 3}.{rest}'] = v
    return out


def _conv(sd, name, cout, cin, k, transposed=False, scale=None):
    scale = scale if scale is not None else 1.0 / math.sqrt(cin * k * k)
    shape = (cin, cout, k, k) if transposed else (cout, cin, k, k)
    sd[f'{name}.weight'] = torch.randn(shape) * scale
    sd[f'{name}.bias'] = torch.randn(cout) * 0.1


def _mmdet_state_dict(categories=3, official_backbone=True, seed=0):
    """(MMDetection RetinaNet state dict of an SHViT-S1, the timm model holding its backbone)."""
    torch.manual_seed(seed)
    src = timm.create_model('shvit_s1', num_classes=0).eval()
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    body = src.state_dict()
    sd = {'backbone.' + k: v for k, v in (_to_official(body) if official_backbone else body).items()}
    for i, c in enumerate(S1_DIMS):
        _conv(sd, f'neck.lateral_convs.{i}.conv', CHANNELS, c, 1)
        _conv(sd, f'neck.fpn_convs.{i}.conv', CHANNELS, CHANNELS, 3)
    _conv(sd, 'neck.fpn_convs.3.conv', CHANNELS, S1_DIMS[-1], 3)  # 'on_input': the raw last map, stride 2
    _conv(sd, 'neck.extra_trans_convs.0.conv', CHANNELS, CHANNELS, 2, transposed=True)
    _conv(sd, 'neck.extra_fpn_convs.0.conv', CHANNELS, CHANNELS, 3)
    for i in range(4):
        _conv(sd, f'bbox_head.cls_convs.{i}.conv', CHANNELS, CHANNELS, 3)
        _conv(sd, f'bbox_head.reg_convs.{i}.conv', CHANNELS, CHANNELS, 3)
    _conv(sd, 'bbox_head.retina_cls', 9 * categories, CHANNELS, 3, scale=0.3)
    _conv(sd, 'bbox_head.retina_reg', 36, CHANNELS, 3, scale=0.02)  # deltas well inside the decoding's clamp
    return sd, src


def _conv2d(sd, name, x, **kw):
    return F.conv2d(x, sd[f'{name}.weight'], sd[f'{name}.bias'], **kw)


def _reference_pyramid(sd, feats):
    """EfficientViTFPN(num_outs=5, num_extra_trans_convs=1, add_extra_convs='on_input'): outputs at strides 8..128."""
    lat = [_conv2d(sd, f'neck.lateral_convs.{i}.conv', f) for i, f in enumerate(feats)]
    for i in range(len(lat) - 1, 0, -1):
        lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode='nearest')
    outs = [_conv2d(sd, f'neck.fpn_convs.{i}.conv', lat[i], padding=1) for i in range(len(lat))]
    outs.append(_conv2d(sd, 'neck.fpn_convs.3.conv', feats[-1], stride=2, padding=1))
    up = F.conv_transpose2d(lat[0], sd['neck.extra_trans_convs.0.conv.weight'],
                            sd['neck.extra_trans_convs.0.conv.bias'], stride=2)
    return [_conv2d(sd, 'neck.extra_fpn_convs.0.conv', up, padding=1)] + outs


def _reference_head(sd, level):
    """RetinaHead on one level: (cls logits [N, H*W*A, C], deltas [N, H*W*A, 4]), MMDetection's flattening."""
    c, r = level, level
    for i in range(4):
        c = F.relu(_conv2d(sd, f'bbox_head.cls_convs.{i}.conv', c, padding=1))
        r = F.relu(_conv2d(sd, f'bbox_head.reg_convs.{i}.conv', r, padding=1))
    c = _conv2d(sd, 'bbox_head.retina_cls', c, padding=1)
    r = _conv2d(sd, 'bbox_head.retina_reg', r, padding=1)
    n = c.shape[0]
    return c.permute(0, 2, 3, 1).reshape(n, -1, c.shape[1] // 9), r.permute(0, 2, 3, 1).reshape(n, -1, 4)


def _mmdet_anchors(stride, h, w):
    """MMDetection's AnchorGenerator(octave_base_scale=4, scales_per_octave=3, ratios=[0.5, 1, 2]) at one level, in
    float64: base size = stride, centre offset 0, scale-major within a ratio, locations row-major."""
    scales = torch.tensor([4 * 2 ** (k / 3) for k in range(3)], dtype=torch.float64)
    ratios = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    h_ratios = ratios.sqrt()
    w_ratios = 1 / h_ratios
    ws = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
    base = torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], 1)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64) * stride,
                            torch.arange(w, dtype=torch.float64) * stride, indexing='ij')
    shifts = torch.stack([xs.reshape(-1), ys.reshape(-1)] * 2, 1)
    return (shifts[:, None, :] + base[None]).reshape(-1, 4)


def _reference_detections(sd, levels, image_hw, per_image=100):
    """MMDetection's RetinaNet test: per level sigmoid scores over anchors x classes, > 0.05, top 1000; boxes decoded
    (means 0, stds 1, log-ratio clamp +-log(1000/16)) and clipped; NMS 0.5 per class over all levels; the best
    ``per_image`` (100 in the paper's config)."""
    boxes, scores, labels = [], [], []
    for stride, level in zip((8, 16, 32, 64, 128), levels):
        cls, deltas = _reference_head(sd, level)
        anchors = _mmdet_anchors(stride, *level.shape[-2:])
        prob = cls[0].double().sigmoid()
        flat = prob.reshape(-1)
        keep = (flat > 0.05).nonzero().squeeze(1)
        top = flat[keep].topk(min(1000, keep.numel())).indices
        idx = keep[top]
        a, c = idx // prob.shape[1], idx % prob.shape[1]
        d, an = deltas[0].double()[a], anchors[a]
        pw, ph = an[:, 2] - an[:, 0], an[:, 3] - an[:, 1]
        px, py = (an[:, 0] + an[:, 2]) / 2, (an[:, 1] + an[:, 3]) / 2
        clamp = abs(math.log(16 / 1000))
        gw, gh = pw * d[:, 2].clamp(-clamp, clamp).exp(), ph * d[:, 3].clamp(-clamp, clamp).exp()
        gx, gy = px + pw * d[:, 0], py + ph * d[:, 1]
        b = torch.stack([gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2], 1)
        b[:, 0::2] = b[:, 0::2].clamp(0, image_hw[1])
        b[:, 1::2] = b[:, 1::2].clamp(0, image_hw[0])
        boxes.append(b)
        scores.append(flat[idx])
        labels.append(c + 1)
    boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    keep = torchvision.ops.batched_nms(boxes, scores, labels, 0.5)[:per_image]
    return boxes[keep], scores[keep], labels[keep]


def _detector(categories=3, **kwargs):
    # min_size / max_size = the test image's sides: no resizing, and 256 x 384 needs no padding (multiple of 128)
    return build_detector('retinanet', 'shvit_s1', categories, out_channels=CHANNELS, min_size=256,
                          max_size=384, **kwargs).eval()


@pytest.fixture(scope='module')
def retina():
    sd, src = _mmdet_state_dict()
    model = _detector()
    assert load_mmdet_detector(model, sd) == []
    torch.manual_seed(1)
    image = torch.rand(3, 256, 384)
    return sd, src, model, image


def _features(src, image):
    x = ((image - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None])[None]
    with torch.no_grad():
        return src.forward_intermediates(x, intermediates_only=True)


def test_the_pyramid_and_head_give_mmdetections_outputs(retina):
    sd, src, model, image = retina
    feats = _features(src, image)
    with torch.no_grad():
        ref_levels = _reference_pyramid(sd, feats)
        images, _ = model.transform([image])
        assert images.tensors.shape[-2:] == (256, 384)
        levels = model.backbone(images.tensors)
        assert list(levels) == ['p3', 'p4', 'p5', 'p6', 'p7']
        for got, want in zip(levels.values(), ref_levels, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        head = model.head(list(levels.values()))
        ref = [_reference_head(sd, level) for level in ref_levels]
    ref_cls, ref_reg = torch.cat([c for c, _ in ref], 1), torch.cat([r for _, r in ref], 1)
    assert head['cls_logits'].shape == (1, ref_cls.shape[1], 4)  # three categories + torchvision's background
    torch.testing.assert_close(head['cls_logits'][..., 1:], ref_cls, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(head['bbox_regression'], ref_reg, rtol=1e-4, atol=1e-5)
    # the background output (label 0) of every anchor: sigmoid 0.01, the focal-loss prior, whatever the input
    torch.testing.assert_close(head['cls_logits'][..., 0].sigmoid(), torch.full_like(head['cls_logits'][..., 0], 0.01))


def _matched(boxes, scores, labels, ref_boxes, ref_scores, ref_labels):
    """How many of the reference detections have a detection of the same label, score (1e-5) and box (2e-3 px)."""
    same = (labels[:, None] == ref_labels[None]) & ((scores.double()[:, None] - ref_scores[None]).abs() < 1e-5) \
        & ((boxes.double()[:, None] - ref_boxes[None]).abs().amax(-1) < 2e-3)
    return int(same.any(0).sum())


def test_detections_are_mmdetections(retina):
    sd, src, model, image = retina
    with torch.no_grad():
        levels = _reference_pyramid(sd, _features(src, image))
        ref = _reference_detections(sd, levels, (256, 384))
        out = model([image])[0]
        model.detections_per_img = 1000  # all that pass NMS: the best 100 of random weights come from few anchors
        try:
            more = model([image])[0]
        finally:
            model.detections_per_img = 100
        ref_more = _reference_detections(sd, levels, (256, 384), per_image=1000)
    # the paper's setting: the same 100 detections, in the same order
    assert len(out['scores']) == len(ref[1]) == 100
    torch.testing.assert_close(out['scores'].double(), ref[1], rtol=0, atol=1e-5)
    assert torch.equal(out['labels'], ref[2])
    torch.testing.assert_close(out['boxes'].double(), ref[0], rtol=0, atol=2e-3)
    # all ~900 of every anchor shape and category: a box IoU or a score at a threshold may round the other way
    # between float32 and float64 (a few detections), an anchor off by a rounding (torchvision's) moves most
    assert len(ref_more[1]) >= 500 and len(set(ref_more[2].tolist())) == 3
    matched = _matched(more['boxes'], more['scores'], more['labels'], *ref_more)
    assert matched >= 0.98 * len(ref_more[1]) and abs(len(more['scores']) - len(ref_more[1])) <= 0.02 * len(ref_more[1])


def test_anchors_are_mmdetections_unrounded():
    """torchvision rounds each anchor corner to a pixel and its recipe truncates the octave sizes (40 for 40.3)."""
    model = _detector()
    images, _ = model.transform([torch.rand(3, 256, 384)])
    shapes = [(256 // s, 384 // s) for s in (8, 16, 32, 64, 128)]
    maps = [torch.zeros(1, 1, h, w) for h, w in shapes]
    anchors = model.anchor_generator(images, maps)[0]
    want = torch.cat([_mmdet_anchors(s, h, w) for s, (h, w) in zip((8, 16, 32, 64, 128), shapes)])
    torch.testing.assert_close(anchors.double(), want, rtol=0, atol=1e-4)
    assert (anchors - anchors.round()).abs().max() > 0.1  # not whole pixels
    # what torchvision's recipe gave (truncated sizes, rounded corners): ~0.9 px off at stride 8 (the docs' figure)
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    sizes = tuple(tuple(int(4 * s * 2 ** (k / 3)) for k in range(3)) for s in (8, 16, 32, 64, 128))
    rounded = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)(images, maps)[0]
    off = (rounded.double() - want).abs().amax(1)
    level_8 = off[:shapes[0][0] * shapes[0][1] * 9]
    assert 0.85 < level_8.max() < 0.95 and off.max() < 1.0
    # and the R-CNNs' RPN anchors (sizes 8 x stride, whole numbers): rounding alone, up to half a pixel
    rpn_maps = [torch.zeros(1, 1, 256 // s, 384 // s) for s in (4, 8, 16, 32, 64)]
    rpn_rounded = AnchorGenerator(tuple((8 * s,) for s in (4, 8, 16, 32, 64)), ((0.5, 1.0, 2.0),) * 5)(images, rpn_maps)
    rpn_want = torch.cat([_rpn_anchors(s, *m.shape[-2:]) for s, m in zip((4, 8, 16, 32, 64), rpn_maps)])
    assert 0.4 < (rpn_rounded[0].double() - rpn_want).abs().max() <= 0.5


def test_a_file_loads_into_the_detector(tmp_path):
    """The official file's form: MMDetection's dict with 'meta' and 'state_dict'; a timm-layout backbone as well."""
    sd, _ = _mmdet_state_dict(official_backbone=False, seed=3)
    path = tmp_path / 'retinanet_shvit_s1.pth'
    torch.save({'meta': {'mmdet_version': '2.25.0', 'CLASSES': ('a', 'b', 'c'), 'epoch': 12}, 'state_dict': sd,
                'optimizer': {'state': {}, 'param_groups': []}}, path)
    model = _detector()
    assert load_mmdet_detector(model, path) == []
    own = model.state_dict()
    assert torch.equal(own['backbone.fpn.up_output_convs.0.weight'], sd['neck.extra_fpn_convs.0.conv.weight'])
    assert torch.equal(own['backbone.fpn.down_convs.0.bias'], sd['neck.fpn_convs.3.conv.bias'])
    assert torch.equal(own['head.regression_head.conv.3.0.weight'], sd['bbox_head.reg_convs.3.conv.weight'])
    assert torch.equal(own['backbone.body.patch_embed.0.c.weight'], sd['backbone.patch_embed.0.c.weight'])


def test_other_categories_load_everything_but_the_classifier_when_asked():
    sd, _ = _mmdet_state_dict(categories=80)
    model = _detector(categories=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MMDetWeightsError, match=r'classifies 80 categories, the model 3: build it with '
                                                r'num_classes=80 .* or pass classifier=False'):
        load_mmdet_detector(model, sd)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded
    left = load_mmdet_detector(model, sd, classifier=False)
    assert left == ['head.classification_head.cls_logits.bias', 'head.classification_head.cls_logits.weight']
    own = model.state_dict()
    assert all(torch.equal(own[k], before[k]) for k in left)
    assert torch.equal(own['head.classification_head.conv.0.0.weight'], sd['bbox_head.cls_convs.0.conv.weight'])


def test_files_that_do_not_fit_are_named(tmp_path):
    model = _detector()
    sd, _ = _mmdet_state_dict()
    extra = dict(sd, **{'neck.extra_trans_convs.1.conv.weight': torch.zeros(CHANNELS, CHANNELS, 2, 2)})
    with pytest.raises(MMDetWeightsError, match=r"1 tensors of the checkpoint without a place in the model \(e\.g\. "
                                                r"\['neck\.extra_trans_convs\.1\.conv\.weight'\]\)"):
        load_mmdet_detector(model, extra)
    missing = {k: v for k, v in sd.items() if k != 'bbox_head.reg_convs.2.conv.bias'}
    with pytest.raises(MMDetWeightsError, match=r"1 tensors of the model not in the checkpoint \(e\.g\. "
                                                r"\['head\.regression_head\.conv\.2\.0\.bias'\]\)"):
        load_mmdet_detector(model, missing)
    with pytest.raises(MMDetWeightsError, match=r'36 tensors of other shapes .*\(backbone\.fpn\.down_convs\.0\.bias: '
                                                r'\[16\] in the checkpoint, \[8\] in the model\).*--out-channels'):
        load_mmdet_detector(build_detector('retinanet', 'shvit_s1', 3, out_channels=8), sd)
    other = {k: v for k, v in sd.items() if not k.startswith('bbox_head.')}
    other['bbox_head.fcos_cls.weight'] = torch.zeros(1)
    with pytest.raises(MMDetWeightsError, match=r'neither a RetinaNet head .* its parts: backbone, bbox_head, neck\. '
                                                r'Only MMDetection RetinaNet, Faster R-CNN and Mask R-CNN .*'
                                                r'--backbone-weights'):
        load_mmdet_detector(model, other)
    with pytest.raises(MMDetWeightsError, match=r'an MMDetection RetinaNet: it loads into build_detector\("retinanet", '
                                                r'\.\.\.\), not into a FasterRCNN'):
        load_mmdet_detector(build_detector('fasterrcnn', 'shvit_s1', 3, out_channels=CHANNELS), sd)
    # files: a classification checkpoint, a truncated one, none
    classification = tmp_path / 'shvit_s1.pth'
    torch.save(timm.create_model('shvit_s1').state_dict(), classification)
    with pytest.raises(MMDetWeightsError, match=r'not an MMDetection detector checkpoint .*--backbone-weights'):
        load_mmdet_detector(model, classification)
    whole = tmp_path / 'whole.pth'
    torch.save({'state_dict': sd}, whole)
    cut = tmp_path / 'cut.pth'
    cut.write_bytes(whole.read_bytes()[:100_000])
    with pytest.raises(MMDetWeightsError, match=r'cut\.pth is not a readable checkpoint'):
        load_mmdet_detector(model, cut)
    with pytest.raises(FileNotFoundError, match=r'nothing\.pth does not exist'):
        load_mmdet_detector(model, tmp_path / 'nothing.pth')


def test_finetune_det_starts_from_detector_weights(tmp_path, capsys):
    data = make_shapes_dataset(tmp_path / 'data', num_train=2, num_val=0, size=(72, 96))
    common = ['finetune-det', '--data', str(data), '--backbone', 'shvit_s1', '--out-channels', str(CHANNELS),
              '--img-size', '96', '--workers', '0', '--no-progress', '--batch-size', '2', '--max-iters', '1',
              '--no-eval', '--checkpoint-every', '0']
    sd, _ = _mmdet_state_dict(categories=80)
    path = tmp_path / 'coco.pth'
    torch.save({'state_dict': sd}, path)
    assert main([*common, '--out', str(tmp_path / 'run'), '--detector-weights', str(path), '--lr', '1e-12']) == 0
    printed = capsys.readouterr().out
    assert f'detector: backbone, neck and heads from {path}; its category-specific layers (80 categories) left out: ' \
           'the data has 3' in printed
    final = torch.load(tmp_path / 'run' / 'model_final.pth', weights_only=True)
    # one step at lr 1e-12 leaves the loaded tensors where they were (AdamW moves each by at most ~lr)
    torch.testing.assert_close(final['backbone.fpn.lateral_convs.2.weight'], sd['neck.lateral_convs.2.conv.weight'],
                               rtol=0, atol=1e-9)
    for option, message in ((['--pretrained'], '--detector-weights gives the backbone its weights too'),
                            (['--resume'], '--resume restores the whole detector')):
        assert main([*common, '--out', str(tmp_path / 'bad'), '--detector-weights', str(path), *option]) == 2
        assert message in capsys.readouterr().err
    # a RetinaNet file for a Mask R-CNN run: one line, before any training
    assert main([*common, '--out', str(tmp_path / 'bad'), '--detector-weights', str(path), '--detector',
                 'maskrcnn']) == 1
    err = capsys.readouterr().err
    assert 'error: the checkpoint is an MMDetection RetinaNet: it loads into build_detector("retinanet", ...), not ' \
           'into a MaskRCNN' in err and 'Traceback' not in err and not (tmp_path / 'bad' / 'log.jsonl').exists()
    assert main([*common, '--out', str(tmp_path / 'bad'), '--detector-weights', str(tmp_path / 'no.pth')]) == 1
    assert 'no.pth does not exist; give an MMDetection checkpoint' in capsys.readouterr().err  # a file: 1


# ---- Faster / Mask R-CNN ----------------------------------------------------------------------------------------

RCNN_STRIDES = (4, 8, 16, 32, 64)


def _mmdet_rcnn_state_dict(categories=3, mask=True, seed=0, agnostic=False):
    """An MMDetection Mask R-CNN (or Faster R-CNN) state dict of an SHViT-S1, the SHViT config's neck
    (EfficientViTFPN, two transposed convs, no extra convs), and the timm model holding its backbone."""
    sd, src = _mmdet_state_dict(seed=seed)
    sd = {k: v for k, v in sd.items() if k.startswith('backbone.') or k.startswith('neck.lateral_convs')
          or k in {f'neck.fpn_convs.{i}.conv.{leaf}' for i in range(3) for leaf in ('weight', 'bias')}}
    for i in range(2):
        _conv(sd, f'neck.extra_trans_convs.{i}.conv', CHANNELS, CHANNELS, 2, transposed=True)
        _conv(sd, f'neck.extra_fpn_convs.{i}.conv', CHANNELS, CHANNELS, 3)
    _conv(sd, 'rpn_head.rpn_conv', CHANNELS, CHANNELS, 3)
    _conv(sd, 'rpn_head.rpn_cls', 3, CHANNELS, 1, scale=1.0)
    _conv(sd, 'rpn_head.rpn_reg', 12, CHANNELS, 1, scale=0.02)
    fc = {'roi_head.bbox_head.shared_fcs.0': (1024, CHANNELS * 49), 'roi_head.bbox_head.shared_fcs.1': (1024, 1024),
          'roi_head.bbox_head.fc_cls': (categories + 1, 1024),
          'roi_head.bbox_head.fc_reg': (4 if agnostic else 4 * categories, 1024)}
    for name, (cout, cin) in fc.items():
        scale = 0.02 if name.endswith('fc_reg') else 20.0 if name.endswith('fc_cls') else 1
        sd[f'{name}.weight'] = torch.randn(cout, cin) * scale / math.sqrt(cin)
        sd[f'{name}.bias'] = torch.randn(cout) * 0.1
    if mask:
        for i in range(4):
            _conv(sd, f'roi_head.mask_head.convs.{i}.conv', 256, CHANNELS if i == 0 else 256, 3)
        _conv(sd, 'roi_head.mask_head.upsample', 256, 256, 2, transposed=True)
        _conv(sd, 'roi_head.mask_head.conv_logits', 1 if agnostic else categories, 256, 1)
    return sd, src


def _reference_rcnn_pyramid(sd, feats):
    """EfficientViTFPN(num_outs=5, num_extra_trans_convs=2, no extra convs): strides 4..64. Its forward puts each
    transposed conv's output first in its list, so extra_fpn_convs.0 makes stride 4 and extra_fpn_convs.1 stride 8."""
    lat = [_conv2d(sd, f'neck.lateral_convs.{i}.conv', f) for i, f in enumerate(feats)]
    for i in range(len(lat) - 1, 0, -1):
        lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode='nearest')
    extra, prev = [], lat[0]
    for i in range(2):
        prev = F.conv_transpose2d(prev, sd[f'neck.extra_trans_convs.{i}.conv.weight'],
                                  sd[f'neck.extra_trans_convs.{i}.conv.bias'], stride=2)
        extra.insert(0, prev)
    extra_outs = [_conv2d(sd, f'neck.extra_fpn_convs.{i}.conv', e, padding=1) for i, e in enumerate(extra)]
    return extra_outs + [_conv2d(sd, f'neck.fpn_convs.{i}.conv', lat[i], padding=1) for i in range(3)]


def _rpn_anchors(stride, h, w):
    """MMDetection's AnchorGenerator(scales=[8], ratios=[0.5, 1, 2]) at one level, float64."""
    ratios = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    ws, hs = stride * 8 / ratios.sqrt(), stride * 8 * ratios.sqrt()
    base = torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], 1)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64) * stride,
                            torch.arange(w, dtype=torch.float64) * stride, indexing='ij')
    shifts = torch.stack([xs.reshape(-1), ys.reshape(-1)] * 2, 1)
    return (shifts[:, None, :] + base[None]).reshape(-1, 4)


def _decode(anchors, deltas, stds, image_hw):
    """MMDetection's delta2bbox (means 0), clipped to the image."""
    d = deltas.double() * torch.tensor(stds, dtype=torch.float64)
    clamp = abs(math.log(16 / 1000))
    pw, ph = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    px, py = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    gw, gh = pw * d[:, 2].clamp(-clamp, clamp).exp(), ph * d[:, 3].clamp(-clamp, clamp).exp()
    gx, gy = px + pw * d[:, 0], py + ph * d[:, 1]
    b = torch.stack([gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2], 1)
    b[:, 0::2] = b[:, 0::2].clamp(0, image_hw[1])
    b[:, 1::2] = b[:, 1::2].clamp(0, image_hw[0])
    return b


def _reference_proposals(sd, levels, image_hw):
    """MMDetection's RPN test (2.x, the paper's config): per level the top 1000 anchors by sigmoid score, decoded
    (stds 1) and clipped, empty boxes dropped; NMS 0.7 per level; the best 1000 of all levels."""
    boxes, scores, ids = [], [], []
    for i, (stride, level) in enumerate(zip(RCNN_STRIDES, levels)):
        t = F.relu(_conv2d(sd, 'rpn_head.rpn_conv', level, padding=1))
        prob = _conv2d(sd, 'rpn_head.rpn_cls', t)[0].permute(1, 2, 0).reshape(-1).double().sigmoid()
        deltas = _conv2d(sd, 'rpn_head.rpn_reg', t)[0].permute(1, 2, 0).reshape(-1, 4)
        top = prob.topk(min(1000, prob.numel())).indices
        b = _decode(_rpn_anchors(stride, *level.shape[-2:])[top], deltas[top], (1, 1, 1, 1), image_hw)
        valid = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        boxes.append(b[valid])
        scores.append(prob[top][valid])
        ids.append(torch.full((int(valid.sum()),), i))
    boxes, scores, ids = torch.cat(boxes), torch.cat(scores), torch.cat(ids)
    return boxes[torchvision.ops.batched_nms(boxes, scores, ids, 0.7)[:1000]]


def _reference_roi_align(levels, boxes, size):
    """MMDetection's SingleRoIExtractor over p2..p5: level floor(log2(sqrt(area) / 56)), RoIAlign aligned, adaptive
    sampling."""
    scale = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    target = torch.floor(torch.log2(scale / 56 + 1e-6)).clamp(0, 3).long()
    rois = torch.cat([torch.zeros_like(boxes[:, :1]), boxes], 1).float()
    out = torch.zeros(len(boxes), levels[0].shape[1], size, size)
    for lvl in range(4):
        idx = (target == lvl).nonzero().squeeze(1)
        out[idx] = torchvision.ops.roi_align(levels[lvl], rois[idx], size, spatial_scale=1 / RCNN_STRIDES[lvl],
                                             sampling_ratio=0, aligned=True)
    return out


def _box_features(sd, levels, proposals):
    x = _reference_roi_align(levels, proposals, 7).flatten(1)
    for i in range(2):
        x = F.relu(F.linear(x, sd[f'roi_head.bbox_head.shared_fcs.{i}.weight'],
                            sd[f'roi_head.bbox_head.shared_fcs.{i}.bias']))
    return x


def _centre_classifier(sd, levels, proposals):
    """Set ``fc_cls``'s bias so that each output averages 0 over ``proposals``: random weights otherwise give one
    category the highest score on every RoI."""
    logits = F.linear(_box_features(sd, levels, proposals), sd['roi_head.bbox_head.fc_cls.weight'])
    sd['roi_head.bbox_head.fc_cls.bias'] = -logits.mean(0)


def _reference_rcnn_detections(sd, levels, proposals, image_hw, per_image=100):
    """Shared2FCBBoxHead + multiclass NMS (score > 0.05, NMS 0.5 per class, the best ``per_image``: 100 in the
    paper's config), then FCNMaskHead's probabilities of each detection's category (28 x 28, before pasting into the
    image)."""
    x = _box_features(sd, levels, proposals)
    cls = F.linear(x, sd['roi_head.bbox_head.fc_cls.weight'], sd['roi_head.bbox_head.fc_cls.bias'])
    reg = F.linear(x, sd['roi_head.bbox_head.fc_reg.weight'], sd['roi_head.bbox_head.fc_reg.bias'])
    prob = cls.double().softmax(-1)[:, :-1]  # MMDetection's background is its last output
    categories = prob.shape[1]
    reg = reg.reshape(len(reg), -1, 4).expand(-1, categories, -1)  # class-agnostic: one set for all
    boxes = torch.stack([_decode(proposals, reg[:, c], (0.1, 0.1, 0.2, 0.2), image_hw) for c in range(categories)], 1)
    keep = (prob > 0.05).nonzero()
    b, s, c = boxes[keep[:, 0], keep[:, 1]], prob[keep[:, 0], keep[:, 1]], keep[:, 1]
    kept = torchvision.ops.batched_nms(b, s, c, 0.5)[:per_image]
    b, s, labels = b[kept], s[kept], c[kept] + 1
    m = _reference_roi_align(levels, b, 14)
    for i in range(4):
        m = F.relu(_conv2d(sd, f'roi_head.mask_head.convs.{i}.conv', m, padding=1))
    m = F.relu(F.conv_transpose2d(m, sd['roi_head.mask_head.upsample.weight'], sd['roi_head.mask_head.upsample.bias'],
                                  stride=2))
    logits = _conv2d(sd, 'roi_head.mask_head.conv_logits', m)
    logits = logits[torch.arange(len(b)), (labels - 1) if logits.shape[1] > 1 else 0]
    return b, s, labels, logits.sigmoid()


def _rcnn(kind='maskrcnn', categories=3):
    return build_detector(kind, 'shvit_s1', categories, out_channels=CHANNELS, min_size=256, max_size=384).eval()


@pytest.mark.parametrize('agnostic', [False, True])
def test_mask_rcnn_gives_mmdetections_proposals_detections_and_masks(agnostic):
    sd, src = _mmdet_rcnn_state_dict(agnostic=agnostic)
    model = _rcnn()
    assert load_mmdet_detector(model, sd) == []
    torch.manual_seed(2)
    image = torch.rand(3, 256, 384)
    with torch.no_grad():
        ref_levels = _reference_rcnn_pyramid(sd, _features(src, image))
        images, _ = model.transform([image])
        levels = model.backbone(images.tensors)
        for got, want in zip(levels.values(), ref_levels, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        proposals = model.rpn(images, levels)[0][0]
        ref_proposals = _reference_proposals(sd, ref_levels, (256, 384))
        # the same 1000 proposals, but for a few whose score or overlap rounds the other way in float32
        assert len(proposals) == len(ref_proposals) == 1000
        close = ((proposals.double()[:, None] - ref_proposals[None]).abs().amax(-1) < 2e-3).any(0)
        assert close.sum() >= 990
        # RoI heads on the reference's proposals: the detections and mask probabilities
        _centre_classifier(sd, ref_levels, ref_proposals.float())
        load_mmdet_detector(model, sd)
        dets = model.roi_heads(levels, [ref_proposals.float()], images.image_sizes)[0][0]
        ref_boxes, ref_scores, ref_labels, ref_masks = _reference_rcnn_detections(sd, ref_levels, ref_proposals.float(),
                                                                                  (256, 384))
    assert len(ref_scores) == 100 and len(set(ref_labels.tolist())) >= 2  # a comparison of substance
    assert len(dets['scores']) == len(ref_scores)
    torch.testing.assert_close(dets['scores'].double(), ref_scores, rtol=0, atol=1e-5)
    assert torch.equal(dets['labels'], ref_labels)
    torch.testing.assert_close(dets['boxes'].double(), ref_boxes, rtol=0, atol=2e-3)
    torch.testing.assert_close(dets['masks'][:, 0], ref_masks, rtol=0, atol=1e-5)


def test_faster_rcnn_and_other_categories():
    sd, _ = _mmdet_rcnn_state_dict(mask=False, categories=80)
    model = _rcnn('fasterrcnn', categories=80)
    assert load_mmdet_detector(model, sd) == []
    own = model.state_dict()
    # MMDetection's background output is its last, torchvision's its first; box deltas per category after
    # torchvision's unused background set
    assert torch.equal(own['roi_heads.box_predictor.cls_score.weight'][0], sd['roi_head.bbox_head.fc_cls.weight'][80])
    assert torch.equal(own['roi_heads.box_predictor.cls_score.bias'][1:], sd['roi_head.bbox_head.fc_cls.bias'][:80])
    assert torch.equal(own['roi_heads.box_predictor.bbox_pred.weight'][4:], sd['roi_head.bbox_head.fc_reg.weight'])
    other = _rcnn('fasterrcnn', categories=3)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(MMDetWeightsError, match='classifies 80 categories, the model 3'):
        load_mmdet_detector(other, sd)
    left = load_mmdet_detector(other, sd, classifier=False)
    assert left == ['roi_heads.box_predictor.bbox_pred.bias', 'roi_heads.box_predictor.bbox_pred.weight',
                    'roi_heads.box_predictor.cls_score.bias', 'roi_heads.box_predictor.cls_score.weight']
    now = other.state_dict()
    assert all(torch.equal(now[k], before[k]) for k in left)
    assert torch.equal(now['roi_heads.box_head.fc7.weight'], sd['roi_head.bbox_head.shared_fcs.1.weight'])
    # a Mask R-CNN file into a Faster R-CNN: the mask head has no place
    with_masks, _ = _mmdet_rcnn_state_dict(categories=80)
    with pytest.raises(MMDetWeightsError, match=r"without a place in the model \(e\.g\. \['roi_head\.mask_head\."):
        load_mmdet_detector(model, with_masks)
    with pytest.raises(MMDetWeightsError, match=r'an MMDetection R-CNN: it loads into build_detector\("fasterrcnn" / '
                                                r'"maskrcnn", \.\.\.\), not into a ForegroundRetinaNet'):
        load_mmdet_detector(_detector(), sd)


def test_aligned_roi_pooling_of_several_images_and_under_torchscript():
    """Found by a review: every test pooled one image, so RoIs taken from the wrong image went unnoticed, and the
    pool (and the R-CNNs' RoI heads) no longer compiled with TorchScript. Reference: each RoI pooled on its own
    image's map of its level (floor(log2(sqrt(area) / 56)), p2..p5), MMDetection's RoIAlign (aligned, adaptive)."""
    model = _rcnn()
    pool = model.roi_heads.box_roi_pool
    torch.manual_seed(4)
    levels = {f'p{k}': torch.randn(2, 5, 256 // 2 ** k, 384 // 2 ** k) for k in range(2, 6)}
    sizes = torch.tensor([20.0, 150, 300, 600, 45, 200])  # every level, on both images
    boxes = []
    for image in range(2):
        corner = torch.rand(len(sizes), 2) * 60 + image * 17
        boxes.append(torch.cat([corner, corner + sizes[:, None] * torch.tensor([1.0, 0.7])], 1))
    got = pool(levels, boxes, [(256, 384)] * 2)
    want = []
    for image, b in enumerate(boxes):
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        for box, lvl in zip(b, torch.floor(torch.log2(area.sqrt() / 56 + 1e-6)).clamp(0, 3).long().tolist()):
            feature = levels[f'p{lvl + 2}'][image:image + 1]
            want.append(torchvision.ops.roi_align(feature, [box[None]], 7, spatial_scale=1 / 2 ** (lvl + 2),
                                                  sampling_ratio=0, aligned=True))
    assert len({int(v) for v in torch.floor(torch.log2(sizes * 0.7 ** 0.5 / 56 + 1e-6)).clamp(0, 3)}) == 4
    torch.testing.assert_close(got, torch.cat(want), rtol=0, atol=1e-6)
    scripted = torch.jit.script(pool)
    torch.testing.assert_close(scripted(levels, boxes, [(256, 384)] * 2), got, rtol=0, atol=0)
    torch.jit.script(model.roi_heads)  # as with torchvision's own pools


def test_checkpoint_forms_and_damaged_heads(tmp_path):
    """Found by a review: a numpy seed in MMDetection's meta (a single-GPU run's) or any other object in the file
    was a raw UnpicklingError; the whole checkpoint dict passed as a mapping was taken for a state dict; degenerate
    head shapes gave a ZeroDivisionError, "-1 categories" or a silently repeated bias."""
    import argparse

    import numpy as np

    sd, _ = _mmdet_state_dict(seed=5)
    model = _detector()
    seeded = tmp_path / 'seeded.pth'
    torch.save({'meta': {'seed': np.int64(3), 'epoch': 12}, 'state_dict': sd}, seeded)
    assert load_mmdet_detector(model, seeded) == []
    assert torch.equal(model.state_dict()['backbone.fpn.lateral_convs.1.bias'], sd['neck.lateral_convs.1.conv.bias'])
    odd = tmp_path / 'odd.pth'
    torch.save({'meta': {'args': argparse.Namespace(seed=3)}, 'state_dict': sd}, odd)
    with pytest.raises(MMDetWeightsError, match=r'odd\.pth is not a readable checkpoint: it holds Python objects other '
                                                r'than tensors and numbers \(argparse\.Namespace\)'):
        load_mmdet_detector(model, odd)
    assert load_mmdet_detector(_detector(), {'meta': {}, 'state_dict': sd}) == []  # what torch.load returns
    with pytest.raises(MMDetWeightsError, match='the checkpoint holds no state dict of tensors'):
        load_mmdet_detector(model, {'meta': {}})
    damaged = dict(sd, **{'bbox_head.retina_reg.weight': torch.zeros(0, CHANNELS, 3, 3)})
    with pytest.raises(MMDetWeightsError, match=r'retina_reg has 0 and retina_cls 27 outputs'):
        load_mmdet_detector(model, damaged)
    rcnn, _ = _mmdet_rcnn_state_dict(mask=False)
    with pytest.raises(MMDetWeightsError, match=r'fc_cls has 1 output\(s\)'):
        load_mmdet_detector(_rcnn('fasterrcnn'), dict(rcnn, **{'roi_head.bbox_head.fc_cls.weight': torch.zeros(1, 1024),
                                                               'roi_head.bbox_head.fc_cls.bias': torch.zeros(1)}))
    with pytest.raises(MMDetWeightsError, match=r'fc_reg has a weight of 12 outputs and a bias of 4'):
        load_mmdet_detector(_rcnn('fasterrcnn'), dict(rcnn, **{'roi_head.bbox_head.fc_reg.bias': torch.zeros(4)}))


def test_evaluate_det_gives_the_ap_of_detector_weights(tmp_path, capsys):
    """``vitzoo evaluate-det``: an MMDetection file, and a finetune-det run's weights, whose AP must equal the AP that
    run's own final evaluation logged (the same model and data through the training command's path)."""
    import json

    data = make_shapes_dataset(tmp_path / 'data', num_train=2, num_val=2, size=(72, 96))
    sd, _ = _mmdet_state_dict()
    path = tmp_path / 'retina.pth'
    torch.save({'state_dict': sd}, path)
    common = ['--data', str(data), '--backbone', 'shvit_s1', '--out-channels', str(CHANNELS), '--img-size', '96',
              '--workers', '0', '--no-progress']
    assert main(['evaluate-det', *common, '--detector-weights', str(path), '--format', 'json']) == 0
    stats = json.loads(capsys.readouterr().out)
    assert set(stats) == {'bbox'} and set(stats['bbox']) >= {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'}
    # the same weights loaded through the API, evaluated directly: the command adds nothing of its own
    from vitzoo.detection.data import CocoDetectionFolder
    from vitzoo.detection.evaluate import evaluate_coco
    model = build_detector('retinanet', 'shvit_s1', 3, out_channels=CHANNELS, min_size=96, max_size=96)
    load_mmdet_detector(model, sd)
    assert evaluate_coco(model, CocoDetectionFolder(str(data), 'val'), progress=False) == stats
    # a finetune-det run's final weights and its checkpoint: the AP its own last evaluation logged
    run = tmp_path / 'run'
    assert main(['finetune-det', *common, '--out', str(run), '--batch-size', '2', '--max-iters', '2',
                 '--checkpoint-every', '0']) == 0
    capsys.readouterr()
    logged = [json.loads(line) for line in (run / 'log.jsonl').read_text().splitlines()]
    final = [r['eval'] for r in logged if 'eval' in r][-1]
    for weights in ('model_final.pth', 'checkpoint_last.pth'):
        assert main(['evaluate-det', *common, '--weights', str(run / weights), '--format', 'json']) == 0
        assert json.loads(capsys.readouterr().out) == final
    # errors: one line each, before or instead of any evaluation
    assert main(['evaluate-det', *common, '--weights', str(run / 'model_final.pth'), '--detector', 'fasterrcnn']) == 1
    err = capsys.readouterr().err
    assert 'model_final.pth does not fit this detector (another --detector, --backbone' in err
    assert 'Traceback' not in err
    coco80, _ = _mmdet_state_dict(categories=80)
    torch.save({'state_dict': coco80}, tmp_path / 'coco80.pth')
    assert main(['evaluate-det', *common, '--detector-weights', str(tmp_path / 'coco80.pth')]) == 1
    assert 'coco80.pth classifies 80 categories, the val split of' in capsys.readouterr().err
    assert main(['evaluate-det', *common, '--weights', str(tmp_path / 'none.pth')]) == 1  # a file: 1
    assert 'none.pth not found' in capsys.readouterr().err
    assert main(['evaluate-det', *common, '--detector-weights', str(tmp_path / 'none.pth')]) == 1
    assert 'none.pth does not exist' in capsys.readouterr().err
    assert main(['evaluate-det', *common, '--detector-weights', str(path), '--batch-size', '0']) == 2  # usage: 2
    assert '--batch-size must be >= 1, got 0' in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: one of the two, not both
        main(['evaluate-det', *common, '--weights', str(path), '--detector-weights', str(path)])
    assert 'not allowed with argument' in capsys.readouterr().err
