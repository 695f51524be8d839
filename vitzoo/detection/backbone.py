"""Turn a timm model of the zoo into a torchvision detection backbone (backbone + FPN).

Three kinds of feature producers are accepted:

* hierarchical models with ``forward_intermediates`` (``shvit_*``: strides 16/32/64; timm CNNs: 4..32). The maps of
  the stages whose stride lies in the detector's stride range are fed, unchanged, to the FPN;
* token models with ``forward_intermediates`` (``nvit_*``, ``revit_*``, DeiT/ViT: every block at stride 16). The
  last block's map goes through a ViTDet-style :class:`SimpleFeaturePyramid` first;
* timm ``features_only`` wrappers (``FeatureListNet`` and friends), used as they are.

The result, :class:`DetectionBackbone`, has ``out_channels`` and returns an ordered dict of maps named after their
stride (``p2`` = 4 ... ``p7`` = 128), which is what torchvision's detectors expect.
"""
import logging
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
from timm.models._features import FeatureInfo

from vitzoo.hub import WeightsError, non_finite_text, non_finite_weights, validate_weights_file
from vitzoo.models import resolve_name

from .checkpoint import load_checkpoint
from .fpn import ExtraLevelFPN
from .simple_pyramid import SimpleFeaturePyramid

__all__ = ['BackboneError', 'DetectionBackbone', 'create_body']


class BackboneError(RuntimeError):
    """The backbone's model cannot be built (e.g. ``nvit_b`` without its dims record) or its weights do not load."""


_logger = logging.getLogger(__name__)


def create_body(
        name: str,
        pretrained: bool = False,
        weights: Optional[Union[str, Path]] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
) -> nn.Module:
    """Create the classification model that a detection backbone is cut from.

    Args:
        name: timm model name (``shvit_s4``, ``revit_t``, ``resnet18``, ...).
        pretrained: Load the model's default pretrained classification weights (timm / Hugging Face Hub).
        weights: Local classification checkpoint (``.safetensors`` / ``.pth``) to load instead; implies pretrained.
            The load is strict, so keys that do not fit are an error, never a silent partial load.
        model_kwargs: Extra ``timm.create_model`` arguments.

    Returns:
        The full model (with its head, sized like the checkpoint's classifier when ``weights`` has another class
        count than the pretrained cfg, or, with ``weights``, a ``num_classes`` in ``model_kwargs``: that head is
        reset after the strict load; :class:`DetectionBackbone` removes and reports the head keys).

    Raises:
        UnknownModelError: ``name`` is not a timm model (the message lists the closest ones).
        FileNotFoundError: ``weights`` does not exist.
        BackboneError: The model cannot be built as asked, or the weights do not load into it (the message says
            why and what to do).
    """
    resolve_name(name)
    kwargs = dict(model_kwargs or {})
    wanted_classes = None
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            what = 'is a folder, not a file' if weights.is_dir() else 'does not exist'  # found by an audit
            raise FileNotFoundError(f'backbone weights file {weights} {what}; give a .safetensors or .pth file.')
        try:  # a file that is no checkpoint at all is named as such, before timm's loader words it its own way
            validate_weights_file(weights)
        except WeightsError as e:
            raise BackboneError(f'could not load {weights} into backbone {name!r}: '
                                f'{summarize_load_error(e, weights)}.') from e
        kwargs['pretrained_cfg_overlay'] = dict(file=str(weights))
        # a num_classes of the caller's sizes the head after the load: given to timm, a count other than the cfg's
        # made its load non-strict, so a partial or another model's file loaded without an error (found by an audit)
        wanted_classes = kwargs.pop('num_classes', None)
        try:
            classes = _checkpoint_classes(name, weights)
        except Exception as e:  # noqa: BLE001  timm's reader raises anything on a file it cannot take
            _refuse_training_checkpoint(name, weights, e)
            raise BackboneError(f'could not load {weights} into backbone {name!r}: '
                                f'{summarize_load_error(e, weights)}.') from e
        if classes:
            # a classifier fine-tuned on other classes: build the model with that head, so that timm's load stays
            # strict (it loads non-strictly when the class counts differ). The detector drops the head anyway
            kwargs['num_classes'] = classes
            kwargs['pretrained_cfg_overlay']['num_classes'] = classes
        pretrained = True
    try:
        try:
            model = _create(name, pretrained, kwargs)
        except (RuntimeError, ValueError):
            if weights is None or classes != 0:
                raise
            # no classifier under the cfg's name: either a checkpoint saved without one (build the model without
            # it; strict as well), or one whose classifier timm's filter renames (an official ConvNeXt's 'head.*'
            # is timm's 'head.fc.*'), which the first, ordinary load above handles
            headless = dict(kwargs, num_classes=0)
            headless['pretrained_cfg_overlay'] = dict(kwargs['pretrained_cfg_overlay'], num_classes=0)
            model = _create(name, pretrained, headless)  # failing too, its error names the body's problem
    except (RuntimeError, ValueError, TypeError, OSError, AttributeError) as e:  # OSError: a failed download
        if isinstance(e, OSError) and not pretrained or isinstance(e, AttributeError) and weights is None:
            raise
        if weights is not None:
            _refuse_training_checkpoint(name, weights, e)
            try:  # a file holding no state dict (timm's loader stops at an AttributeError) is named as such
                _read_state_dict(weights)
            except ValueError as held:
                raise BackboneError(f'could not load {weights} into backbone {name!r}: {held}.') from e
            raise BackboneError(
                f'could not load {weights} into backbone {name!r}: {summarize_load_error(e, weights)}; the file '
                f'must hold {name} weights (with or without its classifier), or choose the backbone it was saved '
                'from.') from e
        if pretrained:
            raise BackboneError(f'could not load the default pretrained weights into backbone {name!r}: '
                                f'{summarize_load_error(e)}') from e
        raise BackboneError(f'cannot build backbone {name!r}: {summarize_load_error(e)}') from e
    # a features_only wrapper has no classifier to size (timm ignores num_classes there too; found by a review)
    if wanted_classes is not None and hasattr(model, 'reset_classifier') \
            and getattr(model, 'num_classes', None) != wanted_classes:
        model.reset_classifier(wanted_classes)
    bad = non_finite_weights(model) if pretrained else []
    if bad:  # else the first loss is NaN, and the advice for a diverging run (lower --lr) misleads
        source = weights if weights is not None else 'the default pretrained weights'
        raise BackboneError(f'could not load {source} into backbone {name!r}: {non_finite_text(bad)}')
    return model


