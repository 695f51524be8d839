"""COCO-format folder: loading, targets, up-front validation errors naming file and entry; COCO evaluation."""
import json
import os
import re
import warnings

import pytest
import torch

from vitzoo.detection.data import (CocoDetectionFolder, DatasetError, SkippedBoxWarning, boxes_as_trained,
                                   collate_detection, hflip, worker_error_message)
from vitzoo.detection.evaluate import evaluate_coco
from vitzoo.detection.synthetic import make_shapes_dataset


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp('shapes'), num_train=4, num_val=3, size=(64, 80))


def test_dataset_items_match_annotations(shapes):
    ds = CocoDetectionFolder(shapes, 'val', with_masks=True)
    raw = json.loads((shapes / 'annotations' / 'instances_val.json').read_text())
    assert len(ds) == 3 and ds.num_classes == 3
    image, target = ds[0]
    assert image.shape == (3, 64, 80) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    anns = [a for a in raw['annotations'] if a['image_id'] == int(target['image_id'])]
    x, y, w, h = anns[0]['bbox']
    torch.testing.assert_close(target['boxes'][0], torch.tensor([x, y, x + w, y + h]))
    assert target['labels'].tolist() == [a['category_id'] for a in anns]  # ids 1..3 map to labels 1..3
    assert target['masks'].shape == (len(anns), 64, 80)
    # a polygon mask covers roughly its box area (rectangles, ellipses, triangles: 0.5-1 of the box)
    for m, a in zip(target['masks'], anns):
        assert 0.4 * a['area'] < m.sum() < 1.1 * a['area']
    images, targets = collate_detection([ds[0], ds[1]])
    assert len(images) == len(targets) == 2


def test_generator_never_mixes_into_an_existing_dataset(tmp_path):
    root = make_shapes_dataset(tmp_path / 'ds', num_train=1, num_val=0, size=(32, 32))
    before = sorted(p.name for p in root.rglob('*'))
    with pytest.raises(FileExistsError, match='already exists'):
        make_shapes_dataset(root, num_train=2, num_val=1, size=(32, 32), seed=1)
    assert sorted(p.name for p in root.rglob('*')) == before and sorted(os.listdir(tmp_path)) == ['ds']
    make_shapes_dataset(root, num_train=2, num_val=1, size=(32, 32), seed=1, force=True)
    assert sorted(p.name for p in (root / 'train').iterdir()) == ['train_0000.png', 'train_0001.png']


@pytest.mark.parametrize("in_the_way", ["file", "current folder", "interrupt"])
def test_generator_command_line_names_its_own_arguments(tmp_path, monkeypatch, capsys, in_the_way):
    """Found by an audit: `python -m vitzoo.detection.synthetic FILE` said to pass "force=True (--force)", which then
    refused the file anyway, `. --force` to choose another "(--out)", an option it does not have, and Ctrl-C was a
    traceback."""
    import sys

    import vitzoo.detection.synthetic as synthetic

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.png").write_text("x")
    root = {"file": "data.png", "current folder": ".", "interrupt": "new"}[in_the_way]
    if in_the_way == "interrupt":
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt
        monkeypatch.setattr(synthetic, "make_shapes_dataset", interrupted)
    for force in ([], ["--force"]):
        monkeypatch.setattr(sys, "argv", ["synthetic", root, *force])
        with pytest.raises(SystemExit) as info:
            synthetic.main()
        if in_the_way == "interrupt":
            assert info.value.code == 130 and capsys.readouterr().err == "interrupted\n"
            continue
        message = str(info.value.code)
        assert message.startswith(f"error: {'data.png is a file' if root == 'data.png' else 'cannot replace .'}")
        assert "force=True" not in message and "(--out)" not in message and "(ROOT)" in message, message
    assert sorted(os.listdir(tmp_path)) == ["data.png"]


def test_hflip_boxes_and_masks():
    image = torch.zeros(3, 4, 10)
    target = dict(boxes=torch.tensor([[1.0, 0.0, 3.0, 2.0]]), masks=torch.zeros(1, 4, 10, dtype=torch.uint8))
    target['masks'][0, :, 1:3] = 1
    image[:, :, 1:3] = 1
    fi, ft = hflip(image, target)
    assert ft['boxes'].tolist() == [[7.0, 0.0, 9.0, 2.0]]
    assert fi[0, 0].nonzero().flatten().tolist() == [7, 8] == ft['masks'][0, 0].nonzero().flatten().tolist()


def _write(shapes, tmp_path, edit):
    root = tmp_path / 'bad'
    (root / 'annotations').mkdir(parents=True)
    (root / 'train').symlink_to(shapes / 'train')
    data = json.loads((shapes / 'annotations' / 'instances_train.json').read_text())
    edit(data)
    (root / 'annotations' / 'instances_train.json').write_text(json.dumps(data))
    return root


def _set(path, value):
    def edit(data):
        entry = data
        for key in path[:-1]:
            entry = entry[key]
        if value is None:
            del entry[path[-1]]
        else:
            entry[path[-1]] = value
    return edit


