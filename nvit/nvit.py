"""timm registrations: the released NViT-B/H/S/T and the ReViT-T/S design-rule models.

Paper: Global Vision Transformer Pruning with Hessian-Aware Saliency (Yang et al., CVPR 2023),
https://arxiv.org/abs/2110.04869 ::

    @inproceedings{yang2023global,
      title={Global Vision Transformer Pruning with Hessian-Aware Saliency},
      author={Yang, Huanrui and Yin, Hongxu and Shen, Maying and Molchanov, Pavlo and Li, Hai and Kautz, Jan},
      booktitle={CVPR}, year={2023}}

Released weights: https://github.com/NVlabs/NViT, licence CC-BY-NC-SA-4.0 (non-commercial).

The per-block dims of the released models are stored only inside their checkpoints, so ``nvit_*`` need one of
``pretrained=True`` (official download), ``pretrained_cfg_overlay=dict(file=...)`` (local file) or ``dims=...``,
unless the variant's dims have been recorded in ``KNOWN_DIMS``.

Without weights, ``nvit_*`` build the released architecture: distilled (dist token + ``head_dist``) with token
scales (``token_mask=True``), as every official checkpoint has them, so that the official weights load strictly
into the model and its params / FLOPs are the released model's. With weights, both follow the checkpoint's keys.
Pass ``distilled=False`` / ``token_mask=False`` for the plain variant.
"""
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import _resolve_pretrained_source, resolve_pretrained_cfg
from timm.models._hub import (
    _EXT_PRIORITY, _PREFERRED_FILES, _get_safe_alternatives, download_cached_file, download_from_hf)
from timm.models._input import update_model_args

from .checkpoint import (
    CorruptCheckpointError, IncompatibleCheckpointError, WeightsUnavailableError, check_dims_match,
    checkpoint_filter_fn, foreign_or_missing_dims_error, load_checkpoint, read_checkpoint_object)
from .dims import NViTDims, resolve_dims, revit_dims
from .download_cache import damaged_download_text, damaged_hub_file_text
from .model import NViT

__all__ = ['KNOWN_DIMS']

_logger = logging.getLogger(__name__)

# Dims of the released models, keyed by variant: fill in from ckpt['dim'] (e.g. ``nvit.load_checkpoint(path)[1]``)
# once read, e.g. KNOWN_DIMS['nvit_b'] = NViTDims(embed_dim=..., heads=[...], ...). Empty: not yet read.
# Only the widths go here: distilled / token_mask default to the released architecture (_RELEASED_ARCH).
KNOWN_DIMS: Dict[str, NViTDims] = {}

# What every released NViT checkpoint has besides its widths (a dist token + head_dist, and a [198, 1] token scale
# per block): the default of the nvit_* entry points when no checkpoint says otherwise
_RELEASED_ARCH = dict(distilled=True, token_mask=True)

_HF_FILES = ('model.safetensors', 'pytorch_model.bin')


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': ('head', 'head_dist'),
        'paper_ids': 'arXiv:2110.04869',
        'paper_name': 'Global Vision Transformer Pruning with Hessian-Aware Saliency',
        'origin_url': 'https://github.com/NVlabs/NViT',
        **kwargs,
    }


