"""Pretrained-weight filter: accepts timm's layout and the official repository's, and refuses other variants."""
import logging
import re
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .variants import variant_name

__all__ = ['checkpoint_filter_fn', 'remap_official_keys', 'describe_state_dict', 'CheckpointMismatchError',
           'ClassifierSizeError', 'IncompleteCheckpointError', 'WeightFileNotFoundError', 'CorruptCheckpointError',
           'InputChannelsError', 'PickleProtocolError', 'CheckpointLayoutError', 'FusionMismatchError']

_logger = logging.getLogger(__name__)

_HEAD_PREFIXES = ('head.', 'head_dist.')
_CLASSIFIERS = ('head.l.', 'head_dist.l.')  # dropped by timm / _fit_distill_head when num_classes differs
_FIRST_CONV = 'patch_embed.0.c.weight'  # in_chans adaptation happens after the filter, so its shape may differ
_OFFICIAL_BLOCK = re.compile(r'^blocks([123])\.(\d+)\.(.*)$')


class CheckpointMismatchError(RuntimeError):
    """The checkpoint holds another variant or another model."""


class ClassifierSizeError(CheckpointMismatchError):
    """The checkpoint's classifier has another number of classes than the model that is to load it."""


class InputChannelsError(CheckpointMismatchError):
    """The checkpoint's first conv takes another number of input channels than the model, and timm cannot adapt it."""


class CheckpointLayoutError(CheckpointMismatchError):
    """The checkpoint is no state dict of tensors, nor a training checkpoint holding one under ``model`` or
    ``state_dict`` (e.g. only ``model_ema``): which weights to load is not known."""


class FusionMismatchError(CheckpointMismatchError):
    """One of checkpoint and model is fused (BatchNorms folded into the convs by ``fuse()``), the other is not."""


class ExtraTensorsError(CheckpointMismatchError):
    """The checkpoint has every tensor of the model and more: saved from a modified model, not another variant."""


class IncompleteCheckpointError(CheckpointMismatchError):
    """The checkpoint fits the model but lacks some of its tensors (truncated, or saved from a modified model)."""


class WeightsUnavailableError(RuntimeError, OSError):
    """The pretrained weights could not be downloaded or found (offline, unreachable Hub or URL): a RuntimeError like
    every other failed pretrained load of the entrypoints, and an OSError like timm's own download errors, so that
    ``except OSError: ... pretrained=False`` fallbacks written for timm's models work here too."""


class CorruptCheckpointError(RuntimeError):
    """The weight file cannot be read: truncated, damaged, or not a checkpoint at all (a RuntimeError like every
    other failed pretrained load of the entrypoints)."""


class PickleProtocolError(RuntimeError):
    """The weight file is a complete ``torch.save`` file saved in a pickle protocol that safe loading
    (``torch.load(weights_only=True)``) does not read, e.g. ``torch.save(..., pickle_protocol=4)``: neither damaged nor
    known to be unsafe; to be re-saved in torch's default protocol (a RuntimeError like every other failed pretrained
    load of the entrypoints)."""


class WeightFileNotFoundError(RuntimeError, FileNotFoundError):
    """The local weight file given for ``pretrained=True`` does not exist (a RuntimeError like every other failed
    pretrained load of the entrypoints, and a FileNotFoundError)."""


_WRAPPER_PREFIXES = ('module.', '_orig_mod.')  # DistributedDataParallel, torch.compile


