"""Build and cache vitzoo's small C kernels (``amx_gemm.c``, ``image_conv.c``, ``shsa_kernel.c``) with the system C
compiler.

A kernel is compiled on first use with ``$CC`` (else ``cc``) into ``$VITZOO_CACHE_DIR/native`` (default
``$XDG_CACHE_HOME/vitzoo``, else ``~/.cache/vitzoo``; a private per-user folder in the system's temporary folder
where that is read-only), under a name keyed by the source, the flags and the compiler, with a sha256 record that
is checked before the library is opened: a library cut short (a crash while copying the cache, a full disk) is
rebuilt, never mapped. Every failure is a ``RuntimeError`` saying what went wrong, which the kernel modules turn
into their ``unavailable_reason()``.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

from vitzoo.atomic import atomic_write_bytes

__all__ = ["build_library", "cpu_flags", "find_compiler", "load_library", "load_once"]


def cpu_flags() -> set:
    """The CPU feature flags the Linux kernel reports (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_dir() -> Optional[Path]:
    """The user's cache folder for vitzoo, or ``None`` for a user with no home folder (a container run under a UID
    with neither ``$HOME`` nor a passwd entry: found by an audit, the kernels were then disabled with "Could not
    determine home directory" instead of being built in the temporary folder)."""
    root = os.environ.get("VITZOO_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "vitzoo"
    try:
        return Path.home() / ".cache" / "vitzoo"
    except (RuntimeError, KeyError):  # Path.home(): RuntimeError from Python 3.10 on, KeyError from pwd before
        return None


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(library: Path) -> bool:
    """Whether ``library`` is a complete build: its sha256 matches the record written after it was built.

    A library cut short (a crash while copying the cache, a full disk) must never be opened: the loader maps it
    and the process dies with SIGBUS on the first call into the missing part.
    """
    record = library.with_name(library.name + ".sha256")
    try:
        return library.is_file() and record.read_text().strip() == _digest(library)
    except OSError:
        return False


def _temporary_dir() -> Path:
    """The per-user build folder in the system's temporary folder, which every user can create names in."""
    return Path(tempfile.gettempdir()) / f"vitzoo-native-{os.getuid()}"


def _private(path: Path) -> bool:
    """``path`` itself (not a link's target) is owned by this user and nobody else may write to it: what a folder in
    the shared temporary folder, and a library in it, must be before the library is loaded (found by an audit:
    another user could create the folder first and plant a library under the predictable name, which was then
    loaded, running their code as this user)."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def _writable_directory(preferred: Optional[Path]) -> Path:
    """``preferred``, created if needed, if a file can be created in it; else (or with ``None``) a private per-user
    directory in the system's temporary folder (reused by later processes, so the kernel is built once there too)."""
    reasons = []
    for directory in ([] if preferred is None else [preferred]) + [_temporary_dir()]:
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            if directory != preferred and not _private(directory):  # a shared folder: only a private one
                reasons.append(f"{directory}: not this user's alone")
                continue
            fd, probe = tempfile.mkstemp(prefix=".probe-", dir=directory)
            os.close(fd)
            os.unlink(probe)
            return directory
        except OSError as e:
            reasons.append(f"{directory}: {e.strerror or e}")
    raise RuntimeError(f"no writable folder to build the kernel in ({'; '.join(reasons)}); set VITZOO_CACHE_DIR to a "
                       f"folder this user can write")


def build_library(source: Path, flags: Sequence[str], compiler: str) -> Path:
    """The library compiled from ``source`` with ``flags`` by ``compiler`` (a command line such as ``"ccache gcc"``),
    built now unless the cache holds an intact one. Raises ``RuntimeError`` saying what went wrong."""
    try:
        command = shlex.split(compiler)
    except ValueError as e:
        raise RuntimeError(f"$CC={compiler!r} is not a valid command line ({e})") from None
    if not command:
        raise RuntimeError("$CC is empty")
    try:
        version = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"the C compiler {compiler!r} does not run ({e})") from None
    key = hashlib.sha256(source.read_bytes() + repr((tuple(flags), compiler, version)).encode()).hexdigest()[:16]
    name = f"{source.stem}-{key}.so"
    temporary = _temporary_dir()
    cache = _cache_dir()
    preferred = None if cache is None else cache / "native"
    for directory in ([] if preferred is None else [preferred]) + [temporary]:
        trusted = directory != temporary or (_private(directory) and _private(directory / name))
        if trusted and _intact(directory / name):
            return directory / name
    target = _writable_directory(preferred) / name
    fd, partial = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([*command, *flags, str(source), "-o", partial], capture_output=True, text=True,
                              timeout=600)
        if done.returncode != 0:
            tail = " / ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise RuntimeError(f"compiling {source.name} with {compiler} failed (exit status {done.returncode})"
                               + (f": {tail}" if tail else ""))
        with open(partial, "rb") as f:
            if f.read(4) != b"\x7fELF":
                raise RuntimeError(f"compiling {source.name} with {compiler} produced no shared library")
            os.fsync(f.fileno())
        digest = _digest(Path(partial))
        os.chmod(partial, 0o700)  # private whatever the linker did: only a private library is loaded from /tmp
        os.replace(partial, target)  # atomic: a concurrent process sees the old state or the whole library
        # last: the record marks the build complete
        atomic_write_bytes(target.with_name(name + ".sha256"), digest.encode(), force=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"compiling {source.name} with {compiler} failed ({e})") from None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def find_compiler() -> Optional[str]:
    """``$CC``, else ``cc`` or ``gcc`` on the PATH; ``None`` if there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def load_library(source: Path, flags: Sequence[str], required_cpu_flags: Sequence[str],
                 functions: Dict[str, Sequence[type]],
                 check: Callable[[ctypes.CDLL], Optional[str]]) -> Tuple[Optional[ctypes.CDLL], str]:
    """``(library, "")`` built from ``source`` and loaded, or ``(None, why not)``.

    Needs Linux on x86-64 with ``required_cpu_flags`` and a C compiler. ``functions`` maps each entry point to its
    ctypes argument types (each returns a C int); ``check(library)`` runs a small case against a reference and
    returns ``None`` if it matches, else what went wrong.
    """
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"needs Linux on x86-64 (this is {platform.system()} on {platform.machine()})"
    missing = [flag for flag in required_cpu_flags if flag not in cpu_flags()]
    if missing:
        return None, f"the CPU lacks {', '.join(missing)}"
    compiler = find_compiler()
    if not compiler:
        return None, "no C compiler found (set $CC or install gcc)"
    path = None
    try:
        path = build_library(source, flags, compiler)
        lib = ctypes.CDLL(str(path))
        for name, argtypes in functions.items():
            function = getattr(lib, name)
            function.restype, function.argtypes = ctypes.c_int, list(argtypes)
    except (RuntimeError, OSError) as e:
        return None, str(e)
    except AttributeError as e:  # a library of another build under the cached name
        return None, f"the cached kernel library {path} lacks its entry points ({e}); delete it to rebuild"
    problem = check(lib)
    return (None, problem) if problem else (lib, "")


def load_once(state: dict, lock: threading.Lock, source: Path, flags: Sequence[str],
              required_cpu_flags: Sequence[str], functions: Dict[str, Sequence[type]],
              check: Callable[[ctypes.CDLL], Optional[str]]) -> Optional[ctypes.CDLL]:
    """:func:`load_library` on the first call, its library and reason kept in ``state`` (``"lib"``, ``"reason"``):
    a kernel module's ``load()``, whose ``unavailable_reason()`` reads ``state["reason"]``."""
    with lock:
        if "lib" not in state:
            state["lib"], state["reason"] = load_library(source, flags, required_cpu_flags, functions, check)
        return state["lib"]
