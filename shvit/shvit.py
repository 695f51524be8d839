"""SHViT S1-S4 timm entrypoints and pretrained configs.

This module must stay named ``shvit.py``: timm files registered models under the last component of the module
name, and its own test-suite runs the feature-intermediate tests for module ``'shvit'``.

Paper: `SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design` (Yun & Ro, CVPR 2024),
https://arxiv.org/abs/2401.16456. Official code and weights (MIT): https://github.com/ysj9909/SHViT
"""
import argparse
import contextlib
import os
import pickle
import re
import threading
import zipfile
from functools import partial
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models._builder import _resolve_pretrained_source
from timm.models._helpers import load_state_dict
from timm.models._hub import _EXT_PRIORITY, _PREFERRED_FILES, HF_WEIGHTS_NAME, _get_safe_alternatives, hf_split

from .checkpoint import (
    CheckpointLayoutError, CheckpointMismatchError, ClassifierSizeError, CorruptCheckpointError, ExtraTensorsError,
    FusionMismatchError, IncompleteCheckpointError, InputChannelsError, PickleProtocolError, WeightFileNotFoundError,
    WeightsUnavailableError, _check_keys, _unwrap, checkpoint_filter_fn,
)
from .download_cache import (
    damaged_download_text, damaged_hub_file_text, download_cache_path, torch_file_damage, unreadable_protocol_text,
)
from .model import SHViT
from .torch_legacy import LEGACY_HEAD_SIZE, starts_as_legacy_file
from .variants import VARIANT_STATS, VARIANTS

__all__ = ['default_cfgs']

_RELEASE_URL = 'https://github.com/ysj9909/SHViT/releases/download/v1.0/{}.pth'

# A failed pretrained load (missing file offline, corrupt or truncated file, another model's weights) can raise
# almost any exception type (torch's weights-only unpickler raises a KeyError for a text file), so what makes an
# error a load error is where it was raised: inside timm's weight loading. An error raised while building the
# model (a CUDA device without a driver, an integer dtype) is re-raised unchanged.
_TIMM_LOADERS = ('load_pretrained', 'load_state_dict', 'load_checkpoint')


def _raised_while_loading(e: BaseException) -> bool:
    """True if ``e`` was raised inside timm's pretrained-weight loading (judged by the traceback's frames)."""
    tb = e.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name in _TIMM_LOADERS and '/timm/' in code.co_filename.replace('\\', '/'):
            return True
        tb = tb.tb_next
    return False


# where a weight file's bytes are read: torch.load (also for timm's URL downloads) and the safetensors reader
_READERS = ('/torch/serialization.py', '/safetensors/')


def _raised_while_reading(e: BaseException) -> bool:
    """True if ``e`` was raised while reading the weight file (judged by the traceback's frames): the file is
    truncated or damaged, whatever the reader raised (EOFError, IndexError, a RuntimeError, ...)."""
    tb = e.__traceback__
    while tb is not None:
        if any(reader in tb.tb_frame.f_code.co_filename.replace('\\', '/') for reader in _READERS):
            return True
        tb = tb.tb_next
    return False


