"""COCO-format folder: loading, targets, up-front validation errors naming file and entry; COCO evaluation."""
import json
import os

import pytest
import torch

from vitzoo.detection.data import CocoDetectionFolder, DatasetError, collate_detection, hflip
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
    (_set(('images', 1, 'file_name'), 'nope.png'), FileNotFoundError, r'image id 2 \(nope.png\): image file .* not found'),
    (_set(('annotations', 0, 'bbox'), None), DatasetError, r"annotation id 1 \(image id 1\): missing field\(s\) \['bbox'\]"),
    (_set(('annotations', 1, 'bbox'), [1, 2, 3]), DatasetError, r'annotation id 2 .*bbox must be \[x, y, width, height\]'),
    (_set(('annotations', 0, 'bbox'), [5, 5, -3, 4]), DatasetError, r'annotation id 1 .*non-positive width'),
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
