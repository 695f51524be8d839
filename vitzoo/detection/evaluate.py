"""COCO mAP of a torchvision detector on a :class:`~vitzoo.detection.data.CocoDetectionFolder` (pycocotools)."""
import contextlib
import io
from typing import Any, Dict, List

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .data import CocoDetectionFolder, check_masks_for_evaluation, collate_detection

__all__ = ['STAT_NAMES', 'evaluate_coco', 'format_stats', 'predictions_to_coco']

STAT_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')


MAX_DETECTIONS = 100  # per image, COCO's rule (pycocotools' maxDets caps each image-and-category pair only)


def predictions_to_coco(
        outputs: List[Dict[str, torch.Tensor]],
        image_ids: List[int],
        label_to_category: Dict[int, int],
        max_per_image: int = MAX_DETECTIONS,
) -> List[Dict[str, Any]]:
    """Convert detector outputs to COCO result entries (``bbox`` xywh; ``segmentation`` RLE when masks exist).

    Detections with label 0 (background: torchvision's RetinaNet head has an output for it) are left out, and of
    the others the ``max_per_image`` highest-scoring are kept (COCO's 100: a detector returning more would score
    higher AP/AR than the papers' evaluation gives it).

    Raises:
        ValueError: a label that is neither 0 nor one of ``label_to_category``'s.
    """
    from pycocotools import mask as mask_utils
    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out['boxes'].detach().cpu().clone()
        boxes[:, 2:] -= boxes[:, :2]
        masks = None
        if 'masks' in out:
            masks = (out['masks'][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        labels, scores = out['labels'].tolist(), out['scores'].tolist()
        unknown = sorted(set(labels) - {0} - set(label_to_category))
        if unknown:
            raise ValueError(f'image id {image_id}: a detection has label {unknown[0]}, but the dataset\'s labels are '
                             f'1..{len(label_to_category)} (0: background); the model was built for another '
                             'number of classes.')
        kept = sorted((i for i, label in enumerate(labels) if label != 0), key=lambda i: -scores[i])[:max_per_image]
        for i in sorted(kept):
            box, label, score = boxes[i].tolist(), labels[i], scores[i]
            entry = dict(image_id=image_id, category_id=label_to_category[label], bbox=box, score=score)
            if masks is not None:
                rle = mask_utils.encode(np.asfortranarray(masks[i]))
                rle['counts'] = rle['counts'].decode('ascii')
                entry['segmentation'] = rle
            results.append(entry)
    return results


def format_stats(stats: Dict[str, Dict[str, float]]) -> str:
    """One line per IoU type: ``bbox: AP 0.123 AP50 ...``."""
    return '\n'.join(f'{iou_type}: ' + ' '.join(f'{k} {v:.3f}' for k, v in s.items()) for iou_type, s in stats.items())


@torch.no_grad()
def evaluate_coco(
        model: nn.Module,
        dataset: CocoDetectionFolder,
        device: torch.device = torch.device('cpu'),
        batch_size: int = 2,
        workers: int = 0,
        progress: bool = True,
        verbose: bool = False,
) -> Dict[str, Dict[str, float]]:
    """Run the detector over ``dataset`` and compute COCO metrics.

    Args:
        model: A torchvision detector (labels ``1..K`` map to the dataset's categories sorted by id).
        dataset: The evaluation split.
        device: Where to run the model.
        batch_size: Images per forward.
        workers: DataLoader workers.
        progress: Show a progress bar.
        verbose: Print pycocotools' own summary tables.

    Returns:
        ``{'bbox': {'AP': ..., 'AP50': ..., ...}}`` plus ``'segm'`` for models that predict masks. Values are in
        ``[0, 1]``; pycocotools reports -1 for a size range without ground truth (with no detections at all too).
        ``segm`` results carry no box, so that their size range (APs / APm / APl) follows the mask's area, as in
        the COCO evaluation; detections labelled 0 (background) are left out.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    was_training = model.training
    model.eval()
    # own generator: starting the loader draws a seed, which must not come from (and move) the global torch RNG
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_detection, generator=torch.Generator())
    results: List[Dict[str, Any]] = []
    has_masks = False
    for images, targets in tqdm(loader, desc='evaluate', disable=not progress, leave=False):
        outputs = model([im.to(device) for im in images])
        has_masks = has_masks or any('masks' in o for o in outputs)
        ids = [int(t['image_id']) for t in targets]
        results += predictions_to_coco(outputs, ids, dataset.label_to_category)
    model.train(was_training)
    if has_masks:  # pycocotools' segm evaluation would stop on it with a bare KeyError
        check_masks_for_evaluation(dataset)

    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    stats: Dict[str, Dict[str, float]] = {}
    with sink:
        gt = COCO()
        gt.dataset = dataset.coco_dict()
        gt.createIndex()
        for iou_type in ('bbox', 'segm') if has_masks else ('bbox',):
            # one field per type: loadRes takes the area of a result with a bbox from the box, also for segm
            drop = 'segmentation' if iou_type == 'bbox' else 'bbox'
            typed = [{k: v for k, v in r.items() if k != drop} for r in results]
            if typed:
                dt = gt.loadRes(typed)
            else:  # no detections: loadRes cannot take an empty list; an empty result set gives -1 where no GT is
                dt = COCO()
                dt.dataset = dict(images=gt.dataset['images'], categories=gt.dataset['categories'], annotations=[])
                dt.createIndex()
            ev = COCOeval(gt, dt, iou_type)
            ev.params.imgIds = [im['id'] for im in dataset.images]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            stats[iou_type] = {k: float(v) for k, v in zip(STAT_NAMES, ev.stats)}
    return stats