@pytest.mark.parametrize('edit,error,match', [
    (_set(('images', 1, 'file_name'), 'nope.png'), FileNotFoundError,
     r'image id 2 \(nope.png\): image file .* not found'),
    (_set(('annotations', 0, 'bbox'), None), DatasetError,
     r"annotation id 1 \(image id 1\): missing field\(s\) \['bbox'\]"),
    (_set(('annotations', 1, 'bbox'), [1, 2, 3]), DatasetError,
     r'annotation id 2 .*bbox must be \[x, y, width, height\]'),
    (_set(('annotations', 0, 'bbox'), [5, 5, -3, 4]), DatasetError, r'annotation id 1 .*negative width'),
    (_set(('annotations', 0, 'bbox'), [500, 5, 3, 4]), DatasetError, r'annotation id 1 .*outside the 80x64 image'),
    (_set(('annotations', 0, 'category_id'), 7), DatasetError,
     r'annotation id 1 \(image id 1\): category id 7 is not in "categories" \(known ids: \[1, 2, 3\]\)'),
    (_set(('annotations', 0, 'image_id'), 99), DatasetError, r'annotation id 1 .*image id 99 is not in "images"'),
    (_set(('annotations', 0, 'segmentation'), [[1, 2, 3]]), DatasetError, r'annotation id 1 .*polygon'),
    (_set(('images', 0, 'width'), None), DatasetError, r"images\[0\]: missing field\(s\) \['width'\]"),
    (_set(('categories',), []), DatasetError, r'"categories" is empty'),
])
def test_bad_data_is_reported_with_file_and_entry(shapes, tmp_path, edit, error, match):
    root = _write(shapes, tmp_path, edit)
    with pytest.raises(error, match=match) as info:
        CocoDetectionFolder(root, 'train', with_masks=True)
    assert 'instances_train.json' in str(info.value)


@pytest.mark.parametrize('bbox', [
    [29.65, 38.33, 1.03, 0.0],  # COCO 2017 train's annotation 918 (zero height), scaled into the 80x64 image
    [70, 10, 1e-6, 30],  # collapses to zero width in float32
    [79.99999999, 10, 5, 30],  # clamped to the image in float32: zero width
    [0, 0, 0, 0],  # zero size in a corner (not "outside the image")
])
def test_a_box_too_small_to_train_on_is_skipped_with_a_warning(shapes, tmp_path, bbox):
    """Found by an audit: COCO 2017's own train split was refused (its zero-height boxes), so the documented
    "COCO itself fits" was false. Such boxes (and ones that collapse to zero once clamped in float32, which
    torchvision would stop training on) are left out of the training targets with one warning naming the first,
    as torchvision's and mmdet's COCO loaders do, and stay in the evaluation ground truth."""
    root = _write(shapes, tmp_path, _set(('annotations', 0, 'bbox'), bbox))
    raw = json.loads((root / 'annotations' / 'instances_train.json').read_text())
    with pytest.warns(SkippedBoxWarning, match=r'instances_train.json: 1 annotation\(s\) with a box too small to '
                                               r'train on \(e\.g\. annotation id 1, image id 1: bbox'):
        ds = CocoDetectionFolder(root, 'train', with_masks=True)
    assert [a['id'] for a in ds.skipped] == [1]
    image_ids = [int(ds[i][1]['image_id']) for i in range(len(ds))]
    target = ds[image_ids.index(1)][1]
    kept = [a for a in raw['annotations'] if a['image_id'] == 1 and a['id'] != 1 and not a.get('iscrowd')]
    assert len(target['boxes']) == len(target['labels']) == len(target['masks']) == len(kept)
    expected = boxes_as_trained([a['bbox'] for a in kept], 80, 64)
    torch.testing.assert_close(target['boxes'], torch.from_numpy(expected), rtol=0, atol=0)
    assert 1 in [a['id'] for a in ds.coco_dict()['annotations']]


def test_a_thin_crowd_box_is_not_refused(shapes, tmp_path):
    """Crowd regions are left out of training (only ignored in evaluation), so the float32 size check skips them."""
    def edit(data):
        data['annotations'][0]['bbox'] = [70, 10, 1e-6, 30]
        data['annotations'][0]['iscrowd'] = 1
    ds = CocoDetectionFolder(_write(shapes, tmp_path, edit), 'train')
    assert len(ds) > 0


def test_labels_follow_sorted_category_ids_and_crowds_are_left_out(shapes, tmp_path):
    """Categories listed out of id order still get labels 1..n by sorted id; images come in id order whatever the
    JSON order; crowd annotations (which need no polygon, even with masks) are not training targets."""
    new_id = {1: 30, 2: 10, 3: 20}

    def edit(data):
        for c in data['categories']:
            c['id'] = new_id[c['id']]
        data['categories'].sort(key=lambda c: [30, 10, 20].index(c['id']))
        for a in data['annotations']:
            a['category_id'] = new_id[a['category_id']]
        data['images'].reverse()
        crowd = data['annotations'][0]
        crowd['iscrowd'] = 1
        del crowd['segmentation']
    root = _write(shapes, tmp_path, edit)
    raw = json.loads((root / 'annotations' / 'instances_train.json').read_text())
    ds = CocoDetectionFolder(root, 'train', with_masks=True)
    assert [int(ds[i][1]['image_id']) for i in range(len(ds))] == sorted(im['id'] for im in raw['images'])
    assert ds.category_to_label == {10: 1, 20: 2, 30: 3} and ds.label_to_category == {1: 10, 2: 20, 3: 30}
    crowd_image = raw['annotations'][0]['image_id']
    index = [int(ds[i][1]['image_id']) for i in range(len(ds))].index(crowd_image)
    target = ds[index][1]
    kept = [a for a in raw['annotations'] if a['image_id'] == crowd_image and not a.get('iscrowd')]
    assert target['labels'].tolist() == [{10: 1, 20: 2, 30: 3}[a['category_id']] for a in kept]
    assert len(target['boxes']) == len(target['masks']) == len(kept)


def _two_splits(shapes, tmp_path, edit_val):
    root = _write(shapes, tmp_path, lambda d: None)
    (root / 'val').symlink_to(shapes / 'val')
    data = json.loads((shapes / 'annotations' / 'instances_val.json').read_text())
    edit_val(data)
    (root / 'annotations' / 'instances_val.json').write_text(json.dumps(data))
    return root