def _refuse_training_checkpoint(name: str, weights: Path, error: BaseException) -> None:
    """Raise a :class:`BackboneError` saying what to do where ``weights`` that failed to load is a ``finetune-det``
    training checkpoint (numpy's RNG state in it reads as an untrusted pickle to timm's loader)."""
    try:
        load_checkpoint(weights)
    except Exception:  # noqa: BLE001  not one: the caller reports ``error``
        return
    raise BackboneError(
        f'could not load {weights} into backbone {name!r}: it is a finetune-det training checkpoint (a whole '
        'detector with its optimizer state), not classification weights; to continue its run pass --resume '
        f'{weights}, and for the trained detector use model_final.pth of that run.') from error


_PICKLED = re.compile(r'(?:Unsupported globals?:|GLOBAL|it pickles) ([\w.]+)')
# the model packages' advice for another model's checkpoint; create_body's own says which backbone to choose
_ENTRYPOINT_ADVICE = re.compile(r"\s*Use the entrypoint of the checkpoint's variant\.?")
_KEY_LIST = re.compile(r'(Missing|Unexpected) key\(s\) in state_dict: (.*)')


def summarize_load_error(error: BaseException, weights: Optional[Path] = None) -> str:
    """The reason of a build / load error in one line: torch's key lists summarised (counts and a few names), the
    first line of other messages (later lines hold advice for Python callers), a repeated mention of ``weights``
    dropped."""
    text = str(error).strip()
    pickled = _PICKLED.search(text)
    if pickled and 'weights_only' in text:  # torch's / timm's / NViT's advice is about Python calls
        return (f'the file pickles Python objects other than tensors ({pickled.group(1).rstrip(".")}), which are not '
                'loaded because unpickling them can run code; if you trust it, save its state dict (tensors only) '
                'to a new file and give that')
    if 'Error(s) in loading state_dict' in text:
        parts = []
        for kind, keys in _KEY_LIST.findall(text):
            names = re.findall(r'"([^"]+)"', keys)
            parts.append(f'{len(names)} {kind.lower()} keys (e.g. {", ".join(names[:3])})')
        reshaped = re.findall(r'size mismatch for ([^:\s]+):', text)
        if reshaped:
            parts.append(f'{len(reshaped)} keys of another shape (e.g. {", ".join(reshaped[:3])})')
        if parts:
            return '; '.join(parts)
    line = text.splitlines()[0].strip() if text else type(error).__name__
    if weights is not None and f'{weights}: ' in line:  # "Could not load ... from file FILE: reason"
        line = line.split(f'{weights}: ', 1)[1]
    return _ENTRYPOINT_ADVICE.sub('', line).rstrip('.')


