"""COCO-format detection folders: layout, up-front validation, dataset and collate.

Layout (one annotation file and one image folder per split)::

    DIR/annotations/instances_train.json   DIR/train/<file_name>
    DIR/annotations/instances_val.json     DIR/val/<file_name>

The annotation files are standard COCO JSON (``images``, ``annotations``, ``categories``; boxes ``[x, y, w, h]`` in
pixels; masks as polygons or RLE in ``segmentation``). Everything is checked when the dataset is created, and every
problem is reported with the file and the entry (image id / annotation id) instead of failing deep inside training.
"""
import copy
import json
import math
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset
from PIL import Image, ImageOps

__all__ = ['CocoDetectionFolder', 'DatasetError', 'SkippedBoxWarning', 'SkippedSegmentationWarning', 'annotation_path',
           'boxes_as_trained', 'check_masks_for_evaluation', 'check_same_categories', 'collate_detection', 'hflip',
           'load_coco_json', 'segmentation_area', 'too_small_to_train', 'worker_error_message']


_EXIF_ORIENTATION = 0x0112  # the EXIF tag of how a camera held the image: 1 upright, 3 upside down, 6 / 8 turned


class DatasetError(ValueError):
    """A problem in a COCO-format dataset; the message names the file and the entry."""


class SkippedBoxWarning(UserWarning):
    """Annotations whose box is too small to train on were left out of the training targets."""


class SkippedSegmentationWarning(UserWarning):
    """A malformed segmentation that nothing uses (a box-only detector) was left out instead of stopping the run."""


def worker_error_message(error: BaseException) -> str:
    """The message of ``error``; for one re-raised from a DataLoader worker, the original exception's message.

    A worker's exception reaches the main process as a new exception of the same type whose message is
    ``Caught X in DataLoader worker process N.`` followed by the whole original traceback; the original message
    is the traceback's last line, after ``module.X: ``.
    """
    text = str(error)
    if not (text.startswith('Caught ') and '\nOriginal Traceback' in text):
        return text
    name = type(error).__name__
    for line in reversed(text.splitlines()):
        head, sep, message = line.partition(': ')
        if sep and (head == name or head.endswith('.' + name)):
            return message
    return text


def annotation_path(root: Path, split: str) -> Path:
    """``DIR/annotations/instances_<split>.json``."""
    return Path(root) / 'annotations' / f'instances_{split}.json'


def _is_number(v: Any) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        return False


def _is_int(v: Any) -> bool:
    """A JSON integer that fits int64 (ids become int64 tensors)."""
    return isinstance(v, int) and not isinstance(v, bool) and -2 ** 63 <= v < 2 ** 63


_INT64 = 'an integer from -2**63 to 2**63 - 1 (ids are int64)'

_JSON_TYPES = {dict: 'an object', list: 'a list', str: 'a string', bool: 'a boolean', int: 'an integer',
               float: 'a number'}


def _found(value: Any) -> str:
    """``value`` as it reads in the JSON, with its JSON type: ``[1] (a list)``, ``null``."""
    if value is None:
        return 'null'
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > 60:
        text = text[:57] + '...'
    return f'{text} ({_JSON_TYPES.get(type(value), type(value).__name__)})'


def _check_fields(entry: Any, fields: Tuple[str, ...], where: str) -> None:
    if not isinstance(entry, dict):
        raise DatasetError(f'{where}: expected an object, got {_found(entry)}.')
    missing = [f for f in fields if f not in entry]
    if missing:
        raise DatasetError(f'{where}: missing field(s) {missing}.')


def _check_value(entry: Dict[str, Any], key: str, ok, expected: str, where: str) -> None:
    """``entry[key]`` must pass ``ok``; else an error naming the entry, the key, what is there and what is expected."""
    if not ok(entry[key]):
        raise DatasetError(f'{where}: "{key}" must be {expected}, got {_found(entry[key])}.')