def _cfg(variant: str, **kwargs: Any) -> Dict[str, Any]:
    stats = VARIANT_STATS[variant]
    size = stats['img_size']
    return {
        'num_classes': 1000, 'input_size': (3, size, size), 'pool_size': (-(-size // 64),) * 2,
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.0.c', 'classifier': 'head.l',
        'license': 'mit', 'paper_ids': 'arXiv:2401.16456',
        'paper_name': 'SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design',
        'origin_url': 'https://github.com/ysj9909/SHViT',
        'notes': (
            f"params {stats['params']:,} (fused {stats['params_fused']:,})",
            f"fvcore fused {stats['gmacs_fused'] * 1e3:.2f} MMACs at {size}x{size}",
            f"ImageNet-1k top-1 {stats['top1']:.3f} / top-5 {stats['top5']:.3f} (timm's evaluation of the in1k "
            f"weights; paper {stats['paper_top1']})",
        ),
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    **{f'{v}.in1k': _cfg(v, hf_hub_id=f'timm/{v}.in1k') for v in VARIANTS},
    **{f'{v}.in1k_official': _cfg(v, url=_RELEASE_URL.format(v)) for v in VARIANTS},
})


def _weights_source(variant: str, kwargs: Dict[str, Any]) -> str:
    """Where ``create_model`` looked for the weights, in words (best effort)."""
    try:
        cfg = resolve_pretrained_cfg(
            variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
            pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay')).to_dict()
    except Exception:  # the original error is what matters; never mask it
        return 'the configured source'
    if cfg.get('state_dict') is not None:
        return 'the state_dict passed in pretrained_cfg'
    if cfg.get('file'):
        return f"file {cfg['file']}"
    if cfg.get('hf_hub_id'):
        return f"Hugging Face Hub repo {cfg['hf_hub_id']}"
    return f"url {cfg.get('url')}"


def _pretrained_source(variant: str, kwargs: Dict[str, Any]) -> Tuple[Optional[str], Any]:
    """timm's ``(load_from, location)`` for the cfg this call resolves to (``'file'`` and a path, ``'url'`` and a URL,
    ``'hf-hub'`` and a hub id, ...); ``(None, None)`` when the cfg cannot be resolved: the load itself reports what
    is wrong with it, which must not be masked here."""
    try:
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                     pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay')).to_dict()
        return _resolve_pretrained_source(cfg)
    except Exception:
        return None, None


def _missing_weight_file(variant: str, kwargs: Dict[str, Any]) -> Optional[WeightFileNotFoundError]:
    """The error for a local weight file (``file=...``, what timm reads) that does not exist; None otherwise.

    timm's reader raises a bare ``FileNotFoundError()`` for it, which says nothing; a folder is refused the same way.
    """
    load_from, path = _pretrained_source(variant, kwargs)
    if load_from != 'file' or os.path.isfile(path):
        return None
    if os.path.isdir(path):
        return WeightFileNotFoundError(
            f'Could not load pretrained weights for {variant}: {path} is a folder, not a weight file.\n'
            f'To fix: give the weight file in it (e.g. {os.path.join(path, "model.safetensors")}) in '
            f'pretrained_cfg_overlay=dict(file=...), or load a converted folder with '
            f'timm.create_model("local-dir:{path}", pretrained=True); or use pretrained=False.')
    return WeightFileNotFoundError(
        f'Could not load pretrained weights for {variant}: weight file {path} does not exist.\n'
        f'To fix: check the path, and give an existing .safetensors or .pth file in '
        f'pretrained_cfg_overlay=dict(file=...); or use pretrained=False.')


def _damaged_download(variant: str, kwargs: Dict[str, Any]) -> Optional[CorruptCheckpointError]:
    """The error for a url source whose download in timm's cache (``download_cache_path``), or a Hub source whose
    ``torch.save`` file in the Hub cache (``_hub_cached_file``), is damaged; None otherwise.

    timm loads that file with ``torch.load`` as it is, so a damaged one either loads (a zip member failing its CRC:
    damaged tensors) or fails in torch's words, often those for an unsafe pickle with the advice to load it with
    ``weights_only=False``. So once timm has loaded it, or failed to, it is checked as a local file is (nothing is
    unpickled): whether it was in the cache already or timm has just downloaded it.
    """
    load_from, location = _pretrained_source(variant, kwargs)
    if load_from == 'url' and location:
        text = damaged_download_text(location, download_cache_path(location, kwargs.get('cache_dir')))
    elif load_from == 'hf-hub' and location:
        cached = _hub_cached_file(location, kwargs.get('cache_dir'))
        hub_id = location[0] if isinstance(location, (tuple, list)) else location
        text = damaged_hub_file_text(hub_id, *cached) if cached is not None else None
    else:
        return None
    if text is None:
        return None
    return CorruptCheckpointError(f'Could not load pretrained weights for {variant}: {text}; or use pretrained=False.')


def _unreadable_protocol(variant: str, kwargs: Dict[str, Any]) -> Optional[str]:
    """For a load that ``torch.load(weights_only=True)`` refused with "Unsupported operand": if the file it read (a
    local file, a ``local-dir:`` folder's, a url's download or a Hub file in the cache) is a ``torch.save`` file that
    looks complete but was saved in a pickle protocol safe loading does not read, say so
    (``unreadable_protocol_text``); else None (a damaged file: reported as such)."""
    load_from, location = _pretrained_source(variant, kwargs)
    path: Optional[str] = None
    if load_from == 'file':
        path = location
    elif load_from == 'local-dir':
        path = _folder_weight_file(location)
    elif load_from == 'url' and location:
        path = download_cache_path(location, kwargs.get('cache_dir'))
    elif load_from == 'hf-hub' and location:
        cached = _hub_cached_file(location, kwargs.get('cache_dir'))
        path = cached[1] if cached is not None else None
    if path is None or not os.path.isfile(path) or torch_file_damage(path) is not None:
        return None
    return unreadable_protocol_text(path)


def _hub_cached_file(location: Any, cache_dir: Optional[str]) -> Optional[Tuple[str, str]]:
    """The Hub file timm reads for a ``hf-hub`` source (a hub id, or a hub id and the cfg's ``hf_hub_filename``) as
    the Hub cache holds it, ``(file name, path)``: the first of the names timm tries (``load_state_dict_from_hf``: the
    name's safetensors alternative, e.g. ``model.safetensors`` for its default ``pytorch_model.bin``, then the name)
    that is cached for the revision (``try_to_load_from_cache``, which makes no request). Checked once timm has
    loaded the weights or failed to, this is the file it read. None when none is cached."""
    from huggingface_hub import try_to_load_from_cache

    hub_id, filename = location if isinstance(location, (tuple, list)) else (location, HF_WEIGHTS_NAME)
    repo, revision = hf_split(hub_id)
    names = (filename,) if filename.endswith('.safetensors') else (*_get_safe_alternatives(filename), filename)
    for name in names:
        try:
            found = try_to_load_from_cache(repo, name, cache_dir=cache_dir, revision=revision)
        except Exception:  # noqa: BLE001  a malformed repo id or revision: the load itself reports it
            return None
        if isinstance(found, str):  # not None (unknown) nor the cache's record that the repo has no such file
            return name, found
    return None


def _hub_fix(repo: str, error: BaseException) -> str:
    """Advice for a failed Hub load; a file neither cached nor downloadable (offline) gets the offline options."""
    cause = next((c for c in _causes(error) if type(c).__name__ == 'LocalEntryNotFoundError'), None)
    local = 'to use a local file pass pretrained_cfg_overlay=dict(file="/path/to/weights.safetensors|.pth")'
    if cause is None:
        return (f'if the file is missing (offline or empty cache), run once online or fetch it with '
                f'`hf download {repo}`; if it is corrupt or truncated, delete it and download again; {local}')
    from huggingface_hub import constants
    fix = (f'the weights are not in the Hub cache and the Hub cannot be reached: while online, run once or fetch them '
           f'with `hf download {repo}`; offline, {local}')
    if not constants.HF_HUB_OFFLINE:
        fix += ('; set HF_HUB_OFFLINE=1 on an offline machine so that this fails at once instead of after the Hub '
                'client\'s retries (46 s or more)')
    return fix


def _read_model_not_ema(variant: str, kwargs: Dict[str, Any]) -> Optional[str]:
    """For a local ``.pth`` file, or the one of a ``local-dir:`` folder, read it here so that a training checkpoint's
    model weights load, not its EMA copy.

    timm's file and folder loaders take ``model_ema`` / ``state_dict_ema`` over ``model`` / ``state_dict`` when a
    checkpoint holds both; the official evaluation (``build.py``) and the release's accuracy are for ``model``. The
    weights read here go to timm as ``pretrained_cfg_overlay['state_dict']``, so timm's filter / adaptation / strict
    load follow unchanged (the ``file`` entry stays, for the record). A folder's cfg source, ``local-dir``, would make
    timm read the folder instead, so it is set to '' for the load; the source to restore afterwards is returned.
    """
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=overlay).to_dict()
    path, source = cfg.get('file'), cfg.get('source') or ''
    if source == 'local-dir' and path:
        path = _folder_weight_file(path)
    elif source not in ('', 'timm'):
        return None
    if cfg.get('state_dict') is not None or not path:
        return None
    _check_named_by_content(variant, path)
    if str(path).endswith('.safetensors'):
        return None
    _check_archive_crc(variant, path)
    _check_torch_file(variant, path)
    try:
        state_dict = load_state_dict(path, use_ema=False)
    except AttributeError as e:  # timm's key cleaning met a key that is no name: say so, not "'int' ... 'startswith'"
        try:
            _check_keys(_unwrap(torch.load(path, map_location='cpu', weights_only=True)))
        except CheckpointLayoutError as layout:
            raise CheckpointLayoutError(
                f'Could not load pretrained weights for {variant} from file {path}: {layout}') from e
        raise
    kwargs['pretrained_cfg_overlay'] = dict(overlay, state_dict=state_dict, source='')
    return source


def _folder_weight_file(folder: str) -> Optional[str]:
    """The file timm's folder loader (``load_state_dict_from_path``) reads in ``folder``: the first of its preferred
    names that exists, else the first file (sorted) of the first extension in its priority order; None if none."""
    for name in _PREFERRED_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    for ext in _EXT_PRIORITY:
        found = sorted(f for f in os.listdir(folder) if f.endswith(ext)) if os.path.isdir(folder) else []
        if found:
            return os.path.join(folder, found[0])
    return None


def _check_named_by_content(variant: str, path: str) -> None:
    """timm reads a file named ``.safetensors`` with safetensors and any other with ``torch.load``: a file of the
    other format than its name says (a safetensors file named ``.bin``) fails there with a misleading error (for a
    ``.bin``: "blocked ... non-allowlisted pickle globals"), so say what it is and what to rename it to."""
    if not os.path.isfile(path):
        return  # reported by the loader
    with open(path, 'rb') as f:
        head = f.read(LEGACY_HEAD_SIZE)
    # a torch.save file starts with a zip archive's local header, or (legacy format) a pickle of torch's magic number
    is_torch = head.startswith(b'PK\x03\x04') or starts_as_legacy_file(head)
    named_safetensors = str(path).endswith('.safetensors')
    stem = os.path.splitext(os.path.basename(path))[0]
    if not is_torch and head[8:9] == b'{' and not named_safetensors:
        real, named, new = 'a safetensors file', 'a torch.save file', stem + '.safetensors'
    elif is_torch and named_safetensors:
        real, named, new = 'a torch.save file', 'a safetensors file', stem + '.pth'
    else:
        return
    raise RuntimeError(
        f'Could not load pretrained weights for {variant} from file {path}: it is {real}, but its name says {named}, '
        f'and timm picks the reader by the name (.safetensors: safetensors, any other: torch.load).\nTo fix: rename '
        f'it to {new}; or use pretrained=False.')


def _check_archive_crc(variant: str, path: str) -> None:
    """A ``torch.save`` zip archive whose members fail their CRC is corrupt: ``torch.load`` does not check the CRCs
    and would return the damaged tensors. Reads the file once (checksums only, nothing is unpickled)."""
    if not os.path.isfile(path) or not zipfile.is_zipfile(path):
        return  # missing files and truncated archives fail in the loader, which names them (legacy files: below)
    with zipfile.ZipFile(path) as archive:
        damaged = archive.testzip()
    if damaged is not None:
        raise CorruptCheckpointError(
            f'Could not load pretrained weights for {variant} from file {path}: the file is corrupt (member '
            f'{damaged} of the archive fails its CRC check).\nTo fix: copy or download the file again; or use '
            f'pretrained=False.')


def _check_torch_file(variant: str, path: str) -> None:
    """A file other than a zip archive (checked above) that is no complete ``torch.save`` file is corrupt
    (``torch_file_damage``: a legacy file cut short, a zip archive without its end record, or first bytes that start
    neither format, such as a text or HTML file): ``torch.load`` reports it with whatever its unpickler meets (a bare
    ``KeyError`` for text, ``EOFError`` for an empty file), at some cuts of a legacy file a global it does not allow,
    which reads as an unsafe pickle. Nothing is unpickled."""
    if not os.path.isfile(path) or zipfile.is_zipfile(path):
        return
    damage = torch_file_damage(path)
    if damage is not None:
        raise CorruptCheckpointError(
            f'Could not load pretrained weights for {variant} from file {path}, which is corrupt or truncated, or not '
            f'a checkpoint at all: {damage}.\nTo fix: check that it is the file you meant, a complete {variant} '
            f'checkpoint, and download or convert the file again; or use pretrained=False.')


def _drop_state_dict_from_cfg(model: Any, source: Optional[str]) -> None:
    """Weights handed over in the cfg must not stay in ``pretrained_cfg`` (timm writes it to config.json); the cfg's
    ``source`` set aside for the load is restored."""
    for m in dict.fromkeys([model, getattr(model, 'model', model)]):  # features_only wraps the SHViT
        cfg = getattr(m, 'pretrained_cfg', None)
        if isinstance(cfg, dict) and 'state_dict' in cfg:
            m.pretrained_cfg = {k: v for k, v in cfg.items() if k != 'state_dict'}
            if source is not None:
                m.pretrained_cfg['source'] = source
            m.default_cfg = m.pretrained_cfg


def _check_given_state_dict(variant: str, kwargs: Dict[str, Any]) -> None:
    """Weights passed as ``pretrained_cfg_overlay=dict(state_dict=...)`` must be a mapping: timm asserts so with an
    empty message."""
    given = (kwargs.get('pretrained_cfg_overlay') or {}).get('state_dict')
    if given is not None and not isinstance(given, Mapping):
        how = ' (a whole model: pass model.state_dict())' if isinstance(given, torch.nn.Module) else ''
        raise TypeError(f'pretrained_cfg_overlay state_dict for {variant} must be a state dict (a dict of tensors) '
                        f'or a training checkpoint holding one, not {type(given).__name__}{how}.')


_NAMESPACE_LOCK = threading.Lock()


@contextlib.contextmanager
def _namespace_allowed() -> Iterator[None]:
    """``argparse.Namespace``, the only non-tensor object the official checkpoints pickle (``'args'``), allowed for
    torch's weights-only loads in the block. torch's allow-list is process-global: it is added only if missing, and
    taken out afterwards only then, so a caller's own allowance stays (found in review: leaving torch's
    ``safe_globals`` block removed it); one such block at a time, so that one load's exit does not take it from
    another's (timm's own file reader does the same without that care)."""
    with _NAMESPACE_LOCK:
        if argparse.Namespace in torch.serialization.get_safe_globals():
            yield
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                yield


def _create_shvit(variant: str, pretrained: bool = False, **kwargs: Any) -> SHViT:
    if pretrained:
        _check_given_state_dict(variant, kwargs)
    source = _weights_source(variant, kwargs) if pretrained else ''
    if kwargs.get('features_only') and kwargs.get('global_pool') == '':
        kwargs['global_pool'] = 'avg'  # no head in the feature model: the pooling a head needs does not matter
    try:
        restore_source = _read_model_not_ema(variant, kwargs) if pretrained else None
        # the official training checkpoints pickle their `args` (an argparse.Namespace): allowed for a URL as timm's
        # file reader allows it for a file (found by an audit: timm's weights-only download refused it)
        from_url = pretrained and _pretrained_source(variant, kwargs)[0] == 'url'
        with _namespace_allowed() if from_url else contextlib.nullcontext():
            model = build_model_with_cfg(
                SHViT, variant, pretrained,
                pretrained_filter_fn=partial(checkpoint_filter_fn, features_only=bool(kwargs.get('features_only')),
                                             strict=kwargs.get('pretrained_strict', True)),
                feature_cfg=dict(out_indices=(0, 1, 2), flatten_sequential=True),
                **kwargs,
            )
        damaged = _damaged_download(variant, kwargs) if pretrained else None  # loaded, with a member failing its CRC
        if damaged is not None:
            raise damaged
        _drop_state_dict_from_cfg(model, restore_source)
        return model
    except Exception as e:
        if not pretrained or not _raised_while_loading(e):
            raise
        missing = _missing_weight_file(variant, kwargs)
        if missing is not None:
            raise missing from e
        damaged = _damaged_download(variant, kwargs)  # before torch's words for the failure (unsafe pickle, ...)
        if damaged is not None:
            raise damaged from e
        if isinstance(e, (ClassifierSizeError, IncompleteCheckpointError, ExtraTensorsError, InputChannelsError,
                          CheckpointLayoutError, FusionMismatchError)):
            # its own class (a RuntimeError), so that `except shvit.FusionMismatchError` works around create_model
            # (found by an audit: a plain RuntimeError, the class only its __cause__, against docs/shvit.md)
            raise type(e)(f'Could not load pretrained weights for {variant} from {source}: {e}') from e
        bad_opcode = _unsupported_opcode(e)
        protocol = _unreadable_protocol(variant, kwargs) if bad_opcode is not None else None
        if protocol is not None:  # a complete file that safe loading does not read: neither damaged nor unsafe
            raise PickleProtocolError(f'Could not load pretrained weights for {variant} from {source}: {protocol}; or '
                                      f'use pretrained=False.') from e
        refused = _refused_global(e)
        if isinstance(e, CheckpointMismatchError):
            fix = 'use the entrypoint of the variant the checkpoint holds, or a checkpoint of ' + variant
        elif ('weights_only=True blocked' in str(e) or refused) and bad_opcode is None:
            fix = ('the file pickles Python objects other than tensors (named above), which are not loaded because '
                   'unpickling them can run code; if you trust the file, pass its tensors instead: obj = '
                   'torch.load(path, weights_only=False), then pretrained_cfg_overlay=dict(state_dict=obj) for a '
                   'state dict or training checkpoint, state_dict=obj.state_dict() for a whole saved model '
                   '(torch.save(model))')
        elif source.startswith('url '):  # the official release file (GitHub): not on the Hub under this tag
            fix = (f'if the file is missing (offline or empty cache), download {source[4:]} once and pass '
                   f'pretrained_cfg_overlay=dict(file="/path/to/{variant}.pth"); if it is corrupt or truncated, '
                   f'delete {download_cache_path(source[4:], kwargs.get("cache_dir"))} and load again, which '
                   f'downloads it again; or use the Hub weights {variant}.in1k')
        elif source.startswith('file '):  # a local file: no download advice
            fix = (f'check that {source[5:]} is a complete {variant} checkpoint (.safetensors, or a .pth state dict '
                   'or training checkpoint), or convert it again')
        else:
            repo = source.rpartition(' ')[2] if source.startswith('Hugging Face Hub repo ') else f'timm/{variant}.in1k'
            fix = _hub_fix(repo, e)
        # a download that failed (timm's own models raise an OSError there); a local file that exists (missing
        # ones were handled above) and fails to load is damaged, not unavailable, whatever torch.load raised
        unavailable = not source.startswith('file ') and any(isinstance(c, OSError) for c in _causes(e, context=False))
        unreadable = not unavailable and not refused and (bad_opcode is not None or _raised_while_reading(e))
        reason = f'{type(e).__name__}: {e}' if bad_opcode is None else (
            f'UnpicklingError: {bad_opcode} (the file is not a pickle that torch.save writes)')
        if refused:  # torch's own words would advise weights_only=False without a word on what the file holds
            where = download_cache_path(source[4:], kwargs.get('cache_dir')) if source.startswith('url ') else 'it'
            reason = f'{type(e).__name__}: {where} pickles {refused}, which weights_only=True does not allow'
        kind = WeightsUnavailableError if unavailable else CorruptCheckpointError if unreadable else \
            type(e) if isinstance(e, CheckpointMismatchError) else RuntimeError
        raise kind(
            f'Could not load pretrained weights for {variant} from {source}: {reason}\n'
            f'To fix: {fix}; or use pretrained=False.') from e


def _refused_global(error: BaseException) -> Optional[str]:
    """The global torch's weights-only unpickler refused ("Unsupported global: GLOBAL module.Name") when ``error`` is
    that refusal itself, as timm's url loader lets it through (its file loader words it "weights_only=True blocked");
    else None. A url source's file gets here only once it passed the checks for damage (``_damaged_download``): a
    complete file that pickles that global."""
    if not isinstance(error, pickle.UnpicklingError):
        return None
    found = re.search(r'Unsupported global: GLOBAL ([\w.]+)', str(error))
    return found.group(1) if found else None


def _unsupported_opcode(error: BaseException) -> Optional[str]:
    """timm reports every refusal of torch's weights-only unpickler as "blocked ... non-allowlisted pickle globals";
    one of an opcode it does not read at all ("Unsupported operand 80") means the bytes are no torch.save pickle (a
    zip archive cut to its first bytes, ``PK``, reads as the PERSID opcode): a damaged file, not an unsafe one.
    Returns the unpickler's words for it, else None."""
    for cause in _causes(error):
        found = re.search(r'Unsupported operand \S+', str(cause)) if isinstance(cause, pickle.UnpicklingError) else None
        if found:
            return found.group(0)
    return None


def _causes(error: Optional[BaseException], context: bool = True) -> Iterator[BaseException]:
    """``error`` and what it was raised from (``__cause__``; without one, with ``context``, the exception that was
    being handled), innermost last."""
    seen = set()
    while error is not None and id(error) not in seen:
        yield error
        seen.add(id(error))
        error = error.__cause__ or (error.__context__ if context else None)


def _entry(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> SHViT:
    return _create_shvit(variant, pretrained=pretrained, **dict(VARIANTS[variant], **kwargs))


@register_model
def shvit_s1(pretrained: bool = False, **kwargs: Any) -> SHViT:
    """SHViT-S1 (224px, 6.3M params fused, 241M MACs, 72.8% top-1)."""
    return _entry('shvit_s1', pretrained, kwargs)


@register_model
def shvit_s2(pretrained: bool = False, **kwargs: Any) -> SHViT:
    """SHViT-S2 (224px, 11.4M params fused, 366M MACs, 75.2% top-1)."""
    return _entry('shvit_s2', pretrained, kwargs)


@register_model
def shvit_s3(pretrained: bool = False, **kwargs: Any) -> SHViT:
    """SHViT-S3 (224px, 14.2M params fused, 601M MACs, 77.4% top-1)."""
    return _entry('shvit_s3', pretrained, kwargs)


@register_model
def shvit_s4(pretrained: bool = False, **kwargs: Any) -> SHViT:
    """SHViT-S4 (256px, 16.5M params fused, 986M MACs, 79.4% top-1)."""
    return _entry('shvit_s4', pretrained, kwargs)
