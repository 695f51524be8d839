"""MMDetection checkpoints (the SHViT paper's ``retinanet_shvit_s4_1x_coco.pth`` / ``maskrcnn_shvit_s4_1x_coco.pth``)
in :func:`~vitzoo.detection.build_detector`'s RetinaNet, Faster R-CNN and Mask R-CNN.

Each part of an MMDetection detector maps onto ours:

* ``backbone.*``: the classification model without its head, in its own layout (for SHViT the official
  ``blocks1/2/3`` one, renamed as :func:`shvit.remap_official_keys` does) -> ``backbone.body.*``;
* ``neck.*``: the SHViT paper's FPN (EfficientViT's ``EfficientViTFPN``; MMDetection's ``FPN`` with RetinaNet's
  extra convs is the same without finer levels, but its R-CNN one, whose P6 is a max-pooling of P5, is not: ours
  has a conv there, which such a file lacks), each conv a ``ConvModule`` whose ``.conv`` holds the tensors ->
  ``backbone.fpn.*`` of :class:`~vitzoo.detection.ExtraLevelFPN`;
* RetinaNet: ``bbox_head.*`` (``RetinaHead``) -> torchvision's ``RetinaNetHead``;
* Faster / Mask R-CNN: ``rpn_head.*`` -> ``rpn.head.*``, ``roi_head.bbox_head.*`` (``Shared2FCBBoxHead``) ->
  ``roi_heads.box_head`` / ``box_predictor``, ``roi_head.mask_head.*`` (``FCNMaskHead``) -> ``roi_heads.mask_head``
  / ``mask_predictor``.

Categories: category ``c`` of the file (0-based, in the order of its ``CLASSES``; for COCO the category ids' order)
becomes label ``c + 1``, as :class:`~vitzoo.detection.data.CocoDetectionFolder` numbers categories, and torchvision's
label 0 is background. MMDetection's RetinaNet has no background output (sigmoid per category): it is added with zero
weights and the focal-loss prior bias, and :class:`~vitzoo.detection.ForegroundRetinaNet` never turns it into
detections. Its R-CNN box classifier has the background output last (torchvision: first), and its class-specific box
and mask outputs none (torchvision: one, never used): moved, and added with zero weights.

Nothing is loaded partially without being asked: every tensor of the model must come from the file and every tensor
of the file must find a place, or the load is an error naming them; only ``classifier=False`` leaves the
category-specific output layers at their initialisation (another set of categories), and says so in its return value.
"""
import math
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Tuple, Union

import torch
import torch.nn as nn
from torchvision.models.detection import FasterRCNN, MaskRCNN

from vitzoo.hub import WeightsError, validate_weights_file

from .checkpoint import numpy_data_globals
from .detectors import ForegroundRetinaNet
from .fpn import ExtraLevelFPN

__all__ = ['MMDetWeightsError', 'convert_mmdet_detector', 'is_mmdet_detector', 'load_mmdet_detector',
           'mmdet_categories', 'read_mmdet_checkpoint']

#: torchvision's (and MMDetection's) initial bias of a focal-loss classifier: sigmoid(bias) = 0.01
PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)
_HEADS = ('bbox_head.', 'rpn_head.', 'roi_head.')


class MMDetWeightsError(ValueError):
    """The file is not an MMDetection detector that fits the model; the message says what differs and what to do."""