@pytest.mark.parametrize('edit,says', [
    (lambda d: d['categories'].append({'id': 9, 'name': 'extra'}), r'ids only in instances_val\.json: \[9\]'),
    (lambda d: d.update(categories=[c for c in d['categories'] if c['id'] != 3],
                        annotations=[a for a in d['annotations'] if a['category_id'] != 3]),
     r'ids only in instances_train\.json: \[3\]'),
    (lambda d: d['categories'][0].update(name='other'), r"id 1 is '\w+' in one and 'other' in the other"),
])
def test_val_categories_must_be_trains(shapes, tmp_path, edit, says):
    """Found by an audit: labels follow train's categories, the evaluation maps them back through val's, and
    nothing compared the two: an extra val category gave AP 0 silently, a missing one an error after training."""
    from vitzoo.detection.data import check_same_categories

    root = _two_splits(shapes, tmp_path, edit)
    train, val = CocoDetectionFolder(root, 'train'), CocoDetectionFolder(root, 'val')
    with pytest.raises(DatasetError, match=says) as info:
        check_same_categories(train, val)
    assert 'same "categories" list' in str(info.value)
    check_same_categories(train, CocoDetectionFolder(shapes, 'val'))  # the same list passes


def test_mask_evaluation_needs_a_segmentation_on_crowd_regions(shapes, tmp_path):
    """Found by an audit: a crowd annotation without a segmentation is fine for training (it is no target), but
    pycocotools' segm evaluation stopped on it with a KeyError after training; it is now a DatasetError naming it,
    from evaluate_coco and (before any training) from finetune-det."""
    from vitzoo.detection.data import check_masks_for_evaluation

    def edit(data):
        data['annotations'].append({'id': 99, 'image_id': data['images'][0]['id'], 'category_id': 1,
                                    'bbox': [10, 10, 20, 20], 'iscrowd': 1})

    root = _two_splits(shapes, tmp_path, edit)
    val = CocoDetectionFolder(root, 'val', with_masks=True)
    with pytest.raises(DatasetError, match=r'annotation id 99 \(image id \d+\) is a crowd region without a '
                                           r'segmentation \(1 such annotation\(s\)\); mask evaluation needs one'):
        check_masks_for_evaluation(val)
    with pytest.raises(DatasetError, match='annotation id 99'):
        evaluate_coco(_Oracle(val, masks=True), val, progress=False)
    check_masks_for_evaluation(CocoDetectionFolder(shapes, 'val', with_masks=True))


def test_bad_json_and_missing_layout(shapes, tmp_path):
    with pytest.raises(FileNotFoundError, match='expected layout DIR/annotations/instances_<split>.json'):
        CocoDetectionFolder(tmp_path, 'train')
    root = _write(shapes, tmp_path, lambda d: None)
    (root / 'annotations' / 'instances_train.json').write_text('{"images": [')
    with pytest.raises(DatasetError, match='instances_train.json: not valid JSON'):
        CocoDetectionFolder(root, 'train')


def test_image_size_mismatch_names_image(shapes, tmp_path):
    root = _write(shapes, tmp_path, _set(('images', 0, 'width'), 81))
    ds = CocoDetectionFolder(root, 'train')
    with pytest.raises(DatasetError, match=r'image id 1: .*train_0000.png is 80x64 but the JSON says 81x64'):
        ds[0]


class _Oracle(torch.nn.Module):
    """Returns the ground truth as detections, optionally moved right by ``shift`` of each box's width: an
    independent check of the metric (a box moved by w/5 overlaps its ground truth with IoU 0.8w / 1.2w = 2/3)."""

    def __init__(self, ds, shift=0.0, masks=False):
        super().__init__()
        self.items = {tuple(ds[i][0].shape) + (float(ds[i][0].sum()),): ds[i][1] for i in range(len(ds))}
        self.shift, self.masks = shift, masks

    def forward(self, images):
        outs = []
        for im in images:
            t = self.items[tuple(im.shape) + (float(im.sum()),)]
            boxes = t['boxes'].clone()
            boxes[:, 0::2] += self.shift * (boxes[:, 2:3] - boxes[:, 0:1])  # x1, x2 (xyxy)
            o = dict(boxes=boxes, labels=t['labels'], scores=torch.ones(len(t['labels'])))
            if self.masks:
                o['masks'] = t['masks'][:, None].float()
            outs.append(o)
        return outs


def test_coco_evaluation_against_oracle(shapes):
    ds = CocoDetectionFolder(shapes, 'val', with_masks=True)
    perfect = evaluate_coco(_Oracle(ds, masks=True), ds, progress=False)
    assert perfect['bbox']['AP'] == pytest.approx(1.0) and perfect['segm']['AP'] == pytest.approx(1.0)
    shifted = evaluate_coco(_Oracle(ds, shift=0.2), ds, progress=False)
    assert set(shifted) == {'bbox'}
    # IoU 2/3 for every box: a hit at the thresholds 0.50, 0.55, 0.60, 0.65 and a miss at 0.70 ... 0.95
    assert shifted['bbox']['AP50'] == pytest.approx(1.0) and shifted['bbox']['AP75'] == pytest.approx(0.0)
    assert shifted['bbox']['AP'] == pytest.approx(0.4)


class _Crowded(_Oracle):
    """The ground truth at score 0.5, after 40 far-away boxes of each of the 3 classes at score 0.9: 120 higher-scored
    false detections per image."""

    def forward(self, images):
        outs = super().forward(images)
        for o in outs:
            far = torch.tensor([[1000.0, 1000.0, 1010.0, 1010.0]]).repeat(120, 1)
            o['boxes'] = torch.cat([far, o['boxes']])
            o['labels'] = torch.cat([torch.arange(1, 4).repeat_interleave(40), o['labels']])
            o['scores'] = torch.cat([torch.full((120,), 0.9), torch.full((len(o['scores']),), 0.5)])
        return outs


def test_at_most_100_detections_per_image_are_scored(shapes):
    """Found by an audit: all of a RetinaNet's 300 detections per image were scored (pycocotools' maxDets caps each
    image-and-category pair, not the image), so 3 classes x 100 boxes made AR100 up to 3x what COCO's 100 per image
    gives. Here the 100 best-scored detections of each image are all false: under COCO's rule nothing is found."""
    ds = CocoDetectionFolder(shapes, 'val')
    stats = evaluate_coco(_Crowded(ds), ds, progress=False)['bbox']
    assert stats['AR100'] == pytest.approx(0.0) and stats['AP'] == pytest.approx(0.0)