_DROPBOX = 'https://www.dropbox.com/scl/fi/'
default_cfgs = generate_default_cfgs({
    'nvit_b.in1k': _cfg(
        url=_DROPBOX + 'jewbgp7yj8itftkpciocb/NViT_B.pth?rlkey=2s6fzd6dqqt70tvog89opd586&dl=1',
        license='cc-by-nc-sa-4.0'),
    'nvit_h.in1k': _cfg(
        url=_DROPBOX + 'hkmmr1sjinygw65s0yku6/NViT_H.pth?rlkey=f72xry5i73of1h376ugy8tobv&dl=1',
        license='cc-by-nc-sa-4.0'),
    'nvit_s.in1k': _cfg(
        url=_DROPBOX + 'fpavg8fb96gpqhaxvn05o/NViT_S.pth?rlkey=uwt7340bw3kqoyb570nfw9bm7&dl=1',
        license='cc-by-nc-sa-4.0'),
    'nvit_t.in1k': _cfg(
        url=_DROPBOX + 'lokqjaj6kaneweer14v5m/NViT_T.pth?rlkey=764a8k9mp9xpz0wjyhhzgvtkc&dl=1',
        license='cc-by-nc-sa-4.0'),
    'revit_t': _cfg(notes=('ReViT-T dims from the redistribution rule; no released weights',)),
    'revit_s': _cfg(notes=('ReViT-S dims from the redistribution rule; no released weights',)),
})


def _hf_names(filename: str) -> Tuple[str, ...]:
    """The files timm tries for Hub weights named ``filename`` (a cfg's ``hf_hub_filename``): a ``.safetensors`` name
    alone, else its safetensors alternative first (``x.bin`` -> ``x.safetensors``), then the file itself."""
    if filename.endswith('.safetensors'):
        return (filename,)
    return (*_get_safe_alternatives(filename), filename)


def _hf_file(variant: str, location: Any, cache_dir: Optional[str]) -> str:
    """The Hub weight file timm would read for a ``hf-hub`` source, from the Hub cache or downloaded into it, checked
    as a cached download is (``damaged_hub_file_text``): a damaged ``torch.save`` file there is a
    ``CorruptCheckpointError`` naming the file and its blob, to delete (since 2026-11-25; before, it was read, and
    reported in the reader's words without them)."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    if isinstance(location, (tuple, list)):  # (repo, the cfg's hf_hub_filename)
        repo, names = location[0], _hf_names(location[1])
    else:
        repo, names = location, _HF_FILES
    for i, name in enumerate(names):
        try:
            path = download_from_hf(repo, name, cache_dir=cache_dir)
        except LocalEntryNotFoundError as e:  # neither cached nor downloadable: offline, or the Hub is unreachable
            if i == len(names) - 1:
                raise _hub_unreachable_error(variant, repo, names) from e
        except EntryNotFoundError:
            if i == len(names) - 1:
                raise
        else:
            damaged = damaged_hub_file_text(repo, name, path)
            if damaged is not None:
                raise CorruptCheckpointError(f'Could not load pretrained weights for {variant}: {damaged}; or use '
                                             f'pretrained=False.')
            return path
    raise AssertionError('unreachable')


def _hub_unreachable_error(variant: str, repo: str, names: Any) -> FileNotFoundError:
    from huggingface_hub import constants
    hint = '' if constants.HF_HUB_OFFLINE else (
        ' On an offline machine set HF_HUB_OFFLINE=1, so that this fails at once instead of after the Hub client\'s '
        f'retries ({23 * len(names)} s or more: 1+2+4+8+8 s for each file tried).')
    return FileNotFoundError(
        f'{variant}: no weight file of Hub repo {repo!r} ({" or ".join(names)}) is in the Hub cache, and the Hub '
        f'cannot be reached (HF_HUB_OFFLINE={int(bool(constants.HF_HUB_OFFLINE))}). While online, load it once or run '
        f'`hf download {repo} {names[0]}`; offline, pass a local file with '
        f'pretrained_cfg_overlay=dict(file="/path/to/{names[0]}").{hint}')


def _dir_file(directory: str) -> str:
    """The weight file of a ``local-dir:`` folder, picked by timm's rule (``load_state_dict_from_path``): the first of
    timm's preferred names that exists (``model.safetensors``, ``pytorch_model.bin``, ``pytorch_model.pth``,
    ``model.pth``, ...), else, for the first extension of timm's order (``.safetensors``, ``.pth``, ``.pth.tar``,
    ``.bin``) that any name in the folder ends with, the first such name (sorted), with timm's warning when there are
    several (since 2026-11-25; before, only ``model.safetensors``, ``pytorch_model.bin`` and ``model.pth``)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f'NViT weights folder {directory!r} (local-dir:) is not a folder; check the path.')
    for name in _PREFERRED_FILES:
        if os.path.exists(os.path.join(directory, name)):
            return _dir_pick(directory, name)
    names = sorted(os.listdir(directory))
    for ext in _EXT_PRIORITY:
        found = [name for name in names if name.endswith(ext)]
        if len(found) > 1:
            _logger.warning(f'Multiple {ext} checkpoints in {directory}: {found}. Using {found[0]!r}.')
        if found:
            return _dir_pick(directory, found[0])
    raise FileNotFoundError(
        f'No NViT weights in folder {directory!r}: looked, as timm does, for the files {", ".join(_PREFERRED_FILES)}, '
        f'then for any file ending in {", ".join(_EXT_PRIORITY)} (in that order). Put the weight file there under one '
        f'of these names, or pass the file itself: pretrained_cfg_overlay=dict(file=...).')