def is_mmdet_detector(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` has MMDetection's detector layout (a neck or a head beside ``backbone.``)."""
    return any(k.startswith(('neck.',) + _HEADS) for k in state_dict)


def read_mmdet_checkpoint(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """The state dict of an MMDetection checkpoint file (under ``'state_dict'``, as MMDetection saves it, or plain).

    Raises:
        FileNotFoundError: no such file.
        MMDetWeightsError: a file that is not a readable checkpoint, or holds no detector's tensors.
    """
    path = Path(path)
    if not path.is_file():
        what = 'is a folder, not a file' if path.is_dir() else 'does not exist'
        raise FileNotFoundError(f'detector weights file {path} {what}; give an MMDetection checkpoint (.pth).')
    try:
        validate_weights_file(path)
        with torch.serialization.safe_globals(numpy_data_globals()):
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except (WeightsError, RuntimeError, ValueError, OSError, EOFError, pickle.UnpicklingError) as e:
        unsafe = re.search(r'GLOBAL ([\w.]+)', str(e))
        why = (f'it holds Python objects other than tensors and numbers ({unsafe.group(1)}); save its '
               "'state_dict' alone with torch.save and give that file") if unsafe else f'{e}'.split('\n')[0]
        raise MMDetWeightsError(f'{path} is not a readable checkpoint: {why}') from e
    return _state_dict_of(ckpt, str(path))


def _state_dict_of(ckpt: Any, what: str) -> Dict[str, torch.Tensor]:
    """The detector's tensors in ``ckpt`` (MMDetection's checkpoint dict, or its ``state_dict``); ``what`` names it
    in the messages."""
    state_dict = ckpt.get('state_dict', ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(state_dict, Mapping) or not state_dict \
            or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise MMDetWeightsError(f'{what} holds no state dict of tensors (an MMDetection checkpoint keeps one under '
                                "'state_dict').")
    if not is_mmdet_detector(state_dict):
        raise MMDetWeightsError(
            f'{what} is not an MMDetection detector checkpoint (no neck.* or head tensors; keys such as '
            f'{sorted(state_dict)[:3]}). For a classification checkpoint of the backbone use --backbone-weights '
            '(build_detector(..., weights=FILE)).')
    return dict(state_dict)


def _kind(state_dict: Mapping[str, torch.Tensor]) -> str:
    """'retinanet' or 'rcnn' (Faster / Mask R-CNN), from the file's heads."""
    if 'bbox_head.retina_cls.weight' in state_dict and 'bbox_head.retina_reg.weight' in state_dict:
        return 'retinanet'
    if 'roi_head.bbox_head.fc_cls.weight' in state_dict and 'rpn_head.rpn_cls.weight' in state_dict:
        return 'rcnn'
    parts = sorted({k.split('.')[0] for k in state_dict})
    raise MMDetWeightsError(
        f'the checkpoint has neither a RetinaNet head (bbox_head.retina_cls / retina_reg) nor an R-CNN one '
        f'(rpn_head.rpn_cls, roi_head.bbox_head.fc_cls); its parts: {", ".join(parts) or "none"}. '
        'Only MMDetection RetinaNet, Faster R-CNN and Mask R-CNN checkpoints convert; for another detector load its '
        'backbone alone (--backbone-weights FILE; build_detector(..., weights=FILE)).')


def mmdet_categories(state_dict: Mapping[str, torch.Tensor]) -> int:
    """The number of object categories an MMDetection detector state dict classifies (background excluded)."""
    if _kind(state_dict) == 'retinanet':
        return _retina_outputs(state_dict)[1]
    rows = state_dict['roi_head.bbox_head.fc_cls.weight'].shape[0]
    if rows < 2:
        raise MMDetWeightsError(f'roi_head.bbox_head.fc_cls has {rows} output(s): not a classifier of categories and '
                                'background, so not a Shared2FCBBoxHead.')
    return rows - 1


def _retina_outputs(state_dict: Mapping[str, torch.Tensor]) -> Tuple[int, int]:
    """(anchors per location, categories) of the file's RetinaHead outputs."""
    reg, cls = state_dict['bbox_head.retina_reg.weight'], state_dict['bbox_head.retina_cls.weight']
    if not reg.shape[0] or reg.shape[0] % 4 or not cls.shape[0] or cls.shape[0] % (reg.shape[0] // 4):
        raise MMDetWeightsError(f'bbox_head.retina_reg has {reg.shape[0]} and retina_cls {cls.shape[0]} outputs: '
                                'not 4 and C per anchor, so not a RetinaHead.')
    anchors = reg.shape[0] // 4
    return anchors, cls.shape[0] // anchors


def _neck_names(fpn: ExtraLevelFPN) -> Dict[str, str]:
    """MMDetection's neck module names -> ours (``backbone.fpn.*``), for the levels ``fpn`` has.

    EfficientViTFPN's finer levels: ``extra_trans_convs.i`` makes the (i+1)-th finer level from the one before
    (ours: ``up_convs.i``), but ``extra_fpn_convs`` follow its output order, finest first, so the output conv of our
    finer level ``i`` (nearest the backbone first) is its ``extra_fpn_convs.{n-1-i}``. Coarser levels are the
    ``fpn_convs`` after the backbone levels' ones.
    """
    n_in, n_fine, n_coarse = len(fpn.lateral_convs), len(fpn.up_convs), len(fpn.down_convs)
    names = {}
    for i in range(n_in):
        names[f'neck.lateral_convs.{i}.conv'] = f'backbone.fpn.lateral_convs.{i}'
        names[f'neck.fpn_convs.{i}.conv'] = f'backbone.fpn.output_convs.{i}'
    for j in range(n_coarse):
        names[f'neck.fpn_convs.{n_in + j}.conv'] = f'backbone.fpn.down_convs.{j}'
    for i in range(n_fine):
        names[f'neck.extra_trans_convs.{i}.conv'] = f'backbone.fpn.up_convs.{i}'
        names[f'neck.extra_fpn_convs.{n_fine - 1 - i}.conv'] = f'backbone.fpn.up_output_convs.{i}'
    return names


def _retina_names(model: ForegroundRetinaNet) -> Dict[str, str]:
    names = {'bbox_head.retina_cls': 'head.classification_head.cls_logits',
             'bbox_head.retina_reg': 'head.regression_head.bbox_reg'}
    for i in range(len(model.head.classification_head.conv)):
        names[f'bbox_head.cls_convs.{i}.conv'] = f'head.classification_head.conv.{i}.0'
        names[f'bbox_head.reg_convs.{i}.conv'] = f'head.regression_head.conv.{i}.0'
    return names


def _rcnn_names(model: FasterRCNN) -> Dict[str, str]:
    names = {'rpn_head.rpn_conv': 'rpn.head.conv.0.0', 'rpn_head.rpn_cls': 'rpn.head.cls_logits',
             'rpn_head.rpn_reg': 'rpn.head.bbox_pred',
             'roi_head.bbox_head.shared_fcs.0': 'roi_heads.box_head.fc6',
             'roi_head.bbox_head.shared_fcs.1': 'roi_heads.box_head.fc7',
             'roi_head.bbox_head.fc_cls': 'roi_heads.box_predictor.cls_score',
             'roi_head.bbox_head.fc_reg': 'roi_heads.box_predictor.bbox_pred'}
    if isinstance(model, MaskRCNN):
        for i in range(len(model.roi_heads.mask_head)):
            names[f'roi_head.mask_head.convs.{i}.conv'] = f'roi_heads.mask_head.{i}.0'
        names['roi_head.mask_head.upsample'] = 'roi_heads.mask_predictor.conv5_mask'
        names['roi_head.mask_head.conv_logits'] = 'roi_heads.mask_predictor.mask_fcn_logits'
    return names


def _backbone(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    body = {k[len('backbone.'):]: v for k, v in state_dict.items() if k.startswith('backbone.')}
    if any(k.startswith('blocks1.') for k in body):  # the official SHViT layout of the paper's detectors
        from shvit import remap_official_keys  # an optional family: only its files need it
        body = remap_official_keys(body)
    return {'backbone.body.' + k: v for k, v in body.items()}


def _per_anchor_background(anchors: int, categories: int) -> Callable[[torch.Tensor, str], torch.Tensor]:
    """RetinaHead's ``retina_cls`` weight or bias with torchvision's background output (label 0) before each anchor's
    categories: zero weights, bias ``PRIOR_BIAS``."""
    def convert(value: torch.Tensor, leaf: str) -> torch.Tensor:
        per_anchor = value.reshape(anchors, categories, *value.shape[1:])
        background = torch.full_like(per_anchor[:, :1], PRIOR_BIAS if leaf == 'bias' else 0.0)
        return torch.cat([background, per_anchor], 1).reshape(anchors * (categories + 1), *value.shape[1:])
    return convert


def _background_first(value: torch.Tensor, leaf: str) -> torch.Tensor:
    """``fc_cls``: MMDetection's background output is its last, torchvision's its first."""
    return torch.cat([value[-1:], value[:-1]])


def _class_specific(categories: int, width: int) -> Callable[[torch.Tensor, str], torch.Tensor]:
    """``fc_reg`` (width 4) / ``conv_logits`` (width 1): outputs per category, with torchvision's unused background
    outputs first (zeros); a class-agnostic file's one set of outputs is repeated for every category (the same
    predictions)."""
    def convert(value: torch.Tensor, leaf: str) -> torch.Tensor:
        if value.shape[0] == width:
            value = value.repeat(categories, *([1] * (value.dim() - 1)))
        elif value.shape[0] != width * categories:
            raise MMDetWeightsError(f'an R-CNN output of {value.shape[0]} rows: neither {width} (class-agnostic) nor '
                                    f'{width} per category ({width * categories}).')
        return torch.cat([torch.zeros_like(value[:width]), value])
    return convert


def convert_mmdet_detector(state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                           classifier: bool = True) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """An MMDetection RetinaNet / Faster R-CNN / Mask R-CNN state dict in ``model``'s layout.

    Args:
        state_dict: MMDetection's tensors (``backbone.*``, ``neck.*`` and the heads): its ``state_dict``.
        model: The detector of :func:`~vitzoo.detection.build_detector` that will load them, of the file's kind.
        classifier: Convert the category-specific output layers (RetinaNet: ``retina_cls``; R-CNN: ``fc_cls``,
            ``fc_reg``, ``conv_logits``); False leaves them out (the model keeps its own, for other categories than
            the file's).

    Returns:
        (converted state dict, the model's keys it leaves out: the category-specific ones with ``classifier=False``).

    Raises:
        MMDetWeightsError: the file is another kind of detector than the model, its categories or anchors differ from
            the model's (categories with ``classifier=True``), or tensors of either side find no place (named).
    """
    kind = _kind(state_dict)
    if kind == 'retinanet' and not isinstance(model, ForegroundRetinaNet) \
            or kind == 'rcnn' and not isinstance(model, FasterRCNN):
        build = 'build_detector("retinanet", ...)' if kind == 'retinanet' else \
            'build_detector("fasterrcnn" / "maskrcnn", ...)'
        raise MMDetWeightsError(f'the checkpoint is an MMDetection {"RetinaNet" if kind == "retinanet" else "R-CNN"}: '
                                f'it loads into {build}, not into a {type(model).__name__}.')
    if not isinstance(getattr(model.backbone, 'fpn', None), ExtraLevelFPN):
        raise MMDetWeightsError('the model\'s backbone has no FPN neck (a token model\'s simple pyramid): '
                                'MMDetection weights need one; build the detector on a CNN or SHViT.')
    categories = mmdet_categories(state_dict)
    if kind == 'retinanet':
        anchors = _retina_outputs(state_dict)[0]
        own_anchors = model.anchor_generator.num_anchors_per_location()[0]
        own_categories = model.head.classification_head.num_classes - 1
        names = _retina_names(model)
        special = {'bbox_head.retina_cls': _per_anchor_background(anchors, categories)}
    else:
        anchors = state_dict['rpn_head.rpn_reg.weight'].shape[0] // 4
        own_anchors = model.rpn.anchor_generator.num_anchors_per_location()[0]
        own_categories = model.roi_heads.box_predictor.cls_score.out_features - 1
        names = _rcnn_names(model)
        special = {'roi_head.bbox_head.fc_cls': _background_first,
                   'roi_head.bbox_head.fc_reg': _class_specific(categories, 4),
                   'roi_head.mask_head.conv_logits': _class_specific(categories, 1)}
    if anchors != own_anchors:
        raise MMDetWeightsError(f'the checkpoint has {anchors} anchors per location, the model {own_anchors}; '
                                'build the model with its default anchor generator.')
    if classifier and categories != own_categories:
        raise MMDetWeightsError(
            f'the checkpoint classifies {categories} categories, the model {own_categories}: build it with '
            f'num_classes={categories} to load the whole detector, or pass classifier=False (--detector-weights '
            'with a dataset of other categories does) to load everything but the category-specific output layers.')
    for module in special:
        weight, bias = state_dict.get(f'{module}.weight'), state_dict.get(f'{module}.bias')
        if weight is not None and bias is not None and weight.shape[0] != bias.shape[0]:
            raise MMDetWeightsError(f'{module} has a weight of {weight.shape[0]} outputs and a bias of '
                                    f'{bias.shape[0]}: a damaged or edited file.')
    names.update(_neck_names(model.backbone.fpn))
    out = _backbone(state_dict)
    unknown, left_out = [], []
    for key, value in state_dict.items():
        if key.startswith('backbone.'):
            continue
        module, _, leaf = key.rpartition('.')
        if module not in names:
            unknown.append(key)
            continue
        if module in special:
            if not classifier:
                left_out.append(f'{names[module]}.{leaf}')
                continue
            value = special[module](value, leaf)
        out[f'{names[module]}.{leaf}'] = value
    own = model.state_dict()
    missing = sorted(set(own) - set(out) - set(left_out))
    unexpected = sorted(set(out) - set(own)) + sorted(unknown)
    reshaped = sorted(k for k in set(out) & set(own) if out[k].shape != own[k].shape)
    if missing or unexpected or reshaped:
        kinds = (('tensors of the model not in the checkpoint', missing),
                 ('tensors of the checkpoint without a place in the model', unexpected),
                 ('tensors of other shapes', reshaped))
        parts = [f'{len(v)} {what} (e.g. {v[:3]})' for what, v in kinds if v]
        shape = ''
        if reshaped:
            k = reshaped[0]
            shape = f' ({k}: {list(out[k].shape)} in the checkpoint, {list(own[k].shape)} in the model)'
        raise MMDetWeightsError(
            f'the checkpoint does not fit the model: {"; ".join(parts)}{shape}. Build the detector as the '
            'checkpoint was trained: its detector, backbone and FPN channels (--detector / --backbone / '
            '--out-channels; 256 for the paper\'s).')
    return out, sorted(left_out)


def load_mmdet_detector(model: nn.Module, checkpoint: Union[str, Path, Mapping[str, torch.Tensor]],
                        classifier: bool = True) -> List[str]:
    """Load an MMDetection RetinaNet / Faster R-CNN / Mask R-CNN checkpoint (a file, what ``torch.load`` returns
    for it, or its ``state_dict``) into ``model`` (:func:`~vitzoo.detection.build_detector`'s detector of the same
    kind), in place.

    The load is strict (see :func:`convert_mmdet_detector`); tensors keep ``model``'s device and dtype.

    Returns:
        The model's keys left at their initialisation (empty, or the category-specific ones with
        ``classifier=False``).
    """
    state_dict = read_mmdet_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else \
        _state_dict_of(checkpoint, 'the checkpoint')
    converted, left_out = convert_mmdet_detector(state_dict, model, classifier=classifier)
    model.load_state_dict(converted, strict=not left_out)
    return left_out
