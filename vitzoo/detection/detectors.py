"""torchvision detectors (RetinaNet, Faster R-CNN, Mask R-CNN) on a zoo backbone.

Pyramid levels follow the SHViT paper: RetinaNet uses strides 8..128 (p3..p7), the R-CNNs strides 4..64 (p2..p6,
RoIAlign on p2..p5). Anchors follow MMDetection's defaults that the paper's configs use: RetinaNet 3 scales per octave
with base size 4x the stride, R-CNN RPN one size of 8x the stride; aspect ratios 0.5/1/2; corners not rounded
(:class:`UnroundedAnchorGenerator`). RoIAlign is MMDetection's too (:class:`AlignedMultiScaleRoIAlign`).

Class convention: ``num_classes`` counts the object categories; labels are ``1..num_classes`` and 0 is background
(torchvision heads are built with ``num_classes + 1``). RetinaNet's head thus has an output for label 0 that training
only ever pushes down; :class:`ForegroundRetinaNet` never turns it into detections (the R-CNNs drop it themselves).
"""
import inspect
import math
import numbers
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import initLevelMapper

from vitzoo.models import model_in_chans

from .backbone import BackboneError, DetectionBackbone, create_body
from .fpn import level_name

__all__ = ['AlignedMultiScaleRoIAlign', 'DETECTOR_STRIDES', 'ForegroundRetinaNet', 'UnroundedAnchorGenerator',
           'build_backbone', 'build_detector']

DETECTOR_STRIDES: Dict[str, Tuple[int, ...]] = {
    'retinanet': (8, 16, 32, 64, 128),
    'fasterrcnn': (4, 8, 16, 32, 64),
    'maskrcnn': (4, 8, 16, 32, 64),
}
_ASPECT_RATIOS = (0.5, 1.0, 2.0)
_TRANSFORM_KWARGS = {'size_divisible', 'fixed_size'}  # GeneralizedRCNNTransform options reached through **kwargs