def test_thinnest_accepted_box_stays_positive_when_flipped_and_resized(shapes, tmp_path):
    """The least box size the validation asks for (4 float32 steps at the image's larger side) is enough for a
    horizontal flip and torchvision's resize to keep a positive width (torchvision refuses other targets)."""
    from torchvision.models.detection.transform import resize_boxes
    step = float(torch.finfo(torch.float32).eps) * 64  # one float32 step at 64..128: the 80x64 image's larger side
    root = _write(shapes, tmp_path, _set(('annotations', 0, 'bbox'), [80 - 4 * step, 10, 4 * step, 30]))
    ds = CocoDetectionFolder(root, 'train')
    image, target = ds[0]
    for im, t in ((image, target), hflip(image, target)):
        box = t['boxes'][:1]
        assert (box[:, 2:] > box[:, :2]).all(), box
        for size in ((13, 17), (64, 80), (800, 1000), (1333, 1667), (100000, 125000)):
            resized = resize_boxes(box, (64, 80), size)
            assert (resized[:, 2:] > resized[:, :2]).all(), (size, resized)
    root = _write(shapes, tmp_path / 'b', _set(('annotations', 0, 'bbox'), [80 - 3 * step, 10, 3 * step, 30]))
    with pytest.warns(SkippedBoxWarning, match='too small to train on'):
        assert [a['id'] for a in CocoDetectionFolder(root, 'train').skipped] == [1]


def test_evaluation_ground_truth_is_the_clamped_box(shapes, tmp_path):
    """Found by an audit: training clamps a box that sticks out of its image, the evaluation ground truth did not, so
    an oracle returning the training targets scored AP 0.667 instead of 1 (and the size range used the outer box's
    area)."""
    def edit(data):
        data['annotations'][0]['bbox'] = [60, 10, 60, 30]  # 80x64 image: 20 of its 60 pixels inside
        del data['annotations'][0]['area'], data['annotations'][0]['segmentation']  # a box-only annotation
    root = _write(shapes, tmp_path, edit)
    ds = CocoDetectionFolder(root, 'train')
    gt = {a['id']: a for a in ds.coco_dict()['annotations']}
    assert gt[1]['bbox'] == [60, 10, 20, 30] and gt[1]['area'] == 600  # not 1800 (medium): a small object
    assert gt[2]['area'] == json.loads((shapes / 'annotations' / 'instances_train.json').read_text())[
        'annotations'][1]['area']  # an area the JSON gives is kept
    stats = evaluate_coco(_Oracle(ds), ds, progress=False)['bbox']
    assert stats['AP'] == pytest.approx(1.0) and stats['APs'] == pytest.approx(1.0)


def _one_square(tmp_path, size=200):
    """A one-image dataset: a 60x60 square object (area 3600: medium) at (10, 10) in a size x size image."""
    import numpy as np
    from PIL import Image
    root = tmp_path / 'square'
    (root / 'annotations').mkdir(parents=True)
    (root / 'val').mkdir()
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(root / 'val' / 'a.png')
    coco = dict(images=[dict(id=1, file_name='a.png', width=size, height=size)], categories=[dict(id=1, name='x')],
                annotations=[dict(id=1, image_id=1, category_id=1, bbox=[10, 10, 60, 60],
                                  segmentation=[[10, 10, 70, 10, 70, 70, 10, 70]], area=3600.0)])
    (root / 'annotations' / 'instances_val.json').write_text(json.dumps(coco))
    return CocoDetectionFolder(root, 'val', with_masks=True)


class _Fixed(torch.nn.Module):
    """Returns the same detections for every image."""

    def __init__(self, **detections):
        super().__init__()
        self.detections = detections

    def forward(self, images):
        return [dict(self.detections) for _ in images]


def test_segm_size_ranges_follow_the_mask_area(tmp_path):
    """Found by an audit: segm results carried their box too, so pycocotools took their area from the box and a
    small false positive mask in a medium box counted against APm."""
    ds = _one_square(tmp_path)
    _, target = ds[0]
    fp_mask = torch.zeros(200, 200)
    fp_mask[120:140, 120:140] = 1  # 20x20 = 400 pixels: a small object, in a 60x60 (medium) box
    model = _Fixed(boxes=torch.cat([target['boxes'], torch.tensor([[100.0, 100.0, 160.0, 160.0]])]),
                   labels=torch.tensor([1, 1]), scores=torch.tensor([0.5, 0.9]),
                   masks=torch.stack([target['masks'][0].float(), fp_mask])[:, None])
    segm = evaluate_coco(model, ds, progress=False)['segm']
    # medium objects: the exact mask is the only medium detection, so APm is 1; all sizes: the higher-scored
    # false positive comes first, precision 1/2 at recall 1, so AP is 0.5
    assert segm['APm'] == pytest.approx(1.0) and segm['AP'] == pytest.approx(0.5)
    assert segm['APs'] == -1 and segm['APl'] == -1  # no small / large ground truth


def test_background_detections_are_left_out_of_the_evaluation(tmp_path):
    """Found by an audit: a detection with label 0 (RetinaNet's background output) raised KeyError: 0."""
    ds = _one_square(tmp_path)
    _, target = ds[0]
    model = _Fixed(boxes=torch.cat([target['boxes'], torch.tensor([[100.0, 100.0, 160.0, 160.0]])]),
                   labels=torch.tensor([1, 0]), scores=torch.tensor([0.5, 0.9]))
    assert evaluate_coco(model, ds, progress=False)['bbox']['AP'] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"image id 1: a detection has label 2, but the dataset's labels are 1..1"):
        evaluate_coco(_Fixed(boxes=target['boxes'], labels=torch.tensor([2]), scores=torch.ones(1)), ds,
                      progress=False)


