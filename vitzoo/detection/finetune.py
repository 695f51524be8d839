"""``vitzoo finetune-det``: fine-tune a torchvision detector with a zoo backbone on a COCO-format folder.

Recipe defaults follow the SHViT paper's MMDetection 1x setup: AdamW, lr 1e-4, weight decay 0.05, linear warm-up
over 500 iterations, lr x0.1 after epochs 8 and 11 of 12. Run with ``torchrun --nproc_per_node N -m vitzoo.cli
finetune-det ...`` (or ``torchrun ... $(which vitzoo) finetune-det ...``) for DDP; each process then loads
``--batch-size`` images.
"""
import argparse
import json
import math
import os
import random
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from vitzoo.atomic import _check_parent_writable, atomic_write_text, resolve_output
from vitzoo.cli import named_output
from vitzoo.messages import cli_message, command_line_advice, first_line, help_description
from vitzoo.models import UnknownModelError

from .backbone import BackboneError, summarize_load_error
from .checkpoint import atomic_save, get_rng_state, load_checkpoint, set_rng_state
from .data import (
    CocoDetectionFolder, DatasetError, SkippedBoxWarning, SkippedSegmentationWarning, annotation_path,
    check_masks_for_evaluation, check_same_categories, collate_detection, hflip, split_exists, worker_error_message)
from .detectors import DETECTOR_STRIDES, MIN_IMAGE_SIDE, build_detector
from .distributed import DistContext, check_device, init_distributed
from .evaluate import evaluate_coco, format_stats
from .mmdet_weights import load_mmdet_detector, mmdet_categories, read_mmdet_checkpoint

__all__ = ['TrainingError', 'register', 'run', 'lr_factor']

NAME = 'finetune-det'
LAST = 'checkpoint_last.pth'
FINAL = 'model_final.pth'  # the final weights (model state only)
OUTPUTS = (LAST, 'log.jsonl', FINAL)  # what a run writes into --out


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says what to change."""


#: The image sizes of the detectors' resizing when no size option is given: torchvision's and the paper's.
MIN_SIZE, MAX_SIZE = 800, 1333


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``finetune-det`` sub-command."""
    p = subparsers.add_parser(NAME, help='fine-tune RetinaNet / Faster R-CNN / Mask R-CNN with a zoo backbone on '
                                         'a COCO-format folder (CPU, GPU, torchrun DDP)',
                              description=help_description(__doc__))
    p.add_argument('--data', required=True, help='dataset folder: DIR/annotations/instances_{train,val}.json, '
                                                 'images in DIR/train/ and DIR/val/ (val optional)')
    p.add_argument('--detector', default='retinanet', choices=sorted(DETECTOR_STRIDES), help='default: %(default)s')
    p.add_argument('--backbone', default='shvit_s4',
                   help='timm model name (shvit_s4, revit_t, resnet18, ...; default: %(default)s)')
    p.add_argument('--pretrained', action='store_true', help='load the backbone\'s pretrained classification weights')
    p.add_argument('--backbone-weights', metavar='FILE', help='local classification checkpoint for the backbone')
    p.add_argument('--detector-weights', metavar='FILE',
                   help="an MMDetection checkpoint of the --detector (the SHViT paper's retinanet_shvit_s4_1x_coco.pth "
                        'or maskrcnn_shvit_s4_1x_coco.pth) to start from: backbone, neck and heads, their '
                        'category-specific layers only when the data has as many categories')
    p.add_argument('--frozen-stages', type=int, default=-1,
                   help='-1: none, 0: stem, N: stem + first N stages (default: %(default)s)')
    p.add_argument('--no-norm-eval', dest='norm_eval', action='store_false',
                   help='let backbone BatchNorms update their statistics (default: kept in eval mode)')
    p.add_argument('--out-channels', type=int, default=256, help='FPN channels (default: %(default)s)')
    p.add_argument('--epochs', type=int, default=12, help='default: %(default)s')
    p.add_argument('--max-iters', type=int, default=None, help='stop after this many iterations in total')
    p.add_argument('--batch-size', type=int, default=2, help='images per process (default: %(default)s)')
    p.add_argument('--lr', type=float, default=1e-4, help='AdamW learning rate (default: %(default)s)')
    p.add_argument('--weight-decay', type=float, default=0.05, help='AdamW weight decay (default: %(default)s)')
    p.add_argument('--warmup-iters', type=int, default=500,
                   help='iterations of linear lr warm-up (default: %(default)s)')
    p.add_argument('--lr-steps', type=int, nargs='*', default=None,
                   help='epochs after which the lr is multiplied by 0.1 (default: 8 11 scaled to --epochs)')
    p.add_argument('--img-size', type=int, default=None, help='sets both --min-size and --max-size')
    p.add_argument('--min-size', type=int, default=MIN_SIZE, help='shorter side after resizing (default: %(default)s)')
    p.add_argument('--max-size', type=int, default=MAX_SIZE,
                   help='longer side limit after resizing (default: %(default)s)')
    p.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability (default: %(default)s)')
    p.add_argument('--out', default='runs/finetune-det', type=named_output('--out runs/finetune-det'),
                   help='output folder (checkpoints, log.jsonl; default: %(default)s)')
    p.add_argument('--force', action='store_true',
                   help='start afresh, or from another run\'s --resume CKPT, in an --out folder that already holds '
                        'a run (a checkpoint, a non-empty log or final weights): those files are removed when '
                        'training starts')
    p.add_argument('--resume', nargs='?', const='auto', default=None, metavar='CKPT',
                   help=f'continue from CKPT: a {LAST}, or the run folder that holds one (default: OUT/{LAST})')
    p.add_argument('--checkpoint-every', type=int, default=500,
                   help='iterations between checkpoints (0: epoch ends; default: %(default)s)')
    p.add_argument('--eval-every', type=int, default=1,
                   help='epochs between evaluations on val (0: only at the end; default: %(default)s)')
    p.add_argument('--no-eval', action='store_true', help='never evaluate')
    p.add_argument('--device', default=None, help='cpu or cuda (default: cuda when available)')
    p.add_argument('--workers', type=int, default=2,
                   help='data-loading processes per training process (default: %(default)s)')
    p.add_argument('--seed', type=int, default=0, help='default: %(default)s')
    p.add_argument('--no-progress', dest='progress', action='store_false', help='no progress bars')
    p.set_defaults(func=run)