def _create(name: str, pretrained: bool, kwargs: Dict[str, Any]) -> nn.Module:
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if getattr(model, 'dynamic_img_size', None) is False and 'dynamic_img_size' not in kwargs:
        # token models must accept any detection input size
        model = timm.create_model(name, pretrained=pretrained, dynamic_img_size=True, **kwargs)
    return model


def _read_state_dict(weights: Path) -> Dict[str, Any]:
    """The state dict in ``weights`` as timm's loader reads it; a file holding something else (a list, a tensor)
    is named as such, where timm's loader stops at an AttributeError."""
    try:
        return timm.models.load_state_dict(str(weights))
    except (AttributeError, TypeError) as e:  # timm takes what the file holds for a dict
        raise ValueError(f"the file holds no state dict ({e}); give a state dict of tensors, or a training "
                         "checkpoint holding one under 'model' or 'state_dict'") from e


def _checkpoint_classes(name: str, weights: Path) -> Optional[int]:
    """The class count of ``weights``' classifier when it differs from the model's pretrained cfg, 0 when the
    checkpoint holds no classifier (saved with ``num_classes=0`` or with its head removed), else None."""
    arch, tag = resolve_name(name)
    cfg = timm.models.get_pretrained_cfg(f'{arch}.{tag}' if tag else arch)
    if cfg is None or not cfg.classifier:
        return None
    state_dict = _read_state_dict(weights)
    names = (cfg.classifier,) if isinstance(cfg.classifier, str) else tuple(cfg.classifier)
    found = False
    for classifier in names:
        weight = state_dict.get(classifier + '.weight')
        if isinstance(weight, torch.Tensor) and weight.dim() >= 1:
            found = True
            if weight.shape[0] != cfg.num_classes:
                return int(weight.shape[0])
    return None if found else 0


def _feature_levels(model: nn.Module) -> tuple:
    info = model.feature_info
    if isinstance(info, FeatureInfo):  # features_only wrapper
        return 'features_only', info.channels(), info.reduction()
    if not hasattr(model, 'forward_intermediates'):
        raise TypeError(
            f'{type(model).__name__} has neither forward_intermediates nor a features_only feature_info; '
            'pass a timm model or timm.create_model(..., features_only=True).')
    return 'intermediates', [f['num_chs'] for f in info], [f['reduction'] for f in info]


def _is_token_model(model: nn.Module) -> bool:
    """Whether every feature point of the model (each block of a ViT-like ``nvit_*`` / ``revit_*`` / DeiT) lies at
    one stride. A ``features_only`` wrapper is judged by all of its model's feature points (``FeatureInfo.info``),
    not by the maps it returns, which may be a single block's (``out_indices=(11,)``)."""
    info = model.feature_info
    points = info.info if isinstance(info, FeatureInfo) else info
    strides = [f['reduction'] for f in points]
    return len(set(strides)) == 1 and len(strides) > 1