def _dir_pick(directory: str, name: str) -> str:
    """``directory/name``, timm's pick in the folder, which must be a file (timm's rule picks by name only)."""
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'In NViT weights folder {directory!r}, timm\'s rule for picking the weight file picks {name!r}, which is '
            f'not a file (a folder?). Rename or remove it, so that the weight file is picked.')
    return path


def _read_pretrained(variant: str, kwargs: Mapping[str, Any]):
    """Locate the pretrained weights timm would use, read them (safely) with their dims record."""
    cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
        pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay')).to_dict()
    given = cfg.get('state_dict')
    if given is not None and not isinstance(given, Mapping):  # timm asserts it with an empty message
        how = ' (a whole model: pass model.state_dict())' if isinstance(given, torch.nn.Module) else ''
        raise TypeError(f'pretrained_cfg_overlay state_dict for {variant} must be a state dict (a dict of tensors) '
                        f'or a training checkpoint holding one, not {type(given).__name__}{how}.')
    load_from, location = _resolve_pretrained_source(cfg)
    cache_dir = kwargs.get('cache_dir')
    if load_from == 'state_dict':
        return read_checkpoint_object(location)
    if load_from == 'file':
        path = location
    elif load_from == 'url':
        try:
            path = download_cached_file(location, check_hash=False, progress=True, cache_dir=cache_dir)
        except OSError as e:  # urllib's URLError / HTTPError, a timeout, a full disk
            raise WeightsUnavailableError(
                f'Could not download the {variant} checkpoint from {location}: {type(e).__name__}: {e}. If this '
                f'machine is offline, download that file once elsewhere and pass '
                f'pretrained_cfg_overlay=dict(file="/path/to/{variant}.pth").') from e
        damaged = damaged_download_text(location, path)  # checked as a local file is, with the cache's advice
        if damaged is not None:
            raise CorruptCheckpointError(f'Could not load pretrained weights for {variant}: {damaged}; or use '
                                         f'pretrained=False.')
    elif load_from == 'hf-hub':
        path = _hf_file(variant, location, cache_dir)
    elif load_from == 'local-dir':
        path = _dir_file(location)
    else:
        raise RuntimeError(
            f'No pretrained weights exist for {variant}. Use pretrained=False, or give a file with '
            f'pretrained_cfg_overlay=dict(file=...).')
    return load_checkpoint(Path(path))


