"""MMDetection RetinaNet checkpoints (the SHViT paper's ``retinanet_shvit_s4_1x_coco.pth``) in our RetinaNet.

An MMDetection RetinaNet holds three parts, each mapped onto :func:`~vitzoo.detection.build_detector`'s
``'retinanet'``:

* ``backbone.*``: the classification model without its head, in its own layout (for SHViT the official
  ``blocks1/2/3`` one, renamed as :func:`shvit.remap_official_keys` does) -> ``backbone.body.*``;
* ``neck.*``: the SHViT paper's FPN (EfficientViT's ``EfficientViTFPN``, or MMDetection's ``FPN`` without finer
  levels), each conv a ``ConvModule`` whose ``.conv`` holds the tensors -> ``backbone.fpn.*`` of
  :class:`~vitzoo.detection.ExtraLevelFPN`;
* ``bbox_head.*``: ``RetinaHead``'s two towers of 3x3 convs and its ``retina_cls`` / ``retina_reg`` outputs ->
  torchvision's ``RetinaNetHead``. MMDetection's classifier has one sigmoid output per category and anchor;
  torchvision's has one more, label 0 (background), which :class:`~vitzoo.detection.ForegroundRetinaNet` never turns
  into detections: it is added with zero weights and the focal-loss prior bias. Category ``c`` of the file (0-based,
  in the order of its ``CLASSES``, for COCO the category ids' order) becomes label ``c + 1``, as
  :class:`~vitzoo.detection.data.CocoDetectionFolder` numbers categories.

Nothing is loaded partially without being asked: every tensor of the model must come from the file and every tensor
of the file must find a place, or the load is an error naming them; only ``classifier=False`` leaves the
classification output layer at its initialisation (another set of categories), and says so in its return value.
"""
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple, Union

import torch
import torch.nn as nn

from vitzoo.hub import WeightsError, validate_weights_file

from .detectors import ForegroundRetinaNet
from .fpn import ExtraLevelFPN

__all__ = ['MMDetWeightsError', 'convert_mmdet_retinanet', 'is_mmdet_detector', 'load_mmdet_retinanet',
           'read_mmdet_checkpoint', 'retinanet_categories']

#: torchvision's (and MMDetection's) initial bias of a focal-loss classifier: sigmoid(bias) = 0.01
PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)
_PARTS = ('backbone.', 'neck.', 'bbox_head.')
_CLASSIFIER = ('head.classification_head.cls_logits.weight', 'head.classification_head.cls_logits.bias')


class MMDetWeightsError(ValueError):
    """The file is not an MMDetection RetinaNet that fits the model; the message says what differs and what to do."""