def test_no_detections_give_minus_one_where_there_is_no_ground_truth(tmp_path):
    """Found by an audit: with no detections every statistic was 0.000, with one pycocotools gives -1 for the size
    ranges without ground truth."""
    ds = _one_square(tmp_path)
    empty = _Fixed(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long), scores=torch.zeros(0),
                   masks=torch.zeros(0, 1, 200, 200))
    stats = evaluate_coco(empty, ds, progress=False)
    # the one object is medium (3600 pixels): small and large have no ground truth
    expected = dict(AP=0, AP50=0, AP75=0, APs=-1, APm=0, APl=-1, AR1=0, AR10=0, AR100=0, ARs=-1, ARm=0, ARl=-1)
    assert stats == {'bbox': expected, 'segm': expected}


_ID = r'must be an integer from -2\*\*63 to 2\*\*63 - 1 \(ids are int64\)'


@pytest.mark.parametrize('edit,match', [
    (_set(('images', 0, 'file_name'), 5),
     r'images\[0\] \(image id 1\): "file_name" must be a non-empty string .*, got 5 \(an integer\)'),
    (lambda d: d['images'][0].update(file_name=None),
     r'images\[0\] \(image id 1\): "file_name" must be a non-empty string .*, got null'),
    (_set(('images', 0, 'file_name'), ''), r'images\[0\] \(image id 1\): "file_name" must be a non-empty string'),
    (_set(('images', 0, 'id'), '1'), r'images\[0\]: "id" ' + _ID + r', got "1" \(a string\)'),
    (_set(('images', 0, 'width'), 80.0), r'image id 1 \(train_0000.png\): "width" must be a positive integer'),
    (_set(('annotations', 0, 'id'), [1]), r'annotations\[0\]: "id" ' + _ID + r', got \[1\] \(a list\)'),
    (_set(('annotations', 0, 'image_id'), [1]),
     r'annotations\[0\] \(annotation id 1\): "image_id" ' + _ID + r', got \[1\] \(a list\)'),
    (_set(('annotations', 0, 'category_id'), {'id': 1}),
     r'annotation id 1 \(image id 1\): "category_id" ' + _ID + r', got \{"id": 1\} \(an object\)'),
    # an id outside int64 was told "must be an integer, got ... (an integer)"
    (_set(('annotations', 0, 'id'), 2 ** 63),
     r'annotations\[0\]: "id" ' + _ID + r', got 9223372036854775808'),
    (_set(('categories', 0, 'id'), [1]), r'categories\[0\]: "id" ' + _ID + r', got \[1\] \(a list\)'),
    (lambda d: d['categories'][0].update(name=None), r'categories\[0\]: "name" must be a string, got null'),
    (_set(('annotations', 0, 'iscrowd'), 'yes'), r'annotation id 1 .*"iscrowd" must be 0 or 1, got "yes"'),
    (_set(('annotations', 0, 'area'), 'big'), r'annotation id 1 .*"area" must be a non-negative number'),
    (_set(('annotations', 0, 'bbox'), [1, 2, 10 ** 400, 3]), r'annotation id 1 .*bbox must be \[x, y, width, height\]'),
    (_set(('annotations', 0, 'segmentation'), {'counts': 'zzz', 'size': [64, 80]}),
     r'annotation id 1 .*RLE segmentation "counts" must be .* covering 64x80 = 5120 pixels; got "zzz"'),
    (_set(('annotations', 0, 'segmentation'), {'counts': [5000, 119], 'size': [64, 80]}),
     r'annotation id 1 .*RLE segmentation "counts"'),
    (_set(('annotations', 0, 'segmentation'), {'counts': [5120], 'size': [80, 64]}),
     r'annotation id 1 .*RLE segmentation "size" must be \[height, width\] of its image, \[64, 80\], got \[80, 64\]'),
    (_set(('images',), []), r'"images" is empty'),
])
def test_wrong_types_are_reported_with_file_entry_and_key(shapes, tmp_path, edit, match):
    # before: a TypeError deep in the loader (PosixPath / int, unhashable list) or silently accepted values
    root = _write(shapes, tmp_path, edit)
    with pytest.raises(DatasetError, match=match) as info:
        CocoDetectionFolder(root, 'train', with_masks=True)
    assert 'instances_train.json' in str(info.value) and '\n' not in str(info.value)


def test_compressed_rle_masks_are_accepted(shapes, tmp_path):
    from pycocotools import mask as mask_utils
    import numpy as np
    masks = {}

    def edit(data):
        rng = np.random.default_rng(0)
        for ann in data['annotations'][:3]:
            m = np.asfortranarray((rng.random((64, 80)) < 0.3).astype(np.uint8))
            rle = mask_utils.encode(m)
            ann['segmentation'] = dict(size=rle['size'], counts=rle['counts'].decode('ascii'))
            masks[ann['id']] = m
    root = _write(shapes, tmp_path, edit)
    ds = CocoDetectionFolder(root, 'train', with_masks=True)
    for index in range(len(ds)):
        _, target = ds[index]
        anns = [a for a in ds.anns[int(target['image_id'])] if not a['iscrowd']]
        for m, a in zip(target['masks'], anns):
            if a['id'] in masks:
                assert (m.numpy() == masks[a['id']]).all()


def test_non_utf8_and_bom_json(shapes, tmp_path):
    root = _write(shapes, tmp_path, lambda d: None)
    ann = root / 'annotations' / 'instances_train.json'
    text = ann.read_bytes()
    ann.write_bytes(b'\xef\xbb\xbf' + text)  # a UTF-8 byte-order mark is fine
    assert len(CocoDetectionFolder(root, 'train')) == 4
    ann.write_bytes(text.replace(b'"images"', b'"im\x80ages"', 1))
    with pytest.raises(DatasetError, match=r'instances_train.json: not UTF-8 text \(.*byte 0x80.*\)'):
        CocoDetectionFolder(root, 'train')