def _missing_dims_error(variant: str) -> ValueError:
    return ValueError(
        f'{variant}: the per-block dims of this model are not known to the package (the released NViT dims are '
        f'stored only inside its checkpoint): load its checkpoint (pretrained=True, a local file, or a weights folder '
        f'with local-dir:PATH) or pass dims=..., with one of:\n'
        f"  timm.create_model('{variant}', pretrained=True)  # downloads the official checkpoint, reads its dims\n"
        f"  timm.create_model('{variant}', pretrained=True, pretrained_cfg_overlay=dict(file='NViT.pth'))"
        f'  # local file, official format or ours\n'
        f"  timm.create_model('{variant}', dims=nvit.NViTDims(...) or a dict or a JSON string)  # random init\n"
        f"or record them once in nvit.nvit.KNOWN_DIMS['{variant}'].")


def _dims_record_differs(variant: str, fixed: NViTDims, recorded: NViTDims, given: bool,
                         where: Optional[str] = None) -> ValueError:
    """The checkpoint's dims record differs from ``dims=`` (``given``) or from a ``revit_*`` name's own dims, first
    ``where`` (default: where the two differ first)."""
    where = where or fixed.first_difference(recorded)
    if given:
        head = (f'{variant}: the checkpoint\'s dims record differs from the dims=... given at {where} (given vs '
                'checkpoint). ')
        fix = 'Leave out dims= to build the model the checkpoint records.'
    else:
        head = (f'{variant}: the checkpoint\'s dims record differs from {variant}\'s own dims (the ReViT rule\'s) at '
                f'{where} ({variant} vs checkpoint). ')
        fix = 'Load it with nvit_b/h/s/t, which take the checkpoint\'s dims, or pass dims= with the checkpoint\'s dims.'
    return IncompatibleCheckpointError(f'{head}{fix}\n{variant}:\n{fixed}\ncheckpoint:\n{recorded}')


def _compared_blocks(fixed: NViTDims, recorded: NViTDims, partial: bool) -> Tuple[NViTDims, NViTDims]:
    """The dims the model is built with and a checkpoint's dims record, as far as they must agree: whole, or for a
    ``partial`` (``pretrained_strict=False``) load the blocks both have (found by an audit: a model cut to fewer
    blocks than the checkpoint was refused, where the docs said the blocks beyond its depth are skipped)."""
    if not partial:
        return fixed, recorded
    depth = min(len(fixed.heads), len(recorded.heads))

    def cut(dims: NViTDims) -> NViTDims:
        return NViTDims(embed_dim=dims.embed_dim, heads=dims.heads[:depth], qk_dim=dims.qk_dim[:depth],
                        v_dim=dims.v_dim[:depth], mlp_dim=dims.mlp_dim[:depth])
    return cut(fixed), cut(recorded)