def _rle_counts(counts: str) -> Optional[List[int]]:
    """Run lengths of a compressed COCO RLE string, or None when the string is malformed.

    Each run is a little-endian sequence of 6-bit groups stored as ``chr(48 + group)``: 5 value bits, bit 0x20 =
    another group follows, bit 0x10 of the last group = negative. From the fourth run on, the stored value is the
    difference to the run two places before.
    """
    runs: List[int] = []
    value = shift = 0
    for ch in counts:
        group = ord(ch) - 48
        if not 0 <= group < 64:
            return None
        value |= (group & 0x1f) << shift
        shift += 5
        if group & 0x20:
            continue
        if group & 0x10:
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
        value = shift = 0
    return None if shift else runs


def _check_segmentation(seg: Any, where: str, height: int, width: int) -> None:
    if isinstance(seg, dict):
        if 'counts' not in seg or 'size' not in seg:
            raise DatasetError(f'{where}: RLE segmentation needs "counts" and "size".')
        if seg['size'] != [height, width] or not all(_is_int(v) for v in seg['size']):
            raise DatasetError(f'{where}: RLE segmentation "size" must be [height, width] of its image, '
                               f'[{height}, {width}], got {_found(seg["size"])}.')
        counts = seg['counts']
        if isinstance(counts, list):
            runs = counts if all(_is_int(v) for v in counts) else None
        elif isinstance(counts, str):
            runs = _rle_counts(counts)
        else:
            runs = None
        if runs is None or any(r < 0 for r in runs) or sum(runs) != height * width:
            raise DatasetError(f'{where}: RLE segmentation "counts" must be a list of non-negative run lengths '
                               f'or a compressed COCO RLE string, covering {height}x{width} = {height * width} '
                               f'pixels; got {_found(counts)}.')
        return
    if not isinstance(seg, list) or not seg:
        raise DatasetError(f'{where}: segmentation must be a non-empty list of polygons or an RLE object '
                           f'(masks are needed for maskrcnn), got {_found(seg)}.')
    for poly in seg:
        if (not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2
                or not all(_is_number(v) for v in poly)):
            raise DatasetError(f'{where}: each polygon must be a flat list [x1, y1, x2, y2, ...] of at least 3 '
                               'points (6 numbers).')


def _read_json(path: Path) -> Any:
    try:
        text = path.read_bytes().decode('utf-8-sig')  # JSON is UTF-8; a leading byte-order mark is tolerated
    except UnicodeDecodeError as e:
        raise DatasetError(f'{path}: not UTF-8 text ({e}); COCO annotation files are UTF-8 JSON, re-save it '
                           'as UTF-8.') from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f'{path}: not valid JSON ({e}).') from e
    except RecursionError as e:
        raise DatasetError(f'{path}: not usable JSON (nested too deeply).') from e


def _positive_int(v: Any) -> bool:
    return _is_int(v) and v > 0


def _file_name(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != '' and '\0' not in v


def boxes_as_trained(bboxes: Any, widths: Any, heights: Any) -> np.ndarray:
    """COCO ``[x, y, w, h]`` boxes as training uses them: float32 ``[x1, y1, x2, y2]`` clamped to their image.

    The one computation behind the training targets, the evaluation ground truth and the validation of degenerate
    boxes, so that the three agree to the last bit.

    Args:
        bboxes: ``N`` boxes ``[x, y, w, h]`` (pixels).
        widths: Width of each box's image (one number, or ``N``).
        heights: Height of each box's image.
    """
    b = np.asarray(bboxes, dtype=np.float32).reshape(-1, 4)
    xyxy = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)
    w = np.asarray(widths, dtype=np.float32).reshape(-1)
    h = np.asarray(heights, dtype=np.float32).reshape(-1)
    xyxy[:, 0::2] = np.clip(xyxy[:, 0::2], 0, w[:, None])
    xyxy[:, 1::2] = np.clip(xyxy[:, 1::2], 0, h[:, None])
    return xyxy


