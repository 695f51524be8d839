"""Atomic outputs: files and folders appear complete or not at all, and nothing is overwritten unless asked.

Every writer in vitzoo (converted weights, ONNX files, plots, training checkpoints) goes through these helpers:
the data is written to a temporary file (or folder) beside the target and renamed onto it in one step, so an
interrupted run never leaves a half-written output, and an existing output is refused unless ``force``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Union

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "check_output_file", "check_output_free",
           "staged_dir"]

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_open(path: PathLike, force: bool = False) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for binary writing; on success it replaces ``path`` in one rename.

    If the body raises, the temporary file is removed and ``path`` is left as it was. Missing parent folders are
    created. Without ``force``, a file that another writer puts at ``path`` while this one writes is not replaced
    either (``FileExistsError`` at the end).

    Args:
        path: destination file.
        force: replace an existing file (otherwise ``FileExistsError``).
    """
    path = Path(path)
    check_output_file(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _make_readable(Path(tmp))
        if force:
            os.replace(tmp, path)
        else:
            _link_no_replace(Path(tmp), path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _link_no_replace(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` in one step, failing if ``path`` has appeared since it was checked.

    A hard link fails atomically when ``path`` exists (another writer got there while this one was writing), where
    a rename would replace it. On a file system without hard links the check is repeated right before the rename.
    """
    try:
        os.link(tmp, path)
    except FileExistsError:
        check_output_free(path, force=False)  # the same message as the check before the work
        raise
    except OSError:  # no hard links here (e.g. some network or FAT file systems)
        check_output_free(path, force=False)
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def check_output_file(path: PathLike, force: bool) -> None:
    """Check, before any work, that a file can be written at ``path``.

    Raises:
        IsADirectoryError: ``path`` is a folder (``force`` does not replace folders with files).
        FileExistsError: ``path`` exists and ``force`` is not set.
        NotADirectoryError: A parent of ``path`` is a file.
        PermissionError: The nearest existing parent folder is not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file path for the output (e.g. {path / 'out'}...).")
    check_output_free(path, force)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {parent} is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: folder {parent} is not writable.")


def check_output_free(path: PathLike, force: bool) -> None:
    """Raise ``FileExistsError`` if ``path`` exists and ``force`` is not set."""
    if os.path.lexists(path) and not force:
        raise FileExistsError(
            f"{path} already exists; refusing to overwrite it. Pass force=True (--force) to replace it."
        )


def atomic_write_bytes(path: PathLike, data: bytes, force: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``.

    Args:
        path: destination file.
        data: file contents.
        force: replace an existing file.
    """
    with atomic_open(path, force=force) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, force: bool = False) -> Path:
    """Text (UTF-8) version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"), force=force)


@contextlib.contextmanager
def staged_dir(out_dir: PathLike, force: bool = False) -> Iterator[Path]:
    """Build a folder in a temp dir next to ``out_dir``, then move it into place in one rename.

    If the body raises, the temp dir is removed and ``out_dir`` is left as it was. With ``force`` an existing
    ``out_dir`` is replaced (it is moved aside first and deleted only after the new folder is in place).

    Args:
        out_dir: the final folder.
        force: replace an existing ``out_dir``.

    Yields:
        The temp folder to fill.
    """
    out_dir = Path(out_dir)
    check_output_free(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        yield tmp
        _make_readable(tmp)
        check_output_free(out_dir, force)  # someone may have created it meanwhile
        old = None
        if os.path.lexists(out_dir):
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
        try:
            os.replace(tmp, out_dir)
        except BaseException:  # the new folder did not land: put the old one back where it was
            if old is not None:
                os.replace(old / out_dir.name, out_dir)
                shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _make_readable(target: Path) -> None:
    """Give a temp file, or a temp folder and its files, the permissions a plain open/mkdir would (temp files
    are private)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [target, *(target.rglob("*") if target.is_dir() else ())]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
