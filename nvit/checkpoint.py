"""Reading NViT checkpoints: safe loading, official-format conversion, dims records and dims checks.

Two layouts are understood:

* **official** (``NVlabs/NViT`` ``ft_checkpoint.pth``): ``{'model': state_dict, 'dim': {EMB, head, QK, V, MLP},
  'args': argparse.Namespace, ...}``; the patch embedding is a 1x1 conv ``[EMB, 768, 1, 1]`` on pixels rearranged
  to (p1 p2 c) channel order; q/k/v are separate ``attn.qkv.{Q,K,V}``; the projection is ``attn.proj.proj``.
* **ours** (``NViT.state_dict()``): 16x16 conv patch embedding, fused ``attn.qkv`` split unevenly into
  ``[H*QK, H*QK, H*V]``, ``attn.proj``, ``attn.token_mask``. Our safetensors files carry the dims as JSON in the
  metadata key ``nvit_dims``.
"""
import argparse
import json
import os
import pickle
import re
import warnings
import zipfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models._input import get_pretrained_grid_size

from .attention import resample_token_mask
from .dims import NViTDims, resolve_dims
from .download_cache import torch_file_damage, unreadable_protocol_text
from .torch_legacy import LEGACY_HEAD_SIZE, starts_as_legacy_file

__all__ = [
    'DIMS_METADATA_KEY', 'load_checkpoint', 'checkpoint_filter_fn', 'convert_official', 'dims_from_state_dict',
    'check_dims_match', 'dims_metadata', 'describe_foreign_checkpoint', 'ClassifierSizeError',
    'IncompatibleCheckpointError', 'CorruptCheckpointError', 'PickleProtocolError',
]

DIMS_METADATA_KEY = 'nvit_dims'
# the only non-tensor object the official checkpoints pickle ('args'); nothing else is ever unpickled
_SAFE_GLOBALS = [argparse.Namespace]
_BLOCK_RE = re.compile(r'^blocks\.(\d+)\.')

StateDict = Dict[str, torch.Tensor]


class IncompatibleCheckpointError(ValueError):
    """The checkpoint does not fit the model (another model, other dims, distilled or not, token scales, tensors
    missing or extra), or lacks what loading it needs (a dims record); the message says which and what to do. A
    ValueError, as these errors were before 2026-11-25."""


class CorruptCheckpointError(RuntimeError):
    """The weight file cannot be read: truncated, damaged, or not a checkpoint at all."""


class PickleProtocolError(RuntimeError):
    """The weight file is a complete ``torch.save`` file saved in a pickle protocol that safe loading
    (``torch.load(weights_only=True)``) does not read, e.g. ``torch.save(..., pickle_protocol=4)``: neither damaged nor
    known to be unsafe; to be re-saved in torch's default protocol."""


def dims_metadata(model_or_dims: Union[torch.nn.Module, NViTDims]) -> Dict[str, str]:
    """Safetensors metadata recording an NViT's dims: ``{'nvit_dims': '<json>'}``."""
    dims = model_or_dims if isinstance(model_or_dims, NViTDims) else getattr(model_or_dims, 'dims', None)
    if not isinstance(dims, NViTDims):
        raise TypeError(f'dims_metadata needs an NViT model or NViTDims, got {type(model_or_dims).__name__}.')
    return {DIMS_METADATA_KEY: dims.to_json()}


def _unreadable(path: str, e: BaseException) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f'Cannot read checkpoint {path!r}: {type(e).__name__}: {e}. The file is probably truncated or corrupt '
        f'(an interrupted download?); delete it and download it again.')


def _load_torch_file(path: str) -> Any:
    """``torch.load(weights_only=True)`` allowing only ``argparse.Namespace`` beyond tensors and containers.

    A zip archive (torch.save's format since 1.6) is CRC-checked first: ``torch.load`` skips the CRCs and would
    return damaged tensors. Any other file is checked first to be a complete ``torch.save`` file
    (``torch_file_damage``: a legacy file walked to its end, a zip archive without its end record, the first bytes of
    anything else): ``torch.load`` reports a file cut short, or no ``torch.save`` file at all, with whatever its
    unpickler meets, at some cuts a global it does not allow (an "unsafe" pickle), and for bytes it cannot read with
    its advice to load the file with ``weights_only=False``.
    """
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        if damaged is not None:
            raise CorruptCheckpointError(
                f'Checkpoint {path!r} is corrupt: member {damaged} of the archive fails its CRC check. Copy or '
                f'download it again.')
    elif os.path.isfile(path):
        damage = torch_file_damage(path)
        if damage is not None:
            raise CorruptCheckpointError(
                f'Cannot read checkpoint {path!r}: {damage}. The file is truncated or corrupt, or not a checkpoint at '
                f'all; delete it and download or convert it again.')
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r'GLOBAL ([\w.]+)', str(e))
        protocol = unreadable_protocol_text(path) if 'Unsupported operand' in str(e) else None
        if protocol is not None:  # checked complete above: neither damaged nor unsafe, only not read by safe loading
            raise PickleProtocolError(f'NViT checkpoint {protocol}.') from None
        if found is None:
            raise _unreadable(path, e) from e
        raise RuntimeError(
            f'Refusing to load {path!r}: it pickles {found.group(1)}, which is not allowed. For safety NViT '
            f'checkpoints are unpickled with weights_only=True and only argparse.Namespace allowed (arbitrary '
            f'pickled objects can run code). If you trust this file, load it yourself with '
            f'torch.load(path, weights_only=False) and pass the state dict through '
            f'pretrained_cfg_overlay=dict(state_dict=...).') from None
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001  on bytes that are no pickle the unpickler raises anything (text: KeyError)
        raise _unreadable(path, e) from e


