"""Whether timm's cached download of URL-hosted weights is a complete ``torch.save`` file, checked without unpickling.

timm downloads a pretrained cfg's ``url`` once into the torch hub cache (``$TORCH_HOME/hub/checkpoints/<the URL's file
name>``, or the ``cache_dir=`` given to ``create_model``) and from then on loads that file. A file damaged there (an
interrupted copy, a disk error, an HTML page saved under the name) is reported by ``torch.load(weights_only=True)``
with whatever its unpickler meets, often as a pickle it refuses for safety, with the advice to load it with
``weights_only=False``: wrong, and unsafe, for a damaged file. The checks here (zip CRCs, the legacy format's
structure, the first bytes) tell a damaged file from an unsafe one. Hub weights are kept the same way, in the Hub
cache, and checked the same way; a Hub ``.safetensors`` file is checked by opening it with the safetensors reader.
A Hub file whose blob is named by a sha256 (a large file's, as the Hub client stores it) must also hash to it, which
catches bytes changed inside tensor data, where neither format has a checksum (a zip member's CRC aside).
The same module is in ``shvit`` and ``nvit`` (the model packages may not import each other).
"""
import hashlib
import os
import re
import tarfile
import zipfile
from typing import Optional, Union
from urllib.parse import urlparse

import torch

from .torch_legacy import LEGACY_HEAD_SIZE, legacy_file_cut, starts_as_legacy_file

__all__ = ['download_cache_path', 'torch_file_damage', 'safetensors_file_damage', 'hub_blob_hash_mismatch',
           'damaged_download_text', 'damaged_hub_file_text', 'saved_pickle_protocol', 'unreadable_protocol_text']

PathLike = Union[str, os.PathLike]
_ZIP_HEADER = b'PK\x03\x04'
_SHA256_NAME = re.compile(r'[0-9a-f]{64}')


def download_cache_path(url: str, cache_dir: Optional[PathLike] = None) -> str:
    """Where timm keeps its download of ``url``: ``cache_dir`` if given, else the ``checkpoints`` folder of torch's
    hub directory (``torch.hub.get_dir()``: ``$TORCH_HOME/hub``), under the last part of the URL's path (its query,
    e.g. Dropbox's ``?dl=1``, left out), as ``torch.hub.load_state_dict_from_url`` and timm's
    ``download_cached_file`` name it."""
    folder = cache_dir or os.path.join(torch.hub.get_dir(), 'checkpoints')
    return os.path.join(os.fspath(folder), os.path.basename(urlparse(url).path))


def torch_file_damage(path: PathLike) -> Optional[str]:
    """What makes ``path`` no complete ``torch.save`` file, in words ("member archive/data/0 of its zip archive fails
    its CRC check"); None when it looks complete (``torch.load`` then reads it, and reports what these checks cannot
    see). A zip archive (torch.save's format since torch 1.6) has its members' CRCs checked; a legacy file is walked to
    its end (``legacy_file_cut``); any other file must at least start as a legacy file does (or be a tar archive, the
    oldest format, which ``torch.load`` reports itself)."""
    with open(path, 'rb') as f:
        head = f.read(LEGACY_HEAD_SIZE)
    if not head:
        return 'it is empty'
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
        except Exception as e:  # noqa: BLE001  a damaged archive raises what its damage makes the reader meet
            return f'its zip archive cannot be read ({type(e).__name__}: {e})'
        return None if damaged is None else f'member {damaged} of its zip archive fails its CRC check'
    if head.startswith(_ZIP_HEADER):
        return ('it starts as a zip archive (the torch.save format) but has no end record (central directory), so it '
                'is cut short')
    cut = legacy_file_cut(path)
    if cut is not None:
        return cut
    # a zero block ends a tar archive: tarfile takes a file of zeros (a failed copy) for an empty one
    if starts_as_legacy_file(head) or head[:512].strip(b'\0') and tarfile.is_tarfile(path):
        return None
    return (f'it is not a torch.save file: its first bytes ({head[:8]!r}) start neither a zip archive nor a legacy '
            f'torch.save file')


def safetensors_file_damage(path: PathLike) -> Optional[str]:
    """What makes ``path`` no complete safetensors file, in the safetensors reader's words (its header is cut or not
    JSON, or the tensors it lists do not cover the file); None when the reader opens it. The format has no checksum,
    so bytes changed inside a tensor's data go unnoticed here."""
    from safetensors import safe_open
    try:
        with safe_open(os.fspath(path), framework='pt', device='cpu'):
            pass
    except Exception as e:  # noqa: BLE001  the reader raises its own SafetensorError (also for an empty file)
        return f'it is no complete safetensors file ({type(e).__name__}: {e})'
    return None