def is_mmdet_detector(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` has MMDetection's detector layout (a ``neck.`` or a head beside ``backbone.``)."""
    return any(k.startswith(('neck.', 'bbox_head.', 'rpn_head.', 'roi_head.')) for k in state_dict)


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
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except (WeightsError, RuntimeError, ValueError, OSError, EOFError) as e:
        unsafe = re.search(r'GLOBAL ([\w.]+)', str(e))
        why = (f'it holds Python objects other than tensors and numbers ({unsafe.group(1)}); save its '
               "'state_dict' alone with torch.save and give that file") if unsafe else f'{e}'.split('\n')[0]
        raise MMDetWeightsError(f'{path} is not a readable checkpoint: {why}') from e
    state_dict = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state_dict, dict) or not state_dict \
            or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise MMDetWeightsError(f'{path} holds no state dict of tensors (an MMDetection checkpoint keeps one under '
                                "'state_dict').")
    if not is_mmdet_detector(state_dict):
        raise MMDetWeightsError(
            f'{path} is not an MMDetection detector checkpoint (no neck.* / bbox_head.* tensors; keys such as '
            f'{sorted(state_dict)[:3]}). For a classification checkpoint of the backbone use --backbone-weights '
            '(build_detector(..., weights=FILE)).')
    return state_dict


def _neck_names(fpn: nn.Module) -> Dict[str, str]:
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


def _head_names(stacked: int) -> Dict[str, str]:
    names = {'bbox_head.retina_cls': 'head.classification_head.cls_logits',
             'bbox_head.retina_reg': 'head.regression_head.bbox_reg'}
    for i in range(stacked):
        names[f'bbox_head.cls_convs.{i}.conv'] = f'head.classification_head.conv.{i}.0'
        names[f'bbox_head.reg_convs.{i}.conv'] = f'head.regression_head.conv.{i}.0'
    return names


def _backbone(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    body = {k[len('backbone.'):]: v for k, v in state_dict.items() if k.startswith('backbone.')}
    if any(k.startswith('blocks1.') for k in body):  # the official SHViT layout of the paper's detectors
        from shvit import remap_official_keys  # an optional family: only its files need it
        body = remap_official_keys(body)
    return {'backbone.body.' + k: v for k, v in body.items()}


def retinanet_categories(state_dict: Mapping[str, torch.Tensor]) -> int:
    """The number of categories an MMDetection RetinaNet state dict classifies."""
    return _file_outputs(state_dict)[1]


def _file_outputs(state_dict: Mapping[str, torch.Tensor]) -> Tuple[int, int]:
    """(anchors per location, categories) of the file's RetinaHead outputs."""
    reg, cls = state_dict.get('bbox_head.retina_reg.weight'), state_dict.get('bbox_head.retina_cls.weight')
    if reg is None or cls is None:
        heads = sorted({k.split('.')[0] for k in state_dict if not k.startswith(('backbone.', 'neck.'))})
        raise MMDetWeightsError(
            f'the checkpoint has no RetinaNet head (bbox_head.retina_cls / retina_reg; its parts: backbone, neck, '
            f'{", ".join(heads)}): only MMDetection RetinaNet checkpoints convert; for another detector load its '
            'backbone alone (--backbone-weights FILE; build_detector(..., weights=FILE)).')
    if reg.shape[0] % 4 or cls.shape[0] % (reg.shape[0] // 4):
        raise MMDetWeightsError(f'bbox_head.retina_reg has {reg.shape[0]} and retina_cls {cls.shape[0]} outputs: '
                                'not 4 and C per anchor, so not a RetinaHead.')
    anchors = reg.shape[0] // 4
    return anchors, cls.shape[0] // anchors


def convert_mmdet_retinanet(state_dict: Mapping[str, torch.Tensor], model: ForegroundRetinaNet,
                            classifier: bool = True) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """An MMDetection RetinaNet state dict in ``model``'s layout.

    Args:
        state_dict: MMDetection's tensors (``backbone.*``, ``neck.*``, ``bbox_head.*``).
        model: The RetinaNet of :func:`~vitzoo.detection.build_detector` that will load them.
        classifier: Convert the classification output layer (``retina_cls``); False leaves it out (the model keeps
            its own, for other categories than the file's).

    Returns:
        (converted state dict, the model's keys it leaves out: the classifier's with ``classifier=False``).

    Raises:
        MMDetWeightsError: the file is not a RetinaNet, its categories or anchors differ from the model's (with
            ``classifier=True``), or tensors of either side find no place (named).
    """
    if not isinstance(model, ForegroundRetinaNet):
        raise MMDetWeightsError(f'MMDetection RetinaNet weights load into build_detector("retinanet", ...), not into '
                                f'a {type(model).__name__}.')
    if not isinstance(getattr(model.backbone, 'fpn', None), ExtraLevelFPN):
        raise MMDetWeightsError('the model\'s backbone has no FPN neck (a token model\'s simple pyramid): '
                                'MMDetection RetinaNet weights need one; build the detector on a CNN or SHViT.')
    anchors, categories = _file_outputs(state_dict)
    own_anchors = model.anchor_generator.num_anchors_per_location()[0]
    if anchors != own_anchors:
        raise MMDetWeightsError(f'the checkpoint has {anchors} anchors per location, the model {own_anchors}; '
                                'build the model with its default anchor generator (3 scales x 3 ratios).')
    own_categories = model.head.classification_head.num_classes - 1
    if classifier and categories != own_categories:
        raise MMDetWeightsError(
            f'the checkpoint classifies {categories} categories, the model {own_categories}: build it with '
            f'num_classes={categories} to load the whole detector, or pass classifier=False (--detector-weights '
            'with a dataset of other categories does) to load everything but the classification output layer.')
    unknown = sorted(k for k in state_dict if not k.startswith(_PARTS))
    names = {**_neck_names(model.backbone.fpn), **_head_names(len(model.head.classification_head.conv))}
    out = _backbone(state_dict)
    for key, value in state_dict.items():
        if key.startswith('backbone.'):
            continue
        module, _, leaf = key.rpartition('.')
        if module not in names:
            if key.startswith(('neck.', 'bbox_head.')):
                unknown.append(key)
            continue
        if module == 'bbox_head.retina_cls':
            if not classifier:
                continue
            value = _with_background(value, anchors, categories, leaf)
        out[f'{names[module]}.{leaf}'] = value
    own = model.state_dict()
    left_out = [] if classifier else list(_CLASSIFIER)
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
            'checkpoint was trained: its backbone and FPN channels (--backbone / --out-channels; 256 for the '
            'paper\'s).')
    return out, left_out


def _with_background(value: torch.Tensor, anchors: int, categories: int, leaf: str) -> torch.Tensor:
    """``retina_cls``'s weight or bias with torchvision's background output (label 0) before each anchor's
    categories: zero weights, bias ``PRIOR_BIAS``."""
    per_anchor = value.reshape(anchors, categories, *value.shape[1:])
    fill = PRIOR_BIAS if leaf == 'bias' else 0.0
    background = torch.full_like(per_anchor[:, :1], fill)
    return torch.cat([background, per_anchor], 1).reshape(anchors * (categories + 1), *value.shape[1:])


def load_mmdet_retinanet(model: ForegroundRetinaNet, checkpoint: Union[str, Path, Mapping[str, torch.Tensor]],
                         classifier: bool = True) -> List[str]:
    """Load an MMDetection RetinaNet checkpoint (a file or its state dict) into ``model``, in place.

    The load is strict (see :func:`convert_mmdet_retinanet`); tensors keep ``model``'s device and dtype.

    Returns:
        The model's keys left at their initialisation (empty, or the classifier's with ``classifier=False``).
    """
    state_dict = read_mmdet_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    converted, left_out = convert_mmdet_retinanet(state_dict, model, classifier=classifier)
    model.load_state_dict(converted, strict=not left_out)
    return left_out
