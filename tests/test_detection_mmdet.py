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
from vitzoo.detection import MMDetWeightsError, build_detector, load_mmdet_retinanet
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
    assert load_mmdet_retinanet(model, sd) == []
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


def test_a_file_loads_into_the_detector(tmp_path):
    """The official file's form: MMDetection's dict with 'meta' and 'state_dict'; a timm-layout backbone as well."""
    sd, _ = _mmdet_state_dict(official_backbone=False, seed=3)
    path = tmp_path / 'retinanet_shvit_s1.pth'
    torch.save({'meta': {'mmdet_version': '2.25.0', 'CLASSES': ('a', 'b', 'c'), 'epoch': 12}, 'state_dict': sd,
                'optimizer': {'state': {}, 'param_groups': []}}, path)
    model = _detector()
    assert load_mmdet_retinanet(model, path) == []
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
        load_mmdet_retinanet(model, sd)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded
    left = load_mmdet_retinanet(model, sd, classifier=False)
    assert left == ['head.classification_head.cls_logits.weight', 'head.classification_head.cls_logits.bias']
    own = model.state_dict()
    assert all(torch.equal(own[k], before[k]) for k in left)
    assert torch.equal(own['head.classification_head.conv.0.0.weight'], sd['bbox_head.cls_convs.0.conv.weight'])


def test_files_that_do_not_fit_are_named(tmp_path):
    model = _detector()
    sd, _ = _mmdet_state_dict()
    extra = dict(sd, **{'neck.extra_trans_convs.1.conv.weight': torch.zeros(CHANNELS, CHANNELS, 2, 2)})
    with pytest.raises(MMDetWeightsError, match=r"1 tensors of the checkpoint without a place in the model \(e\.g\. "
                                                r"\['neck\.extra_trans_convs\.1\.conv\.weight'\]\)"):
        load_mmdet_retinanet(model, extra)
    missing = {k: v for k, v in sd.items() if k != 'bbox_head.reg_convs.2.conv.bias'}
    with pytest.raises(MMDetWeightsError, match=r"1 tensors of the model not in the checkpoint \(e\.g\. "
                                                r"\['head\.regression_head\.conv\.2\.0\.bias'\]\)"):
        load_mmdet_retinanet(model, missing)
    with pytest.raises(MMDetWeightsError, match=r'36 tensors of other shapes .*\(backbone\.fpn\.down_convs\.0\.bias: '
                                                r'\[16\] in the checkpoint, \[8\] in the model\).*--out-channels'):
        load_mmdet_retinanet(build_detector('retinanet', 'shvit_s1', 3, out_channels=8), sd)
    mask_rcnn = {k: v for k, v in sd.items() if not k.startswith('bbox_head.')}
    mask_rcnn['rpn_head.rpn_conv.weight'] = torch.zeros(1)
    mask_rcnn['roi_head.bbox_head.fc_cls.weight'] = torch.zeros(1)
    with pytest.raises(MMDetWeightsError, match=r'no RetinaNet head .*roi_head, rpn_head.*--backbone-weights'):
        load_mmdet_retinanet(model, mask_rcnn)
    with pytest.raises(MMDetWeightsError, match=r'load into build_detector\("retinanet", \.\.\.\), not into a '
                                                r'FasterRCNN'):
        load_mmdet_retinanet(build_detector('fasterrcnn', 'shvit_s1', 3, out_channels=CHANNELS), sd)
    # files: a classification checkpoint, a truncated one, none
    classification = tmp_path / 'shvit_s1.pth'
    torch.save(timm.create_model('shvit_s1').state_dict(), classification)
    with pytest.raises(MMDetWeightsError, match=r'not an MMDetection detector checkpoint .*--backbone-weights'):
        load_mmdet_retinanet(model, classification)
    whole = tmp_path / 'whole.pth'
    torch.save({'state_dict': sd}, whole)
    cut = tmp_path / 'cut.pth'
    cut.write_bytes(whole.read_bytes()[:100_000])
    with pytest.raises(MMDetWeightsError, match=r'cut\.pth is not a readable checkpoint'):
        load_mmdet_retinanet(model, cut)
    with pytest.raises(FileNotFoundError, match=r'nothing\.pth does not exist'):
        load_mmdet_retinanet(model, tmp_path / 'nothing.pth')


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
    assert f'detector: backbone, neck and head from {path}; its classification layer (80 categories) left out: the ' \
           'data has 3' in printed
    final = torch.load(tmp_path / 'run' / 'model_final.pth', weights_only=True)
    # one step at lr 1e-12 leaves the loaded tensors where they were (AdamW moves each by at most ~lr)
    torch.testing.assert_close(final['backbone.fpn.lateral_convs.2.weight'], sd['neck.lateral_convs.2.conv.weight'],
                               rtol=0, atol=1e-9)
    for option, message in ((['--pretrained'], '--detector-weights gives the backbone its weights too'),
                            (['--detector', 'maskrcnn'], 'for --detector maskrcnn give a detector checkpoint\'s '
                                                         'backbone with --backbone-weights FILE'),
                            (['--resume'], '--resume restores the whole detector')):
        assert main([*common, '--out', str(tmp_path / 'bad'), '--detector-weights', str(path), *option]) == 2
        assert message in capsys.readouterr().err
    assert main([*common, '--out', str(tmp_path / 'bad'), '--detector-weights', str(tmp_path / 'no.pth')]) == 2
    assert 'no.pth is not a file' in capsys.readouterr().err
