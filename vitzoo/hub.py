"""Shared helpers for pretrained weights: files, hashes, atomic writes, Hub downloads, and clear errors.

The public entry point for users is :func:`load_pretrained_model`, a thin wrapper around
``timm.create_model(name, pretrained=True, ...)`` that checks the weight file before timm reads it and turns
the Hub's and timm's low-level exceptions into errors that say what is wrong and what to do.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import math
import os
import pickle
import re
import urllib.error
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

# the model packages cannot import vitzoo, so vitzoo uses shvit's copies: timm's local-dir: pick of a folder's weight
# file, and the legacy torch.save walk
from shvit.shvit import _folder_weight_file as folder_weight_file
from shvit.torch_legacy import LEGACY_HEAD_SIZE, legacy_file_cut, starts_as_legacy_file

from .atomic import atomic_write_bytes, atomic_write_text, check_output_free, staged_dir

__all__ = [
    "WEIGHT_FILES",
    "WeightsError",
    "CorruptWeightsError",
    "MissingWeightsError",
    "sha256_file",
    "check_output_free",
    "atomic_write_bytes",
    "atomic_write_text",
    "staged_dir",
    "resource_path",
    "read_safetensors_metadata",
    "validate_weights_file",
    "non_finite_weights",
    "non_finite_text",
    "hub_config",
    "fetch_hub_weights",
    "hub_offline_hint",
    "load_pretrained_model",
]

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the order timm tries them on the Hub
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
PathLike = Union[str, os.PathLike]


class WeightsError(RuntimeError):
    """Base class for the errors raised about pretrained weight files."""


class CorruptWeightsError(WeightsError):
    """A weight file is truncated, unreadable, or does not match its expected sha256."""


class MissingWeightsError(WeightsError, FileNotFoundError):
    """A weight file (or Hub repository) could not be found, or could not be downloaded (e.g. offline)."""


# how long huggingface_hub waits before it gives up on an unreachable Hub, per file: five retries, 1+2+4+8+8 s (its
# http_backoff defaults), plus the connection attempts; timm tries two file names
_HUB_RETRY_SECONDS = 23
# what a failed download raises (urllib: URLError / HTTPError; a dropped or timed-out connection); a missing local
# file (FileNotFoundError) is not one of them
_DOWNLOAD_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException)


def _http_answer(error: Optional[BaseException]) -> Optional[BaseException]:
    """The HTTP error an online Hub answered with, in ``error``'s chain of causes; None for no answer (no connection)
    or offline. The Hub client words such an answer (a 503, or a 403 of no gated repo) as a connection problem."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    seen = set()
    while error is not None and id(error) not in seen and not constants.HF_HUB_OFFLINE:
        if isinstance(error, HfHubHTTPError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _hub_not_reached(error: BaseException) -> str:
    """Why a Hub client's ``LocalEntryNotFoundError`` came: an HTTP error the Hub answered with, offline mode, or
    no connection."""
    from huggingface_hub import constants

    answer = _http_answer(error)
    if answer is not None:
        status = getattr(getattr(answer, "response", None), "status_code", "?")
        return f"the Hub answered HTTP {status} ({_shorten((str(answer).splitlines() or [''])[0], 200)})"
    return f"the Hub cannot be reached (HF_HUB_OFFLINE={int(constants.HF_HUB_OFFLINE)})"


def hub_offline_hint(files: int = len(WEIGHT_FILES), error: Optional[BaseException] = None) -> str:
    """Advice for a Hub request that failed as if offline: set HF_HUB_OFFLINE=1 to fail at once ('' if it is set,
    or if ``error``, the failure, came from an HTTP answer: the machine is online).
    ``files``: how many files were tried, each with the Hub client's retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or _http_answer(error) is not None:
        return ""
    return (f" If this machine is offline, set HF_HUB_OFFLINE=1 so that loading fails at once instead of after the "
            f"Hub client's retries ({_HUB_RETRY_SECONDS * files} s or more), and uses the Hub cache only.")


# ---------------------------------------------------------------------------------------------------------------------
# files, hashes and atomic writes


def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resource_path(name: str) -> Path:
    """Locate a file of the weights record (``weights/<name>``).

    The canonical copy is ``weights/`` at the repository root (source checkouts and editable installs);
    an installed wheel carries a copy as data files in ``<prefix>/share/vitzoo/weights/`` (setup.cfg
    ``[options.data_files]``), where ``<prefix>`` is ``sys.prefix``, the user base of ``pip install --user``, or
    the folder the packages were installed into or one of its three parents (``pip install --target DIR``: ``DIR``;
    ``--prefix P`` and Debian's ``/usr/local``: three levels above ``site-packages``; found by an audit: such
    installs did not find their own manifest).
    """
    import site
    import sys

    here = Path(__file__).resolve().parent
    folders = [here.parent / "weights"]
    prefixes = [Path(sys.prefix), Path(site.getuserbase()), here.parent, *list(here.parent.parents)[:3]]
    folders += list(dict.fromkeys(p / "share" / "vitzoo" / "weights" for p in prefixes))
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"weights/{name} not found in {', '.join(map(str, folders))}. Reinstall vitzoo, or pass the file's path "
        "explicitly."
    )


# ---------------------------------------------------------------------------------------------------------------------
# checking weight files


# bytes per element of the safetensors dtypes of whole bytes; a tensor of another dtype gets no size check
_SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                            "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def _is_count(value: Any) -> bool:
    """A non-negative JSON integer (``true``/``false`` are no integers here, as in the safetensors reader)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors_metadata(path: PathLike) -> Tuple[Dict[str, str], Dict[str, Any]]:
    """Read and check the header of a safetensors file without loading the tensors.

    Checks that the header is valid JSON; that each tensor's byte range (non-negative integers, start <= end) holds
    exactly its shape's elements of its dtype (for the dtypes of whole bytes); and that the ranges, sorted, follow one
    another without gap or overlap from the start of the data to the end of the file, which also catches truncated
    and padded files.

    Returns:
        ``(metadata, tensors)``: the ``__metadata__`` dict (may be empty) and ``{name: {dtype, shape, data_offsets}}``.

    Raises:
        CorruptWeightsError: the file is not a complete safetensors file.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CorruptWeightsError(f"{path} is not a safetensors file: only {size} bytes long.")
        header_len = int.from_bytes(prefix, "little")
        if header_len > size - 8:
            raise CorruptWeightsError(
                f"{path} is truncated or not a safetensors file: its header claims {header_len} bytes but the file "
                f"has {size} bytes."
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptWeightsError(f"{path} is corrupt: its safetensors header is not valid JSON ({e}).") from e
    if not isinstance(header, dict):
        raise CorruptWeightsError(f"{path} is corrupt: its safetensors header is not a JSON object.")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        # the safetensors reader refuses such a file ("expected a map" of strings); found by an audit: push crashed
        raise CorruptWeightsError(f"{path} is corrupt: its safetensors metadata (__metadata__) is not a JSON object "
                                  "of strings. Download or convert it again.")
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and isinstance(entry.get("dtype"), str) and isinstance(entry.get("shape"), list)
                and all(_is_count(n) for n in entry["shape"])):
            raise CorruptWeightsError(
                f"{path} is corrupt: the safetensors header entry of {name!r} is not a tensor record (dtype, shape of "
                "non-negative integers, data_offsets: two non-negative integers). Download or convert it again.")
        start, end = offsets
        item = _SAFETENSORS_DTYPE_BYTES.get(entry["dtype"])
        need = None if item is None else item * math.prod(entry["shape"])
        if end < start:
            wrong = f"its byte range ends (at {end}) before it starts (at {start})"
        elif need is not None and end - start != need:
            wrong = f"its byte range holds {end - start} bytes, but its dtype and shape need {need}"
        else:
            continue
        raise CorruptWeightsError(f"{path} is corrupt: in its safetensors header, tensor {name!r} ({entry['dtype']}, "
                                  f"shape {entry['shape']}): {wrong}. Download or convert it again.")
    # the tensors' byte ranges must tile the data area: sorted, each one starting where the one before ends
    end = 0
    for name, entry in sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        start = entry["data_offsets"][0]
        if start != end:
            what = "overlaps the tensor before it" if start < end else f"leaves the bytes {end} to {start} unused"
            raise CorruptWeightsError(
                f"{path} is corrupt: in its safetensors header the byte range of {name!r} ({start} to "
                f"{entry['data_offsets'][1]}) {what}. Download or convert it again.")
        end = entry["data_offsets"][1]
    if 8 + header_len + end != size:
        raise CorruptWeightsError(
            f"{path} is truncated or corrupt: its tensors need {8 + header_len + end} bytes but the file has {size}. "
            "Download or convert it again."
        )
    return metadata, header


def _is_legacy_torch_file(path: Path) -> bool:
    """True if the file starts as a legacy (non-zip) ``torch.save`` file does, in whatever pickle protocol it was
    saved (``torch.save(..., pickle_protocol=N)``): with a pickle of torch's magic number."""
    with open(path, "rb") as f:
        return starts_as_legacy_file(f.read(LEGACY_HEAD_SIZE))


def _content_kind(path: Path) -> Optional[str]:
    """What a weight file holds, by its first bytes: 'torch' (a torch.save zip archive, or the legacy pickle format in
    any pickle protocol), 'safetensors' (an 8-byte little-endian header length, then the JSON header's '{'), or None
    (neither, or too short to tell)."""
    with open(path, "rb") as f:
        head = f.read(LEGACY_HEAD_SIZE)
    if head.startswith(b"PK\x03\x04") or starts_as_legacy_file(head):
        return "torch"
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") >= 2:
        return "safetensors"
    return None


def _check_named_by_content(path: Path) -> None:
    """timm picks a weight file's reader by its name (``.safetensors``: safetensors; any other: ``torch.load``), so a
    file whose content is the other format cannot be loaded: say what it is and the name to give it."""
    kind = _content_kind(path)
    named_safetensors = path.suffix == ".safetensors"
    if kind == "safetensors" and not named_safetensors:
        new_name = "model.safetensors" if path.name == WEIGHT_FILES[1] else path.with_suffix(".safetensors").name
        real, named = "a safetensors file", "a torch.save file"
    elif kind == "torch" and named_safetensors:
        new_name = WEIGHT_FILES[1] if path.name == WEIGHT_FILES[0] else path.with_suffix(".pth").name
        real, named = "a torch.save file", "a safetensors file"
    else:
        return
    raise WeightsError(
        f"{path} is {real}, but its name says {named}: timm picks the reader by the name (.safetensors: safetensors, "
        f"any other: torch.load), so it cannot load it. Rename it to {new_name} (a Hub repo's file: upload it under "
        "that name).")


def validate_weights_file(path: PathLike, expected_sha256: Optional[str] = None) -> None:
    """Check that a weight file exists, matches ``expected_sha256`` (if given) and can be read.

    ``.safetensors`` files get a header check (:func:`read_safetensors_metadata`); other files are checked to be
    ``torch.save`` files without unpickling anything: a zip archive whose members pass their CRC, or the legacy
    (pre-1.6) pickle format, recognised by its magic number and walked to its end (its pickles' opcodes and its
    storages' recorded sizes) so that a file cut short is reported as such, not as whatever ``torch.load`` would meet
    at the cut (at some cuts an unsafe global). A file whose content is the other format than its name says (a
    safetensors file named ``.bin``) is refused as timm would fail on it.

    Raises:
        MissingWeightsError: no such file.
        CorruptWeightsError: hash mismatch, truncated or unreadable file.
        WeightsError: the file's content is the other format than its name says; the message gives the name to use.
    """
    path = Path(path)
    if path.is_dir():
        raise MissingWeightsError(
            f"{path} is a folder; give the weight file in it (e.g. {path / 'model.safetensors'}).")
    if not path.is_file():
        raise MissingWeightsError(f"Weight file {path} does not exist.")
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256.lower():
            raise CorruptWeightsError(
                f"sha256 mismatch for {path}: expected {expected_sha256}, got {actual}. The file is corrupt or is not "
                "the file you meant; download it again."
            )
    _check_named_by_content(path)
    if path.suffix == ".safetensors":
        read_safetensors_metadata(path)
    elif _is_legacy_torch_file(path):
        cut = legacy_file_cut(path)
        if cut is not None:
            raise CorruptWeightsError(f"{path} is corrupt or truncated: {cut}. Download or convert it again.")
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
        if bad is not None:
            raise CorruptWeightsError(f"{path} is corrupt: member {bad} of the checkpoint archive fails its CRC check. "
                                      "Download or copy it again.")
    else:
        raise CorruptWeightsError(
            f"{path} is truncated or not a checkpoint: it is neither a safetensors file nor a torch.save archive. "
            "Check that it is the file you meant, and download or copy it again."
        )


# ---------------------------------------------------------------------------------------------------------------------
# Hub downloads


def _hub_repo_cache(repo_id: str, cache_dir: Optional[PathLike]) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def _evict(cached: Path, repo_cache: Path) -> None:
    """Remove a cached file: its snapshot entry and the blob it points to, if that blob is in the repo's cache (a
    snapshot entry linked by hand to a file elsewhere leaves that file alone; found by an audit)."""
    blob = Path(os.path.realpath(cached))
    inside = os.path.realpath(repo_cache) + os.sep
    for p in {cached} | ({blob} if str(blob).startswith(inside) else set()):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _remove_partials(repo_cache: Path) -> None:
    """Remove the half-downloaded blobs (``*.incomplete``) the Hub client keeps, but none of a download under way:
    the Hub client holds the blob's lock (``.locks/<repo folder>/<blob>.lock``) while it downloads, so a partial is
    removed only while its lock can be taken at once (found by an audit: another process's download lost its file)."""
    from filelock import FileLock, Timeout

    locks = repo_cache.parent / ".locks" / repo_cache.name
    for partial in (repo_cache / "blobs").glob("*.incomplete"):
        blob = partial.name.split(".", 1)[0]  # <blob>.incomplete, or <blob>.<random>.incomplete
        try:
            with FileLock(str(locks / f"{blob}.lock"), timeout=0, mode=0o664):
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()
        except (Timeout, OSError, NotImplementedError):  # held by another download, or not lockable: leave it
            continue


def _hub_weight_files(filename: Optional[str] = None) -> Tuple[str, ...]:
    """The files timm tries, in order, for Hub weights named ``filename`` (a pretrained cfg's ``hf_hub_filename``;
    None: timm's default, ``pytorch_model.bin``): a ``.safetensors`` name alone, else the file's safetensors
    alternative (timm's rule, e.g. ``x.bin`` -> ``x.safetensors``; ``pytorch_model.bin`` -> ``model.safetensors``)
    and then the file itself."""
    from timm.models._hub import _get_safe_alternatives

    filename = filename or WEIGHT_FILES[1]
    if filename.endswith(".safetensors"):
        return (filename,)
    return (*_get_safe_alternatives(filename), filename)


def fetch_hub_weights(hub_id: str, cache_dir: Optional[PathLike] = None, filename: Optional[str] = None) -> Path:
    """Download (or find in the cache) the weight file of a Hub repo and check it before anyone loads it.

    Tries the files timm tries (:func:`_hub_weight_files`): ``model.safetensors`` then ``pytorch_model.bin``, or those
    for ``filename``. A cached file whose content does not match its ETag (the sha256 for LFS files), that is
    truncated, or whose safetensors header does not fit its tensors (:func:`read_safetensors_metadata`), is removed
    from the cache and reported.

    Args:
        hub_id: ``org/name`` or ``org/name@revision``.
        cache_dir: Hub cache folder (default: ``HF_HUB_CACHE``).
        filename: the pretrained cfg's ``hf_hub_filename``, if it has one.

    Returns:
        The path of the checked file in the cache.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo_id, _, revision = hub_id.partition("@")
    repo_cache = _hub_repo_cache(repo_id, cache_dir)
    files = _hub_weight_files(filename)
    offline_misses, not_reached = [], None
    for filename in files:
        try:
            cached = Path(hf_hub_download(repo_id, filename, revision=revision or None, cache_dir=cache_dir))
        except RepositoryNotFoundError as e:
            raise MissingWeightsError(_repo_not_found(repo_id, e)) from e
        except LocalEntryNotFoundError as e:
            offline_misses.append(filename)
            not_reached = e
            continue
        except EntryNotFoundError:
            continue
        except Exception as e:  # a short download ("Consistency check failed"), a dropped connection, an HTTP error
            _remove_partials(repo_cache)
            raise WeightsError(
                f"Downloading {filename} of '{repo_id}' failed: {_shorten(str(e))} The partial file (if any) was "
                "removed; retry the download."
            ) from e
        blob_name = Path(os.path.realpath(cached)).name
        try:
            validate_weights_file(cached, expected_sha256=blob_name if _SHA256_RE.match(blob_name) else None)
        except CorruptWeightsError as e:
            _evict(cached, repo_cache)
            retry = ("Retry the download; if it fails again the file on the Hub is broken." if not
                     constants.HF_HUB_OFFLINE else f"Download it again while online (`hf download {repo_id} "
                     f"{filename}`; HF_HUB_OFFLINE=1 is set here).")
            raise CorruptWeightsError(
                f"{filename} of Hub repo '{repo_id}' is corrupt and was removed from the cache ({e}). {retry}"
            ) from e
        return cached
    if offline_misses:
        at_revision = f" --revision {revision}" if revision else ""
        raise MissingWeightsError(
            f"No weight file of '{repo_id}' ({' or '.join(files)}) is in the Hub cache ({repo_cache.parent}) "
            f"and {_hub_not_reached(not_reached)}. While online, run "
            f"`hf download {repo_id} {files[0]}{at_revision}` (or load once without HF_HUB_OFFLINE); or load a "
            f"local file with pretrained_cfg_overlay=dict(file='/path/to/{Path(files[0]).name}')."
            f"{hub_offline_hint(len(files), not_reached)}"
        )
    if len(files) == 1:
        raise MissingWeightsError(f"Hub repository '{repo_id}' has no {files[0]} (the cfg's hf_hub_filename).")
    raise MissingWeightsError(f"Hub repository '{repo_id}' has neither {' nor '.join(files)}.")


# ---------------------------------------------------------------------------------------------------------------------
# loading


def _pretrained_cfg(name: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The pretrained cfg ``create_model`` resolves for a registered ``name`` (``arch`` or ``arch.tag``): the given
    ``pretrained_cfg`` (a dict, a ``PretrainedCfg`` or a tag, as timm takes it) or the registered one, with
    ``pretrained_cfg_overlay`` applied, by timm's own resolver."""
    from timm.models import PretrainedCfg
    from timm.models._builder import resolve_pretrained_cfg

    arch, _, tag = name.partition(".")
    given = kwargs.get("pretrained_cfg")
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if isinstance(given, dict) and given:  # any keys: timm's create_model then judges the ones it cannot take
        return {**given, **overlay}
    if not (isinstance(given, (str, PretrainedCfg)) and given):
        given = tag or None  # the name's tag, else the architecture's default cfg
    return resolve_pretrained_cfg(arch, pretrained_cfg=given, pretrained_cfg_overlay=overlay).to_dict()


def _weight_source(name: str, kwargs: Dict[str, Any]) -> Tuple[str, str]:
    """Where ``create_model(name, pretrained=True, **kwargs)`` will read weights from: ``(kind, location)``."""
    if name.startswith("hf-hub:"):
        return "hub", name[len("hf-hub:"):]
    if name.startswith("local-dir:"):
        return "dir", name[len("local-dir:"):]
    cfg = _pretrained_cfg(name, kwargs)
    if cfg.get("state_dict") is not None:
        return "state_dict", "<state_dict>"
    if cfg.get("file"):
        return "file", str(cfg["file"])
    if cfg.get("hf_hub_id"):
        return "hub", str(cfg["hf_hub_id"])
    if cfg.get("url"):
        return "url", str(cfg["url"])
    raise MissingWeightsError(
        f"'{name}' has no pretrained weights configured. Use a tag with weights (see "
        f"timm.list_pretrained('{name.split('.')[0]}*')), or pass pretrained_cfg_overlay=dict(file=...)."
    )


def _hub_filename(name: str, hub_id: str, kwargs: Dict[str, Any]) -> Optional[str]:
    """The ``hf_hub_filename`` timm reads Hub weights by (None: its default files): the overlay's, else the pretrained
    cfg's, which for an ``hf-hub:`` name is the one in the repo's config.json."""
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    # an hf-hub: repo's config.json is checked in any case: timm reads it before the weights
    config = hub_config(hub_id, kwargs.get("cache_dir")) if name.startswith("hf-hub:") else None
    if overlay.get("hf_hub_filename"):
        return overlay["hf_hub_filename"]
    if config is not None:
        return config.get("hf_hub_filename")
    return _pretrained_cfg(name, kwargs).get("hf_hub_filename")


def _repo_not_found(repo_id: str, error: BaseException) -> str:
    """What the Hub's "not found" means: a gated repo (its own error) or a name it does not show this caller."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError

    if isinstance(error, GatedRepoError):
        return (f"Hub repository '{repo_id}' is gated: accept its conditions on {constants.ENDPOINT}/{repo_id} while "
                "logged in, and load with that account's token (`hf auth login` or HF_TOKEN).")
    return (f"Hub repository '{repo_id}' was not found at {constants.ENDPOINT}. Check the name; a private or gated "
            "repo also needs a token (`hf auth login` or HF_TOKEN).")


def hub_config(hub_id: str, cache_dir: Optional[PathLike] = None, weights: bool = True) -> Dict[str, Any]:
    """The pretrained cfg in the config.json of an ``hf-hub:`` repo, which timm reads before the weights.

    Raises what makes every load of the repo fail, in words timm does not give (found by an audit: a raw
    ``RemoteEntryNotFoundError``, ``KeyError: 'architecture'``, a ``JSONDecodeError`` naming no file):
    :class:`MissingWeightsError` when the repo does not exist, has no config.json, or (offline) its config.json is
    not in the Hub cache; :class:`WeightsError` when config.json is not JSON or names no ``architecture`` (not a
    timm config) or, for a load with ``weights``, when its two class counts differ (:func:`_check_class_counts`);
    :class:`vitzoo.models.UnknownModelError` when timm does not know its architecture. Empty when the file cannot be
    fetched for another reason (a network or HTTP error: the weights' fetch then says why).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    from .models import UnknownModelError, resolve_name  # models imports timm only: no import cycle

    repo_id, _, revision = hub_id.partition("@")
    try:
        path = hf_hub_download(repo_id, "config.json", revision=revision or None, cache_dir=cache_dir)
    except LocalEntryNotFoundError as e:
        at_revision = f" --revision {revision}" if revision else ""
        raise MissingWeightsError(
            f"config.json of '{repo_id}', which timm reads first for an hf-hub: name, is not in the Hub cache "
            f"({_hub_repo_cache(repo_id, cache_dir).parent}) and {_hub_not_reached(e)}. While online, run "
            f"`hf download {repo_id} config.json {WEIGHT_FILES[0]}{at_revision}` (or load once without "
            f"HF_HUB_OFFLINE).{hub_offline_hint(1, e)}"
        ) from e
    except RepositoryNotFoundError as e:
        raise MissingWeightsError(_repo_not_found(repo_id, e)) from e
    except EntryNotFoundError as e:
        raise MissingWeightsError(
            f"Hub repository '{repo_id}' has no config.json, which timm reads first for an hf-hub: name "
            f"(architecture, classes, input size): it is not a timm model repo. A folder written by `vitzoo convert` "
            f"has one (`vitzoo push` uploads it)."
        ) from e
    except Exception:  # noqa: BLE001  a network or HTTP error: the weights' fetch, next, reports it
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise WeightsError(f"config.json of Hub repo '{repo_id}' is not valid JSON ({e}); timm cannot read it.") from e
    arch = config.get("architecture") if isinstance(config, dict) else None
    if not isinstance(arch, str) or not arch:
        other = " (it looks like a transformers config)" if isinstance(config, dict) and (
            "architectures" in config or "model_type" in config) else ""
        raise WeightsError(f"config.json of Hub repo '{repo_id}' names no architecture (its \"architecture\" key), "
                           f"so it is not a timm config{other}; timm cannot build a model from it.")
    try:
        resolve_name(arch)
    except UnknownModelError as e:
        raise UnknownModelError(f"config.json of Hub repo '{repo_id}' names architecture '{arch}': {e} (a model "
                                f"registered by a package is known once that package is imported)") from e
    if weights:  # a model built without them has nothing to lose
        _check_class_counts(config, f"config.json of Hub repo '{repo_id}'")
    cfg = config.get("pretrained_cfg", config)
    return cfg if isinstance(cfg, dict) else {}


def _check_class_counts(config: Dict[str, Any], where: str) -> None:
    """Refuse a timm config.json whose top-level ``num_classes`` differs from its ``model_args``' (found by an
    audit): timm builds the model with ``model_args`` and, the counts differing, loads the weights without their
    classifier, leaving a random one with no error."""
    args = config.get("model_args")
    top = config.get("num_classes")
    if isinstance(args, dict) and "num_classes" in args and top is not None and args["num_classes"] != top:
        raise WeightsError(
            f"{where} says num_classes {top!r} at the top and {args['num_classes']!r} in model_args: timm would build "
            f"a model with {args['num_classes']!r} classes and load the weights without their classifier. Make the "
            "two agree (the classifier's size in the weight file).")


def _check_model_name(name: str, kwargs: Dict[str, Any]) -> None:
    """An unknown architecture (or pretrained tag) is an UnknownModelError naming the closest registered names."""
    from .models import resolve_name  # models imports timm only: no import cycle

    if name.startswith(("hf-hub:", "local-dir:")):
        return
    given = kwargs.get("pretrained_cfg")
    if isinstance(given, str) and given:  # a tag, as timm takes it: create_model("shvit_s1", pretrained_cfg="in1k")
        name = f"{name.partition('.')[0]}.{given}"
    elif given:  # a cfg given in full: the tag need not be registered, the architecture must
        name = name.partition(".")[0]
    resolve_name(name)


def load_pretrained_model(name: str, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model(name, pretrained=True, **kwargs)`` with checked weight files and clear errors.

    The weight file is located and checked first (downloaded into the Hub cache for Hub sources; works offline
    with a warm cache, with zero requests). Errors: :class:`vitzoo.models.UnknownModelError` (a ``ValueError``:
    the architecture or tag is not registered; the message lists the closest names), :class:`MissingWeightsError`
    (what is missing and how to get it, including a failed download, e.g. offline), :class:`CorruptWeightsError`
    (truncated, unreadable or hash mismatch; a bad cached file is removed), and :class:`WeightsError` when the
    weights do not fit the model (e.g. weights of another model).

    Args:
        name: a timm model name (``arch`` or ``arch.tag``), ``hf-hub:org/name`` or ``local-dir:/path``.
        **kwargs: passed to ``timm.create_model``.
    """
    import timm

    _check_model_name(name, kwargs)
    kind, location = _weight_source(name, kwargs)
    if kind == "hub":
        fetch_hub_weights(location, cache_dir=kwargs.get("cache_dir"), filename=_hub_filename(name, location, kwargs))
    elif kind == "file":
        validate_weights_file(location)
    elif kind == "url":
        _check_cached_download(location, kwargs)
    elif kind == "dir":
        folder = Path(location)
        weights = folder_weight_file(str(folder)) if folder.is_dir() else None
        if not (folder / "config.json").is_file() or weights is None or not Path(weights).is_file():
            raise MissingWeightsError(
                f"{folder} is not a converted model folder: it needs config.json and a weight file, "
                f"{' or '.join(WEIGHT_FILES)} (or another that timm's local-dir: loader picks: any *.safetensors, "
                "*.pth, *.pth.tar or *.bin) (make one with `vitzoo convert`)."
            )
        validate_weights_file(weights)
        try:
            with open(folder / "config.json", encoding="utf-8") as f:
                config = json.load(f)
        except ValueError as e:
            raise WeightsError(f"{folder / 'config.json'} is not valid JSON ({e}); timm cannot read it.") from e
        if isinstance(config, dict):
            _check_class_counts(config, str(folder / "config.json"))
    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except (RuntimeError, ValueError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile) + _DOWNLOAD_ERRORS as e:
        problem = _classify(e)
        if problem == "download" and kind == "hub":  # the file was fetched and checked above; the Hub's re-check failed
            raise MissingWeightsError(
                f"Could not reach the Hub for '{name}' (repo {location}) although its weight file is cached: "
                f"{_download_cause_text(e)}.{hub_offline_hint(error=e)}"
            ) from e
        if problem == "download":
            raise MissingWeightsError(_download_failed_message(name, location, e, kwargs)) from e
        if problem == "explained":  # the model's own message says what is wrong and what to pass
            raise WeightsError(f"The pretrained weights from {location} do not fit '{name}': {_explanation(e)}") from e
        if problem == "mismatch":
            raise WeightsError(
                f"The pretrained weights from {location} do not fit '{name}' (are they weights of another model or "
                f"variant?): {_shorten(str(e))}"
            ) from e
        if problem == "protocol":  # a complete file in a pickle protocol safe loading does not read: the model says so
            raise WeightsError(_explanation(e, _PROTOCOL)) from e
        if problem == "unsafe":  # a URL's file is the one in timm's cache
            cached = _url_cache_file(location, kwargs) if kind == "url" else None
            raise WeightsError(_unsafe_pickle_message(str(cached or location), e)) from e
        if problem == "corrupt":
            raise CorruptWeightsError(f"{location} is corrupt or truncated: {_shorten(str(e))}") from e
        raise
    bad = non_finite_weights(model)
    if bad:
        raise CorruptWeightsError(f"The pretrained weights from {location} for '{name}': {non_finite_text(bad)}")
    return model


def non_finite_weights(model: torch.nn.Module) -> List[str]:
    """The names of ``model``'s floating-point parameters that hold NaN or infinity, and of its floating-point
    buffers that hold NaN (a buffer may hold infinity on purpose, as an attention mask does). Weights on the
    ``meta`` device have no values and are passed over."""
    bad = [name for name, p in model.named_parameters()
           if p.is_floating_point() and not p.is_meta and not bool(torch.isfinite(p).all())]
    bad += [name for name, b in model.named_buffers()
            if b.is_floating_point() and not b.is_meta and bool(torch.isnan(b).any())]
    return bad


def non_finite_text(names: List[str]) -> str:
    """What :func:`non_finite_weights` found, in words, with what to do."""
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return (f"{len(names)} tensor(s) hold NaN or infinite values ({shown}): the weights of a training run that "
            "diverged, or a damaged file. Use weights saved before the run diverged, or download / copy the file "
            "again.")


def _url_cache_file(url: str, kwargs: Dict[str, Any]) -> Optional[Path]:
    """Where timm keeps its download of ``url``: the ``cache_dir`` passed, else torch.hub's checkpoints folder
    (``$TORCH_HOME/hub/checkpoints``), under the URL path's last part (its query left out); None if it has none."""
    from urllib.parse import urlparse

    file_name = os.path.basename(urlparse(url).path)
    if not file_name:
        return None
    return Path(kwargs.get("cache_dir") or Path(torch.hub.get_dir()) / "checkpoints") / file_name


def _check_cached_download(url: str, kwargs: Dict[str, Any]) -> None:
    """A URL source's download already in timm's cache is checked as a local file is (:func:`validate_weights_file`):
    timm loads it as it is, so a damaged one would load with damaged tensors (a zip member failing its CRC) or be
    reported in torch's words for an unsafe pickle, with the advice to load it with ``weights_only=False``."""
    cached = _url_cache_file(url, kwargs)
    if cached is None or not cached.is_file():
        return  # timm downloads it
    try:
        validate_weights_file(cached)
    except CorruptWeightsError as e:
        raise CorruptWeightsError(
            f"The download of {url} in timm's cache is corrupt or truncated: {e} To fix: delete {cached} and load "
            f"again, which downloads it again; or download it yourself and load it with "
            f"pretrained_cfg_overlay=dict(file='/path/to/{cached.name}')."
        ) from e


def _download_failed_message(name: str, url: str, error: BaseException, kwargs: Dict[str, Any]) -> str:
    """A failed download of URL-hosted weights: the URL, the reason, and how to load them without downloading."""
    from urllib.parse import urlparse

    file_name = os.path.basename(urlparse(url).path)
    advice = (f"If this machine is offline, download that file once elsewhere and load it with "
              f"pretrained_cfg_overlay=dict(file='/path/to/{file_name or 'weights.pth'}')")
    cache = _url_cache_file(url, kwargs)
    if cache is not None:  # timm's download cache (torch.hub's checkpoints folder, or cache_dir=): a file there is used
        advice += f", or put it at {cache}, where timm looks for this download first"
    return f"Could not download the pretrained weights of '{name}' from {url}: {_download_cause_text(error)}. {advice}."


def _download_cause_text(error: BaseException) -> str:
    """The download error down ``error``'s cause chain, as ``Type: reason`` (one line, no final full stop)."""
    cause = error
    while cause is not None and not isinstance(cause, _DOWNLOAD_ERRORS):
        cause = cause.__cause__
    cause = cause or error
    reason = getattr(cause, "reason", None) or cause
    return f"{type(cause).__name__}: {_shorten(str(reason), 300).rstrip('.')}"


def _unsafe_pickle_message(location: str, error: BaseException) -> str:
    found = re.search(r"(?:Unsupported globals?:?|GLOBAL) ([\w., ]+?)(?: was|\. |,? which|$)", str(error))
    named = f" ({found.group(1).strip()})" if found else ""
    return (f"{location} is not a plain checkpoint: it pickles Python objects other than tensors{named}, which are "
            "not loaded because unpickling them can run code. If you trust the file, re-save only its tensors, e.g. "
            f"torch.save(torch.load('{location}', weights_only=False)['model'], 'clean.pth') (for a whole pickled "
            "model: its .state_dict()), and use clean.pth.")


# the models' own errors that say what does not fit and what to pass (shvit.checkpoint, nvit.checkpoint); matched by
# name, so that this module needs neither package
_EXPLAINED = ("ClassifierSizeError", "IncompleteCheckpointError", "ExtraTensorsError", "IncompatibleCheckpointError",
              "InputChannelsError", "CheckpointLayoutError", "FusionMismatchError")
# the models' error for a complete torch.save file in a pickle protocol that weights-only loading does not read
_PROTOCOL = ("PickleProtocolError",)


def _classify(error: BaseException) -> Optional[str]:
    """'download' (a failed download, e.g. offline), 'explained' (a classifier of another size, an incomplete
    checkpoint, an NViT checkpoint that does not fit: the message says it), 'mismatch' (weights of another model),
    'protocol' (a complete torch.save file in a pickle protocol weights-only loading does not read: the message says
    it), 'unsafe' (a file that pickles more than tensors), 'corrupt' (unreadable file) or None (not the weights'
    fault: re-raised as it is), looking down the cause chain."""
    while error is not None:
        text = str(error)
        if isinstance(error, _DOWNLOAD_ERRORS):
            return "download"
        if type(error).__name__ in _EXPLAINED:
            return "explained"
        if type(error).__name__ in _PROTOCOL:
            return "protocol"
        if type(error).__name__ == "CheckpointMismatchError" or "loading state_dict" in text:
            return "mismatch"
        if "weights_only=True blocked" in text or text.startswith("Refusing to load") or (
                isinstance(error, pickle.UnpicklingError) and "Unsupported global" in text):
            return "unsafe"
        if isinstance(error, (pickle.UnpicklingError, EOFError, zipfile.BadZipFile)) or \
                type(error).__name__ in ("SafetensorError", "CorruptCheckpointError") or "PytorchStreamReader" in text:
            return "corrupt"
        error = error.__cause__
    return None


def _explanation(error: BaseException, names: Tuple[str, ...] = _EXPLAINED) -> str:
    """The message of the model's own error (one of ``names``) down ``error``'s cause chain: the deepest such one,
    the raw message (the model packages re-raise their error as its own class with the source in front)."""
    found: Optional[BaseException] = None
    cause: Optional[BaseException] = error
    while cause is not None:
        if type(cause).__name__ in names:
            found = cause
        cause = cause.__cause__
    return str(found if found is not None else error)


def _shorten(message: str, limit: int = 600) -> str:
    """One line; its cause of at most about ``limit`` characters (the middle goes), its advice from "To fix:" on
    kept whole: the paths to delete and the commands to run are never cut."""
    message = " ".join(message.split())
    at = message.find("To fix:")
    cause, advice = (message[:at].rstrip(), " " + message[at:]) if at >= 0 else (message, "")
    if len(cause) > limit:
        head = limit * 2 // 3
        cause = cause[:head] + " ... " + cause[-(limit - head):]
    return (cause + advice).strip()