class ForegroundRetinaNet(RetinaNet):
    """torchvision's RetinaNet whose detections never carry label 0 (background).

    The classification head keeps its ``num_classes + 1`` outputs (same weights and checkpoints as ``RetinaNet``);
    the background output is left out before the score threshold and the top-k selection, so it takes no place of a
    real detection either (before, with a low ``score_thresh`` a third of the detections could be label 0).
    """

    def postprocess_detections(self, head_outputs: Dict[str, List[Tensor]], anchors: List[List[Tensor]],
                               image_shapes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        head_outputs = dict(head_outputs)
        head_outputs['cls_logits'] = [logits.index_fill(-1, torch.zeros(1, dtype=torch.long, device=logits.device),
                                                        float('-inf')) for logits in head_outputs['cls_logits']]
        detections = super().postprocess_detections(head_outputs, anchors, image_shapes)
        # a score threshold below 0 would still let a background score of 0 through
        return [{k: v[d['labels'] != 0] for k, v in d.items()} for d in detections]


class UnroundedAnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` with MMDetection's cell anchors (the SHViT paper's): corners at real
    coordinates, where torchvision rounds each to a whole pixel.

    Sizes may be real numbers too (RetinaNet's octave sizes ``4 * stride * 2 ** (k / 3)``: 40.3 and 50.8 pixels at
    stride 8, which torchvision's own recipe truncates to 40 and 50). Weights trained with MMDetection
    (:mod:`vitzoo.detection.mmdet_weights`) so see the anchors they were trained with.
    """

    def generate_anchors(self, scales: List[float], aspect_ratios: List[float], dtype: torch.dtype = torch.float32,
                         device: torch.device = torch.device('cpu')) -> Tensor:
        sizes = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        heights = torch.sqrt(ratios)  # ratio = height / width at the size's area
        widths = 1 / heights
        ws = (widths[:, None] * sizes[None, :]).reshape(-1)  # ratio-major, sizes within a ratio: the head's slots
        hs = (heights[:, None] * sizes[None, :]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2


_CLASSES = {'retinanet': ForegroundRetinaNet, 'fasterrcnn': FasterRCNN, 'maskrcnn': MaskRCNN}


def _check_kind(kind: str) -> str:
    if kind not in DETECTOR_STRIDES:
        raise ValueError(f'unknown detector kind {kind!r}; choose one of {sorted(DETECTOR_STRIDES)}.')
    return kind


def build_backbone(
        name: Union[str, nn.Module],
        kind: str = 'retinanet',
        pretrained: bool = False,
        weights: Optional[Union[str, Path]] = None,
        out_channels: int = 256,
        frozen_stages: int = -1,
        norm_eval: bool = True,
        model_kwargs: Optional[Dict[str, Any]] = None,
) -> DetectionBackbone:
    """Build a :class:`DetectionBackbone` with the pyramid levels of detector ``kind``.

    Args:
        name: timm model name, or an already created timm model / ``features_only`` model.
        kind: ``'retinanet'``, ``'fasterrcnn'`` or ``'maskrcnn'`` (selects the pyramid strides).
        pretrained: Load the default pretrained classification weights.
        weights: Local classification checkpoint to load instead.
        out_channels: FPN channels.
        frozen_stages: See :class:`DetectionBackbone`.
        norm_eval: Keep backbone BatchNorms in eval mode during training.
        model_kwargs: Extra ``timm.create_model`` arguments.
    """
    strides = DETECTOR_STRIDES[_check_kind(kind)]
    if isinstance(name, str):
        model = create_body(name, pretrained=pretrained, weights=weights, model_kwargs=model_kwargs)
    elif pretrained or weights is not None or model_kwargs:
        raise ValueError('pretrained / weights / model_kwargs apply to a model name; load weights into a model you '
                         'pass yourself before passing it.')
    else:
        model = name
    # the model itself, or the one inside a features_only wrapper (timm's FeatureGetterNet keeps it as .model)
    fixed = next((m for m in model.modules() if getattr(m, 'dynamic_img_size', None) is False), None)
    if fixed is not None:
        inside = '' if fixed is model else f' (its {type(fixed).__name__})'
        fix = "leave dynamic_img_size out of model_kwargs: the backbone sets it" if isinstance(name, str) else (
            "create it with timm.create_model(..., dynamic_img_size=True), or pass the model name, which does so")
        raise ValueError(f'{type(model).__name__}{inside} was created for one input size (dynamic_img_size=False), '
                         f'but a detector feeds it images of many sizes; {fix}.')
    ref = next(model.parameters(), None)  # the neck is created on the body's device and in its dtype
    return DetectionBackbone(model, strides, out_channels, frozen_stages=frozen_stages, norm_eval=norm_eval,
                             device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)


def _check_normalisation(body: nn.Module, detector_kwargs: Dict[str, Any]) -> None:
    """Refuse an ``image_mean`` / ``image_std`` (given, or the pretrained cfg's) whose length is not the backbone's
    input channel count: torchvision's transform would broadcast a 1-channel image to the 3 values and feed the model
    3 channels (found by an audit: a backbone built with in_chans=1 then failed at its first forward, blaming the
    image)."""
    chans = model_in_chans(getattr(body, 'model', body))
    cfg = getattr(body, 'pretrained_cfg', None) or {}
    for key, default in (('image_mean', (0.485, 0.456, 0.406)), ('image_std', (0.229, 0.224, 0.225))):
        given = key in detector_kwargs
        values = detector_kwargs[key] if given else cfg.get(key[len('image_'):], default)
        if len(values) != chans:
            where = f'{key}={list(values)}' if given else f"the backbone's pretrained cfg {key[len('image_'):]} " \
                f'{list(values)}'
            raise ValueError(
                f'the backbone takes {chans}-channel images, but {where} has {len(values)} values; pass image_mean '
                f'and image_std with {chans} values each (the normalisation the backbone was trained with), e.g. '
                f'build_detector(..., image_mean={[0.5] * chans}, image_std={[0.25] * chans}).')


#: Least ``min_size`` / ``max_size``: an image resized below 32 px leaves the coarsest pyramid levels nothing, and 1 px
#: resizes to 0 in torchvision ("Input and output sizes should be greater than 0"; found by an audit).
MIN_IMAGE_SIDE = 32


def _is_size(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= MIN_IMAGE_SIDE


def _check_sizes(min_size: Any, max_size: Any) -> None:
    """torchvision's resize takes them unchecked and fails at the first image (found by an audit)."""
    sizes = min_size if isinstance(min_size, (tuple, list)) else (min_size,)
    if not sizes or not all(_is_size(s) for s in sizes):
        raise ValueError(f'min_size must be an int >= {MIN_IMAGE_SIDE} (the shorter image side after resizing) or a '
                         f'non-empty tuple of them (one drawn per training batch), got {min_size!r}.')
    if not _is_size(max_size):
        raise ValueError(f'max_size must be an int >= {MIN_IMAGE_SIDE} (the longer image side limit after '
                         f'resizing), got {max_size!r}.')


#: Paddings a failing backbone is also tried at (multiples of ``size_divisible`` up to this), to say which one it
#: needs (MaxViT's windows: 256 where the R-CNNs pad to 64 and RetinaNet to 128). Not more: a 2048x3072 try of a
#: model that runs at no such size took 29 s and 15 GB (found by a review)
_LARGEST_PADDING_TRIED = 256


def _check_runs_at_detector_sizes(backbone: DetectionBackbone, divisible: int) -> None:
    """Run the backbone once on a non-square input of the sizes the detector gives it (a multiple of
    ``size_divisible``, ``2d x 3d``): a model built for one input size (LeViT, PiT, Hiera, EfficientFormerV2) or
    whose windows need other multiples (MaxViT) is refused here, naming why, not at the first training step with a
    shape error from inside the model (found by an audit)."""
    ref = next(backbone.parameters(), None)
    if ref is None or ref.device.type == 'meta':
        return

    def fails_at(d: int) -> Optional[BaseException]:
        x = torch.zeros(1, model_in_chans(getattr(backbone.body, 'model', backbone.body)) or 3, 2 * d, 3 * d,
                        device=ref.device, dtype=ref.dtype)
        modes = {m: m.training for m in backbone.modules()}
        try:
            with torch.no_grad():
                backbone.eval()(x)
        except (RuntimeError, AssertionError, IndexError, ValueError) as e:
            return e
        finally:
            for m, mode in modes.items():
                m.training = mode
        return None

    error = fails_at(divisible)
    if error is None:
        return
    name = (getattr(backbone.body, 'pretrained_cfg', None) or {}).get('architecture') or type(backbone.body).__name__
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    head = (f'the backbone {name} fails on a {2 * divisible}x{3 * divisible} input ({type(error).__name__}: '
            f'{reason}), a size the detector gives it (torchvision resizes each image to min_size / max_size and pads '
            f'it to a multiple of size_divisible={divisible})')
    larger = [divisible * k for k in (2, 4, 8) if divisible * k <= _LARGEST_PADDING_TRIED]
    works = next((d for d in larger if fails_at(d) is None), None)
    if works is not None:
        raise BackboneError(f'{head}; padded to multiples of {works} it runs: pass size_divisible={works} to '
                            f'build_detector.')
    raise BackboneError(f'{head}: it runs at one input size only, or at sizes a detector does not give it. Choose a '
                        f'backbone that takes any input size (SHViT, NViT / ReViT, ViTs, ResNets, ConvNeXt, Swin...).')


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` with MMDetection's RoIAlign (the SHViT paper's): pixel centres at
    half-integer coordinates (``aligned=True``; torchvision's samples half a pixel off), and by default an adaptive
    number of sampling points per bin (``sampling_ratio=0``: ceil(RoI size / output size), where torchvision's recipe
    takes 2). Each RoI is pooled from the level of its size, as torchvision's does (the same level as MMDetection's
    ``finest_scale=56`` rule). :func:`_roi_pool` sets the scales from the pyramid's strides; left unset, they are
    inferred from the first batch and kept, as torchvision's pool does."""

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]]) -> Tensor:
        # written for TorchScript too, as torchvision's pool is (found by a review: math.log2 and a star-unpacked
        # shape made the R-CNNs' RoI heads unscriptable)
        maps: List[Tensor] = []
        for name in self.featmap_names:
            maps.append(x[name])
        scales, mapper = self.scales, self.map_levels
        if scales is None or mapper is None:
            height = max([shape[0] for shape in image_shapes])
            scales = [2.0 ** float(torch.round(torch.log2(torch.tensor(m.shape[-2] / height))).item()) for m in maps]
            first = int(torch.round(-torch.log2(torch.tensor(scales[0]))).item())
            last = int(torch.round(-torch.log2(torch.tensor(scales[-1]))).item())
            mapper = initLevelMapper(first, last, canonical_scale=self.canonical_scale,
                                     canonical_level=self.canonical_level)
            self.scales, self.map_levels = scales, mapper
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
        if len(maps) > 1:
            levels = mapper(boxes).to(rois.device)
        else:
            levels = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
        out = maps[0].new_zeros((rois.shape[0], maps[0].shape[1], self.output_size[0], self.output_size[1]))
        for level, feature in enumerate(maps):
            index = torch.where(levels == level)[0]
            out[index] = roi_align(feature, rois[index], self.output_size, spatial_scale=scales[level],
                                   sampling_ratio=self.sampling_ratio, aligned=True).to(out.dtype)
        return out