def _load_safetensors_file(path: str) -> Tuple[StateDict, Dict[str, str]]:
    from safetensors import safe_open
    try:
        with safe_open(path, framework='pt', device='cpu') as f:
            metadata = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError for bad headers / short files
        raise _unreadable(path, e) from e


def is_official_layout(state_dict: Mapping[str, Any]) -> bool:
    """True for the official key layout (separate attn.qkv.Q/K/V)."""
    return any(k.endswith('attn.qkv.Q.weight') for k in state_dict)


def describe_foreign_checkpoint(state_dict: Mapping[str, Any]) -> Optional[str]:
    """Say what a checkpoint looks like if it is clearly not an NViT one (None if it could be one)."""
    keys = list(state_dict)
    odd = next((k for k in keys if not isinstance(k, str)), None)
    if odd is not None:  # found by an audit: an AttributeError traceback in `vitzoo convert`
        return (f'not a state dict: its key {odd!r} is of type {type(odd).__name__}, where a state dict has parameter '
                f'names (first keys: {keys[:4]})')
    if any(k.startswith('patch_embed.0.c.') for k in keys) or any('.mixer.' in k for k in keys):
        return 'a SHViT checkpoint (keys like patch_embed.0.c.weight); load it with an shvit_* model'
    pruning = next((k for k in keys if k.endswith('attn.qkv.head_mask.weight') or k.endswith('attn.qkv.Q.weight')
                    and getattr(state_dict[k], 'ndim', 2) == 3), None)
    if pruning is not None:  # found by an audit: it was called a timm ViT and told to pass dims=, which cannot load it
        return (f'an NViT pruning-time checkpoint (full-size, pruned parts zeroed, per-head tensors such as '
                f'{pruning}), not a dense NViT one: make it dense first with the NViT repository\'s finetune_dense.py '
                f'(it folds attn.qkv.head_mask into Q/K/V and drops the zeroed rows and columns), or use a released '
                f'NViT-B/H/S/T checkpoint; this package does not convert the pruning-time format')
    if not any(_BLOCK_RE.match(k) for k in keys) or 'pos_embed' not in state_dict:
        nested = [k for k, v in state_dict.items()
                  if isinstance(v, Mapping) and any(isinstance(n, str) and _BLOCK_RE.match(n) for n in v)]
        if nested:  # e.g. only 'model_ema' (found by an audit: named "not an NViT/ViT checkpoint", without advice)
            head = (f"a training checkpoint that holds its weights under {nested} (top-level keys: {keys[:8]}), not "
                    f"under 'model' or 'state_dict', so which ones to load is not known. ")
            if 'dim' in state_dict:  # the official dims record stays beside the weights
                return (f"{head}Save the weights you want with the dims record and load that: ck = torch.load(PATH); "
                        f"torch.save({{'model': ck[{nested[0]!r}], 'dim': ck['dim']}}, 'weights.pth')")
            return (f"{head}Save the weights you want as a plain state dict and load that: "
                    f"torch.save(torch.load(PATH)[{nested[0]!r}], 'weights.pth')")
        return f'not an NViT/ViT checkpoint (no blocks.N.* / pos_embed keys; first keys: {keys[:4]})'
    return None


def _as_foreign(description: str) -> str:
    """``describe_foreign_checkpoint``'s words, ending in "not an NViT checkpoint" once (not after advice)."""
    done = description.startswith(('not ', 'a training checkpoint'))
    return description if done else f'{description}, not an NViT checkpoint'


def _looks_like_timm_vit(state_dict: Mapping[str, Any]) -> bool:
    return not is_official_layout(state_dict) and not any(k.endswith('attn.token_mask') for k in state_dict)


_OFFICIAL_QKV_RE = re.compile(r'^(.*)\.attn\.qkv\.([QKV])\.(weight|bias)$')


def _official_qkv_parts(state_dict: Mapping[str, torch.Tensor], prefix: str, kind: str) -> List[torch.Tensor]:
    """A block's separate official Q, K and V tensors (``weight`` or ``bias``), checked to be all there and of one
    input width, in the order of our fused ``qkv``."""
    names = [f'{prefix}.attn.qkv.{n}.{kind}' for n in 'QKV']
    missing = [n for n in names if n not in state_dict]
    if missing:
        raise IncompatibleCheckpointError(
            f'Official-layout NViT checkpoint without {missing}: a block needs its Q, K and V {kind} together (they '
            f'are merged into {prefix}.attn.qkv.{kind}). The file is incomplete; download it again.')
    parts = [state_dict[n] for n in names]
    if kind == 'weight' and len({tuple(t.shape[1:]) for t in parts}) > 1:
        raise IncompatibleCheckpointError(
            f'Official-layout NViT checkpoint: Q, K and V of {prefix} take inputs of different widths '
            f'({", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, parts))}); they must share the embedding '
            'width. The file is damaged or not an NViT checkpoint.')
    return parts