def load_coco_json(path: Path, image_dir: Path, require_masks: bool = False) -> Dict[str, Any]:
    """Read and validate a COCO annotation file.

    Args:
        path: The annotation JSON.
        image_dir: Folder the image ``file_name`` entries are relative to.
        require_masks: Every (non-crowd) annotation must carry a ``segmentation``.

    Returns:
        The parsed dict, with ``area`` (of the box clamped to the image) and ``iscrowd`` filled in where absent
        (pycocotools needs them).

    Raises:
        FileNotFoundError: the JSON or an image file does not exist.
        DatasetError: not UTF-8, malformed JSON, no images, or malformed entries: a missing field or one of the
            wrong type (the message names the file, the entry, the field, what it holds and what is expected).
    """
    path, image_dir = Path(path), Path(image_dir)
    if not path.is_file():
        coco = path.with_name(f'{path.stem}2017{path.suffix}')
        split = path.stem[len('instances_'):]
        if path.name.startswith('instances_') and coco.is_file():  # a COCO 2017 folder with its own names
            raise FileNotFoundError(f'annotation file {path} not found, but {coco} is there (COCO 2017\'s name): '
                                    f'rename it to {path.name} (and {split}2017/ to {split}/).')
        raise FileNotFoundError(f'annotation file {path} not found; expected layout DIR/annotations/'
                                'instances_<split>.json with images in DIR/<split>/.')
    data = _read_json(path)
    _check_fields(data, ('images', 'annotations', 'categories'), str(path))
    for key in ('images', 'annotations', 'categories'):
        if not isinstance(data[key], list):
            raise DatasetError(f'{path}: "{key}" must be a list, got {_found(data[key])}.')
    if not data['categories']:
        raise DatasetError(f'{path}: "categories" is empty.')
    if not data['images']:
        raise DatasetError(f'{path}: "images" is empty; there is nothing to train or evaluate on.')
    cat_ids = set()
    for i, cat in enumerate(data['categories']):
        where = f'{path}: categories[{i}]'
        _check_fields(cat, ('id', 'name'), where)
        _check_value(cat, 'id', _is_int, _INT64, where)
        _check_value(cat, 'name', lambda v: isinstance(v, str), 'a string', where)
        if cat['id'] in cat_ids:
            raise DatasetError(f'{path}: category id {cat["id"]} appears twice.')
        cat_ids.add(cat['id'])
    images = {}
    for i, img in enumerate(data['images']):
        _check_fields(img, ('id', 'file_name', 'width', 'height'), f'{path}: images[{i}]')
        _check_value(img, 'id', _is_int, _INT64, f'{path}: images[{i}]')
        _check_value(img, 'file_name', _file_name, f'a non-empty string (a path relative to {image_dir})',
                     f'{path}: images[{i}] (image id {img["id"]})')
        where = f'{path}: image id {img["id"]} ({img["file_name"]})'
        if img['id'] in images:
            raise DatasetError(f'{where}: image id appears twice.')
        for key in ('width', 'height'):
            _check_value(img, key, _positive_int, 'a positive integer (pixels)', where)
        if not (image_dir / img['file_name']).is_file():
            raise FileNotFoundError(f'{where}: image file {image_dir / img["file_name"]} not found.')
        images[img['id']] = img
    seen = set()
    dropped: List[str] = []  # malformed segmentations a box-only detector leaves out
    for i, ann in enumerate(data['annotations']):
        _check_fields(ann, ('id',), f'{path}: annotations[{i}]')
        _check_value(ann, 'id', _is_int, _INT64, f'{path}: annotations[{i}]')
        where = f'{path}: annotation id {ann["id"]}'
        if 'image_id' in ann:
            _check_value(ann, 'image_id', _is_int, _INT64,
                         f'{path}: annotations[{i}] (annotation id {ann["id"]})')
            where += f' (image id {ann["image_id"]})'
        _check_fields(ann, ('image_id', 'category_id', 'bbox'), where)
        _check_value(ann, 'category_id', _is_int, _INT64, where)
        if ann['id'] in seen:
            raise DatasetError(f'{where}: annotation id appears twice.')
        seen.add(ann['id'])
        if ann['image_id'] not in images:
            raise DatasetError(f'{where}: image id {ann["image_id"]} is not in "images".')
        if ann['category_id'] not in cat_ids:
            raise DatasetError(f'{where}: category id {ann["category_id"]} is not in "categories" '
                               f'(known ids: {sorted(cat_ids)}).')
        box = ann['bbox']
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise DatasetError(f'{where}: bbox must be [x, y, width, height] (4 finite numbers), got {box!r}.')
        x, y, w, h = box
        img = images[ann['image_id']]
        if w < 0 or h < 0:
            raise DatasetError(f'{where}: bbox {box} has a negative width or height.')
        # a zero width or height is a degenerate box, left out of training (too_small_to_train), wherever it lies
        if w > 0 and h > 0 and (x >= img['width'] or y >= img['height'] or x + w <= 0 or y + h <= 0):
            raise DatasetError(f'{where}: bbox {box} lies outside the {img["width"]}x{img["height"]} image.')
        ann.setdefault('iscrowd', 0)
        _check_value(ann, 'iscrowd', lambda v: isinstance(v, int) and v in (0, 1), '0 or 1', where)
        if 'area' in ann:
            _check_value(ann, 'area', lambda v: _is_number(v) and v >= 0, 'a non-negative number (pixels)', where)
        if require_masks and not ann['iscrowd']:
            _check_fields(ann, ('segmentation',), where)
        if 'segmentation' in ann and (require_masks or ann['segmentation']):
            try:
                _check_segmentation(ann['segmentation'], where, img['height'], img['width'])
            except DatasetError as e:
                if require_masks:
                    raise
                # a box-only detector never reads it (found by an audit: an exporter's 2-point polygon stopped a
                # RetinaNet run); its area then comes from the box
                dropped.append(str(e))
                del ann['segmentation']
    if dropped:  # one warning, as for boxes too small to train on: an exporter's bug may hit every polygon
        warnings.warn(f'{path}: {len(dropped)} malformed segmentation(s) left out, the detector training on boxes '
                      f'only (e.g. {dropped[0].removeprefix(f"{path}: ")})', SkippedSegmentationWarning, stacklevel=2)
    _fill_areas(data, images)
    return data