def _roi_pool(strides: List[int], output_size: int) -> MultiScaleRoIAlign:
    """MMDetection's RoIAlign over the pyramid levels of ``strides``, its scales set from them. torchvision's,
    left to itself, infers them once, from the first batch's largest image and its maps, and keeps them: found by an
    audit, a first batch whose resized height was 33-45 or 65-90 pixels (a wide image: maps padded to 64 pixels)
    gave twice the real scales, for every later batch, training and evaluation."""
    pool = AlignedMultiScaleRoIAlign([level_name(s) for s in strides], output_size=output_size, sampling_ratio=0)
    pool.scales = [1.0 / s for s in strides]
    pool.map_levels = initLevelMapper(int(math.log2(strides[0])), int(math.log2(strides[-1])),
                                      canonical_scale=pool.canonical_scale, canonical_level=pool.canonical_level)
    return pool


def build_detector(
        kind: str,
        backbone: Union[str, nn.Module, DetectionBackbone],
        num_classes: int,
        pretrained: bool = False,
        weights: Optional[Union[str, Path]] = None,
        out_channels: int = 256,
        frozen_stages: int = -1,
        norm_eval: bool = True,
        min_size: int = 800,
        max_size: int = 1333,
        **detector_kwargs: Any,
) -> nn.Module:
    """Build a torchvision detector on a zoo backbone.

    Args:
        kind: ``'retinanet'``, ``'fasterrcnn'`` or ``'maskrcnn'``.
        backbone: timm model name (``'shvit_s4'``), a timm model / ``features_only`` model, or a built
            :class:`DetectionBackbone` (whose strides must match ``kind``).
        num_classes: Number of object categories (background excluded).
        pretrained: Load the backbone's pretrained classification weights (model names only).
        weights: Local classification checkpoint for the backbone (model names only).
        out_channels: FPN channels.
        frozen_stages: See :class:`DetectionBackbone`.
        norm_eval: Keep backbone BatchNorms in eval mode during training.
        min_size: Shorter image side after resizing (torchvision ``GeneralizedRCNNTransform``).
        max_size: Upper bound of the longer side after resizing.
        **detector_kwargs: Passed to the torchvision detector class (e.g. ``score_thresh``,
            ``detections_per_img``, ``image_mean``). They are checked by that class, not swallowed.

    Returns:
        The detector: in train mode ``model(images, targets)`` returns a loss dict, in eval mode ``model(images)``
        returns one dict per image with ``boxes`` (xyxy, input pixel coordinates), ``labels``, ``scores`` and, for
        Mask R-CNN, ``masks`` ([N, 1, H, W] probabilities).
    """
    _check_kind(kind)
    _check_sizes(min_size, max_size)
    allowed = set(inspect.signature(_CLASSES[kind]).parameters) | _TRANSFORM_KWARGS
    unknown = sorted(set(detector_kwargs) - allowed - {'backbone', 'num_classes'})
    if unknown:
        raise TypeError(f'build_detector({kind!r}) got unknown arguments {unknown}; '
                        f'{_CLASSES[kind].__name__} accepts {sorted(allowed - {"backbone", "num_classes", "kwargs"})}.')
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f'num_classes must be an int >= 1 (object categories, background excluded), got '
                         f'{num_classes!r}.')
    if isinstance(backbone, DetectionBackbone):
        given = [name for name, value, default in (
            ('pretrained', pretrained, False), ('weights', weights, None), ('out_channels', out_channels, 256),
            ('frozen_stages', frozen_stages, -1), ('norm_eval', norm_eval, True)) if value != default]
        if given:
            raise ValueError(f'{", ".join(given)} apply when build_detector builds the backbone; pass them to '
                             f'build_backbone(...) for a backbone you build yourself.')
        if tuple(backbone.out_strides) != DETECTOR_STRIDES[kind]:
            raise ValueError(f'backbone pyramid strides {backbone.out_strides} do not fit {kind} '
                             f'(needs {DETECTOR_STRIDES[kind]}); build it with build_backbone(..., kind={kind!r}).')
    else:
        backbone = build_backbone(backbone, kind, pretrained=pretrained, weights=weights, out_channels=out_channels,
                                  frozen_stages=frozen_stages, norm_eval=norm_eval)
    strides = backbone.out_strides
    cfg = getattr(backbone.body, 'pretrained_cfg', None) or {}
    _check_normalisation(backbone.body, detector_kwargs)
    detector_kwargs.setdefault('image_mean', list(cfg.get('mean', (0.485, 0.456, 0.406))))
    detector_kwargs.setdefault('image_std', list(cfg.get('std', (0.229, 0.224, 0.225))))
    detector_kwargs.setdefault('size_divisible', max(strides))
    divisible = detector_kwargs['size_divisible']
    if isinstance(divisible, bool) or not isinstance(divisible, numbers.Integral) or divisible < 1 \
            or divisible % max(strides):
        # torchvision places the anchors of a level at (padded size / map size) pixels apart: a padding that is not a
        # multiple of the coarsest stride puts them off the grid
        raise ValueError(f'size_divisible={divisible!r} must be a positive int multiple of the coarsest pyramid '
                         f'stride {max(strides)} of {kind}, or anchors land off their feature grid.')
    _check_runs_at_detector_sizes(backbone, divisible)
    # our anchors and RoI pools for the pyramid's strides; an anchor generator or pool the caller passes replaces ours
    if kind == 'retinanet':
        sizes = tuple(tuple(4 * s * 2 ** (k / 3) for k in range(3)) for s in strides)
        # COCO scores at most 100 detections per image (torchvision's RetinaNet keeps 300, which inflates AP/AR
        # against the papers' numbers; found by an audit); Faster / Mask R-CNN keep 100 already
        parts = dict(anchor_generator=UnroundedAnchorGenerator(sizes, (_ASPECT_RATIOS,) * len(sizes)),
                     detections_per_img=100)
    else:
        roi_strides = [s for s in strides if s <= 32]
        parts = dict(rpn_anchor_generator=UnroundedAnchorGenerator(tuple((8 * s,) for s in strides),
                                                                   (_ASPECT_RATIOS,) * len(strides)),
                     box_roi_pool=_roi_pool(roi_strides, output_size=7))
        if kind == 'maskrcnn':
            parts['mask_roi_pool'] = _roi_pool(roi_strides, output_size=14)
    parts.update(min_size=min_size, max_size=max_size, **detector_kwargs)
    model = _CLASSES[kind](backbone, num_classes + 1, **parts)
    ref = next(backbone.parameters(), None)  # the heads follow the backbone's device and dtype, like its neck
    return model if ref is None else model.to(device=ref.device, dtype=ref.dtype)
