"""A tiny synthetic COCO-format dataset (shapes on textured backgrounds) for smoke tests and demos.

``python -m vitzoo.detection.synthetic DIR`` writes ``DIR/annotations/instances_{train,val}.json`` and the PNG images,
in the layout ``vitzoo finetune-det --data DIR`` reads.
"""
import argparse
import sys
import json
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from PIL import Image

from vitzoo.atomic import staged_dir
from vitzoo.cli import named_output
from vitzoo.detection.data import segmentation_area
from vitzoo.messages import cli_message

__all__ = ['CATEGORIES', 'make_shapes_dataset']

CATEGORIES = [dict(id=1, name='rectangle'), dict(id=2, name='ellipse'), dict(id=3, name='triangle')]


def _polygon(kind: int, x0: float, y0: float, w: float, h: float) -> List[float]:
    if kind == 1:
        pts = [(x0, y0), (x0 + w, y0), (x0 + w, y0 + h), (x0, y0 + h)]
    elif kind == 2:
        pts = [(x0 + w / 2 * (1 + math.cos(t)), y0 + h / 2 * (1 + math.sin(t)))
               for t in (2 * math.pi * i / 24 for i in range(24))]
    else:
        pts = [(x0 + w / 2, y0), (x0 + w, y0 + h), (x0, y0 + h)]
    return [round(v, 2) for p in pts for v in p]


def _fill(image: torch.Tensor, polygon: Sequence[float], color: torch.Tensor) -> None:
    """Paint a convex polygon (even-odd test on pixel centres)."""
    h, w = image.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing='ij')
    px, py = polygon[0::2], polygon[1::2]
    inside = torch.zeros(h, w, dtype=torch.bool)
    n = len(px)
    for i in range(n):
        x1, y1, x2, y2 = px[i], py[i], px[(i + 1) % n], py[(i + 1) % n]
        if y1 == y2:
            continue
        crosses = ((y1 > ys) != (y2 > ys)) & (xs < (x2 - x1) * (ys - y1) / (y2 - y1) + x1)
        inside ^= crosses
    image[:, inside] = color[:, None]


def _split(root: Path, split: str, count: int, size: Tuple[int, int], gen: torch.Generator, first_ann: int) -> int:
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    images: List[Dict] = []
    anns: List[Dict] = []
    h, w = size
    for idx in range(count):
        fy, fx = (torch.rand(2, generator=gen) * 0.3 + 0.05).tolist()
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
        texture = 0.5 + 0.15 * torch.sin(fx * xs + fy * ys) + 0.1 * torch.rand(h, w, generator=gen)
        image = (texture[None] * torch.rand(3, 1, 1, generator=gen) + 0.2).clamp(0, 1)
        for _ in range(int(torch.randint(1, 4, (), generator=gen))):
            kind = int(torch.randint(1, 4, (), generator=gen))
            bw, bh = (torch.rand(2, generator=gen) * 0.3 + 0.2).tolist()
            bw, bh = bw * w, bh * h
            x0 = float(torch.rand((), generator=gen)) * (w - bw)
            y0 = float(torch.rand((), generator=gen)) * (h - bh)
            poly = _polygon(kind, x0, y0, bw, bh)
            color = torch.zeros(3)
            color[kind - 1] = 1.0
            _fill(image, poly, color)
            anns.append(dict(id=first_ann + len(anns), image_id=idx + 1, category_id=kind, iscrowd=0,
                             bbox=[round(x0, 2), round(y0, 2), round(bw, 2), round(bh, 2)],
                             area=round(segmentation_area([poly], h, w), 2), segmentation=[poly]))
        name = f'{split}_{idx:04d}.png'
        Image.fromarray((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(folder / name)
        images.append(dict(id=idx + 1, file_name=name, width=w, height=h))
    ann_dir = root / 'annotations'
    ann_dir.mkdir(parents=True, exist_ok=True)
    data = dict(images=images, annotations=anns, categories=CATEGORIES)
    (ann_dir / f'instances_{split}.json').write_text(json.dumps(data))
    return first_ann + len(anns)


def make_shapes_dataset(root: str, num_train: int = 8, num_val: int = 4, size: Tuple[int, int] = (128, 160),
                        seed: int = 0, force: bool = False) -> Path:
    """Write a synthetic COCO-format folder with 3 classes (rectangle, ellipse, triangle) and polygon masks.

    Args:
        root: Output folder.
        num_train: Training images.
        num_val: Validation images (0: no val split).
        size: Image (height, width).
        seed: Random seed; the same seed gives the same files.
        force: Replace an existing, non-empty ``root`` (an empty folder is always used).

    The folder is built beside ``root`` and moved into place in one rename (:func:`vitzoo.atomic.staged_dir`):
    an interrupted run leaves nothing behind, and an existing dataset is never mixed with a new one.
    """
    root = Path(root)
    empty = root.is_dir() and not any(root.iterdir())
    gen = torch.Generator().manual_seed(seed)
    with staged_dir(root, force=force or empty) as tmp:
        next_ann = _split(tmp, 'train', num_train, size, gen, 1)
        if num_val:
            _split(tmp, 'val', num_val, size, gen, next_ann)
    return root


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low`` (a bad value is a usage error, exit code 2, naming the option)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'must be an integer >= {low}, got {text!r}') from None
        if value < low:
            raise argparse.ArgumentTypeError(f'must be an integer >= {low}, got {value}')
        return value
    return parse


def main() -> None:  # pragma: no cover
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('root', type=named_output('/tmp/shapes'))
    # finetune-det refuses a split without images; val may be left out (0)
    p.add_argument('--train', type=_int_at_least(1), default=16)
    p.add_argument('--val', type=_int_at_least(0), default=8)
    p.add_argument('--height', type=_int_at_least(1), default=192)
    p.add_argument('--width', type=_int_at_least(1), default=256)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--force', action='store_true', help='replace an existing, non-empty ROOT')
    a = p.parse_args()
    try:
        print(make_shapes_dataset(a.root, a.train, a.val, (a.height, a.width), a.seed, force=a.force))
    except OSError as e:  # the output checks name vitzoo's --out and force=True; here they are ROOT and --force
        raise SystemExit(f'error: {cli_message(e).replace("(--out)", "(ROOT)")}')
    except KeyboardInterrupt:  # nothing is left behind (staged_dir)
        print('interrupted', file=sys.stderr)
        raise SystemExit(130)


if __name__ == '__main__':  # pragma: no cover
    main()