class DetectionBackbone(nn.Module):
    """Feature-producing timm model + (simple pyramid) + :class:`ExtraLevelFPN`, as a torchvision backbone.

    Args:
        model: A timm model with ``forward_intermediates`` (its head and unused layers are pruned in place) or a timm
            ``features_only`` model.
        out_strides: Strides of the pyramid levels the detector needs, e.g. ``(8, 16, 32, 64, 128)``.
        out_channels: Channels of every pyramid level.
        frozen_stages: ``-1`` freezes nothing, ``0`` the stem (everything before the first feature stage),
            ``N`` the stem and feature stages ``0 .. N-1`` (stage i = ``feature_info[i]`` of the timm model; when
            ``feature_info[0]`` is the stem's own output, a single layer such as a ResNet's ``act1`` or a
            MobileNetV3's ``bn1``, stage 0 is the stem, so ``0`` and ``1`` both freeze the stem with that layer).
            Frozen parameters get ``requires_grad=False`` and their modules stay in eval mode (BatchNorm
            statistics, dropout and drop-path as in evaluation).
        norm_eval: Keep every BatchNorm of the backbone in eval mode during training (as the SHViT paper does).
        device: Device of the new (neck) parameters.
        dtype: Dtype of the new (neck) parameters.
    """

    def __init__(
            self,
            model: nn.Module,
            out_strides: Sequence[int] = (8, 16, 32, 64, 128),
            out_channels: int = 256,
            frozen_stages: int = -1,
            norm_eval: bool = True,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f'out_channels must be an int >= 1 (the channels of every pyramid level), got '
                             f'{out_channels!r}.')
        dd = dict(device=device, dtype=dtype)
        self.out_strides = [int(s) for s in out_strides]
        self.out_channels = out_channels
        self.norm_eval = norm_eval
        self.mode, channels, reductions = _feature_levels(model)
        self.is_token_model = _is_token_model(model)
        lo, hi = self.out_strides[0], self.out_strides[-1]
        if self.is_token_model:
            self.indices = [len(reductions) - 1]
        else:
            by_stride = {r: i for i, r in enumerate(reductions) if lo <= r <= hi}  # last stage of each stride
            self.indices = [by_stride[r] for r in sorted(by_stride)]
            if not self.indices:
                raise ValueError(
                    f'no feature stage of the backbone (strides {reductions}) lies in the detector\'s stride range '
                    f'{lo}..{hi}.')
        self.stage_modules = [] if self.mode == 'features_only' else [f['module'] for f in model.feature_info]
        self.dropped_keys: List[str] = []
        if self.mode == 'intermediates' and hasattr(model, 'prune_intermediate_layers'):
            before = set(model.state_dict())
            # token models: the final norm is unused too (forward_intermediates is called with norm=False)
            model.prune_intermediate_layers(self.indices, prune_norm=self.is_token_model, prune_head=True)
            self.dropped_keys = sorted(before - set(model.state_dict()))
            if self.dropped_keys:
                _logger.info('backbone: dropped %d classification-only keys: %s',
                             len(self.dropped_keys), ', '.join(self.dropped_keys))
        self.body = model
        in_channels = [channels[i] for i in self.indices]
        in_strides = [reductions[i] for i in self.indices]
        self.in_strides = list(in_strides)  # of the body's maps
        if self.is_token_model:
            pyramid_strides = [s for s in self.out_strides if s <= 4 * in_strides[0]]
            self.pyramid = SimpleFeaturePyramid(in_channels[0], in_strides[0], pyramid_strides, **dd)
            in_channels, in_strides = self.pyramid.out_channels, pyramid_strides
        else:
            self.pyramid = None
        self.fpn = ExtraLevelFPN(in_channels, in_strides, self.out_strides, out_channels, **dd)
        self.frozen_stages = frozen_stages
        self._freeze(frozen_stages)
        # a new module is in training mode: its frozen (or, with norm_eval, all) BatchNorms go to eval mode now, not
        # at the first train() (found by an audit: a training step right after building moved their statistics)
        self.train(self.training)

    def _freeze(self, frozen_stages: int) -> None:
        if isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int) or frozen_stages < -1:
            raise ValueError(f'frozen_stages must be -1 (nothing frozen), 0 (the stem) or a number of stages, got '
                             f'{frozen_stages!r}.')
        if frozen_stages < 0:
            return
        if self.mode == 'features_only':
            raise ValueError('frozen_stages needs a timm model with feature_info module names, not a features_only '
                             'wrapper; freeze its parameters yourself or pass the full timm model.')
        if frozen_stages > len(self.stage_modules):
            count = len(self.stage_modules)
            raise ValueError(f'frozen_stages={frozen_stages} but the backbone has {count} stages: use -1 (nothing '
                             f'frozen), 0 (the stem) or 1..{count} (vitzoo finetune-det: --frozen-stages).')
        names = [n for n, _ in self.body.named_parameters()]
        # stage i ends at the last parameter of feature_info[i]'s module, or, for a module without parameters (a
        # ResNet's first feature point is its stem activation `act1`), at the last parameter registered before it
        ends = [_end_of_module(names, self.body, m) for m in self.stage_modules]
        # token models: every feature point is a block (blocks.0, ...), never a stem layer, even when the block holds
        # no Sequential / ModuleList (a ViT block does not)
        first_is_stage = self.is_token_model or not _is_stem_layer(self.body.get_submodule(self.stage_modules[0]))
        if frozen_stages == 0 and first_is_stage:
            first = self.stage_modules[0] + '.'  # stem: everything before the first stage's own parameters
            end = next((i for i, n in enumerate(names) if n.startswith(first)), ends[0])
        elif frozen_stages == 0:  # the first feature point is the stem's own output (ResNet act1, MobileNetV3 bn1)
            end = ends[0]
        else:
            end = max(ends[:frozen_stages])
        frozen = set(names[:end])
        for n, p in self.body.named_parameters():
            if n in frozen:
                p.requires_grad_(False)

    @property
    def size_multiple(self) -> int:
        """What an input's height and width must be multiples of: the largest stride of the body's maps used."""
        return max(self.in_strides)

    def train(self, mode: bool = True) -> 'DetectionBackbone':
        """Set train mode, then put the backbone's frozen modules (those whose parameters all have
        ``requires_grad=False``, with everything inside them: BatchNorms, dropout, drop-path) in eval mode, and
        with ``norm_eval`` every BatchNorm of the backbone."""
        super().train(mode)
        if mode:
            _eval_frozen(self.body)
            if self.norm_eval:
                for m in self.body.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def forward_backbone(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The backbone maps that the (simple pyramid and) FPN consume, finest first."""
        if self.mode == 'features_only':
            feats = self.body(x)
            feats = list(feats.values()) if isinstance(feats, dict) else list(feats)
            return [feats[i] for i in self.indices]
        return list(self.body.forward_intermediates(
            x, indices=self.indices, output_fmt='NCHW', intermediates_only=True))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Pyramid maps ``{'p3': ..., 'p7': ...}`` (names = ``p`` + log2(stride)) for a padded image batch: height and
        width multiples of the body's coarsest stride (:attr:`size_multiple`), as torchvision's detectors pad them
        (``size_divisible``)."""
        multiple = self.size_multiple
        if x.dim() == 4 and (x.shape[-2] % multiple or x.shape[-1] % multiple):
            # models round a size that is not a multiple differently (SHViT up, ResNet down, ConvNeXt down twice),
            # so the levels would not be size / stride, and differ by model (found by an audit)
            raise ValueError(f'the backbone takes images whose height and width are multiples of {multiple} (its '
                             f'coarsest stride), got {x.shape[-2]}x{x.shape[-1]}; pad them (with zeros at the bottom '
                             f'and right, as torchvision\'s detectors do with size_divisible).')
        feats = self.forward_backbone(x)
        if self.pyramid is not None:
            feats = self.pyramid(feats[-1])
        return OrderedDict(self.fpn(feats))


def _eval_frozen(module: nn.Module) -> None:
    """Put every module whose parameters are all frozen (it has some) in eval mode, submodules included: a frozen
    stage is a fixed feature extractor, so its dropout / drop-path is off too, not only its BatchNorms (found by an
    audit: with ``drop_path_rate`` the frozen blocks dropped paths in training; and a BatchNorm without parameters,
    ``affine=False``, was taken for a frozen one in a trained stage, its statistics never updated)."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        module.eval()
        return
    for child in module.children():
        _eval_frozen(child)


def _is_stem_layer(module: nn.Module) -> bool:
    """A single layer (norm, activation) rather than a stage of blocks: it holds no Sequential / ModuleList."""
    return not any(isinstance(m, (nn.Sequential, nn.ModuleList)) for m in module.modules())


def _end_of_module(names: List[str], root: nn.Module, module_name: str) -> int:
    """Index just past the last parameter of ``module_name`` in ``names`` (registration order); for a module without
    parameters, just past the last parameter of the modules registered before it."""
    prefix = module_name + '.'
    own = [i for i, n in enumerate(names) if n.startswith(prefix)]
    if own:
        return own[-1] + 1
    order = [n for n, _ in root.named_modules()]
    before = order[:order.index(module_name)] if module_name in order else []
    owners = {n + '.' for n in before if n}
    return max((i + 1 for i, n in enumerate(names) if any(n.startswith(o) for o in owners)), default=0)