def test_worker_errors_unwrap_to_the_original_message(shapes, tmp_path):
    root = _write(shapes, tmp_path, _set(('images', 0, 'width'), 81))
    ds = CocoDetectionFolder(root, 'train')
    with pytest.raises(DatasetError) as direct:
        ds[0]
    batches = iter(torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1, collate_fn=collate_detection))
    try:
        next(batches)
        raise AssertionError('the worker did not fail')
    except DatasetError as e:
        text, unwrapped = str(e), worker_error_message(e)
        e.__traceback__ = None  # (a reference cycle through torch's re-raise frame would keep the iterator alive)
    finally:
        del batches  # shut the worker down now, not at some later garbage collection
    assert 'DataLoader worker' in text  # what torch re-raises
    assert unwrapped == str(direct.value) == worker_error_message(direct.value)
    assert worker_error_message(OSError('plain')) == 'plain'


def test_boxes_are_clamped_in_y_to_the_image_height():
    """Mutation testing: only the x overflow was tested, so clamping y to the width (80) instead of the height (64)
    went unnoticed. On the 80x64 image, [10, 50, 20, 30] reaches y = 80 and is clamped to y = 64."""
    xyxy = boxes_as_trained([[10, 50, 20, 30], [70, 0, 30, 10]], 80, 64)
    assert xyxy.tolist() == [[10, 50, 30, 64], [70, 0, 80, 10]]
    assert boxes_as_trained([[0, 0, 10, 10]], [80], [4]).tolist() == [[0, 0, 10, 4]]


def test_recall_stats_are_named_as_pycocotools_orders_them(tmp_path):
    """AR1 / AR10 / AR100 differ when the best box is ranked low; each is checked against COCOeval run directly on
    the same detections, and against hand values."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    ds = _one_square(tmp_path)  # ground truth: xywh [10, 10, 60, 60]
    # rank 1: moved 18 px (IoU 42/78 = 0.54: a hit at 0.50 only); rank 2: moved 8 px (IoU 52/68 = 0.76: a hit at
    # 0.50 ... 0.75); ranks 3..10: false positives; rank 11: the exact box (a hit at every threshold)
    xywh = [[28, 10, 60, 60], [18, 10, 60, 60]] + [[120 + 4 * i, 120, 30, 30] for i in range(8)] + [[10, 10, 60, 60]]
    scores = [0.9, 0.8] + [0.7 - 0.05 * i for i in range(8)] + [0.1]
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in xywh], dtype=torch.float32)
    model = _Fixed(boxes=boxes, labels=torch.ones(len(xywh), dtype=torch.long), scores=torch.tensor(scores))
    stats = evaluate_coco(model, ds, progress=False)['bbox']
    # by hand: AR1 = 1/10 thresholds, AR10 = 6/10, AR100 = 10/10
    assert (stats['AR1'], stats['AR10'], stats['AR100']) == pytest.approx((0.1, 0.6, 1.0))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / 'square' / 'annotations' / 'instances_val.json'))  # the JSON as written
        for ann in gt.dataset['annotations']:
            ann.setdefault('iscrowd', 0)  # optional in the JSON, required by COCOeval
        dt = gt.loadRes([dict(image_id=1, category_id=1, bbox=b, score=s) for b, s in zip(xywh, scores)])
        ev = COCOeval(gt, dt, 'bbox')
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    names = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')
    assert stats == pytest.approx(dict(zip(names, (float(v) for v in ev.stats))))


def test_soft_masks_are_cut_at_one_half(tmp_path):
    """Mask probabilities of 0.3 everywhere give an empty mask, 0.7 a full one: in an 80x80 image a full mask
    overlaps the 60x60 square with IoU 3600 / 6400 = 0.56, so a cut at 0 would score segm AP50 1 instead of 0."""
    from pycocotools import mask as mask_utils

    from vitzoo.detection.evaluate import predictions_to_coco
    ds = _one_square(tmp_path, size=80)
    _, target = ds[0]
    for prob, pixels in ((0.3, 0), (0.7, 80 * 80)):
        out = dict(boxes=target['boxes'], labels=torch.tensor([1]), scores=torch.ones(1),
                   masks=torch.full((1, 1, 80, 80), prob))
        (entry,) = predictions_to_coco([out], [1], ds.label_to_category)
        assert mask_utils.area(entry['segmentation']) == pixels
    soft = _Fixed(boxes=target['boxes'], labels=torch.tensor([1]), scores=torch.ones(1),
                  masks=torch.full((1, 1, 80, 80), 0.3))
    stats = evaluate_coco(soft, ds, progress=False)
    assert stats['bbox']['AP50'] == pytest.approx(1.0)
    assert stats['segm']['AP50'] == pytest.approx(0.0) and stats['segm']['AR100'] == pytest.approx(0.0)


def test_evaluation_restores_the_training_mode(tmp_path):
    ds = _one_square(tmp_path)
    _, target = ds[0]
    modes = []

    class _Recording(_Fixed):
        def forward(self, images):
            modes.append(self.training)
            return super().forward(images)

    model = _Recording(boxes=target['boxes'], labels=torch.tensor([1]), scores=torch.ones(1))
    model.train()
    evaluate_coco(model, ds, progress=False)
    assert modes == [False] and model.training
    model.eval()
    evaluate_coco(model, ds, progress=False)
    assert modes == [False, False] and not model.training


def test_evaluation_draws_nothing_from_the_global_torch_rng(tmp_path):
    """Found by an audit: the evaluation's DataLoader took its seed from the global torch RNG, so an evaluation
    between training iterations changed the training's later random draws (and an exact resume)."""
    ds = _one_square(tmp_path)
    _, target = ds[0]
    model = _Fixed(boxes=target['boxes'], labels=torch.tensor([1]), scores=torch.ones(1))
    torch.manual_seed(0)
    expected = torch.rand(3)  # what the next draws are without an evaluation in between
    torch.manual_seed(0)
    evaluate_coco(model, ds, progress=False)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize('dtype,mode', [('uint16', 'I;16'), ('int32', 'I'), ('float32', 'F')])