def too_small_to_train(data: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The (non-crowd) annotations of a validated COCO dict whose box is too small to train on.

    A box must keep a positive size as training uses it (float32, clamped to its image): a zero height (COCO 2017's
    train split has such boxes, e.g. annotation 918), ``[100, 10, 1e-6, 30]``, or ``x = 127.99999999`` in a
    128-pixel-wide image collapse to nothing there, and torchvision stops training on such a target. The margin is 4
    float32 steps at the image's larger side: enough for a horizontal flip (width - x) and any resize to keep the box
    positive. Crowd boxes are not trained on (only ignored in evaluation), so they never count.
    """
    anns = data['annotations']
    if not anns:
        return []
    sizes = {im['id']: (im['width'], im['height']) for im in data['images']}
    dims = np.array([sizes[a['image_id']] for a in anns])
    xyxy = boxes_as_trained([a['bbox'] for a in anns], dims[:, 0], dims[:, 1])
    size = xyxy[:, 2:] - xyxy[:, :2]
    least = 4 * np.spacing(dims.max(axis=1).astype(np.float32))
    crowd = np.array([bool(a.get('iscrowd', 0)) for a in anns])
    return [anns[i] for i in np.flatnonzero((size.min(axis=1) < least) & ~crowd)]


def _fill_areas(data: Dict[str, Any], images: Dict[Any, Dict[str, Any]]) -> None:
    """Fill in the ``area`` of annotations without one (pycocotools sorts objects into small / medium / large by
    it): its mask's pixel count when it has a segmentation, as COCO's own areas are, else its box's as training
    uses it (found by an audit: a triangle's box area, twice its mask's, made a small object medium)."""
    anns = data['annotations']
    if not anns:
        return
    dims = np.array([(images[a['image_id']]['width'], images[a['image_id']]['height']) for a in anns])
    xyxy = boxes_as_trained([a['bbox'] for a in anns], dims[:, 0], dims[:, 1])
    size = xyxy[:, 2:] - xyxy[:, :2]
    for ann, (bw, bh), (width, height) in zip(anns, size.astype(np.float64), dims.tolist()):
        if 'area' not in ann:
            seg = ann.get('segmentation')
            ann['area'] = segmentation_area(seg, height, width) if seg else float(bw * bh)


def _rle(seg: Any, height: int, width: int) -> Dict[str, Any]:
    """A checked COCO segmentation (polygons, an uncompressed or a compressed RLE) as one compressed RLE."""
    from pycocotools import mask as mask_utils
    rles = mask_utils.frPyObjects(seg, height, width) if not isinstance(seg, dict) or isinstance(
        seg['counts'], list) else seg
    return mask_utils.merge(rles) if isinstance(rles, list) else rles


def segmentation_area(seg: Any, height: int, width: int) -> float:
    """Pixels covered by a checked COCO segmentation in a ``height`` x ``width`` image."""
    from pycocotools import mask as mask_utils
    return float(mask_utils.area(_rle(seg, height, width)))


def hflip(image: torch.Tensor, target: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Flip an image ``[C, H, W]`` and its target (boxes xyxy, optional masks) left-right."""
    width = image.shape[-1]
    target = dict(target)
    boxes = target['boxes'].clone()
    boxes[:, [0, 2]] = width - target['boxes'][:, [2, 0]]
    target['boxes'] = boxes
    if 'masks' in target:
        target['masks'] = target['masks'].flip(-1)
    return image.flip(-1), target


class CocoDetectionFolder(Dataset):
    """One split of a COCO-format folder (see the module docstring for the layout).

    Items are ``(image, target)``: ``image`` float ``[3, H, W]`` in ``[0, 1]``; ``target`` with ``boxes`` (xyxy,
    float), ``labels`` (``1..num_classes``, categories sorted by id), ``image_id``, and ``masks`` (uint8
    ``[N, H, W]``) when ``with_masks``. Crowd annotations are left out of the targets (they still count in the
    COCO evaluation), and so are boxes too small to train on (:func:`too_small_to_train`; listed in
    ``skipped``, announced by a :class:`SkippedBoxWarning`); those stay in the evaluation ground truth, as in
    pycocotools' evaluation of the JSON itself.

    Args:
        root: The dataset folder.
        split: Split name (``'train'``, ``'val'``).
        with_masks: Load instance masks (Mask R-CNN); every annotation then needs a ``segmentation``.
    """

    def __init__(self, root: str, split: str = 'train', with_masks: bool = False) -> None:
        self.root = Path(root)
        self.split = split
        self.with_masks = with_masks
        self.ann_file = annotation_path(self.root, split)
        self.image_dir = self.root / split
        self.coco = load_coco_json(self.ann_file, self.image_dir, require_masks=with_masks)
        cat_ids = sorted(c['id'] for c in self.coco['categories'])
        self.category_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.label_to_category = {i + 1: c for i, c in enumerate(cat_ids)}
        self.images = sorted(self.coco['images'], key=lambda im: im['id'])
        self.skipped = too_small_to_train(self.coco)
        if self.skipped:
            first = self.skipped[0]
            if split == 'train':
                fate = 'are left out of the training targets; they stay in the evaluation ground truth.'
            else:  # not trained on: what counts is the evaluation
                fate = ("stay in the evaluation ground truth; only the targets of this split's items leave them out, "
                        'as training does.')
            warnings.warn(
                f'{self.ann_file}: {len(self.skipped)} annotation(s) with a box too small to train on (e.g. annotation '
                f'id {first["id"]}, image id {first["image_id"]}: bbox {first["bbox"]}) {fate}', SkippedBoxWarning,
                stacklevel=2)
        skipped = {id(a) for a in self.skipped}
        self.anns: Dict[Any, List[Dict[str, Any]]] = {im['id']: [] for im in self.images}
        for ann in self.coco['annotations']:
            if id(ann) not in skipped:
                self.anns[ann['image_id']].append(ann)

    @property
    def num_classes(self) -> int:
        """Number of object categories."""
        return len(self.category_to_label)

    def coco_dict(self) -> Dict[str, Any]:
        """A copy of the validated annotation dict, as ground truth for pycocotools: every ``bbox`` as it is trained
        on and predicted (clamped to its image, float32 corners), so that a detector returning exactly the training
        targets scores AP 1. ``area`` is kept where the JSON gives it (COCO: the mask's area), else the clamped
        box's."""
        gt = copy.deepcopy(self.coco)
        anns = gt['annotations']
        if anns:
            sizes = {im['id']: (im['width'], im['height']) for im in gt['images']}
            dims = np.array([sizes[a['image_id']] for a in anns])
            xyxy = boxes_as_trained([a['bbox'] for a in anns], dims[:, 0], dims[:, 1])
            xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)  # in float32, like predictions
            for ann, box in zip(anns, xywh.tolist()):
                ann['bbox'] = box
        return gt

    def __len__(self) -> int:
        return len(self.images)

    def _load_image(self, info: Dict[str, Any]) -> torch.Tensor:
        file = self.image_dir / info['file_name']
        try:
            with Image.open(file) as im:
                if im.mode in ('I', 'F') or im.mode.startswith('I;'):
                    # convert('RGB') would cut 16-bit, 32-bit and float values to 255 (nearly white) without a word
                    raise DatasetError(
                        f'{self.ann_file}: image id {info["id"]}: {file} is not an 8-bit image (PIL mode {im.mode}); '
                        'only 8-bit images are read (RGB, grayscale, palette): convert it to 8 bits per channel, '
                        'scaled to 0..255 as suits your data.')
                # shown as viewers show it, as detectron2 and mmcv read it (found by an audit: a phone photo's
                # EXIF rotation was ignored, so its boxes fell on other pixels)
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
                upright = ImageOps.exif_transpose(im) if orientation not in (1, None) else im
                image = torch.from_numpy(np.asarray(upright.convert('RGB')).copy()).permute(2, 0, 1)
        except DatasetError:
            raise
        except Image.DecompressionBombError as e:  # not an OSError: an aerial or slide image over 2 x MAX_IMAGE_PIXELS
            raise DatasetError(f'{self.ann_file}: image id {info["id"]}: {file}: {e} Tile the image, or raise '
                               'PIL.Image.MAX_IMAGE_PIXELS if the file is trusted.') from e
        except (OSError, ValueError) as e:
            raise DatasetError(f'{self.ann_file}: image id {info["id"]}: cannot decode {file}: {e}') from e
        if tuple(image.shape[-2:]) != (info['height'], info['width']):
            rotated = (f' after its EXIF orientation {orientation} was applied (as viewers show it; if it was '
                       'annotated on the unrotated pixels, remove the EXIF orientation tag)'
                       if orientation not in (1, None) else '')
            raise DatasetError(f'{self.ann_file}: image id {info["id"]}: {file} is {image.shape[-1]}x'
                               f'{image.shape[-2]}{rotated} but the JSON says {info["width"]}x{info["height"]}.')
        return image.float().div_(255)

    def _masks(self, anns: List[Dict[str, Any]], height: int, width: int) -> torch.Tensor:
        from pycocotools import mask as mask_utils
        masks = torch.zeros(len(anns), height, width, dtype=torch.uint8)
        for i, ann in enumerate(anns):
            with warnings.catch_warnings():  # pycocotools' numpy-2 copy-keyword DeprecationWarning
                warnings.simplefilter('ignore', DeprecationWarning)
                m = mask_utils.decode(_rle(ann['segmentation'], height, width))
            masks[i] = torch.from_numpy(m)
        return masks

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        info = self.images[index]
        image = self._load_image(info)
        h, w = info['height'], info['width']
        anns = [a for a in self.anns[info['id']] if not a['iscrowd']]
        target = {
            'boxes': torch.from_numpy(boxes_as_trained([a['bbox'] for a in anns], w, h)),
            'labels': torch.tensor([self.category_to_label[a['category_id']] for a in anns], dtype=torch.int64),
            'image_id': torch.tensor(info['id']),
        }
        if self.with_masks:
            target['masks'] = self._masks(anns, h, w)
        return image, target