def lr_factor(iteration: int, warmup_iters: int, milestones: List[int], warmup_ratio: float = 1e-3) -> float:
    """Linear warm-up from ``warmup_ratio`` to 1 over ``warmup_iters``, times 0.1 per passed milestone."""
    factor = 0.1 ** sum(iteration >= m for m in milestones)
    if iteration < warmup_iters:
        factor *= warmup_ratio + (1 - warmup_ratio) * iteration / warmup_iters
    return factor


def default_lr_steps(epochs: int) -> List[int]:
    """The 1x schedule's lr steps (after epochs 8 and 11 of 12) scaled to ``epochs``: each rounded down, and only
    steps that fall inside the run (a step after the last epoch never takes effect) and differ from each other.

    ``round`` placed the second step at the very end for short runs (6 epochs: ``[4, 6]``, so it never dropped the
    lr); rounded down, 6 epochs give ``[4, 5]``, 24 give ``[16, 22]``, 3 give ``[2]``.
    """
    return sorted({s for s in (epochs * 8 // 12, epochs * 11 // 12) if 0 < s < epochs})


def _load_detector_weights(model: nn.Module, path: Path, num_classes: int, report: bool) -> None:
    """``--detector-weights``: the MMDetection detector in ``path``, its category-specific layers only when it has
    ``num_classes`` categories (else they keep their initialisation, and the run says so)."""
    state_dict = read_mmdet_checkpoint(path)
    categories = mmdet_categories(state_dict)
    left_out = load_mmdet_detector(model, state_dict, classifier=categories == num_classes)
    if report:
        print(f'detector: backbone, neck and heads from {path}'
              + (f'; its category-specific layers ({categories} categories) left out: the data has {num_classes}, '
                 f'so they start from their initialisation ({", ".join(left_out)})' if left_out else ''))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _must(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate_args(args: argparse.Namespace) -> None:
    """Check the arguments before any work (no dataset read, no model built, nothing written).

    Raises:
        ValueError: the first argument out of range, by its option name.
    """
    def at_least(name: str, low: int) -> None:
        value = getattr(args, name)
        _must(value >= low, f'--{name.replace("_", "-")} must be >= {low}, got {value}.')

    # two options that say the same thing differently: one of them would be ignored (found by an audit)
    # (a --min-size / --max-size given at its default value is not told from none given)
    _must(args.img_size is None or (args.min_size, args.max_size) in ((MIN_SIZE, MAX_SIZE), (args.img_size,) * 2),
          '--img-size sets both --min-size and --max-size; give --img-size alone, or --min-size / --max-size.')
    _must(not (args.pretrained and args.backbone_weights),
          "--pretrained and --backbone-weights both give the backbone's weights; give one of them.")
    if args.detector_weights is not None:
        _must(not (args.pretrained or args.backbone_weights),
              "--detector-weights gives the backbone its weights too; leave out --pretrained / --backbone-weights.")
        _must(args.resume is None, '--resume restores the whole detector from its checkpoint; leave out '
                                   '--detector-weights.')
    # as build_detector checks them, before any work (found by an audit: --img-size 1 was torchvision's traceback)
    for name in ('img_size', 'min_size', 'max_size'):
        if getattr(args, name) is not None:
            at_least(name, MIN_IMAGE_SIDE)
    if args.img_size is not None:
        args.min_size = args.max_size = args.img_size
    for name in ('epochs', 'batch_size', 'out_channels'):
        at_least(name, 1)
    if args.max_iters is not None:
        at_least('max_iters', 1)
    for name in ('warmup_iters', 'checkpoint_every', 'eval_every', 'workers'):
        at_least(name, 0)
    at_least('frozen_stages', -1)
    _must(math.isfinite(args.lr) and args.lr > 0, f'--lr must be a positive finite number, got {args.lr}.')
    _must(math.isfinite(args.weight_decay) and args.weight_decay >= 0,
          f'--weight-decay must be a non-negative finite number, got {args.weight_decay}.')
    _must(0 <= args.hflip <= 1, f'--hflip is a probability (0 to 1), got {args.hflip}.')
    bad_steps = [e for e in args.lr_steps or () if e < 1]
    _must(not bad_steps, f'--lr-steps are epochs after which the lr drops (>= 1), got {bad_steps}.')
    late_steps = [e for e in args.lr_steps or () if e >= args.epochs]
    _must(not late_steps, f'--lr-steps must be below --epochs {args.epochs} (a step at or after the end of the last '
                          f'epoch never drops the lr), got {late_steps}; lower them or raise --epochs.')
    _must(0 <= args.seed < 2 ** 32, f'--seed must be in 0 .. 2**32-1, got {args.seed}.')
    check_device(args.device)


def _run_files(out: Path) -> List[str]:
    """The outputs of an earlier run in ``out``; an empty log.jsonl (left by a run that failed before its first
    iteration) is not one."""
    return [name for name in OUTPUTS if (out / name).exists()
            and not (name == 'log.jsonl' and (out / name).is_file() and (out / name).stat().st_size == 0)]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.is_file() and b.is_file() and os.path.samefile(a, b)
    except OSError:
        return False


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.is_dir() and b.is_dir() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_args(args: argparse.Namespace, out: Path) -> Tuple[Optional[Path], bool]:
    """The checkpoint to resume from (None: a fresh start) and whether it is ``out``'s own (the run continuing
    itself). Refuses, before any work, to write into a folder that holds another run unless ``--force``."""
    validate_args(args)
    if os.path.lexists(out) and not out.is_dir():
        raise FileExistsError(f'--out {out} is a file, not a folder; choose another --out.')
    _check_parent_writable(out, out.parent)
    existing = _run_files(out)
    if args.resume is not None:
        ckpt = out / LAST if args.resume == 'auto' else Path(args.resume)
        if ckpt.is_dir():  # a run's --out folder: its checkpoint
            if not (ckpt / LAST).is_file():
                raise FileNotFoundError(f'--resume {ckpt} is a folder without a {LAST}; give the {LAST} of a '
                                        'finetune-det run, or the --out folder that holds it.')
            ckpt = ckpt / LAST
        if not ckpt.is_file():
            raise FileNotFoundError(f'checkpoint {ckpt} not found; give a {LAST} written by finetune-det.')
        continuing = _same_file(ckpt, out / LAST)
        if existing and not continuing and not args.force and _same_folder(ckpt.parent, out):
            # another file of this very run (its model_final.pth, a copy): not "another run", and --force would only
            # lead to the next refusal (found by an audit)
            # model_final.pth holds no training state: --force would only lead to its own refusal
            force = '' if ckpt.name == FINAL else \
                f" (or pass --force to resume from {ckpt.name} and replace the run's files)"
            raise FileExistsError(f'{ckpt} is a file of the run in {out}, not its {LAST}; resume from {out / LAST}, '
                                  f"which holds the run's latest state{force}.")
        if existing and not continuing and not args.force:
            # resuming another run's checkpoint here would overwrite this run's checkpoint, weights and log
            raise FileExistsError(
                f'{out} already holds another run ({", ".join(existing)}); resuming {ckpt} into it would replace '
                f'those files: pass --force to replace them, or choose another --out.')
        return ckpt, continuing
    if existing and not args.force:
        if LAST in existing:
            raise FileExistsError(f'{out} already holds a run ({", ".join(existing)}); pass --resume to continue it '
                                  'or --force to start afresh (which removes those files).')
        raise FileExistsError(f'{out} holds files of an earlier run ({", ".join(existing)}) but no {LAST} to '
                              '--resume from; pass --force to start afresh (which removes those files) or choose '
                              'another --out.')
    return None, False


#: what a run's arguments must share with the run it resumes (the model, what its weights' shapes follow, which
#: parameters the optimizer state holds, and the optimizer settings that its state carries: loading it would
#: silently replace another --lr / --weight-decay with the checkpoint's)
# batch_size: a mid-epoch resume skips the images the saved step has seen, by this run's batch size; seed: it orders
# each epoch's images (another one would train some twice and skip others); norm_eval: how the backbone trains.
# --data is not compared: a dataset may move (another path, the same images). min_size / max_size (which --img-size
# sets) and hflip: what the images are trained at.
RESUME_KEYS = ('detector', 'backbone', 'out_channels', 'frozen_stages', 'lr', 'weight_decay', 'batch_size', 'seed',
               'norm_eval', 'min_size', 'max_size', 'hflip')


def _resume_option(key: str, value: Any) -> Tuple[str, str]:
    """The option ``key`` and its ``value`` as they read on the command line (norm_eval is --no-norm-eval)."""
    if key == 'norm_eval':
        return '--no-norm-eval', 'not given' if value else 'given'
    return f'--{key.replace("_", "-")}', str(value)


def _sizes(values: Dict[str, Any]) -> str:
    """The image-size options of a run's arguments as they read on the command line."""
    if values.get('img_size') is not None:
        return f'--img-size {values["img_size"]}'
    return f'--min-size {values["min_size"]} --max-size {values["max_size"]}'


def _check_resume(ckpt: Dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    saved = ckpt.get('args') or {}
    differ = []
    # the values the runs used: an option left out is its default, and --img-size sets both sizes
    for k in RESUME_KEYS:
        if k in saved and str(saved[k]) != str(getattr(args, k)):
            if k in ('min_size', 'max_size'):  # both sizes in one phrase, named by the options that gave them
                sizes = f'{_sizes(saved)} there, {_sizes(vars(args))} here'
                if sizes not in differ:
                    differ.append(sizes)
                continue
            (option, there), (_, here) = _resume_option(k, saved[k]), _resume_option(k, getattr(args, k))
            differ.append(f'{option} {there} there, {here} here')
    if differ:
        raise ValueError(f'{path} is from another run: {"; ".join(differ)}. Resume with the same arguments, or '
                         'start a new run (--out elsewhere, or --force).')


def _save(path: Path, model: nn.Module, optimizer, scheduler, state: Dict[str, int], rng: List[Any],
          args: argparse.Namespace) -> None:
    # the arguments as plain values (no Path objects, no argparse's `func`), so the file loads with weights_only
    plain = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not callable(v)}
    atomic_save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                     rng=rng, args=plain, **state), path)


def _log(out: Path, record: Dict[str, Any]) -> None:
    with open(out / 'log.jsonl', 'a') as f:
        f.write(json.dumps(record) + '\n')


def _trim_log(out: Path, iteration: int, pending: bool = False) -> None:
    """Drop the log lines of iterations after ``iteration`` (a run resumed from an earlier checkpoint than its last
    iteration redoes them), and with ``pending`` an evaluation at ``iteration`` (it is done again), so that every
    iteration and evaluation appears once."""
    path = out / 'log.jsonl'
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a crash
            continue
        done = record.get('iteration') if isinstance(record, dict) else None
        if not (isinstance(done, int) and (done > iteration or (pending and done == iteration and 'eval' in record))):
            keep.append(line if line.endswith('\n') else line + '\n')
    if keep != lines:
        atomic_write_text(path, ''.join(keep), force=True)


def _without_val(root: Path) -> str:
    """The note for a dataset without a val annotation file; an error where the folder looks renamed half-way (val
    images there, or COCO's own name of the file), as evaluation would otherwise be off without a word."""
    path = annotation_path(root, 'val')
    coco = path.with_name('instances_val2017.json')
    if coco.is_file():
        raise DatasetError(f'{coco} is there but not {path}: evaluation on val needs both; rename it to '
                           'instances_val.json (COCO 2017: also val2017/ to val/), or pass --no-eval to train without '
                           'evaluation.')
    if (root / 'val').is_dir():
        raise DatasetError(f'{root / "val"} is there but not {path}: evaluation on val needs both; add the '
                           'annotation file, or pass --no-eval to train without evaluation.')
    return f'note: no {path}, so no evaluation (pass --no-eval to train without one and without this note).'


def _evaluate(model: nn.Module, val: Optional[CocoDetectionFolder], ctx: DistContext, args, out: Path,
              state: Dict[str, int]) -> Optional[Dict[str, Dict[str, float]]]:
    stats = None
    if val is not None and ctx.is_main:
        # the training RNG goes on as if no evaluation had run: the checkpoint before it holds the state a resumed
        # run continues from (evaluate_coco draws nothing itself; this also covers what the model might draw)
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == 'cuda' else []):
            stats = evaluate_coco(model, val, ctx.device, batch_size=args.batch_size, workers=args.workers,
                                  progress=args.progress)
        # the epoch of the last iteration, counted from 1 as in the iterations' lines (--max-iters may end a run
        # inside an epoch)
        epoch = state['epoch'] + (1 if state['step'] else 0)
        print(f'[eval] epoch {epoch} iteration {state["iteration"]}\n{format_stats(stats)}', flush=True)
        _log(out, dict(eval=stats, epoch=epoch, iteration=state['iteration']))
    ctx.barrier()
    return stats


def train(args: argparse.Namespace, ctx: DistContext) -> Dict[str, Any]:
    """The fine-tuning loop. Returns ``dict(state=..., eval=...)`` (last evaluation, None without val)."""
    out = resolve_output(args.out)  # RUN/missing/.. is RUN, whose files the checks must see (found by an audit)
    resume_from, continuing = _check_args(args, out)
    with_masks = args.detector == 'maskrcnn'
    with warnings.catch_warnings(record=True) as notes:  # printed once below, as notes, not as Python warnings
        warnings.simplefilter('always', SkippedBoxWarning)
        warnings.simplefilter('always', SkippedSegmentationWarning)
        train_ds = CocoDetectionFolder(args.data, 'train', with_masks=with_masks)
        val_ds = None
        if not args.no_eval and split_exists(args.data, 'val'):
            val_ds = CocoDetectionFolder(args.data, 'val', with_masks=with_masks)
            check_same_categories(train_ds, val_ds)
            if with_masks:
                check_masks_for_evaluation(val_ds)
        elif not args.no_eval:
            note = _without_val(Path(args.data))  # on every rank: an error stops them all
            if ctx.is_main:
                print(note)
    for note in notes:
        as_note = issubclass(note.category, (SkippedBoxWarning, SkippedSegmentationWarning))
        if ctx.is_main and as_note:
            print(f'note: {note.message}')
        elif not as_note:
            warnings.warn_explicit(note.message, note.category, note.filename, note.lineno)
    _seed_everything(args.seed)
    model = build_detector(args.detector, args.backbone, train_ds.num_classes, pretrained=args.pretrained,
                           weights=args.backbone_weights, out_channels=args.out_channels,
                           frozen_stages=args.frozen_stages, norm_eval=args.norm_eval,
                           min_size=args.min_size, max_size=args.max_size).to(ctx.device)
    if args.detector_weights is not None:
        _load_detector_weights(model, Path(args.detector_weights), train_ds.num_classes, ctx.is_main)
    if ctx.is_main and model.backbone.dropped_keys:
        dropped = model.backbone.dropped_keys
        print(f'backbone: dropped {len(dropped)} classification-only keys '
              f'({", ".join(dropped[:6])}{", ..." if len(dropped) > 6 else ""})')
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    iters_per_epoch = math.ceil(len(train_ds) / (args.batch_size * ctx.world_size))
    steps = args.lr_steps if args.lr_steps is not None else default_lr_steps(args.epochs)
    milestones = [e * iters_per_epoch for e in steps]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, args.warmup_iters, milestones))
    total = args.epochs * iters_per_epoch
    if args.max_iters is not None:
        total = min(total, args.max_iters)
    flip_gen = torch.Generator().manual_seed(args.seed * 1000 + ctx.rank)
    state = dict(epoch=0, step=0, iteration=0)
    # a checkpoint is `pending` when written before the evaluation that ends an epoch or before the end of the run
    # (final evaluation, model_final.pth): a run stopped there does that work first when resumed
    pending = False

    def ended() -> bool:
        return state['epoch'] >= args.epochs or state['iteration'] >= total

    def epoch_eval_due() -> bool:
        return bool(args.eval_every) and state['step'] == 0 and state['epoch'] % args.eval_every == 0
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        _check_resume(ckpt, args, resume_from)
        try:
            model.load_state_dict(ckpt['model'])
        except RuntimeError as e:  # strict: every missing / unexpected / misshapen key is an error
            raise ValueError(f'{resume_from} does not fit this model (another dataset\'s classes?): '
                             f'{summarize_load_error(e)}.') from e
        try:
            optimizer.load_state_dict(ckpt['optimizer'])
        except ValueError as e:  # another set of trainable parameters (a checkpoint without the arguments saved)
            raise ValueError(f'{resume_from}: its optimizer state does not fit this model\'s trainable parameters '
                             '(a run with another --frozen-stages?); resume with the arguments of the run that '
                             'wrote it.') from e
        scheduler.load_state_dict(ckpt['scheduler'])
        # the next update's lr from this run's schedule (the same value as saved, unless --epochs / --lr-steps /
        # --warmup-iters changed it; before, the first resumed update used the old schedule's lr)
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group['lr'] = base * factor(scheduler.last_epoch)
        state = {k: int(ckpt[k]) for k in state}
        pending = bool(ckpt.get('pending', False))
        rngs = ckpt['rng']
        if len(rngs) != ctx.world_size and ctx.is_main:
            print(f'warning: checkpoint from {len(rngs)} process(es), resuming with {ctx.world_size}; '
                  'data order and random draws will differ from an uninterrupted run.')
        set_rng_state(rngs[ctx.rank % len(rngs)], flip_gen)
        # a pending checkpoint finishes only the run it was written for: one at this run's end exactly (found by a
        # review: a later one, resumed with a smaller --epochs / --max-iters, wrote its weights as this run's)
        at_end = state['iteration'] == total or (state['epoch'] == args.epochs and state['step'] == 0
                                                 and state['iteration'] <= total)  # not past --max-iters
        if ended() and not (pending and at_end):
            limit = f'--epochs {args.epochs}' + (f' / --max-iters {args.max_iters}' if args.max_iters else '')
            raise ValueError(f'{resume_from} is at epoch {state["epoch"]}, iteration {state["iteration"]}: nothing '
                             f'is left to train with {limit}; raise --epochs or --max-iters to train further.')
        if ctx.is_main:
            print(f'resumed from {resume_from}: epoch {state["epoch"]} step {state["step"]} '
                  f'iteration {state["iteration"]}'
                  + (f' (training had ended: {"the evaluation and " if val_ds is not None else ""}the final '
                     'weights follow)' if ended() else
                     f' (the evaluation after epoch {state["epoch"]} was stopped: it runs first)'
                     if pending and epoch_eval_due() and val_ds is not None else ''))
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if continuing:
            # an evaluation logged at the checkpoint's iteration is dropped only if it is done again (not --no-eval)
            _trim_log(out, state['iteration'], pending and val_ds is not None and (ended() or epoch_eval_due()))
        else:
            # a fresh start or another run's checkpoint resumed here (--force, or files that are no run): never mix
            # this run's files with an earlier one's. log.jsonl is created by the first record, so a run that fails
            # before its first iteration leaves none
            for name in OUTPUTS:
                if (out / name).is_file() or (out / name).is_symlink():
                    (out / name).unlink()
    ddp = DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == 'cuda' else None) \
        if ctx.initialized else model

    last_saved: List[int] = []  # the iteration the latest checkpoint of this run holds

    def checkpoint(pending: bool = False) -> None:
        rng = ctx.all_gather_object(get_rng_state(flip_gen))
        if ctx.is_main:
            _save(out / LAST, model, optimizer, scheduler, dict(state, pending=pending), rng, args)
            last_saved[:] = [state['iteration']]

    first_iteration = state['iteration']

    last_eval = None
    evaluated_at = -1
    if pending and not ended() and epoch_eval_due() and val_ds is not None:  # the interrupted epoch-end evaluation
        last_eval = _evaluate(model, val_ds, ctx, args, out, state)
        evaluated_at = state['iteration']
        checkpoint()
    while not ended():
        sampler = DistributedSampler(train_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                     seed=args.seed)
        sampler.set_epoch(state['epoch'])
        order = list(sampler)[state['step'] * args.batch_size:]  # skip what a resumed epoch already saw
        # own generator: creating the loader must not draw from the global RNG (exact resume mid-epoch)
        loader_gen = torch.Generator().manual_seed(args.seed + 7919 * state['epoch'] + ctx.rank)
        loader = DataLoader(train_ds, batch_size=args.batch_size, sampler=order, num_workers=args.workers,
                            collate_fn=collate_detection, generator=loader_gen)
        ddp.train()
        bar = tqdm(loader, desc=f'epoch {state["epoch"] + 1}/{args.epochs}', total=iters_per_epoch,
                   initial=state['step'], disable=not (args.progress and ctx.is_main))
        try:  # the bar is closed (its line ended) before an error is printed
            for images, targets in bar:
                if state['iteration'] >= total:
                    break
                pairs = [hflip(im, t) if torch.rand((), generator=flip_gen) < args.hflip else (im, t)
                         for im, t in zip(images, targets)]
                images = [im.to(ctx.device) for im, _ in pairs]
                targets = [{k: v.to(ctx.device) for k, v in t.items()} for _, t in pairs]
                losses = ddp(images, targets)
                loss = sum(losses.values())
                # every rank checks every rank's loss before backward, so that all of them stop together
                diverged = ctx.ranks_where(not bool(torch.isfinite(loss)))
                if diverged:
                    values = ', '.join(f'{k} {v.item():.4g}' for k, v in losses.items())
                    where = ctx.all_gather_object(values)
                    values = '; '.join(f'rank {r}: {where[r]}' for r in diverged) if ctx.initialized else values
                    # --lr is the optimizer state's (a RESUME_KEY): a lower one needs a new run; --warmup-iters
                    # may change on resume
                    raise TrainingError(
                        f'non-finite loss at iteration {state["iteration"] + 1} ({values}); '
                        + (f'resume from {out / LAST} (iteration {last_saved[0]}) with a larger --warmup-iters (now '
                           f'{args.warmup_iters}), or start a new run (--force, or another --out) with a lower --lr '
                           f'(now {args.lr:g}), or check the data.' if last_saved else
                           f'no checkpoint was written: start again (--force, or another --out) with a lower --lr '
                           f'(now {args.lr:g}) or a larger --warmup-iters (now {args.warmup_iters}), or check '
                           'the data.'))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                lr = optimizer.param_groups[0]['lr']  # the lr of this update (scheduler.step() sets the next one)
                optimizer.step()
                scheduler.step()
                state['iteration'] += 1
                state['step'] += 1
                # the job's losses, averaged over the ranks as the gradients are (found by an audit: the log held
                # rank 0's only, 1/N of the batch)
                logged = ctx.mean(torch.stack([loss.detach(), *(v.detach() for v in losses.values())])).tolist()
                if ctx.is_main:
                    # the epoch this iteration belongs to, from 1 (an evaluation after it names the same)
                    record = dict(iteration=state['iteration'], epoch=state['epoch'] + 1, lr=lr, loss=logged[0],
                                  **dict(zip(losses, logged[1:])))
                    _log(out, record)
                    bar.set_postfix(loss=f'{logged[0]:.4f}', lr=f'{record["lr"]:.2e}')
                if args.checkpoint_every and state['iteration'] % args.checkpoint_every == 0:
                    checkpoint()
        finally:
            bar.close()
        if state['step'] >= iters_per_epoch:
            state['epoch'] += 1
            state['step'] = 0
        evaluating = epoch_eval_due() and val_ds is not None
        checkpoint(pending=evaluating or ended())
        if evaluating:
            last_eval = _evaluate(model, val_ds, ctx, args, out, state)
            evaluated_at = state['iteration']
            if not ended():
                checkpoint()  # the evaluation is done
    if evaluated_at != state['iteration']:
        last_eval = _evaluate(model, val_ds, ctx, args, out, state)
    if ctx.is_main:
        atomic_save(model.state_dict(), out / 'model_final.pth')  # replaces only what --force / --resume allowed
    checkpoint()  # the run is complete: a --resume of it has nothing left to do
    if ctx.is_main:
        trained = state['iteration'] - first_iteration
        span = f' (iterations {first_iteration + 1}..{state["iteration"]})' if first_iteration and trained else ''
        saved = f'checkpoint {out / LAST} (iteration {last_saved[0]}), ' if last_saved else ''
        print(f'done: {trained} iterations{span}; {saved}weights {out / "model_final.pth"}')
    return dict(state=state, eval=last_eval)