def _create_nvit(variant: str, pretrained: bool = False, default_dims: Optional[NViTDims] = None, /,
                 **kwargs) -> NViT:
    """Build ``variant``; dims from, first match wins: ``dims=``, ``default_dims`` (the ReViT rule's, for
    ``revit_*``: a checkpoint must match them), the checkpoint's record, ``KNOWN_DIMS[variant]``."""
    dims = resolve_dims(kwargs.pop('dims', None))
    fixed = dims or default_dims  # the dims a checkpoint must match
    state_dict = None
    strict = kwargs.get('pretrained_strict', True)  # False: timm's opt-out of a strict load, honoured with a warning
    if pretrained:
        state_dict, file_dims, _ = _read_pretrained(variant, kwargs)
        if fixed is not None and file_dims is not None:
            compared, recorded = _compared_blocks(fixed, file_dims, partial=not strict)
            if compared != recorded:
                raise _dims_record_differs(variant, fixed, file_dims, given=dims is not None,
                                           where=compared.first_difference(recorded))
        dims = fixed or file_dims or KNOWN_DIMS.get(variant)
        if dims is None:
            raise foreign_or_missing_dims_error(variant, state_dict, f'The pretrained checkpoint for {variant}')
        kwargs.setdefault('distilled', 'dist_token' in state_dict)
        kwargs.setdefault('token_mask', any(k.endswith('.attn.token_mask') for k in state_dict))
        # hand timm the already-read weights: it then runs the filter, classifier / in_chans adaptation, strict load
        kwargs['pretrained_cfg_overlay'] = dict(kwargs.get('pretrained_cfg_overlay') or {}, state_dict=state_dict,
                                                source='')
    else:  # no checkpoint to follow: the released architecture
        for key, value in _RELEASED_ARCH.items():
            kwargs.setdefault(key, value)
    dims = dims or fixed or KNOWN_DIMS.get(variant)
    if dims is None:
        raise _missing_dims_error(variant)
    if kwargs.get('features_only') and kwargs.get('global_pool') == '':
        # timm's feature getter drops the heads and the pooling (prune_intermediate_layers): built with the released
        # pooling, the feature model is the same, and a distilled one is not refused for a head it does not keep
        kwargs['global_pool'] = 'token'
    if state_dict is not None:
        check_dims_match(dims, state_dict, partial=not strict)

    model = build_model_with_cfg(
        NViT, variant, pretrained,
        dims=dims.to_dict(),
        pretrained_filter_fn=partial(checkpoint_filter_fn, features_only=bool(kwargs.get('features_only')),
                                     strict=strict),
        feature_cfg=dict(out_indices=3, feature_cls='getter'),
        **kwargs,
    )
    # features_only: timm's FeatureGetterNet keeps the NViT as .model (pruned to the blocks it returns); its graph
    # ('fx') and hook wrappers keep only the NViT's modules, all blocks
    inner = next((m for m in (model, getattr(model, 'model', None)) if isinstance(m, NViT)), None)
    built_dims = (inner.dims if inner is not None else dims).to_dict()
    for m in dict.fromkeys(m for m in (model, inner) if m is not None):
        if hasattr(m, 'pretrained_cfg'):
            cfg = dict(m.pretrained_cfg)
            cfg.pop('state_dict', None)  # do not keep the weights inside the cfg (timm saves it in config.json)
            if not kwargs['distilled']:
                cfg['classifier'] = 'head'  # no head_dist to name
            m.pretrained_cfg = m.default_cfg = cfg
        update_model_args(m, dims=built_dims, distilled=kwargs['distilled'], token_mask=kwargs['token_mask'])
    return model


@register_model
def nvit_b(pretrained: bool = False, **kwargs) -> NViT:
    """NViT-B (34M params, 6.8G FLOPs, 83.29% top-1); dims from the checkpoint; distilled, with token scales."""
    return _create_nvit('nvit_b', pretrained, **kwargs)


@register_model
def nvit_h(pretrained: bool = False, **kwargs) -> NViT:
    """NViT-H (30M params, 6.2G FLOPs, 82.95% top-1); dims from the checkpoint; distilled, with token scales."""
    return _create_nvit('nvit_h', pretrained, **kwargs)


@register_model
def nvit_s(pretrained: bool = False, **kwargs) -> NViT:
    """NViT-S (21M params, 4.2G FLOPs, 82.19% top-1); dims from the checkpoint; distilled, with token scales."""
    return _create_nvit('nvit_s', pretrained, **kwargs)


@register_model
def nvit_t(pretrained: bool = False, **kwargs) -> NViT:
    """NViT-T (6.9M params, 1.3G FLOPs, 76.21% top-1); dims from the checkpoint; distilled, with token scales."""
    return _create_nvit('nvit_t', pretrained, **kwargs)


@register_model
def revit_t(pretrained: bool = False, **kwargs) -> NViT:
    """ReViT-T: EMB 176, dims from the ReViT rule as the official code computes it (see docs/nvit.md)."""
    return _create_nvit('revit_t', pretrained, revit_dims(176), **kwargs)


@register_model
def revit_s(pretrained: bool = False, **kwargs) -> NViT:
    """ReViT-S: EMB 384, dims from the ReViT rule as the official code computes it (see docs/nvit.md)."""
    return _create_nvit('revit_s', pretrained, revit_dims(384), **kwargs)
