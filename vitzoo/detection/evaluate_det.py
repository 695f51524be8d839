"""``vitzoo evaluate-det``: COCO box (and mask) AP of a detector's weights on a COCO-format split.

The weights are an MMDetection checkpoint of the detector (``--detector-weights``, the SHViT paper's released
``retinanet_shvit_s4_1x_coco.pth`` / ``maskrcnn_shvit_s4_1x_coco.pth``) or a ``finetune-det`` run's
(``--weights``: its ``model_final.pth`` or ``checkpoint_last.pth``). Nothing is trained and nothing is written.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

from vitzoo.messages import cli_message, help_description
from vitzoo.models import UnknownModelError

from .backbone import BackboneError, summarize_load_error
from .checkpoint import load_checkpoint
from .data import CocoDetectionFolder, DatasetError, check_masks_for_evaluation
from .detectors import DETECTOR_STRIDES, MIN_IMAGE_SIDE, build_detector
from .distributed import check_device
from .evaluate import evaluate_coco, format_stats
from .mmdet_weights import load_mmdet_detector, mmdet_categories, read_mmdet_checkpoint

NAME = 'evaluate-det'


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate-det`` sub-command."""
    p = subparsers.add_parser(NAME, help='COCO AP of detector weights (an MMDetection checkpoint or a finetune-det '
                                         'run) on a COCO-format split', description=help_description(__doc__))
    p.add_argument('--data', required=True, help='dataset folder: DIR/annotations/instances_SPLIT.json, images in '
                                                 'DIR/SPLIT/')
    p.add_argument('--split', default='val', help='default: %(default)s')
    p.add_argument('--detector', default='retinanet', choices=sorted(DETECTOR_STRIDES), help='default: %(default)s')
    p.add_argument('--backbone', default='shvit_s4', help='timm model name (default: %(default)s)')
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument('--detector-weights', metavar='FILE', help='an MMDetection checkpoint of the --detector')
    weights.add_argument('--weights', metavar='FILE',
                         help="a finetune-det run's model_final.pth or checkpoint_last.pth")
    p.add_argument('--out-channels', type=int, default=256, help='FPN channels (default: %(default)s)')
    p.add_argument('--img-size', type=int, default=None, help='sets both --min-size and --max-size')
    p.add_argument('--min-size', type=int, default=800, help='shorter side after resizing (default: %(default)s)')
    p.add_argument('--max-size', type=int, default=1333, help='longer side limit (default: %(default)s)')
    p.add_argument('--batch-size', type=int, default=2, help='images per forward (default: %(default)s)')
    p.add_argument('--workers', type=int, default=2, help='data-loading processes (default: %(default)s)')
    p.add_argument('--device', default=None, help='cpu or cuda (default: cuda when available)')
    p.add_argument('--format', choices=('text', 'json'), default='text',
                   help='text: one line per IoU type; json: {"bbox": {"AP": ...}, ...} (default: %(default)s)')
    p.add_argument('--no-progress', dest='progress', action='store_false', help='no progress bar')
    p.set_defaults(func=run)


def _validate(args: argparse.Namespace) -> torch.device:
    """Check the arguments before any work; returns the device. Raises ``ValueError`` naming the option."""
    if args.img_size is not None:
        if (args.min_size, args.max_size) != (800, 1333):
            raise ValueError('--img-size sets both --min-size and --max-size; give --img-size alone, or --min-size / '
                             '--max-size.')
        args.min_size = args.max_size = args.img_size
    for option in ('min_size', 'max_size'):
        if getattr(args, option) < MIN_IMAGE_SIDE:
            raise ValueError(f'--{option.replace("_", "-")} must be >= {MIN_IMAGE_SIDE}, got {getattr(args, option)}.')
    for option, low in (('batch_size', 1), ('out_channels', 1), ('workers', 0)):
        if getattr(args, option) < low:
            raise ValueError(f'--{option.replace("_", "-")} must be >= {low}, got {getattr(args, option)}.')
    return check_device(args.device)


def _load_run_weights(model: nn.Module, path: Path) -> None:
    """A finetune-det run's weights: ``model_final.pth`` (a state dict) or a training checkpoint's ``model``."""
    try:
        state = load_checkpoint(path)['model']
    except ValueError as e:
        if 'holds model weights only' not in str(e):
            raise
        state = torch.load(path, map_location='cpu', weights_only=True)  # model_final.pth: the state dict alone
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # strict: every missing / unexpected / misshapen key is an error
        raise ValueError(f'{path} does not fit this detector (another --detector, --backbone, --out-channels or '
                         f'dataset?): {summarize_load_error(e)}.') from e


def evaluate(args: argparse.Namespace, device: torch.device) -> dict:
    """Build the detector, load the weights, evaluate; returns the COCO stats."""
    with_masks = args.detector == 'maskrcnn'
    dataset = CocoDetectionFolder(args.data, args.split, with_masks=with_masks)
    if with_masks:
        check_masks_for_evaluation(dataset)
    if args.detector_weights:
        state_dict = read_mmdet_checkpoint(args.detector_weights)
        categories = mmdet_categories(state_dict)
        if categories != dataset.num_classes:
            raise ValueError(f'{args.detector_weights} classifies {categories} categories, the {args.split} split of '
                             f'{args.data} has {dataset.num_classes}: evaluate it on data of its categories.')
    model = build_detector(args.detector, args.backbone, dataset.num_classes, out_channels=args.out_channels,
                           min_size=args.min_size, max_size=args.max_size)
    if args.detector_weights:
        load_mmdet_detector(model, state_dict)
    else:
        _load_run_weights(model, Path(args.weights))
    model.to(device)
    return evaluate_coco(model, dataset, device, batch_size=args.batch_size, workers=args.workers,
                         progress=args.progress)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``vitzoo evaluate-det``; returns the exit code (2: a usage error, 1: another reported one)."""
    try:
        device = _validate(args)
    except ValueError as e:
        print(f'vitzoo {NAME}: error: {e}', file=sys.stderr)
        return 2
    try:
        stats = evaluate(args, device)
    except (DatasetError, UnknownModelError, BackboneError, ValueError, OSError) as e:
        print(f'vitzoo {NAME}: error: {cli_message(e)}', file=sys.stderr)
        return 2 if isinstance(e, UnknownModelError) else 1
    print(json.dumps(stats, indent=2) if args.format == 'json' else format_stats(stats))
    return 0