def _out_of_memory(error: BaseException) -> bool:
    """torch's CPU allocator raises a plain RuntimeError ("can't allocate memory"), CUDA an OutOfMemoryError."""
    text = str(error)
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text \
        or 'out of memory' in text


def run(args: argparse.Namespace) -> int:
    """Entry point of ``vitzoo finetune-det``; returns the exit code (2: an argument out of range or an unknown
    backbone, as argparse's usage errors; 1: any other reported error)."""
    ctx = None
    try:
        validate_args(args)  # before anything else, also before joining a process group
    except ValueError as e:  # an argument out of range: a usage error, as argparse's own
        print(f'vitzoo {NAME}: error: {e}', file=sys.stderr)
        return 2
    try:
        ctx = init_distributed(args.device)
        train(args, ctx)
    except BrokenPipeError:  # the reader of stdout went away: the command line ends quietly (141)
        raise
    except (DatasetError, UnknownModelError, BackboneError, TrainingError, ValueError, OSError) as e:
        # user errors (bad arguments, data, checkpoints, output folder, a diverging run): one line, not a
        # traceback; one raised in a DataLoader worker comes wrapped in the worker's traceback text; the advice of
        # a load error summarised by its first line (a backbone's pretrained weights) is kept
        message = command_line_advice(
            cli_message(e, worker_error_message(e)), local_file='give a local file with --backbone-weights FILE',
            no_weights='leave out --pretrained and --backbone-weights (a randomly initialised backbone)',
            variant='choose the --backbone the checkpoint was saved from',
            dims='load its checkpoint with --pretrained or --backbone-weights FILE')
        print(f'vitzoo {NAME}: error: {message}', file=sys.stderr)
        # drop the traceback now: it holds a DataLoader iterator in a reference cycle (torch's re-raise frame),
        # and workers shut down by a later garbage collection wait 5 s each for a stop signal that never comes
        e.__traceback__ = None
        return 2 if isinstance(e, UnknownModelError) else 1  # an unknown name is a usage error, as in every command
    except (RuntimeError, MemoryError) as e:
        if not _out_of_memory(e):
            raise
        # found by an audit: a traceback; the run cannot go on at these sizes, and which ones to lower is known
        print(f'vitzoo {NAME}: error: out of memory ({type(e).__name__}: {first_line(e)}); lower --batch-size (now '
              f'{args.batch_size}), --img-size / --max-size (now {args.max_size}) or --out-channels (now '
              f'{args.out_channels}).', file=sys.stderr)
        e.__traceback__ = None
        return 1
    finally:
        if ctx is not None:
            ctx.close()
    return 0
