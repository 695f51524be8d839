"""Atomic outputs: files and folders appear complete or not at all, and nothing is overwritten unless asked.

Every writer in vitzoo (converted weights, ONNX files, plots, training checkpoints) goes through these helpers:
the data is written to a temporary file (or folder) beside the target and renamed onto it in one step, so an
interrupted run never leaves a half-written output, and an existing output is refused unless ``force``.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Iterator, List, Optional, Sequence, Union

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "check_new_file", "check_output_dir",
           "check_output_file", "check_output_free", "resolve_output", "staged_dir"]

PathLike = Union[str, os.PathLike]


def resolve_output(path: PathLike) -> Path:
    """The absolute path ``path`` names once its missing parent folders exist: the parent with links and ``..``
    resolved as the kernel resolves them, the last component kept, so that a link there is the output itself
    (replaced with force, never followed). Every check and every write goes through this one path: ``x/missing/..``
    is ``x`` (found by an audit: the check saw no ``x/missing/..``, which does not exist before ``missing`` is
    created, and ``x`` was then replaced without ``--force``), ``LINK/..`` is the link target's parent."""
    text = os.fspath(path)
    head, name = os.path.split(text.rstrip(os.sep) or text)
    if name in ("", os.curdir, os.pardir):
        return Path(os.path.realpath(text))
    return Path(os.path.realpath(head or os.curdir)) / name