def convert_official(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Official layout -> ours. Tensors already in our layout pass through unchanged: the official 1x1 patch
    embedding is converted only in a checkpoint with the official attention keys (found by an audit: our own
    ``patch_size=1`` model's 1x1 embedding was taken for it, and its reload failed or was reshaped)."""
    official = is_official_layout(state_dict) or any('.attn.proj.proj.' in k for k in state_dict)
    out: StateDict = {}
    for k, v in state_dict.items():
        if official and k == 'patch_embed.proj.weight' and v.ndim == 4 and v.shape[-1] == 1 and v.shape[-2] == 1:
            # 1x1 conv over pixels rearranged 'b c (h p1) (w p2) -> b (p1 p2 c) h w' == p x p conv, (c, p1, p2)
            emb, flat = v.shape[:2]
            patch = int(round((flat // 3) ** 0.5))
            if patch * patch * 3 != flat:
                raise IncompatibleCheckpointError(
                    f'patch_embed.proj.weight {tuple(v.shape)}: {flat} input channels is not 3*p*p.')
            out[k] = v.reshape(emb, patch, patch, 3).permute(0, 3, 1, 2).contiguous()
        elif (qkv := _OFFICIAL_QKV_RE.match(k)) is not None:
            prefix, kind = qkv.group(1, 3)
            merged = f'{prefix}.attn.qkv.{kind}'
            if merged not in out:  # the first of Q, K, V met takes all three
                out[merged] = torch.cat(_official_qkv_parts(state_dict, prefix, kind), dim=0)
        elif k.endswith('.attn.qkv.token_mask'):
            out[k.replace('.attn.qkv.token_mask', '.attn.token_mask')] = v
        elif '.attn.proj.proj.' in k:
            out[k.replace('.attn.proj.proj.', '.attn.proj.')] = v
        else:
            out[k] = v
    return out


def _num_blocks(state_dict: Mapping[str, Any]) -> int:
    found = [int(m.group(1)) for m in map(_BLOCK_RE.match, state_dict) if m]
    return max(found) + 1 if found else 0


_Widths = Tuple[int, int, int]


def _present_block_widths(state_dict: Mapping[str, torch.Tensor]) -> Tuple[Optional[int], Dict[int, _Widths]]:
    """Like ``_block_widths`` for a partial state dict: the embedding width if ``pos_embed`` is there, and the total
    widths of the blocks whose q/k/v, projection and first MLP weights are all there."""
    embed = state_dict.get('pos_embed')
    widths = {}
    for i in range(_num_blocks(state_dict)):
        names = [f'blocks.{i}.attn.qkv.weight', f'blocks.{i}.attn.proj.weight', f'blocks.{i}.mlp.fc1.weight']
        if all(n in state_dict for n in names):
            qkv, proj, fc1 = (state_dict[n].shape for n in names)
            widths[i] = ((qkv[0] - proj[1]) // 2, proj[1], fc1[0])
    return (None if embed is None else embed.shape[-1]), widths


def _block_widths(state_dict: Mapping[str, torch.Tensor]) -> Tuple[int, List[Tuple[int, int, int]]]:
    """Embedding width and per-block total (q/k, v, mlp) widths from an our-layout state dict."""
    widths: List[Tuple[int, int, int]] = []
    try:
        embed_dim = state_dict['pos_embed'].shape[-1]
        for i in range(_num_blocks(state_dict)):
            qkv_rows = state_dict[f'blocks.{i}.attn.qkv.weight'].shape[0]
            v_total = state_dict[f'blocks.{i}.attn.proj.weight'].shape[1]
            mlp = state_dict[f'blocks.{i}.mlp.fc1.weight'].shape[0]
            widths.append(((qkv_rows - v_total) // 2, v_total, mlp))
    except KeyError as e:
        block = f'blocks.{len(widths)}.'
        present = [k for k in state_dict if isinstance(k, str) and k.startswith(block)]
        if 'pos_embed' in state_dict and present:  # found by an audit: a stray tensor read as "not NViT"
            raise IncompatibleCheckpointError(
                f'Block {len(widths)} of the checkpoint is incomplete: it has {len(present)} tensor(s) (e.g. '
                f'{present[:3]}) but not {e}. The file is damaged or holds tensors of a deeper model; load the '
                f'complete checkpoint.') from None
        raise IncompatibleCheckpointError(f'Not an NViT state dict: missing key {e}.') from None
    return embed_dim, widths


def check_dims_match(dims: NViTDims, state_dict: Mapping[str, torch.Tensor], partial: bool = False) -> None:
    """Raise IncompatibleCheckpointError (a ValueError) naming every block whose widths in ``dims`` disagree with the
    weight shapes.

    With ``partial`` (a ``pretrained_strict=False`` load) tensors may be missing and blocks beyond ``dims.depth``
    may be there: only the widths the present weights show, of blocks the dims have, are compared.
    """
    if is_official_layout(state_dict):
        state_dict = convert_official(state_dict)
    problems = []
    widths: Sequence[Optional[_Widths]]
    if partial:
        embed_dim, present = _present_block_widths(state_dict)
        widths = [present.get(i) for i in range(dims.depth)]
    else:
        embed_dim, widths = _block_widths(state_dict)
        if len(widths) != dims.depth:
            problems.append(f'depth {dims.depth} vs weights {len(widths)} blocks')
    if embed_dim is not None and embed_dim != dims.embed_dim:
        problems.insert(0, f'embed_dim {dims.embed_dim} vs weights {embed_dim}')
    for i, found in enumerate(widths[:dims.depth]):
        if found is None:
            continue
        qk, v, mlp = found
        want = (dims.heads[i] * dims.qk_dim[i], dims.heads[i] * dims.v_dim[i], dims.mlp_dim[i])
        if want != (qk, v, mlp):
            problems.append(f'block {i}: heads*qk, heads*v, mlp = {want} vs weights {(qk, v, mlp)}')
    if problems:
        raise IncompatibleCheckpointError('NViT dims do not match the checkpoint weights: ' + '; '.join(problems) + '.')


def dims_from_state_dict(
        state_dict: Mapping[str, torch.Tensor],
        heads: Union[int, Sequence[int]],
) -> NViTDims:
    """Infer dims from weight shapes (either layout).

    Weight shapes give only total widths per block (heads*qk, heads*v, mlp); the head split is a reshape, so the
    head counts must be given.

    Args:
        state_dict: Official or our-layout state dict.
        heads: Heads per block (one int for all blocks, or a list).
    """
    if is_official_layout(state_dict):
        state_dict = convert_official(state_dict)
    embed_dim, widths = _block_widths(state_dict)
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(widths)
    if len(heads) != len(widths):
        raise ValueError(f'dims_from_state_dict: {len(heads)} head counts given for {len(widths)} blocks.')
    qk, v = [], []
    for i, ((qk_t, v_t, _), h) in enumerate(zip(widths, heads)):
        if isinstance(h, bool) or not isinstance(h, int) or h < 1:
            raise ValueError(f'dims_from_state_dict: block {i}: a head count must be a whole number >= 1, got {h!r}.')
        if qk_t % h or v_t % h:
            raise ValueError(f'block {i}: q/k width {qk_t} or v width {v_t} is not divisible by {h} heads.')
        qk.append(qk_t // h)
        v.append(v_t // h)
    return NViTDims(embed_dim, heads, qk, v, [w[2] for w in widths])


_WRAPPER_PREFIXES = ('module.', '_orig_mod.')  # DistributedDataParallel / DataParallel, torch.compile


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Remove a ``module.`` / ``_orig_mod.`` prefix carried by every key (repeatedly: ``module._orig_mod.``)."""
    sd = dict(state_dict)
    while sd:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(isinstance(k, str) and k.startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def take_nested_model(state_dict: StateDict, path: str = '<state_dict>') -> StateDict:
    """A ViT whose keys all carry one prefix (``backbone.`` in a detector's checkpoint, ``model.`` in a Lightning
    one) beside other parts' tensors: its own tensors without the prefix, with a ``UserWarning`` naming what is left
    out. A prefix counts only when a ViT is under it (``pos_embed`` and ``blocks.N.*``: not NesT's ``levels.N.``
    nor a CLIP ResNet's attention-pooling head). Two ViTs (a teacher and a student) are an error naming them."""
    if 'pos_embed' in state_dict:
        return state_dict
    keys = [k for k in state_dict if isinstance(k, str)]
    prefixes = sorted(k[:-len('pos_embed')] for k in keys if k.endswith('.pos_embed')
                      and any(_BLOCK_RE.match(other[len(k) - len('pos_embed'):])
                              for other in keys if other.startswith(k[:-len('pos_embed')])))
    if len(prefixes) > 1:
        raise IncompatibleCheckpointError(
            f'{path} holds {len(prefixes)} ViTs, under {prefixes}, so which one to load is not known. Save the one '
            f'you want as a plain state dict (its keys without the prefix) and load that.')
    if not prefixes:
        return state_dict
    inner = {k[len(prefixes[0]):]: v for k, v in state_dict.items() if k.startswith(prefixes[0])}
    if len(inner) < len(state_dict):
        others = [k for k in state_dict if not k.startswith(prefixes[0])]
        warnings.warn(f'Loading the ViT under {prefixes[0]!r} in {path} ({len(inner)} tensors); its {len(others)} '
                      f'other tensors belong to other parts (e.g. {others[:3]}) and are left out.',
                      UserWarning, stacklevel=2)
    return inner


def _inner_state_dict(obj: Mapping[str, Any]) -> Optional[str]:
    """The key holding the weights of a training checkpoint (``model``: official / DeiT, ``state_dict``: timm)."""
    return next((k for k in ('model', 'state_dict') if isinstance(obj.get(k), Mapping)), None)


def _from_torch_object(obj: Any, path: str) -> Tuple[StateDict, Optional[NViTDims], Dict[str, str]]:
    if not isinstance(obj, Mapping):
        raise IncompatibleCheckpointError(f'{path}: expected a dict checkpoint, got {type(obj).__name__}.')
    inner = _inner_state_dict(obj)
    if inner is not None:
        meta = {'format': 'official' if 'dim' in obj else 'torch-dict'}
        if isinstance(obj.get('args'), argparse.Namespace):
            meta['args'] = json.dumps({k: str(v) for k, v in vars(obj['args']).items()})
        record = obj.get('dim')
        record = obj.get(DIMS_METADATA_KEY) if record is None else record
        dims = _file_dims(record, path) if record is not None else None
        return dict(obj[inner]), dims, meta  # _finish strips the wrapper prefixes
    if DIMS_METADATA_KEY in obj:
        sd = {k: v for k, v in obj.items() if k != DIMS_METADATA_KEY}
        return sd, _file_dims(obj[DIMS_METADATA_KEY], path), {'format': 'nvit'}
    return dict(obj), None, {'format': 'state_dict'}


def _file_dims(record: Any, path: str) -> NViTDims:
    """A checkpoint's own dims record as ``NViTDims``; a malformed one is the checkpoint's fault, not the caller's."""
    try:
        return resolve_dims(record)
    except (ValueError, TypeError) as e:
        raise IncompatibleCheckpointError(
            f'{path}: its NViT dims record is invalid ({e}). Convert the checkpoint again, or load its state dict with '
            f'the dims given: pretrained_cfg_overlay=dict(state_dict=...) and dims=...') from e


def read_checkpoint_object(
        obj: Any,
        path: str = '<state_dict>',
) -> Tuple[StateDict, Optional[NViTDims], Dict[str, str]]:
    """Like ``load_checkpoint`` for an object already in memory (an official dict or a state dict)."""
    sd, dims, meta = _from_torch_object(obj, path)
    return _finish(sd, dims, meta, path)


def _finish(
        sd: StateDict,
        dims: Optional[NViTDims],
        meta: Dict[str, str],
        path: str,
) -> Tuple[StateDict, Optional[NViTDims], Dict[str, str]]:
    sd = take_nested_model(strip_wrapper_prefixes(sd), path)
    foreign = describe_foreign_checkpoint(sd)
    if foreign is not None:
        raise IncompatibleCheckpointError(f'{path} is {_as_foreign(foreign)}.')
    sd = convert_official(sd)
    if dims is not None:
        check_dims_match(dims, sd)
    return sd, dims, meta


def _check_named_by_content(path: str) -> None:
    """The file is read by its name, as timm reads weight files (``.safetensors``: safetensors, any other:
    ``torch.load``): a file of the other format (a safetensors file named ``.bin``) is refused with what it is and the
    name to give it, not read as a corrupt file."""
    with open(path, 'rb') as f:
        head = f.read(LEGACY_HEAD_SIZE)
    # a torch.save file starts with a zip archive's local header, or (legacy format) a pickle of torch's magic number
    is_torch = head.startswith(b'PK\x03\x04') or starts_as_legacy_file(head)
    named_safetensors = path.endswith('.safetensors')
    stem = os.path.splitext(os.path.basename(path))[0]
    if not is_torch and head[8:9] == b'{' and not named_safetensors:
        real, named, new = 'a safetensors file', 'a torch.save file', stem + '.safetensors'
    elif is_torch and named_safetensors:
        real, named, new = 'a torch.save file', 'a safetensors file', stem + '.pth'
    else:
        return
    raise RuntimeError(f'NViT weight file {path!r} is {real}, but its name says {named}, and it is read by the name '
                       f'(.safetensors: safetensors, any other: torch.load), as timm reads weight files. Rename it to '
                       f'{new}.')


def load_checkpoint(path: Union[str, os.PathLike]) -> Tuple[StateDict, Optional[NViTDims], Dict[str, str]]:
    """Read an NViT checkpoint file safely.

    Accepts official ``.pth`` files (dims from ``'dim'``), our ``.safetensors`` (dims from metadata ``nvit_dims``)
    and plain state-dict ``.pth``/``.bin`` files (dims unknown).

    Returns:
        ``(state_dict, dims, metadata)``: the state dict in our layout, the dims record (None when the file has
        none), and string metadata (``format``, plus safetensors metadata or the official ``args`` as JSON).

    Raises:
        CorruptCheckpointError: the file is truncated or corrupt (a RuntimeError).
        RuntimeError: the file would need unpickling something other than tensors and ``argparse.Namespace``.
        IncompatibleCheckpointError: the file is not an NViT checkpoint (e.g. SHViT), or its dims record is invalid
            or disagrees with its weights (a ValueError).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise FileNotFoundError(
            f'{path!r} is a folder, not an NViT weight file: give the file in it (e.g. '
            f'{os.path.join(path, "model.safetensors")!r}), or load a converted folder with '
            f'timm.create_model("local-dir:{path}", pretrained=True).')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'NViT weight file {path!r} does not exist; check the path.')
    _check_named_by_content(path)
    if path.endswith('.safetensors'):
        sd, meta = _load_safetensors_file(path)
        dims = _file_dims(meta[DIMS_METADATA_KEY], path) if DIMS_METADATA_KEY in meta else None
        meta.setdefault('format', 'nvit' if dims is not None else 'safetensors')
    else:
        sd, dims, meta = _from_torch_object(_load_torch_file(path), path)
    return _finish(sd, dims, meta, path)


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: torch.nn.Module,
                         features_only: bool = False, strict: bool = True) -> StateDict:
    """timm pretrained filter: official or our layout -> ``model``'s, resampling position embedding / token scales.

    Accepts a full training checkpoint dict (weights under ``'model'`` or ``'state_dict'``) too, and keys wrapped
    by DDP (``module.``) or ``torch.compile`` (``_orig_mod.``). With ``features_only`` (the model is built for
    ``features_only=True``, whose classifier timm drops) the checkpoint's classifier is not checked, so a fine-tuned
    or headless checkpoint loads. ``strict=False`` (``pretrained_strict=False``) lets tensors be missing (the model
    keeps their initialisation) or extra (timm skips them), with a ``UserWarning`` naming them; another model's
    checkpoint, a distilled / non-distilled mismatch, other input channels, a classifier of another size and other
    tensor shapes are still errors.
    """
    inner = _inner_state_dict(state_dict)
    if inner is not None:
        state_dict = state_dict[inner]
    state_dict = take_nested_model(
        strip_wrapper_prefixes({k: v for k, v in state_dict.items() if k != DIMS_METADATA_KEY}))
    foreign = describe_foreign_checkpoint(state_dict)
    if foreign is not None:
        raise IncompatibleCheckpointError(f'This is {_as_foreign(foreign)}.')
    out = convert_official(state_dict)
    _check_dtypes(out, model)
    _check_distilled(out, model, strict and not features_only)
    grid = list(model.patch_embed.grid_size)
    prefix = model.num_prefix_tokens
    source = _source_grid(model, out, out['pos_embed'].shape[1] - prefix)
    if source != grid:
        out['pos_embed'] = resample_abs_pos_embed(
            out['pos_embed'], new_size=grid, old_size=source, num_prefix_tokens=prefix)
        for k in [k for k in out if k.endswith('attn.token_mask')]:
            out[k] = resample_token_mask(out[k], grid, source, prefix)
    _check_in_chans(out, model)
    _fit_patch_size(out, model)
    if not features_only:
        _check_classifier(out, model, strict)
    if strict:
        _check_norm_placement(out, model)
        _check_complete(out, model)
    else:
        _warn_partial(out, model, features_only)
    return out


class ClassifierSizeError(RuntimeError):
    """The checkpoint's classifier has another number of classes than the model that is to load it."""


class WeightsUnavailableError(RuntimeError, OSError):
    """The pretrained weights could not be downloaded (offline, unreachable URL): a RuntimeError, and an OSError like
    timm's own download errors, so that ``except OSError`` fallbacks written for timm's models work here too."""


def _check_dtypes(state_dict: Mapping[str, Any], model: torch.nn.Module) -> None:
    """A floating-point tensor of the model takes floating-point weights only: ``load_state_dict`` would cast integer
    or boolean ones (a quantised checkpoint, a mask) into it without a word (found by an audit)."""
    own = model.state_dict()
    wrong = [k for k, v in state_dict.items() if k in own and isinstance(v, torch.Tensor)
             and own[k].is_floating_point() and not v.is_floating_point()]
    if wrong:
        k = wrong[0]
        raise IncompatibleCheckpointError(
            f'Checkpoint tensor {k} is {state_dict[k].dtype} where the model\'s is {own[k].dtype} ({len(wrong)} such '
            f'tensor(s), e.g. {wrong[:3]}): integer or boolean values would be cast into the weights. Give a '
            f'floating-point checkpoint (float32, float16 or bfloat16); a quantised one must be dequantised first.')


def _check_classifier(state_dict: Mapping[str, Any], model: torch.nn.Module, strict: bool = True) -> None:
    """A classifier timm will load (the model's ``num_classes`` is its cfg's) must have the model's size; timm drops
    it only when they differ. Say so instead of torch's size-mismatch list. Without ``strict`` a checkpoint without
    a classifier is let through (the missing keys are warned about)."""
    weight = state_dict.get('head.weight')
    cfg_classes = (getattr(model, 'pretrained_cfg', None) or {}).get('num_classes')
    if cfg_classes != model.num_classes or (weight is None and model.num_classes <= 0):
        return
    if weight is None and not strict:
        return
    if weight is None:
        raise ClassifierSizeError(
            f'The checkpoint has no classifier (head), and the model\'s {model.num_classes} classes are those of the '
            f'pretrained cfg, so timm loads it strictly. Create the model with num_classes=0 for features, or with '
            f'the number of classes you will train (a new classifier on the checkpoint\'s body), or pass '
            f'pretrained_strict=False to keep the model\'s new classifier (with a warning).')
    if weight.shape[0] == model.num_classes:
        return
    # timm keeps a checkpoint's classifier only when num_classes is the pretrained cfg's: give the count to both
    n = weight.shape[0]
    raise ClassifierSizeError(
        f'The checkpoint\'s classifier (head) has {n} outputs, the model\'s {model.num_classes}. To load it, give the '
        f'count to the model and to its pretrained cfg: timm.create_model(..., pretrained=True, num_classes={n}, '
        f'pretrained_cfg_overlay=dict(file=..., num_classes={n})) (num_classes={n} alone makes timm drop this '
        f'classifier and start a new one); vitzoo convert: --num-classes {n}.')


def _check_distilled(state_dict: Mapping[str, Any], model: torch.nn.Module, strict: bool = True) -> None:
    """A distillation token changes every block's attention, so it cannot be added or dropped while loading. A
    distillation head without the token, or (``strict``) the token and the head without the distillation head, is
    a damaged file (found by an audit: named as a position embedding of a non-square grid, or by torch's raw
    missing-keys list)."""
    has_dist = 'dist_token' in state_dict
    if 'head_dist.weight' in state_dict and not has_dist:
        raise IncompatibleCheckpointError(
            'The checkpoint has a distillation head (head_dist) but no distillation token (dist_token), which a '
            'distilled model has beside it: the file is damaged or was edited; load the complete checkpoint.')
    if strict and has_dist and 'head.weight' in state_dict and 'head_dist.weight' not in state_dict:
        raise IncompatibleCheckpointError(
            'The checkpoint is distilled (it has dist_token) and has its classifier (head) but not the distillation '
            'head (head_dist): the file is damaged or was edited; load the complete checkpoint. '
            f'{_STRICT_OPT_OUT}')
    if has_dist == (model.num_prefix_tokens == 2):
        return
    if has_dist:
        raise IncompatibleCheckpointError(
            'The checkpoint is distilled (it has dist_token and head_dist) and the model is not: create it with '
            'distilled=True (what the nvit_* names pick by themselves for such a checkpoint).')
    raise IncompatibleCheckpointError(
        'The checkpoint is not distilled (no dist_token / head_dist) and the model is: create it with distilled=False.')


def _check_in_chans(state_dict: Mapping[str, Any], model: torch.nn.Module) -> None:
    """The checkpoint's patch embedding must take the model's input channels, or the channels the pretrained cfg
    declares (``input_size[0]``), from which timm adapts it to the model's (``adapt_input_conv``); otherwise timm
    stops with "inconsistent with input_size", which does not say what to pass."""
    weight = state_dict.get('patch_embed.proj.weight')
    declared = ((getattr(model, 'pretrained_cfg', None) or {}).get('input_size') or (3,))[0]
    if weight is None or weight.ndim != 4 or weight.shape[1] in (model.in_chans, declared):
        return
    n = weight.shape[1]
    raise IncompatibleCheckpointError(
        f'The checkpoint\'s patch embedding (patch_embed.proj) takes {n} input channel{"s" * (n != 1)}, the model '
        f'{model.in_chans}. Create the model with in_chans={n} (vitzoo convert: --in-chans {n}). timm adapts a first '
        f'conv to another in_chans only from the channels the pretrained cfg declares (input_size[0], here '
        f'{declared}); to adapt this one to {model.in_chans}, pass in_chans={model.in_chans} and declare its {n}: '
        f'pretrained_cfg_overlay=dict(file=..., input_size=({n}, H, W)).')


def _fit_patch_size(state_dict: StateDict, model: torch.nn.Module) -> None:
    """A model created with another ``patch_size`` gets the patch embedding resampled (timm ViT's rule)."""
    weight = state_dict.get('patch_embed.proj.weight')
    want = tuple(model.patch_embed.proj.weight.shape[-2:])
    if weight is not None and weight.ndim == 4 and tuple(weight.shape[-2:]) != want:
        state_dict['patch_embed.proj.weight'] = resample_patch_embed(weight, list(want), verbose=False)


def _check_norm_placement(state_dict: Mapping[str, Any], model: torch.nn.Module) -> None:
    """The final norm must be where the checkpoint has it: on the tokens (``norm``) or after pooling (``fc_norm``,
    on by default for ``global_pool='avg'/'max'/'avgmax'``, as in timm's ViT). Say which ``fc_norm=`` loads it
    instead of listing missing tensors."""
    own = model.state_dict()
    tokens = 'on the tokens before pooling (norm)'
    pooled = "after pooling (fc_norm, the default for global_pool='avg', 'max' and 'avgmax')"
    # fc_norm=True alone keeps token pooling: most such checkpoints were trained with avg pooling (timm's fc_norm
    # default), and loaded with fc_norm=True they gave other outputs (found by an audit)
    to_pooled = ("the pooling it was trained with: global_pool='avg' (or 'max', 'avgmax'; timm then puts the norm "
                 "after pooling), or fc_norm=True for token pooling with the norm on the class token")
    for key, other, fix, file_has, model_has in (('norm.weight', 'fc_norm.weight', 'fc_norm=False', tokens, pooled),
                                                 ('fc_norm.weight', 'norm.weight', to_pooled, pooled, tokens)):
        if key in state_dict and other not in state_dict and other in own and key not in own:
            raise IncompatibleCheckpointError(
                f'The checkpoint applies its final norm {file_has}, the model {model_has}. Create the model with '
                f'{fix} to load it.')


_CLASSIFIER_KEYS = ('head.weight', 'head.bias', 'head_dist.weight', 'head_dist.bias')


def _check_complete(state_dict: Mapping[str, Any], model: torch.nn.Module) -> None:
    """Every tensor the model has must come from the checkpoint, and nothing else, except a classifier of another
    size.

    timm loads non-strictly when ``num_classes`` differs from the checkpoint's (it drops the classifiers), which
    would let an incomplete checkpoint load with random tensors in the gaps, or extra tensors go unused.
    """
    own = model.state_dict()
    scales = [k for k in state_dict if k.endswith('attn.token_mask') and k not in own]
    if scales and not any(k.endswith('attn.token_mask') for k in own):
        raise IncompatibleCheckpointError(
            f'The checkpoint has learned token scales ({len(scales)} attn.token_mask tensors) and the model was '
            f'created with token_mask=False: create it with token_mask=True to load them.')
    missing = [k for k in own if k not in state_dict and k not in _CLASSIFIER_KEYS]
    if not missing:
        # the same non-strict load would also skip tensors the model does not have, with only a logged warning
        unexpected = [k for k in state_dict if k not in own and k not in _CLASSIFIER_KEYS]
        if unexpected:
            raise IncompatibleCheckpointError(
                f'The checkpoint has {len(unexpected)} tensor{"s" * (len(unexpected) > 1)} that the model does not '
                f'have (e.g. {unexpected[:3]}): it was saved from a modified model. Load it into the model it was '
                f'saved from, or remove those tensors from the file. {_STRICT_OPT_OUT}')
        return
    hint = ''
    if all(k.endswith('attn.token_mask') for k in missing):
        hint = ' The checkpoint has no token scales: create the model with token_mask=False.'
    raise IncompatibleCheckpointError(
        f'The checkpoint is incomplete: {len(missing)} of the model\'s tensors are missing (e.g. {missing[:3]}); it '
        f'may be truncated or saved from a modified model.{hint} {_STRICT_OPT_OUT}')


_STRICT_OPT_OUT = ('To load on purpose only the tensors the two have in common (say, to start a modified model from '
                   'these weights), pass pretrained_strict=False: the model\'s other tensors keep their initialisation '
                   'and the checkpoint\'s others are skipped, with a warning naming them.')


def _warn_partial(state_dict: Mapping[str, Any], model: torch.nn.Module, features_only: bool) -> None:
    """``pretrained_strict=False``: warn (``UserWarning``) naming the model's tensors the checkpoint lacks, which keep
    their initialisation, and the checkpoint's tensors the model lacks, which timm skips. Classifiers that timm drops
    (``num_classes`` other than the cfg's, or ``features_only``) are no loss."""
    own = model.state_dict()
    cfg_classes = (getattr(model, 'pretrained_cfg', None) or {}).get('num_classes')
    dropped = _CLASSIFIER_KEYS if features_only or cfg_classes != model.num_classes else ()
    missing = [k for k in own if k not in state_dict and k not in dropped]
    unexpected = [k for k in state_dict if k not in own and k not in dropped]
    if missing or unexpected:
        warnings.warn(_partial_load_message(missing, unexpected), UserWarning, stacklevel=2)


def _partial_load_message(missing: List[str], unexpected: List[str], shown: int = 5) -> str:
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
    return 'Partial NViT load (pretrained_strict=False): ' + '; '.join(parts) + '.'


def _source_grid(model: torch.nn.Module, state_dict: Mapping[str, Any], patches: int) -> List[int]:
    """The checkpoint's patch grid: from the source's recorded ``img_size`` (timm's config.json ``model_args``,
    e.g. through ``local-dir:``; with its ``dynamic_img_pad``, the padded grid) if it accounts for every patch
    token, else the model's own grid if the counts agree, else the square grid of that many tokens."""
    weight = state_dict.get('patch_embed.proj.weight')
    recorded = get_pretrained_grid_size(model, weight, patches) or _padded_source_grid(model, weight, patches)
    if recorded is not None:
        return list(recorded)
    grid = list(model.patch_embed.grid_size)
    if grid[0] * grid[1] == patches:
        return grid
    side = int(round(patches ** 0.5))
    if side * side != patches:
        raise IncompatibleCheckpointError(
            f'The checkpoint\'s position embedding has {patches} patch tokens, which is not a square grid, and its '
            f'image size is not recorded, so it cannot be resampled to this model\'s {grid[0]}x{grid[1]} grid. Load '
            f'it through the folder with its config.json (timm.create_model("local-dir:PATH", pretrained=True, '
            f'img_size=...)), or create the model with the img_size the checkpoint was trained at.')
    return [side, side]


def _padded_source_grid(model: torch.nn.Module, weight: Any, patches: int) -> Optional[List[int]]:
    """The grid of a fixed-size source built with ``dynamic_img_pad=True`` at an ``img_size`` that is not a
    multiple of its patch (recorded in its config.json ``model_args``): ``ceil(img_size / patch)`` per side, as
    ``NViTPatchEmbed`` lays it out, if that accounts for every patch token; else None. (timm's
    ``get_pretrained_grid_size`` counts whole patches only; since 2026-11-25 such a source has a position
    embedding for the padded grid.)"""
    args = getattr(model, 'pretrained_model_args', None) or {}
    size = args.get('img_size')
    if not args.get('dynamic_img_pad') or args.get('dynamic_img_size') or size is None:
        return None
    if not isinstance(weight, torch.Tensor) or weight.ndim != 4:
        return None
    height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    grid = [-(-int(height) // weight.shape[-2]), -(-int(width) // weight.shape[-1])]
    return grid if grid[0] * grid[1] == patches else None


def foreign_or_missing_dims_error(variant: str, state_dict: Mapping[str, Any], where: str) -> ValueError:
    """The error for a checkpoint that carries no dims record."""
    if _looks_like_timm_vit(state_dict):
        return IncompatibleCheckpointError(
            f'{where} looks like a timm ViT/DeiT checkpoint (fused attn.qkv, no token scales, no NViT dims record), '
            f'not an NViT one. Convert a DeiT with nvit.from_vit(timm.create_model(...)), or pass '
            f'dims=NViTDims.uniform(...) to {variant} (vitzoo convert: --dims JSON_OR_FILE) if you really mean to '
            f'load it as an NViT. The second way keeps NViT\'s attention scale of 64**-0.5, which is right only for '
            f'64-wide heads (DeiT); for other head widths (ViT-H/14: 80) pass attn_scale=head_dim**-0.5 too, or use '
            f'from_vit, which sets it (vitzoo convert cannot).')
    return IncompatibleCheckpointError(
        f'{where} has no NViT dims record (official "dim" key or safetensors metadata "{DIMS_METADATA_KEY}"), and '
        f'head counts cannot be recovered from weight shapes. Pass dims=... to {variant} '
        f'(vitzoo convert: --dims JSON_OR_FILE, the record as JSON or a .json file; '
        f'nvit.dims_from_state_dict(state_dict, heads=...) can build them if you know the head counts).')