def test_images_that_are_not_8_bit_are_refused(tmp_path, dtype, mode):
    """Found by an audit: a 16-bit PNG was clipped to 8 bits by PIL's convert('RGB'), so nearly every pixel became
    255 (white) without a word. 8-bit images (RGB, grayscale, palette) still load."""
    import numpy as np
    from PIL import Image
    ds = _one_square(tmp_path, size=16)
    pixels = np.full((16, 16), 1000, dtype)  # 1000 of 65535: a dark grey; cut to 8 bits it would read as 255
    suffix = 'png' if dtype == 'uint16' else 'tif'
    Image.fromarray(pixels).save(ds.image_dir / f'a.{suffix}')
    assert Image.open(ds.image_dir / f'a.{suffix}').mode == mode
    ds.images[0]['file_name'] = f'a.{suffix}'
    with pytest.raises(DatasetError) as info:
        ds[0]
    assert str(info.value) == (f'{ds.ann_file}: image id 1: {ds.image_dir / f"a.{suffix}"} is not an 8-bit image '
                               f'(PIL mode {mode}); only 8-bit images are read (RGB, grayscale, palette): convert it '
                               'to 8 bits per channel, scaled to 0..255 as suits your data.')
    for pil_mode, value in (('L', 128), ('P', 128), ('RGB', (128, 128, 128))):
        Image.new(pil_mode, (16, 16), value).save(ds.image_dir / 'b.png')
        ds.images[0]['file_name'] = 'b.png'
        assert ds[0][0].shape == (3, 16, 16)


def test_a_missing_annotation_file_names_the_coco_2017_one_it_sees(shapes, tmp_path):
    """Found by an audit: the docs said COCO fits after renaming the image folders only; its annotation files keep
    COCO's names (instances_train2017.json), which the error did not point out."""
    root = tmp_path / 'coco'
    (root / 'annotations').mkdir(parents=True)
    (root / 'train').symlink_to(shapes / 'train')
    coco = root / 'annotations' / 'instances_train2017.json'
    coco.write_bytes((shapes / 'annotations' / 'instances_train.json').read_bytes())
    with pytest.raises(FileNotFoundError) as info:
        CocoDetectionFolder(root, 'train')
    assert str(info.value) == (f'annotation file {root / "annotations" / "instances_train.json"} not found, but '
                               f'{coco} is there (COCO 2017\'s name): rename it to instances_train.json (and '
                               'train2017/ to train/).')
    coco.rename(root / 'annotations' / 'instances_train.json')
    assert len(CocoDetectionFolder(root, 'train')) == 4


def test_the_skipped_box_warning_is_worded_by_split(shapes, tmp_path):
    """Found by an audit: the val split's warning said its boxes were "left out of the training targets"; val is not
    trained on, and its boxes stay in the evaluation ground truth."""
    def zero_height(root, split):
        path = root / 'annotations' / f'instances_{split}.json'
        data = json.loads(path.read_text())
        data['annotations'][0]['bbox'][3] = 0.0
        path.write_text(json.dumps(data))

    root = tmp_path / 'ds'
    (root / 'annotations').mkdir(parents=True)
    for split in ('train', 'val'):
        (root / split).symlink_to(shapes / split)
        (root / 'annotations' / f'instances_{split}.json').write_bytes(
            (shapes / 'annotations' / f'instances_{split}.json').read_bytes())
        zero_height(root, split)
    messages = {}
    for split in ('train', 'val'):
        with pytest.warns(SkippedBoxWarning) as caught:
            CocoDetectionFolder(root, split)
        (messages[split],) = [str(w.message).split(']) ', 1)[1] for w in caught]
    assert messages['train'] == 'are left out of the training targets; they stay in the evaluation ground truth.'
    assert messages['val'] == ('stay in the evaluation ground truth; only the targets of this split\'s items leave '
                               'them out, as training does.')


@pytest.mark.parametrize('option,value,message', [
    ('--height', '-5', 'argument --height: must be an integer >= 1, got -5'),
    ('--width', '0', 'argument --width: must be an integer >= 1, got 0'),
    ('--train', '0', 'argument --train: must be an integer >= 1, got 0'),  # finetune-det refuses zero images
    ('--val', '-1', 'argument --val: must be an integer >= 0, got -1'),
    ('--train', 'x', "argument --train: must be an integer >= 1, got 'x'"),
])
def test_synthetic_generator_refuses_bad_sizes_and_counts(tmp_path, monkeypatch, capsys, option, value, message):
    """Found by an audit: `--height -5` was a traceback, `--train 0` wrote a dataset finetune-det refuses."""
    import sys
    from vitzoo.detection import synthetic
    monkeypatch.setattr(sys, 'argv', ['synthetic', str(tmp_path / 'ds'), option, value])
    with pytest.raises(SystemExit) as info:
        synthetic.main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.rstrip().endswith(f'error: {message}'), err
    assert not (tmp_path / 'ds').exists()


# ----------------------------------------------------------------------------------- found by the session-30 audit

def _jpeg_dataset(tmp_path, orientation, json_size):
    """A 40 x 60 (W x H as stored) JPEG, black but for a white 10 x 20 block at x 30..40, y 0..20 of its stored
    pixels, with an EXIF orientation; the JSON gives ``json_size`` (W, H)."""
    import numpy as np
    from PIL import Image
    root = tmp_path / f'exif{orientation}'
    (root / 'annotations').mkdir(parents=True)
    (root / 'train').mkdir()
    pixels = np.zeros((60, 40, 3), np.uint8)
    pixels[0:20, 30:40] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(root / 'train' / 'a.jpg', exif=exif, quality=100)
    coco = dict(images=[dict(id=1, file_name='a.jpg', width=json_size[0], height=json_size[1])],
                categories=[dict(id=1, name='x')],
                annotations=[dict(id=1, image_id=1, category_id=1, bbox=[1, 1, 5, 5])])
    (root / 'annotations' / 'instances_train.json').write_text(json.dumps(coco))
    return CocoDetectionFolder(root, 'train')