@contextlib.contextmanager
def atomic_open(path: PathLike, force: bool = False) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for binary writing; on success it replaces ``path`` in one rename.

    If the body raises, the temporary file is removed and ``path`` is left as it was. Missing parent folders are
    created. Without ``force``, a file that another writer puts at ``path`` while this one writes is not replaced
    either (``FileExistsError`` at the end). A new file gets the permissions a plain ``open`` would give it; a file
    that replaces an existing file keeps that file's permissions (a private ``0600`` file stays private). An OS error
    about the temporary file (it cannot be created, renamed, ...) names ``path`` instead, with the OS reason.

    Args:
        path: destination file.
        force: replace an existing file (otherwise ``FileExistsError``).
    """
    path = Path(path)
    check_output_file(path, force)
    real = resolve_output(path)
    created = _make_parents(real)
    try:
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(real), suffix=".tmp", dir=real.parent)
    except OSError as e:
        _remove_empty(created)
        raise _naming_target(e, path, temp=None) from e
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _make_readable(tmp, like=real if force else None)
        if force:
            os.replace(tmp, real)
        else:
            _link_no_replace(tmp, real, shown=path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # a failed clean-up must not hide the error itself
            os.unlink(tmp)
        _remove_empty(created)
        interrupt = _interrupt_behind(e)
        if interrupt is not None:
            raise interrupt
        # an error naming no file while the body writes (ENOSPC, EIO, EFBIG from f.write) is about this file
        renamed = _naming_target(e, path, temp=tmp, unnamed=True) if isinstance(e, OSError) else e
        if renamed is e:
            raise
        raise renamed from e


def _temp_prefix(target: Path) -> str:
    """The start of a temporary name beside ``target``: hidden, named after it, short enough that the whole name
    (with ``tempfile``'s 8 characters and a suffix) fits where ``target``'s name fits (found by an audit: a legal
    name of 241-255 bytes failed with "File name too long" after all the work)."""
    return f".{os.fsdecode(os.fsencode(target.name)[:100])}."  # 100 bytes, not characters (a review)


def _interrupt_behind(error: BaseException) -> Optional[BaseException]:
    """The interrupt that ``error``, an ordinary exception, was raised while handling, if any: Ctrl-C's
    ``KeyboardInterrupt`` or the CLI's SIGTERM exception (a ``BaseException`` that is no ``Exception``). A writer
    stopped mid-write may fail in its own clean-up (``torch.save``'s zip writer: "unexpected pos"), which would
    replace the interrupt by a traceback; the writers re-raise the interrupt instead."""
    if not isinstance(error, Exception):
        return None
    seen = set()
    context = error.__context__
    while context is not None and id(context) not in seen:
        if not isinstance(context, Exception):
            return context
        seen.add(id(context))
        context = context.__context__
    return None


#: The errors a write to a file gives (full disk or quota, file too large, I/O error): one naming no path is about
#: the file being written; others (a reset connection in the body) are left as they are (found by a review)
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


def _naming_target(error: OSError, target: Path, temp: Optional[Path], unnamed: bool = False) -> OSError:
    """``error`` re-made to name ``target`` (the path the caller gave) where it names a temporary path of ours.

    The user never saw the temp name (``.model.onnx.x1y2.tmp``), so an error about it is confusing. The OS reason
    (``errno``, ``strerror``) and the error's type are kept. ``temp=None`` means every path in ``error`` is a temp
    path (an error of ``mkstemp``/``mkdtemp``, which name only the path they tried). A path inside a temp folder
    becomes the same path inside ``target``. ``unnamed``: a write error (``_WRITE_ERRNOS``) that names no path is
    about ``target`` (a write to the open file: "[Errno 28] No space left on device" alone named nothing, found by an
    audit). Returns ``error`` itself when there is nothing to rename.
    """
    if error.errno is None or error.strerror is None:
        return error
    if unnamed and error.filename is None and error.errno in _WRITE_ERRNOS:
        return type(error)(error.errno, error.strerror, str(target))

    def swap(name: Any) -> Any:
        if name is None:
            return None
        text = os.fsdecode(name)
        if temp is None or text == str(temp):
            return str(target)
        if text.startswith(str(temp) + os.sep):
            return str(target) + text[len(str(temp)):]
        return name

    first, second = swap(error.filename), swap(error.filename2)
    if (first, second) == (error.filename, error.filename2):
        return error
    if second is not None and os.path.abspath(os.fsdecode(second)) == os.path.abspath(target):
        second = None  # a rename of the temp onto the target: one name is enough
    return type(error)(error.errno, error.strerror, first, None, second)


def _link_no_replace(tmp: Path, path: Path, shown: Optional[PathLike] = None) -> None:
    """Move ``tmp`` to ``path`` in one step, failing if ``path`` has appeared since it was checked.

    A hard link fails atomically when ``path`` exists (another writer got there while this one was writing), where
    a rename would replace it. On a file system without hard links the check is repeated right before the rename.
    """
    try:
        os.link(tmp, path)
    except FileExistsError:
        check_output_free(shown or path, force=False)  # the same message as the check before the work
        raise
    except OSError:  # no hard links here (e.g. some network or FAT file systems)
        check_output_free(shown or path, force=False)
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _check_parent_writable(path: Union[str, Path], parent: Path) -> None:
    """The nearest existing folder at or above ``parent`` must be a writable folder (``path`` is for messages)."""
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot write {path}: {parent} is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: folder {parent} is not writable.")


def check_output_file(path: PathLike, force: bool, example_name: str = "output") -> None:
    """Check, before any work, that a file can be written at ``path`` (``example_name``: a file name the message
    for a folder suggests in it).

    Raises:
        IsADirectoryError: ``path`` is a folder (``force`` does not replace folders with files).
        FileExistsError: ``path`` exists and ``force`` is not set.
        NotADirectoryError: A parent of ``path`` is a file.
        PermissionError: The nearest existing parent folder is not writable.
    """
    path = Path(path)
    real = resolve_output(path)
    if real.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file path for the output, e.g. {path / example_name}.")
    check_output_free(path, force)
    _check_parent_writable(path, real.parent)


def check_new_file(path: PathLike, force: bool = False, option: Optional[str] = None,
                   example_name: str = "output") -> Path:
    """Check, before any work, that a single-file output (``vitzoo export --out``, ``compare --plot``) can be
    written at ``path``: in a folder that exists (it is not created), not over a folder, and over an existing file
    only with ``force``.

    Folder outputs (``convert --out``, ``finetune-det --out``) are different: their missing parent folders are
    created, like ``mkdir -p``.

    Args:
        path: The output file.
        force: An existing file may be replaced.
        option: The command line option that names the file (``--out``), for the messages; None for a Python
            caller (the messages then name ``force=True``).
        example_name: A file name that the message for a folder ``path`` suggests in it (``pareto.png``).

    Raises:
        IsADirectoryError: ``path`` is a folder (``force`` does not replace folders with files).
        FileExistsError: ``path`` exists and ``force`` is False.
        FileNotFoundError: The folder of ``path`` does not exist.
        NotADirectoryError: A parent of ``path`` is a file.
        PermissionError: The folder is not writable.
    """
    path = Path(path)
    real = resolve_output(path)
    other = f" or choose another {option}" if option else ""
    if not real.is_dir() and os.path.lexists(real) and not force:
        raise FileExistsError(f"{path} already exists; refusing to overwrite it. Pass "
                              f"{'--force' if option else 'force=True'} to replace it{other}.")
    try:
        check_output_file(path, force, example_name)  # a folder, a parent that is a file, an unwritable folder
    except PermissionError:
        if real.parent.is_dir():
            raise
        # the nearest existing folder above a missing one is not writable: the missing folder is named first
    if not real.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist; create it first "
                                f"(mkdir -p {path.parent}){other}.")
    return path


def check_output_free(path: PathLike, force: bool) -> None:
    """Raise ``FileExistsError`` if ``path`` (:func:`resolve_output`) exists and ``force`` is not set."""
    real = resolve_output(path)
    if os.path.lexists(real) and not force:
        resolved = os.pardir in Path(path).parts or Path(os.path.abspath(path)) != real  # '..', links: say where
        which = f" (it is {real})" if resolved else ""
        raise FileExistsError(
            f"{path} already exists{which}; refusing to overwrite it. Pass force=True (--force) to replace it."
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


def check_output_dir(path: PathLike, force: bool, keep: Sequence[PathLike] = ()) -> None:
    """Check, before any work, that a folder can be written (or, with ``force``, replaced) at ``path``.

    What ``force`` cannot change is said first (asking for ``--force`` there would only lead to that refusal): a
    file or a dangling link in the way, an unwritable parent, and an existing folder that cannot be replaced; only
    then is an existing folder refused without ``force``.

    Args:
        path: the output folder.
        force: an existing folder at ``path`` may be replaced.
        keep: inputs of the command (a source checkpoint): a folder holding one of them is never replaced.

    Raises:
        FileExistsError: ``path`` is a file or a dangling link (never replaced by a folder); or it is a folder that
            cannot be replaced, even with ``force``: the current folder or one containing it, one holding one of
            ``keep``, a mount point (a rename cannot move it); or it exists and ``force`` is not set.
        NotADirectoryError: A parent of ``path`` is a file.
        PermissionError: The nearest existing parent folder is not writable.
    """
    real = resolve_output(path)
    if os.path.lexists(real) and not os.path.isdir(real):
        if os.path.islink(real):
            what, kind = f"a link to {os.readlink(real)}, which does not exist", "a link"
        else:
            what = kind = "a file"
        raise FileExistsError(f"{path} is {what}, and the output is a folder; {kind} is never replaced by one "
                              "(not even with --force). Choose another output folder (--out).")
    _check_parent_writable(path, real.parent)
    if os.path.isdir(real) and not os.path.islink(real):
        _check_replaceable(path, keep)
    check_output_free(path, force)


def _check_replaceable(path: PathLike, keep: Sequence[PathLike]) -> None:
    """Refuse an existing folder ``path`` that even ``force`` may not replace (see :func:`check_output_dir`)."""
    target = os.path.realpath(resolve_output(path))
    for item in keep:
        kept = os.path.realpath(item)
        if kept == target or kept.startswith(target.rstrip(os.sep) + os.sep):
            raise FileExistsError(
                f"cannot replace {path}: it {'is' if kept == target else 'holds'} the input {item}, which replacing "
                "it would delete; choose another output folder (--out)."
            )
    if os.path.ismount(target):
        raise FileExistsError(
            f"cannot replace {path}: it is a mount point, which cannot be replaced; choose another output folder "
            "(--out), e.g. a new folder inside it."
        )
    cwd = os.path.realpath(os.getcwd())
    if cwd == target or cwd.startswith(target.rstrip(os.sep) + os.sep):
        raise FileExistsError(
            f"cannot replace {path}: it {'is' if cwd == target else 'contains'} the current folder, which cannot be "
            "replaced; choose another output folder (--out), e.g. a new folder inside it."
        )


@contextlib.contextmanager
def staged_dir(out_dir: PathLike, force: bool = False) -> Iterator[Path]:
    """Build a folder in a temp dir next to ``out_dir``, then move it into place in one rename.

    Before the rename, every file in the temp dir and the temp dir itself are flushed to disk (``fsync``), and the
    parent folder after it, so that a crash never leaves a published folder with missing or empty files.
    If the body raises, the temp dir is removed and ``out_dir`` is left as it was. With ``force`` an existing
    ``out_dir`` is replaced (it is moved aside first and deleted only after the new folder is in place); the
    current folder and mount points cannot be replaced (:func:`check_output_dir`), and if moving the old folder
    aside fails anyway, everything this created is removed and the error says so. An OS error about the temp
    folder names ``out_dir`` instead.

    Args:
        out_dir: the final folder.
        force: replace an existing ``out_dir``.

    Yields:
        The temp folder to fill.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force)
    target = resolve_output(out_dir)  # '.', 'a/..', 'a/missing/..': the real name and parent
    created = _make_parents(target)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".partial", dir=target.parent))
    except OSError as e:
        _remove_empty(created)
        raise _naming_target(e, out_dir, temp=None) from e
    landed = False
    try:
        yield tmp
        _make_readable(tmp)
        _fsync_tree(tmp)
        check_output_free(out_dir, force)  # someone may have created it meanwhile
        old = None
        try:
            if os.path.lexists(target):
                old = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".old", dir=target.parent))
                try:
                    os.replace(target, old / target.name)
                except OSError as e:
                    raise _cannot_move_aside(e, out_dir) from e
            os.replace(tmp, target)
        except BaseException:  # also Ctrl-C between the two renames (found by an audit: the output was lost)
            if old is not None:
                if os.path.lexists(old / target.name) and not os.path.lexists(target):  # put the old one back
                    os.replace(old / target.name, target)
                if os.path.lexists(old / target.name):  # another writer took its place: never delete it
                    warnings.warn(f"{out_dir} was not replaced; the folder that was there is now "
                                  f"{old / target.name}.", RuntimeWarning, stacklevel=3)
                else:
                    shutil.rmtree(old, ignore_errors=True)
            raise
        landed = True
        with contextlib.suppress(OSError):  # the rename itself; the folder is published whatever this gives
            _fsync(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            if os.path.lexists(old):
                warnings.warn(f"{out_dir} was replaced, but the old folder could not be deleted; it is now {old}: "
                              "delete it yourself.", RuntimeWarning, stacklevel=3)
    except Exception as e:
        interrupt = _interrupt_behind(e)
        if interrupt is not None:
            raise interrupt
        if not isinstance(e, OSError):
            raise
        renamed = _naming_target(e, out_dir, temp=tmp)
        if renamed is e:
            raise
        raise renamed from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not landed:
            _remove_empty(created)


def _make_parents(path: Path) -> List[Path]:
    """Create the missing parent folders of ``path``; returns those created, outermost first."""
    missing = []
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    Path(os.path.abspath(path)).parent.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def _remove_empty(created: List[Path]) -> None:
    """Remove folders a failed write created (innermost first), if still empty: an error leaves nothing behind."""
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _cannot_move_aside(error: OSError, out_dir: Path) -> OSError:
    """The error for an existing ``out_dir`` that cannot be renamed aside (busy, a mount point, no permission)."""
    reason = error.strerror or str(error)
    new = type(error)(
        f"cannot replace {out_dir}: moving the existing folder aside failed ({reason}; a mount point or a folder "
        "in use cannot be moved); nothing was changed. Choose another output folder (--out) or remove it first."
    )
    new.errno = error.errno  # for callers that test it; the message stays the one above
    return new


def _make_readable(target: Path, like: Optional[Path] = None) -> None:
    """Give a temp file, or a temp folder and its files, the permissions a plain open/mkdir would (temp files
    are private). A temp file that will replace ``like``, an existing file, gets its permissions instead, as a plain
    open of ``like`` for writing keeps them (found by an audit: ``force`` turned a 0600 file into a 0644 one)."""
    try:
        kept = os.lstat(like) if like is not None else None
    except FileNotFoundError:  # gone meanwhile: a new file
        kept = None
    if kept is not None and stat.S_ISREG(kept.st_mode):  # a link or a special file in the way is not copied
        os.chmod(target, stat.S_IMODE(kept.st_mode) & 0o777)
        return
    umask = os.umask(0)
    os.umask(umask)
    for p in [target, *(target.rglob("*") if target.is_dir() else ())]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk (a file system that cannot sync a folder is let be)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if not (os.path.isdir(path) and e.errno in (errno.EINVAL, errno.ENOTSUP)):
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """:func:`_fsync` every regular file in ``folder``, then its folders, innermost first, ``folder`` last."""
    for parent, _, files in os.walk(folder, topdown=False):
        for name in files:
            path = Path(parent) / name
            if path.is_file() and not path.is_symlink():
                _fsync(path)
        _fsync(Path(parent))