def hub_blob_hash_mismatch(path: PathLike) -> Optional[str]:
    """For a Hub cache file ``path`` whose blob (the file it links to, or itself) is named by a sha256, as the Hub
    client names a large (LFS) file's blob by the sha256 the Hub gave for it: if the content hashes otherwise, that in
    words (its bytes changed after the download: a disk or copy error); None when it matches, or the name is no sha256
    (a small file's blob is named by its git hash, and a cache without symbolic links keeps copies under the entry's
    name). Reads the whole file once."""
    blob = os.path.realpath(path)
    expected = os.path.basename(blob)
    if not _SHA256_NAME.fullmatch(expected):
        return None
    digest = hashlib.sha256()
    with open(blob, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    if digest.hexdigest() == expected:
        return None
    return (f'its content hashes to sha256 {digest.hexdigest()}, not to {expected}, the sha256 the Hub gave for it and '
            f'its blob\'s name, so bytes in it changed after the download')


def damaged_download_text(url: str, path: PathLike) -> Optional[str]:
    """If ``path``, timm's download of ``url``, exists and is damaged (``torch_file_damage``): what is wrong and what
    to do, in words ("the download of URL in the cache, PATH, is corrupt or truncated: ...\\nTo fix: delete PATH ...",
    for the caller to prefix with the model's name); None when it is missing (timm downloads it) or looks complete."""
    if not os.path.isfile(path):
        return None
    damage = torch_file_damage(path)
    if damage is None:
        return None
    name = os.path.basename(path)
    return (f'the download of {url} in the cache, {path}, is corrupt or truncated: {damage}.\n'
            f'To fix: delete {path} and load again, which downloads it again; or download it yourself and pass it with '
            f'pretrained_cfg_overlay=dict(file="/path/to/{name}")')


def damaged_hub_file_text(hub_id: str, filename: str, path: PathLike) -> Optional[str]:
    """If ``path``, Hub repo ``hub_id``'s (``org/name`` or ``org/name@revision``) weight file ``filename`` as it stands
    in the Hub cache, is damaged (``safetensors_file_damage`` for a ``.safetensors`` name, else ``torch_file_damage``;
    then ``hub_blob_hash_mismatch``): what is wrong and what to do, in words, for the caller to prefix with the model's
    name; None when it is missing or looks complete. The cache keeps the file as a snapshot entry linking to a blob
    named by its hash, and the Hub client links a deleted entry to the blob left behind again, so the advice is to
    delete both (or to download again with ``--force-download``)."""
    if not os.path.isfile(path):
        return None
    damage = (safetensors_file_damage if filename.endswith('.safetensors') else torch_file_damage)(path)
    damage = damage or hub_blob_hash_mismatch(path)
    if damage is None:
        return None
    repo, _, revision = hub_id.partition('@')
    blob = os.path.realpath(path)
    linked = '' if blob == os.path.abspath(path) else f' and {blob}, the blob it links to,'
    at_revision = f' --revision {revision}' if revision else ''
    return (f'{filename} of Hub repo {hub_id} in the Hub cache, {path}, is corrupt or truncated: {damage}.\n'
            f'To fix: delete {path}{linked} and load again, which downloads it again (or run `hf download {repo} '
            f'{filename}{at_revision} --force-download`); or download it yourself and pass it with '
            f'pretrained_cfg_overlay=dict(file="/path/to/{os.path.basename(filename)}")')


def saved_pickle_protocol(path: PathLike) -> Optional[int]:
    """The pickle protocol a ``torch.save`` file was saved in (``torch.save(..., pickle_protocol=N)``, 2 by default):
    the PROTO opcode that opens its pickle (a zip archive's ``data.pkl``; a legacy file's first pickle, whose protocol
    its other pickles share). Pickles of protocols 0 and 1 open without one: 1 for those. None when the file is no
    ``torch.save`` file, or its pickle cannot be found. Nothing is unpickled."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n == 'data.pkl' or n.endswith('/data.pkl')), None)
                if name is None:
                    return None
                with archive.open(name) as member:
                    head = member.read(2)
        else:
            with open(path, 'rb') as f:
                head = f.read(LEGACY_HEAD_SIZE)
            if not starts_as_legacy_file(head):
                return None
    except (OSError, zipfile.BadZipFile):
        return None
    if not head:
        return None
    return head[1] if head[0] == 0x80 and len(head) > 1 else 1


def unreadable_protocol_text(path: PathLike) -> Optional[str]:
    """For a ``torch.save`` file that ``torch.load(weights_only=True)`` refused with "Unsupported operand" although it
    looks complete (``torch_file_damage``): when it was saved in a pickle protocol other than 2 (torch's default) and
    3, the cause, in words, with what to do; else None. torch's weights-only unpickler does not read the opcodes that
    protocols 4 and 5 frame their pickles with (FRAME, operand 149) nor the text opcodes of protocols 0 and 1, and
    says "Unsupported operand", with its advice to load the file with ``weights_only=False``; the file is neither
    damaged nor known to be unsafe, only unreadable by safe loading."""
    protocol = saved_pickle_protocol(path)
    if protocol is None or protocol in (2, 3):
        return None
    named = 'pickle protocol 0 or 1' if protocol == 1 else f'pickle protocol {protocol}'
    return (f'{path} is a torch.save file saved in {named} (torch.save(..., pickle_protocol=N)), which '
            f'torch.load(weights_only=True), the safe loading used for weights, does not read ("Unsupported '
            f'operand"); it reads protocol 2, torch.save\'s default, and 3.\nTo fix: re-save it in the default '
            f'protocol where you trust it (loading it unrestricted can run code it pickles): '
            f'torch.save(torch.load("{path}", weights_only=False), "resaved.pth"), and load resaved.pth')