def check_same_categories(train: CocoDetectionFolder, val: CocoDetectionFolder) -> None:
    """The evaluation split must list the training split's categories: the model's labels are the training split's
    category ids in order, and the evaluation maps them back through its own list.

    Raises:
        DatasetError: the two ``categories`` lists differ (ids or names), naming both files and the first difference.
    """
    names = [{c['id']: c['name'] for c in ds.coco['categories']} for ds in (train, val)]
    if names[0] == names[1]:
        return
    only = [sorted(set(names[i]) - set(names[1 - i])) for i in (0, 1)]
    renamed = sorted(k for k in set(names[0]) & set(names[1]) if names[0][k] != names[1][k])
    what = '; '.join(part for part in (
        f'ids only in {train.ann_file.name}: {only[0]}' if only[0] else '',
        f'ids only in {val.ann_file.name}: {only[1]}' if only[1] else '',
        f'id {renamed[0]} is {names[0][renamed[0]]!r} in one and {names[1][renamed[0]]!r} in the other'
        if renamed else '') if part)
    raise DatasetError(
        f'{val.ann_file} lists other categories than {train.ann_file} ({what}). The model\'s labels follow the '
        'training split\'s categories and the evaluation maps them back through its own, so its scores would be '
        'wrong: give both files the same "categories" list (an evaluation split may have no annotations of a '
        'category, but it lists it).')


