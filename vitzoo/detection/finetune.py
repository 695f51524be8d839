"""``vitzoo finetune-det``: fine-tune a torchvision detector with a zoo backbone on a COCO-format folder.

Recipe defaults follow the SHViT paper's MMDetection 1x setup: AdamW, lr 1e-4, weight decay 0.05, linear warm-up
over 500 iterations, lr x0.1 after epochs 8 and 11 of 12. Run with ``torchrun --nproc_per_node N -m vitzoo.cli
finetune-det ...`` (or ``torchrun ... $(which vitzoo) finetune-det ...``) for DDP; each process then loads
``--batch-size`` images.
"""
import argparse
import json
import math
import random
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from vitzoo.models import UnknownModelError

from .backbone import BackboneError
from .checkpoint import atomic_save, get_rng_state, load_checkpoint, set_rng_state
from .data import CocoDetectionFolder, DatasetError, collate_detection, hflip, split_exists
from .detectors import DETECTOR_STRIDES, build_detector
from .distributed import DistContext, init_distributed
from .evaluate import evaluate_coco, format_stats

__all__ = ['register', 'run', 'lr_factor']

NAME = 'finetune-det'
LAST = 'checkpoint_last.pth'
OUTPUTS = (LAST, 'log.jsonl', 'model_final.pth')  # what a run writes into --out


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``finetune-det`` sub-command."""
    p = subparsers.add_parser(NAME, help='fine-tune RetinaNet / Faster R-CNN / Mask R-CNN with a zoo backbone on '
                                         'a COCO-format folder (CPU, GPU, torchrun DDP)')
    p.add_argument('--data', required=True, help='dataset folder: DIR/annotations/instances_{train,val}.json, '
                                                 'images in DIR/train/ and DIR/val/ (val optional)')
    p.add_argument('--detector', default='retinanet', choices=sorted(DETECTOR_STRIDES))
    p.add_argument('--backbone', default='shvit_s4', help='timm model name (shvit_s4, revit_t, resnet18, ...)')
    p.add_argument('--pretrained', action='store_true', help='load the backbone\'s pretrained classification weights')
    p.add_argument('--backbone-weights', metavar='FILE', help='local classification checkpoint for the backbone')
    p.add_argument('--frozen-stages', type=int, default=-1, help='-1: none, 0: stem, N: stem + first N stages')
    p.add_argument('--no-norm-eval', dest='norm_eval', action='store_false',
                   help='let backbone BatchNorms update their statistics (default: kept in eval mode)')
    p.add_argument('--out-channels', type=int, default=256, help='FPN channels')
    p.add_argument('--epochs', type=int, default=12)
    p.add_argument('--max-iters', type=int, default=None, help='stop after this many iterations in total')
    p.add_argument('--batch-size', type=int, default=2, help='images per process')
    p.add_argument('--lr', type=float, default=1e-4)
    p.add_argument('--weight-decay', type=float, default=0.05)
    p.add_argument('--warmup-iters', type=int, default=500)
    p.add_argument('--lr-steps', type=int, nargs='*', default=None,
                   help='epochs after which the lr is multiplied by 0.1 (default: 8 11 scaled to --epochs)')
    p.add_argument('--img-size', type=int, default=None, help='sets both --min-size and --max-size')
    p.add_argument('--min-size', type=int, default=800, help='shorter side after resizing')
    p.add_argument('--max-size', type=int, default=1333, help='longer side limit after resizing')
    p.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    p.add_argument('--out', default='runs/finetune-det', help='output folder (checkpoints, log.jsonl)')
    p.add_argument('--force', action='store_true', help='start afresh in an --out folder that has a checkpoint')
    p.add_argument('--resume', nargs='?', const='auto', default=None, metavar='CKPT',
                   help=f'continue from CKPT (default: OUT/{LAST})')
    p.add_argument('--checkpoint-every', type=int, default=500, help='iterations between checkpoints (0: epoch ends)')
    p.add_argument('--eval-every', type=int, default=1, help='epochs between evaluations on val (0: only at the end)')
    p.add_argument('--no-eval', action='store_true', help='never evaluate')
    p.add_argument('--device', default=None, help='cpu or cuda (default: cuda when available)')
    p.add_argument('--workers', type=int, default=2, help='data-loading processes per training process')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--no-progress', dest='progress', action='store_false', help='no progress bars')
    p.set_defaults(func=run)


def lr_factor(iteration: int, warmup_iters: int, milestones: List[int], warmup_ratio: float = 1e-3) -> float:
    """Linear warm-up from ``warmup_ratio`` to 1 over ``warmup_iters``, times 0.1 per passed milestone."""
    factor = 0.1 ** sum(iteration >= m for m in milestones)
    if iteration < warmup_iters:
        factor *= warmup_ratio + (1 - warmup_ratio) * iteration / warmup_iters
    return factor


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_args(args: argparse.Namespace, out: Path) -> Optional[Path]:
    if args.img_size is not None:
        args.min_size = args.max_size = args.img_size
    for name in ('epochs', 'batch_size', 'min_size', 'max_size'):
        if getattr(args, name) < 1:
            raise ValueError(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}.')
    if args.max_iters is not None and args.max_iters < 1:
        raise ValueError(f'--max-iters must be >= 1, got {args.max_iters}.')
    if args.resume is not None:
        return out / LAST if args.resume == 'auto' else Path(args.resume)
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not args.force:
        raise FileExistsError(f'{out} already holds a run ({", ".join(existing)}); pass --resume to continue it or '
                              '--force to start afresh (which replaces those files).')
    return None


#: what a run's arguments must share with the run it resumes (the model and what its weights' shapes follow)
RESUME_KEYS = ('detector', 'backbone', 'out_channels')


def _check_resume(ckpt: Dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    saved = ckpt.get('args') or {}
    differ = [f'--{k.replace("_", "-")} {saved[k]!s} there, {getattr(args, k)!s} here' for k in RESUME_KEYS
              if k in saved and str(saved[k]) != str(getattr(args, k))]
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


def _evaluate(model: nn.Module, val: Optional[CocoDetectionFolder], ctx: DistContext, args, out: Path,
              state: Dict[str, int]) -> Optional[Dict[str, Dict[str, float]]]:
    stats = None
    if val is not None and ctx.is_main:
        stats = evaluate_coco(model, val, ctx.device, batch_size=args.batch_size, workers=args.workers,
                              progress=args.progress)
        print(f'[eval] epoch {state["epoch"]} iteration {state["iteration"]}\n{format_stats(stats)}', flush=True)
        _log(out, dict(eval=stats, **state))
    ctx.barrier()
    return stats


def train(args: argparse.Namespace, ctx: DistContext) -> Dict[str, Any]:
    """The fine-tuning loop. Returns ``dict(state=..., eval=...)`` (last evaluation, None without val)."""
    out = Path(args.out)
    resume_from = _check_args(args, out)
    with_masks = args.detector == 'maskrcnn'
    train_ds = CocoDetectionFolder(args.data, 'train', with_masks=with_masks)
    val_ds = None
    if not args.no_eval and split_exists(args.data, 'val'):
        val_ds = CocoDetectionFolder(args.data, 'val', with_masks=with_masks)
    _seed_everything(args.seed)
    model = build_detector(args.detector, args.backbone, train_ds.num_classes, pretrained=args.pretrained,
                           weights=args.backbone_weights, out_channels=args.out_channels,
                           frozen_stages=args.frozen_stages, norm_eval=args.norm_eval,
                           min_size=args.min_size, max_size=args.max_size).to(ctx.device)
    if ctx.is_main and model.backbone.dropped_keys:
        print(f'backbone: dropped {len(model.backbone.dropped_keys)} classification-only keys '
              f'({", ".join(model.backbone.dropped_keys[:6])}{", ..." if len(model.backbone.dropped_keys) > 6 else ""})')
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    iters_per_epoch = math.ceil(len(train_ds) / (args.batch_size * ctx.world_size))
    steps = args.lr_steps if args.lr_steps is not None else [round(args.epochs * 8 / 12), round(args.epochs * 11 / 12)]
    milestones = [e * iters_per_epoch for e in steps]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, args.warmup_iters, milestones))
    total = args.epochs * iters_per_epoch
    if args.max_iters is not None:
        total = min(total, args.max_iters)
    flip_gen = torch.Generator().manual_seed(args.seed * 1000 + ctx.rank)
    state = dict(epoch=0, step=0, iteration=0)
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        _check_resume(ckpt, args, resume_from)
        try:
            model.load_state_dict(ckpt['model'])
        except RuntimeError as e:  # strict: every missing / unexpected / misshapen key is an error
            raise ValueError(f'{resume_from} does not fit this model (another dataset\'s classes?): '
                             f'{str(e).splitlines()[0]} ...') from e
        optimizer.load_state_dict(ckpt['optimizer'])
        scheduler.load_state_dict(ckpt['scheduler'])
        state = {k: int(ckpt[k]) for k in state}
        rngs = ckpt['rng']
        if len(rngs) != ctx.world_size:
            print(f'warning: checkpoint from {len(rngs)} process(es), resuming with {ctx.world_size}; '
                  'data order and random draws will differ from an uninterrupted run.')
        set_rng_state(rngs[ctx.rank % len(rngs)], flip_gen)
        if ctx.is_main:
            print(f'resumed from {resume_from}: epoch {state["epoch"]} step {state["step"]} '
                  f'iteration {state["iteration"]}')
    elif ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / 'log.jsonl').write_text('')
    ddp = DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == 'cuda' else None) \
        if ctx.initialized else model

    def checkpoint() -> None:
        rng = ctx.all_gather_object(get_rng_state(flip_gen))
        if ctx.is_main:
            _save(out / LAST, model, optimizer, scheduler, state, rng, args)

    last_eval = None
    evaluated_at = -1
    while state['epoch'] < args.epochs and state['iteration'] < total:
        sampler = DistributedSampler(train_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                     seed=args.seed)
        sampler.set_epoch(state['epoch'])
        order = list(sampler)[state['step'] * args.batch_size:]  # skip what a resumed epoch already saw
        # own generator: creating the loader must not draw from the global RNG (exact resume mid-epoch)
        loader_gen = torch.Generator().manual_seed(args.seed + 7919 * state['epoch'] + ctx.rank)
        loader = DataLoader(train_ds, batch_size=args.batch_size, sampler=order, num_workers=args.workers,
                            collate_fn=collate_detection, generator=loader_gen)
        ddp.train()
        bar = tqdm(loader, desc=f'epoch {state["epoch"]}', total=iters_per_epoch, initial=state['step'],
                   disable=not (args.progress and ctx.is_main))
        for images, targets in bar:
            if state['iteration'] >= total:
                break
            pairs = [hflip(im, t) if torch.rand((), generator=flip_gen) < args.hflip else (im, t)
                     for im, t in zip(images, targets)]
            images = [im.to(ctx.device) for im, _ in pairs]
            targets = [{k: v.to(ctx.device) for k, v in t.items()} for _, t in pairs]
            losses = ddp(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise RuntimeError(f'non-finite loss at iteration {state["iteration"]}: '
                                   f'{ {k: v.item() for k, v in losses.items()} }; lower --lr or check the data.')
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            state['iteration'] += 1
            state['step'] += 1
            if ctx.is_main:
                record = dict(iteration=state['iteration'], epoch=state['epoch'], lr=optimizer.param_groups[0]['lr'],
                              loss=loss.item(), **{k: v.item() for k, v in losses.items()})
                _log(out, record)
                bar.set_postfix(loss=f'{loss.item():.4f}', lr=f'{record["lr"]:.2e}')
            if args.checkpoint_every and state['iteration'] % args.checkpoint_every == 0:
                checkpoint()
        bar.close()
        if state['step'] >= iters_per_epoch:
            state['epoch'] += 1
            state['step'] = 0
        checkpoint()
        if args.eval_every and state['step'] == 0 and state['epoch'] % args.eval_every == 0:
            last_eval = _evaluate(model, val_ds, ctx, args, out, state)
            evaluated_at = state['iteration']
    if evaluated_at != state['iteration']:
        last_eval = _evaluate(model, val_ds, ctx, args, out, state)
    if ctx.is_main:
        atomic_save(model.state_dict(), out / 'model_final.pth')  # replaces only what --force / --resume allowed
        print(f'done: {state["iteration"]} iterations; checkpoint {out / LAST}, weights {out / "model_final.pth"}')
    return dict(state=state, eval=last_eval)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``vitzoo finetune-det``; returns the exit code."""
    ctx = None
    try:
        ctx = init_distributed(args.device)
        train(args, ctx)
    except (DatasetError, UnknownModelError, BackboneError, ValueError, OSError) as e:
        # user errors (bad arguments, data, checkpoints, output folder): a message, not a traceback
        print(f'vitzoo {NAME}: error: {e}', file=sys.stderr)
        return 2
    finally:
        if ctx is not None:
            ctx.close()
    return 0