def _unwrap(checkpoint: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """Take the weights out of a training checkpoint (``model`` / ``state_dict`` key) and strip the ``module.`` /
    ``_orig_mod.`` prefixes of DDP and ``torch.compile`` (in either order, each key for itself). Anything other than a
    mapping (a list, a tensor: a file saved by other code) is a :class:`CheckpointLayoutError`."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointLayoutError(
            f'The checkpoint is not a state dict: it holds a {type(checkpoint).__name__}. Give the state dict of an '
            "SHViT (model.state_dict()), or a training checkpoint holding one under 'model' or 'state_dict'.")
    for key in ('model', 'state_dict'):
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping):
            checkpoint = inner
            break
    out = {}
    for key, value in checkpoint.items():
        while isinstance(key, str) and key.startswith(_WRAPPER_PREFIXES):
            key = key.partition('.')[2]
        out[key] = value
    return out


def _check_keys(state_dict: Mapping[Any, Any]) -> None:
    """A state dict's keys are parameter names: a mapping with another key (an int, a tuple) is not one."""
    odd = next((k for k in state_dict if not isinstance(k, str)), None)
    if odd is not None:
        raise CheckpointLayoutError(
            f'The checkpoint is not a state dict: its key {odd!r} is of type {type(odd).__name__}, where a state dict '
            f'has parameter names (first keys: {list(state_dict)[:4]}). Give the state dict of an SHViT '
            "(model.state_dict()), or a training checkpoint holding one under 'model' or 'state_dict'.")


def _check_tensors(state_dict: Mapping[str, Any]) -> None:
    """Every entry of the (unwrapped) state dict must be a tensor: a training checkpoint whose weights are under
    another key than ``model`` / ``state_dict`` (``model_ema``, ``state_dict_ema``, ...) is named as such."""
    others = {k: v for k, v in state_dict.items() if not torch.is_tensor(v)}
    if not others:
        return
    nested = [k for k, v in others.items() if isinstance(v, Mapping)]
    if nested:
        key = nested[0]
        raise CheckpointLayoutError(
            f'The checkpoint holds its weights under {nested} (top-level keys: {list(state_dict)[:8]}), not under '
            f"'model' or 'state_dict', so which ones to load is not known. Save the weights you want as a plain state "
            f"dict and load that: torch.save(torch.load(PATH)[{key!r}], 'weights.pth').")
    key = next(iter(others))
    raise CheckpointLayoutError(
        f'The checkpoint is not a state dict: {len(others)} of its entries are no tensors (e.g. {key!r}: '
        f'{type(others[key]).__name__}). Give a state dict of tensors, or a training checkpoint holding one under '
        "'model' or 'state_dict'.")


_ANCHORS = (_FIRST_CONV, 'patch_embed.0.weight')  # the first conv's weight, unfused and fused


def _take_nested_model(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """An SHViT whose keys all carry one prefix (``backbone.`` in an MMDetection checkpoint, such as the official
    ``retinanet_shvit_s4_1x_coco.pth``; ``model.`` in a Lightning one), beside the other parts' tensors: its own
    tensors without the prefix, with a ``UserWarning`` naming what is left out. Several candidates (a teacher and a
    student) are an error naming them."""
    if any(anchor in state_dict for anchor in _ANCHORS):
        return state_dict
    prefixes = sorted({k[:-len(anchor)] for k in state_dict for anchor in _ANCHORS if k.endswith('.' + anchor)})
    if not prefixes:
        return state_dict
    if len(prefixes) > 1:
        raise CheckpointLayoutError(
            f'The checkpoint holds {len(prefixes)} SHViTs, under {prefixes}, so which one to load is not known. Save '
            f'the one you want as a plain state dict (its keys without the prefix) and load that.')
    prefix = prefixes[0]
    inner = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    others = [k for k in state_dict if not k.startswith(prefix)]
    if others:
        warnings.warn(f'Loading the SHViT under {prefix!r} in the checkpoint ({len(inner)} tensors); its '
                      f'{len(others)} other tensors belong to other parts (e.g. {others[:3]}) and are left out.',
                      UserWarning, stacklevel=3)
    return inner


def _is_fused(keys: Any) -> bool:
    """Keys of a fused SHViT (``fuse()`` / ``timm.utils.reparameterize_model``: BatchNorms folded into the convs)."""
    return 'patch_embed.0.weight' in keys and _FIRST_CONV not in keys


def _fusion_mismatch(state_dict: Mapping[str, Any], model: nn.Module) -> FusionMismatchError:
    if _is_fused(state_dict):
        found = _variant_of(state_dict)
        name = found and variant_name(*found)
        build = f'timm.create_model({name!r}).fuse()' if name else 'the model they were saved from, fused (.fuse())'
        return FusionMismatchError(
            f'The checkpoint holds {describe_state_dict(state_dict)}, and the model is not fused. Fused weights '
            f'load only into a fused model of their variant (fusing changes the layers), and cannot be unfused for '
            f'training: model = {build}; model.load_state_dict(WEIGHTS). To train, load the unfused checkpoint they '
            f'were made from.')
    return FusionMismatchError(
        f'The model is fused (fuse() / timm.utils.reparameterize_model folded its BatchNorms) and the checkpoint '
        f'({describe_state_dict(state_dict)}) is not: load the checkpoint into the model first, then fuse it.')


def remap_official_keys(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename official ``blocks1/2/3.*`` keys to timm's ``stages.{i}.downsample/blocks.*`` (others unchanged).

    In ``blocks2`` / ``blocks3`` the first three entries are the downsampler: ``.0.{k}`` (residual dw-conv, FFN at the
    old width) -> ``downsample.{k}``, ``.1`` (PatchMerging) -> ``downsample.2``, ``.2.{k}`` -> ``downsample.{3+k}``;
    entry ``j >= 3`` is BasicBlock ``j - 3``.
    """
    out = {}
    for key, value in state_dict.items():
        match = _OFFICIAL_BLOCK.match(key)
        if match is None:
            out[key] = value
            continue
        stage, index, rest = int(match.group(1)) - 1, int(match.group(2)), match.group(3)
        if stage == 0:
            new = f'stages.0.blocks.{index}.{rest}'
        elif index >= 3:
            new = f'stages.{stage}.blocks.{index - 3}.{rest}'
        elif index == 1:
            new = f'stages.{stage}.downsample.2.{rest}'
        else:
            sub, _, tail = rest.partition('.')
            if not sub.isdigit():  # no official key (a damaged or foreign file): kept, so the load reports it as
                out[key] = value   # unexpected (found by an audit: int('weight') raised a bare ValueError)
                continue
            new = f'stages.{stage}.downsample.{int(sub) + (3 if index == 2 else 0)}.{tail}'
        out[new] = value
    return out


def _variant_of(state_dict: Mapping[str, torch.Tensor]) -> Optional[Tuple[List[int], List[int]]]:
    """``(widths, depths)`` of the SHViT a timm-layout state dict (unfused or fused) holds; None if it is none."""
    fused = _is_fused(state_dict)
    conv = 'stages.{}.blocks.0.conv.weight' if fused else 'stages.{}.blocks.0.conv.m.c.weight'
    last_stem = 'patch_embed.6.weight' if fused else 'patch_embed.6.c.weight'
    if last_stem not in state_dict or not any(k.startswith('stages.') for k in state_dict):
        return None
    widths, depths = [], []
    stage = 0
    while conv.format(stage) in state_dict:
        widths.append(state_dict[conv.format(stage)].shape[0])
        depths.append(len({k.split('.')[3] for k in state_dict if k.startswith(f'stages.{stage}.blocks.')}))
        stage += 1
    return widths, depths


def describe_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Which SHViT variant a timm-layout state dict (unfused or fused) holds, in words."""
    found = _variant_of(state_dict)
    if found is None:
        return f'not an SHViT checkpoint (first keys: {", ".join(list(state_dict)[:3])})'
    name = variant_name(*found)
    if name is None:
        name = f'SHViT with embed_dim={tuple(found[0])}, depth={tuple(found[1])}'
        return f'a fused {name}' if _is_fused(state_dict) else f'an {name}'
    return f'a fused {name} (BatchNorms folded in, as saved after fuse())' if _is_fused(state_dict) else name


def _describe_model(model: nn.Module) -> str:
    embed_dim, depth = getattr(model, 'embed_dim', ()), getattr(model, 'depth', ())
    return variant_name(embed_dim, depth) or f'an SHViT with embed_dim={tuple(embed_dim)}, depth={tuple(depth)}'


def _body_shapes(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    """Shapes of everything but the head(s), the first conv and BN step counters."""
    return {
        k: tuple(v.shape) for k, v in state_dict.items()
        if not k.startswith(_HEAD_PREFIXES) and k != _FIRST_CONV and not k.endswith('num_batches_tracked')
    }


def _fit_distill_head(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> None:
    """Make the ``head_dist.*`` entries match the model: drop them, or start the model's from ``head.*``."""
    model_keys = model.state_dict()
    has_dist = any(k.startswith('head_dist.') for k in model_keys)
    if not has_dist:
        if any(k.startswith('head_dist.') for k in state_dict):
            _logger.warning('Dropping the checkpoint\'s distillation head (head_dist.*); create the model with '
                            'distilled=True to keep it (the official eval output is the mean of both heads).')
            for k in [k for k in state_dict if k.startswith('head_dist.')]:
                del state_dict[k]
        return
    for k in [k for k in model_keys if k.startswith('head_dist.')]:
        src = 'head.' + k[len('head_dist.'):]
        if k not in state_dict and src in state_dict:
            state_dict[k] = state_dict[src].clone()  # non-distilled checkpoint: both heads start equal
        if k in state_dict and tuple(state_dict[k].shape) != tuple(model_keys[k].shape):
            del state_dict[k]  # different num_classes: the new head keeps its init, like the main classifier


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module,
                         features_only: bool = False, strict: bool = True) -> Dict[str, torch.Tensor]:
    """Turn a checkpoint in timm's or the official layout into ``model``'s layout.

    Args:
        state_dict: The checkpoint (a state dict, or a training checkpoint holding one).
        model: The model that will load it.
        features_only: The model is built for ``features_only=True`` (timm then drops its head after loading):
            the checkpoint's head is left out and not checked, so a fine-tuned or headless checkpoint loads.
        strict: False for ``pretrained_strict=False``: tensors the checkpoint lacks (the model keeps their
            initialisation) or has beyond the model's (timm skips them) are allowed, with a ``UserWarning`` naming
            them; tensors of other shapes, another model's checkpoint (no tensor in common with the model's body), a
            classifier of another size and other input channels are still errors.

    Raises:
        CheckpointMismatchError: The checkpoint is another SHViT variant or not an SHViT at all.
    """
    state_dict = _unwrap(state_dict)
    _check_keys(state_dict)
    state_dict = _take_nested_model(state_dict)
    _check_tensors(state_dict)
    if any(k.startswith('blocks1.') for k in state_dict):
        state_dict = remap_official_keys(state_dict)
    own = model.state_dict()
    _check_dtypes(state_dict, own)
    if _is_fused(state_dict) != _is_fused(own) and any(anchor in state_dict for anchor in _ANCHORS):
        raise _fusion_mismatch(state_dict, model)
    if _is_fused(own):  # fused weights into a fused model: nothing to adapt, only to check
        _check_fused_fits(state_dict, own)
        return state_dict
    expected, found = _body_shapes(own), _body_shapes(state_dict)
    if expected != found:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        reshaped = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        if not strict and not reshaped and set(expected) & set(found):  # some of the model's tensors, as asked
            pass
        elif not unexpected and not reshaped:  # the model's own keys and shapes, some missing: truncated, not another
            raise _incomplete(missing, model)
        elif not missing and not reshaped:  # every tensor of the model, plus some: a modified model, not another
            raise _extra_tensors(unexpected, model)
        elif not missing and not unexpected and describe_state_dict(state_dict) == _describe_model(model):
            # the model's keys and variant, some tensors of other shapes: a modified model (an audit found "expected
            # shvit_s1, found shvit_s1" here)
            k = reshaped[0]
            raise CheckpointMismatchError(
                f'Checkpoint has {len(reshaped)} tensor(s) of other shapes than {_describe_model(model)}\'s (e.g. '
                f'{k}: {list(found[k])} in the checkpoint, {list(expected[k])} in the model): it was saved from a '
                f'modified {_describe_model(model)}. Load it into the model it was saved from.')
        else:
            raise CheckpointMismatchError(
                f'Checkpoint does not fit the model: expected {_describe_model(model)}, found '
                f'{describe_state_dict(state_dict)} ({len(missing)} missing keys, e.g. {missing[:3]}; '
                f'{len(unexpected)} unexpected, e.g. {unexpected[:3]}; {len(reshaped)} with other shapes, '
                f'e.g. {reshaped[:3]}). Use the entrypoint of the checkpoint\'s variant.')
    _check_in_chans(state_dict, model)
    cfg_classes = (getattr(model, 'pretrained_cfg', None) or {}).get('num_classes')
    # no head, or one timm drops (or a checkpoint head without its classifier): the checkpoint's whole head (its
    # BatchNorm too) is left out; a headless model whose cfg claims a classifier-less checkpoint keeps the checks
    headless = features_only or (model.num_classes <= 0 and (
        cfg_classes != model.num_classes or 'head.l.weight' not in state_dict))
    if headless:
        for k in [k for k in state_dict if k.startswith(_HEAD_PREFIXES)]:
            del state_dict[k]
    else:
        _fit_distill_head(state_dict, model)
        _check_classifier(state_dict, model, strict)
    if strict:
        _check_complete(state_dict, model, headless)
    else:
        _warn_partial(state_dict, model, headless)
    return state_dict


def _check_dtypes(state_dict: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> None:
    """A floating-point tensor of the model takes floating-point weights only: ``load_state_dict`` would cast integer
    or boolean ones (a quantised checkpoint, a mask) into it without a word (found by an audit)."""
    wrong = [k for k, v in state_dict.items() if k in own and own[k].is_floating_point() and not v.is_floating_point()]
    if wrong:
        k = wrong[0]
        raise CheckpointLayoutError(
            f'Checkpoint tensor {k} is {state_dict[k].dtype} where the model\'s is {own[k].dtype} ({len(wrong)} such '
            f'tensor(s), e.g. {wrong[:3]}): integer or boolean values would be cast into the weights. Give a '
            f'floating-point checkpoint (float32, float16 or bfloat16); a quantised one must be dequantised first.')


def _check_fused_fits(state_dict: Mapping[str, Any], own: Mapping[str, torch.Tensor]) -> None:
    """Fused weights into a fused model must match it key for key and shape for shape; the error says what differs
    and, for the same variant, that the model was built otherwise (classes, distillation)."""
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    expected = {k: tuple(v.shape) for k, v in own.items()}
    if found == expected:
        return
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    parts = [f'{len(missing)} missing (e.g. {missing[:3]})'] if missing else []
    parts += [f'{len(unexpected)} unexpected (e.g. {unexpected[:3]})'] if unexpected else []
    parts += [f'{len(reshaped)} of other shapes (e.g. {reshaped[0]}: {list(found[reshaped[0]])} in the checkpoint, '
              f'{list(expected[reshaped[0]])} in the model)'] if reshaped else []
    theirs, ours = describe_state_dict(state_dict), describe_state_dict(own)
    advice = (f'Load it into {theirs}.' if theirs != ours else
              'It was saved from a model built otherwise (another num_classes, distilled or not): build yours the '
              'same way, then fuse it and load.')
    raise CheckpointMismatchError(f'Checkpoint does not fit the fused model ({ours}): tensors {"; ".join(parts)}. '
                                  f'{advice}')


def _check_in_chans(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """The checkpoint's first conv must take the model's input channels, or the channels the pretrained cfg declares
    (``input_size[0]``), from which timm adapts it to the model's (``adapt_input_conv``); otherwise timm stops with
    "inconsistent with input_size", which does not say what to pass."""
    weight = state_dict.get(_FIRST_CONV)
    declared = ((getattr(model, 'pretrained_cfg', None) or {}).get('input_size') or (3,))[0]
    if weight is None or weight.ndim != 4 or weight.shape[1] in (model.in_chans, declared):
        return
    n = weight.shape[1]
    raise InputChannelsError(
        f'The checkpoint\'s first conv ({_FIRST_CONV[:-len(".weight")]}) takes {n} input channel{"s" * (n != 1)}, '
        f'the model {model.in_chans}. Create the model with in_chans={n} (vitzoo convert: --in-chans {n}). timm adapts '
        f'a first conv to another in_chans only from the channels the pretrained cfg declares (input_size[0], here '
        f'{declared}); to adapt this one to {model.in_chans}, pass in_chans={model.in_chans} and declare its {n}: '
        f'pretrained_cfg_overlay=dict(file=..., input_size=({n}, H, W)).')


def _check_classifier(state_dict: Mapping[str, torch.Tensor], model: nn.Module, strict: bool = True) -> None:
    """A classifier timm will load (the model's ``num_classes`` is its cfg's) must have the model's size.

    timm drops the checkpoint's classifier only when ``num_classes`` differs from the pretrained cfg's; when they
    agree but the checkpoint's classifier has another size, say so instead of torch's size-mismatch list. Without
    ``strict`` a checkpoint without a classifier is let through (the missing keys are warned about).
    """
    weight = state_dict.get('head.l.weight')
    cfg_classes = (getattr(model, 'pretrained_cfg', None) or {}).get('num_classes')
    if cfg_classes != model.num_classes or (weight is None and model.num_classes <= 0):
        return
    if weight is None and not strict:
        return
    if weight is None:
        raise IncompleteCheckpointError(
            f'The checkpoint has no classifier (head.l), and the model\'s {model.num_classes} classes are those of '
            f'the pretrained cfg, so timm loads it strictly. Create the model with num_classes=0 for pooled features, '
            f'or with the number of classes you will train (a new classifier on the checkpoint\'s body), or pass '
            f'pretrained_strict=False to keep the model\'s new classifier (with a warning).')
    if weight.shape[0] == model.num_classes:
        return
    # timm keeps a checkpoint's classifier only when num_classes is the pretrained cfg's: give the count to both
    n = weight.shape[0]
    raise ClassifierSizeError(
        f'The checkpoint\'s classifier (head.l) has {n} outputs, the model\'s {model.num_classes}. To load it, give '
        f'the count to the model and to its pretrained cfg: timm.create_model(..., pretrained=True, num_classes={n}, '
        f'pretrained_cfg_overlay=dict(file=..., num_classes={n})) (num_classes={n} alone makes timm drop this '
        f'classifier and start a new one); vitzoo convert: --num-classes {n}.')


def _check_complete(state_dict: Mapping[str, torch.Tensor], model: nn.Module, headless: bool = False) -> None:
    """Every tensor the model has must come from the checkpoint, except a classifier of another size.

    timm loads non-strictly when ``num_classes`` differs from the checkpoint's (it drops the classifier), which
    would let an incomplete checkpoint load with random tensors in the gaps; the body check above leaves out the
    first conv and the head's BatchNorm, so they are checked here. A ``headless`` load (``features_only``) needs
    none of the model's head.
    """
    own = model.state_dict()
    optional = _HEAD_PREFIXES if headless else _CLASSIFIERS
    missing = [k for k in own
               if k not in state_dict and not k.startswith(optional) and not k.endswith('num_batches_tracked')]
    if missing:
        raise _incomplete(missing, model)
    # the same non-strict load would also skip tensors the model does not have, with only a logged warning
    unexpected = [k for k in state_dict
                  if k not in own and not k.startswith(_CLASSIFIERS) and not k.endswith('num_batches_tracked')]
    if unexpected:
        raise _extra_tensors(unexpected, model)


def _warn_partial(state_dict: Mapping[str, torch.Tensor], model: nn.Module, headless: bool) -> None:
    """``pretrained_strict=False``: warn (``UserWarning``) naming the model's tensors the checkpoint lacks, which keep
    their initialisation, and the checkpoint's tensors the model lacks, which timm skips. A classifier that timm
    drops (``num_classes`` other than the cfg's) or a head a ``features_only`` model drops is no loss."""
    own = model.state_dict()
    cfg_classes = (getattr(model, 'pretrained_cfg', None) or {}).get('num_classes')
    dropped = _HEAD_PREFIXES if headless else _CLASSIFIERS if cfg_classes != model.num_classes else ()
    missing = [k for k in own
               if k not in state_dict and not k.startswith(dropped) and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in state_dict
                  if k not in own and not k.startswith(dropped) and not k.endswith('num_batches_tracked')]
    if missing or unexpected:
        warnings.warn(_partial_load_message(_describe_model(model), missing, unexpected), UserWarning, stacklevel=2)


def _partial_load_message(model_name: str, missing: List[str], unexpected: List[str], shown: int = 5) -> str:
    """The ``pretrained_strict=False`` warning: how many tensors were left out either way, and the first names."""
    def some(keys: List[str]) -> str:
        more = f', ... ({len(keys) - shown} more)' if len(keys) > shown else ''
        return ', '.join(keys[:shown]) + more

    parts = []
    if missing:
        parts.append(f'{len(missing)} of the model\'s tensors are not in the checkpoint and keep their '
                     f'initialisation: {some(missing)}')
    if unexpected:
        parts.append(f'{len(unexpected)} tensor{"s" * (len(unexpected) > 1)} of the checkpoint '
                     f'{"are" if len(unexpected) > 1 else "is"} not in the model and not loaded: {some(unexpected)}')
    return f'Partial load of {model_name} (pretrained_strict=False): ' + '; '.join(parts) + '.'


_STRICT_OPT_OUT = ('To load on purpose only the tensors the two have in common (say, to start a modified model from '
                   'these weights), pass pretrained_strict=False: the model\'s other tensors keep their initialisation '
                   'and the checkpoint\'s others are skipped, with a warning naming them.')


def _extra_tensors(unexpected: List[str], model: nn.Module) -> ExtraTensorsError:
    return ExtraTensorsError(
        f'Checkpoint has {len(unexpected)} tensor{"s" if len(unexpected) > 1 else ""} that '
        f'{_describe_model(model)} does not have (e.g. '
        f'{unexpected[:3]}): it was saved from a modified model. Load it into the model it was saved from, or '
        f'remove those tensors from the file. {_STRICT_OPT_OUT}')


def _incomplete(missing: List[str], model: nn.Module) -> IncompleteCheckpointError:
    return IncompleteCheckpointError(
        f'Checkpoint is incomplete: {len(missing)} of the model\'s tensors are missing (e.g. {missing[:3]}); '
        f'it may be truncated or saved from a modified model. Use a complete {_describe_model(model)} checkpoint. '
        f'{_STRICT_OPT_OUT}')