def check_masks_for_evaluation(dataset: CocoDetectionFolder) -> None:
    """Mask evaluation (pycocotools' ``segm``) needs a ``segmentation`` on every annotation, crowd ones included
    (their region is what detections are ignored in); training needs it only on the others.

    Raises:
        DatasetError: an annotation without one (a crowd region; or, in a split opened without masks, any
            annotation: a missing, empty or malformed one, which that split leaves out), named with its file.
    """
    bare = [a for a in dataset.coco['annotations'] if not a.get('segmentation')]
    if bare:
        # found by an audit: only crowd regions were checked, so a split opened with with_masks=False (the default)
        # stopped pycocotools' segm evaluation on an ordinary annotation with a bare KeyError / IndexError
        what = 'a crowd region without a segmentation' if bare[0]['iscrowd'] else \
            'without a usable segmentation (none, empty, or malformed and left out)'
        raise DatasetError(
            f'{dataset.ann_file}: annotation id {bare[0]["id"]} (image id {bare[0]["image_id"]}) is {what} '
            f'({len(bare)} such annotation(s)); mask evaluation needs one on every annotation: add its polygon or '
            'RLE, or remove it.')


def collate_detection(batch: List[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]) -> Tuple[list, list]:
    """Collate to ``(list of images, list of targets)``, the input format of torchvision detectors."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def split_exists(root: Optional[str], split: str) -> bool:
    """Whether ``DIR/annotations/instances_<split>.json`` exists."""
    return root is not None and annotation_path(Path(root), split).is_file()