def test_exif_orientation_is_applied_as_viewers_show_the_image(tmp_path):
    """Found by an audit: a JPEG's EXIF orientation was ignored, so boxes drawn on the image as viewers show it
    (and as detectron2 / mmcv read it) fell on other pixels; orientation 6 was refused as the wrong size."""
    # orientation 3: upside down, so the white block shows at x 0..10, y 40..60 (numpy's rot90 twice: independent)
    image, _ = _jpeg_dataset(tmp_path, 3, (40, 60))[0]
    assert image.shape == (3, 60, 40)
    assert image[:, 40:60, 0:10].mean() > 0.9 and image[:, 0:20, 30:40].mean() < 0.1
    # orientation 6: turned 90 degrees clockwise for display, 60 x 40 as viewers show it
    image, _ = _jpeg_dataset(tmp_path, 6, (60, 40))[0]
    assert image.shape == (3, 40, 60) and image[:, 30:40, 40:60].mean() > 0.9
    with pytest.raises(DatasetError, match=r'a.jpg is 60x40 after its EXIF orientation 6 was applied \(as viewers '
                                           r'show it; if it was annotated on the unrotated pixels, remove the EXIF '
                                           r'orientation tag\) but the JSON says 40x60'):
        _jpeg_dataset(tmp_path / 'raw', 6, (40, 60))[0]


def test_a_missing_area_is_the_masks_as_coco_counts_it(shapes, tmp_path):
    """Found by an audit: an annotation without "area" got its box's, twice a triangle's mask, so a small object was
    scored as medium (APs / APm / APl); the generator wrote box areas too."""
    import numpy as np
    from pycocotools import mask as mask_utils

    def edit(data):
        data['annotations'][0].update(bbox=[0, 0, 60, 60], segmentation=[[0, 0, 60, 0, 0, 60]])  # area 1800 by hand
        del data['annotations'][0]['area']
    ds = CocoDetectionFolder(_write(shapes, tmp_path, edit), 'train', with_masks=True)
    area = next(a['area'] for a in ds.coco_dict()['annotations'] if a['id'] == 1)
    assert abs(area - 1800) < 60 and area < 32 ** 2 * 2  # the triangle's, not the box's 3600
    raw = json.loads((shapes / 'annotations' / 'instances_val.json').read_text())
    for ann in raw['annotations']:  # the generator's areas are its masks' (pycocotools rasterises the polygon)
        rle = mask_utils.frPyObjects(ann['segmentation'], 64, 80)
        assert ann['area'] == pytest.approx(float(np.sum(mask_utils.area(rle))), abs=0.01)


def test_a_malformed_polygon_stops_only_a_detector_that_reads_masks(shapes, tmp_path):
    """Found by an audit: an exporter's 2-point polygon in one annotation stopped a box-only (RetinaNet) run."""
    from vitzoo.detection.data import SkippedSegmentationWarning

    def edit(data):
        for ann in data['annotations']:  # an exporter's bug hits every polygon
            ann['segmentation'].append([128.0, 128.0])
        del data['annotations'][0]['area']
    root = _write(shapes, tmp_path, edit)
    count = len(json.loads((shapes / 'annotations' / 'instances_train.json').read_text())['annotations'])
    with pytest.warns(SkippedSegmentationWarning) as caught:
        ds = CocoDetectionFolder(root, 'train')
    (warning,) = [w for w in caught if w.category is SkippedSegmentationWarning]  # one, not one per annotation
    assert re.fullmatch(rf".*instances_train.json: {count} malformed segmentation\(s\) left out, the detector "
                        r"training on boxes only \(e.g. annotation id 1 \(image id 1\): each polygon must be .*\)",
                        str(warning.message)), str(warning.message)
    box = json.loads((shapes / 'annotations' / 'instances_train.json').read_text())['annotations'][0]['bbox']
    first = next(a for a in ds.coco_dict()['annotations'] if a['id'] == 1)
    assert 'segmentation' not in first and first['area'] == pytest.approx(box[2] * box[3], rel=1e-6)
    with pytest.raises(DatasetError, match='at least 3 points'):
        CocoDetectionFolder(root, 'train', with_masks=True)


def test_an_image_over_pils_pixel_limit_is_a_dataset_error(shapes, monkeypatch):
    """Found by an audit: PIL's DecompressionBombError (not an OSError) escaped as a traceback."""
    from PIL import Image
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)  # stands in for a > 178-megapixel image: 64 x 80 is 5120
    ds = CocoDetectionFolder(shapes, 'train')
    with pytest.raises(DatasetError, match=r'image id 1: .*train_0000.png: .*exceeds limit.* Tile the image, or '
                                           r'raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted'):
        ds[0]


def test_mask_evaluation_names_an_ordinary_annotation_without_a_mask(shapes, tmp_path):
    """Found by an audit: only crowd regions were checked, so a mask model evaluated on a split opened without masks
    (the default) stopped in pycocotools with KeyError('segmentation') (none), IndexError (an empty list) or the
    KeyError again (a 2-point polygon, left out)."""
    for segmentation, label in ((None, 'none'), ([], 'empty'), ([[1, 1, 5, 5]], 'malformed')):
        def edit(data):
            ann = data['annotations'][0]
            ann.pop('segmentation', None)
            if segmentation is not None:
                ann['segmentation'] = segmentation

        root = _two_splits(shapes, tmp_path / label, edit)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # the malformed polygon's own warning
            val = CocoDetectionFolder(root, 'val')
        first = val.coco['annotations'][0]
        with pytest.raises(DatasetError, match=rf'annotation id {first["id"]} \(image id {first["image_id"]}\) is '
                                               r'without a usable segmentation'):
            evaluate_coco(_Oracle(CocoDetectionFolder(shapes, 'val', with_masks=True), masks=True), val,
                          progress=False)
