"""vitzoo.atomic: outputs appear whole or not at all, and are never overwritten unless asked."""
import os

import pytest

from vitzoo.atomic import atomic_open, atomic_write_text, check_output_file, staged_dir


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_open_writes_then_refuses_overwrite(tmp_path):
    out = tmp_path / "sub" / "file.bin"
    with atomic_open(out) as f:
        f.write(b"first")
    assert out.read_bytes() == b"first"
    with pytest.raises(FileExistsError, match="already exists.*force"):
        with atomic_open(out) as f:
            f.write(b"second")
    assert out.read_bytes() == b"first"
    with atomic_open(out, force=True) as f:
        f.write(b"second")
    assert out.read_bytes() == b"second"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not the private mode of a temp file
    assert _leftovers(out.parent) == []


def test_failure_leaves_the_old_file_and_no_temp_file(tmp_path):
    out = tmp_path / "model.onnx"
    atomic_write_text(out, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(out, force=True) as f:
            f.write(b"half of the new fi")
            raise RuntimeError("boom")
    assert out.read_text() == "old"
    assert _leftovers(tmp_path) == []


class _InterruptedWriter:
    """A file whose third write is interrupted (Ctrl-C): torch.save's zip writer then fails in its own clean-up
    ("unexpected pos"), with the interrupt only as the context of that RuntimeError."""

    def __init__(self, f, interrupt):
        self.f, self.interrupt, self.writes = f, interrupt, 0

    def write(self, data):
        self.writes += 1
        if self.writes == 3:
            raise self.interrupt
        return self.f.write(data)

    def flush(self):
        self.f.flush()


class _Terminated(BaseException):
    """As the CLI's SIGTERM exception: a BaseException that is no Exception."""


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt(), _Terminated()])
def test_an_interrupt_that_a_writer_turns_into_an_error_stays_an_interrupt(tmp_path, interrupt):
    """Found by an audit: Ctrl-C or SIGTERM while finetune-det saved a checkpoint printed torch's RuntimeError
    traceback and exited 1, not "interrupted" (130 / 143). The old file stays, no temp file is left, in a file and
    in a staged folder."""
    import torch

    state = {"w": torch.randn(100, 100)}
    out = tmp_path / "checkpoint_last.pth"
    atomic_write_text(out, "old")
    with pytest.raises(type(interrupt)):
        with atomic_open(out, force=True) as f:
            torch.save(state, _InterruptedWriter(f, interrupt))
    assert out.read_text() == "old" and _leftovers(tmp_path) == []
    with pytest.raises(type(interrupt)):
        with staged_dir(tmp_path / "converted") as folder:
            with open(folder / "model.pth", "wb") as f:
                torch.save(state, _InterruptedWriter(f, interrupt))
    assert not (tmp_path / "converted").exists() and _leftovers(tmp_path) == []
    with pytest.raises(RuntimeError, match="boom"):  # an error while handling an ordinary error stays itself
        with atomic_open(out, force=True):
            try:
                raise ValueError("first")
            except ValueError:
                raise RuntimeError("boom")


def test_a_file_that_appears_while_writing_is_not_replaced(tmp_path, monkeypatch):
    out = tmp_path / "plot.png"
    with pytest.raises(FileExistsError, match="already exists.*force"):
        with atomic_open(out) as f:
            f.write(b"ours")
            out.write_bytes(b"another writer's")  # lands after the check, before our file is moved in
    assert out.read_bytes() == b"another writer's"
    assert _leftovers(tmp_path) == []
    # without hard links (some network / FAT file systems) the check is repeated right before the rename
    monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(PermissionError("no hard links here")))
    with pytest.raises(FileExistsError):
        with atomic_open(out) as f:
            f.write(b"ours")
    assert out.read_bytes() == b"another writer's"
    out.unlink()
    with atomic_open(out) as f:
        f.write(b"ours")
    assert out.read_bytes() == b"ours" and _leftovers(tmp_path) == []


def test_check_output_file_names_what_is_in_the_way(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder; give a file path"):
        check_output_file(tmp_path / "folder", force=True)  # force replaces files, never folders
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="already exists"):
        check_output_file(tmp_path / "file", force=False)
    check_output_file(tmp_path / "file", force=True)
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        check_output_file(tmp_path / "file" / "sub" / "out.onnx", force=False)
    check_output_file(tmp_path / "new" / "sub" / "out.onnx", force=False)  # missing folders are created later
    with pytest.raises(IsADirectoryError):
        with atomic_open(tmp_path / "folder", force=True):
            pass


@pytest.mark.parametrize("when", ["as the new folder moves in", "right after the old one moved aside"])
def test_an_interrupt_during_a_forced_replace_puts_the_old_folder_back(tmp_path, monkeypatch, when):
    """The second case was found by an audit: Ctrl-C between the two renames left no output, the old folder hidden
    in `.NAME.XXXX.old`."""
    out = tmp_path / "hub_folder"
    out.mkdir()
    (out / "f").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if when.startswith("as") and str(src).endswith(".partial"):
            raise KeyboardInterrupt
        real_replace(src, dst)
        if when.startswith("right") and str(dst).endswith(".old/hub_folder"):
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(out, force=True) as tmp:
            (tmp / "f").write_text("new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert (out / "f").read_text() == "old" and _leftovers(tmp_path) == []


def test_an_old_folder_that_cannot_be_deleted_is_named(tmp_path, monkeypatch):
    import shutil
    out = tmp_path / "hub_folder"
    out.mkdir()
    monkeypatch.setattr(shutil, "rmtree", lambda *args, **kwargs: None)  # e.g. a file in it that cannot go
    with pytest.warns(RuntimeWarning, match=r"hub_folder was replaced, but the old folder could not be deleted; it "
                                            r"is now .*/\.hub_folder\..*\.old: delete it yourself"):
        with staged_dir(out, force=True) as tmp:
            (tmp / "f").write_text("new")
    assert (out / "f").read_text() == "new"


def test_staged_dir_is_all_or_nothing(tmp_path):
    out = tmp_path / "hub_folder"
    with pytest.raises(RuntimeError):
        with staged_dir(out) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x")
            raise RuntimeError("verification failed")
    assert not out.exists() and _leftovers(tmp_path) == []
    with staged_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (out / "config.json").read_text() == "{}"
    with pytest.raises(FileExistsError):
        with staged_dir(out):
            pass


def test_staged_dir_refuses_the_current_folder_and_mount_points_before_any_work(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work)
    for out, what in ((".", "it is the current folder"), (str(work), "it is the current folder"),
                      ("sub/..", "it is the current folder"), (str(tmp_path), "it contains the current folder")):
        with pytest.raises(FileExistsError, match=f"cannot replace .*: {what}.*choose another output folder"):
            with staged_dir(out, force=True):
                pytest.fail("the body must not run")
    assert sorted(os.listdir(tmp_path)) == ["work"] and os.listdir(work) == ["sub"]
    # without force too: what force cannot change is said first (before 2026-11-25, "already exists ... Pass
    # --force", which then only led to this refusal; found by an audit)
    with pytest.raises(FileExistsError, match="cannot replace .: it is the current folder"):
        with staged_dir(".", force=False):
            pass
    (work / "file").write_text("x")
    with pytest.raises(FileExistsError, match="file is a file, and the output is a folder; a file is never replaced "
                                              r"by one \(not even with --force\)"):
        with staged_dir(work / "file", force=False):
            pass
    (work / "file").unlink()
    with pytest.raises(FileExistsError, match="already exists"):  # an ordinary folder without force: the usual one
        with staged_dir(work / "sub", force=False):
            pass
    with pytest.raises(FileExistsError, match="cannot replace /: it is a mount point"):
        with staged_dir("/", force=True):
            pass


def test_staged_dir_removes_what_it_made_when_the_old_folder_cannot_be_moved_aside(tmp_path, monkeypatch):
    import errno

    out = tmp_path / "hub_folder"
    out.mkdir()
    (out / "f").write_text("old")

    def busy(src, dst):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src), str(dst))

    monkeypatch.setattr(os, "replace", busy)  # what renaming a mount point or a busy folder gives
    with pytest.raises(OSError, match=r"cannot replace .*hub_folder: moving the existing folder aside failed "
                                      r"\(Device or resource busy.*nothing was changed") as info:
        with staged_dir(out, force=True) as tmp:
            (tmp / "f").write_text("new")
    assert info.value.errno == errno.EBUSY and ".old" not in str(info.value)
    assert _leftovers(tmp_path) == [] and (out / "f").read_text() == "old"


def test_os_errors_name_the_target_not_the_temp_file(tmp_path, monkeypatch):
    missing = tmp_path / "gone"
    missing.mkdir()
    real_mkstemp, real_mkdtemp = __import__("tempfile").mkstemp, __import__("tempfile").mkdtemp

    def vanishing(make):  # the folder disappears between the checks and the temp file (as /proc/x behaves)
        def wrapped(*args, **kwargs):
            os.rmdir(missing)
            try:
                return make(*args, **kwargs)
            finally:
                missing.mkdir()
        return wrapped

    monkeypatch.setattr("tempfile.mkstemp", vanishing(real_mkstemp))
    with pytest.raises(FileNotFoundError) as info:
        atomic_write_text(missing / "model.onnx", "x")
    assert str(info.value) == f"[Errno 2] No such file or directory: '{missing / 'model.onnx'}'"
    monkeypatch.setattr("tempfile.mkdtemp", vanishing(real_mkdtemp))
    with pytest.raises(FileNotFoundError) as info:
        with staged_dir(missing / "hub"):
            pass
    assert str(info.value) == f"[Errno 2] No such file or directory: '{missing / 'hub'}'"
    monkeypatch.undo()

    def denied(src, dst):
        raise PermissionError(13, "Permission denied", str(src), str(dst))

    out = tmp_path / "plot.png"
    monkeypatch.setattr(os, "replace", denied)  # the final rename fails (force: replace rather than link)
    with pytest.raises(PermissionError) as info:
        atomic_write_text(out, "x", force=True)
    assert str(info.value) == f"[Errno 13] Permission denied: '{out}'" and info.value.errno == 13
    with pytest.raises(PermissionError) as info:
        with staged_dir(tmp_path / "hub") as tmp:
            (tmp / "config.json").write_text("{}")
    assert str(info.value) == f"[Errno 13] Permission denied: '{tmp_path / 'hub'}'"
    monkeypatch.undo()
    assert _leftovers(tmp_path) == [] and sorted(os.listdir(tmp_path)) == ["gone"]

    # an error inside the body about a file in the temp folder names the same file in the target folder
    with pytest.raises(FileNotFoundError, match=f"'{tmp_path / 'hub' / 'no' / 'file'}'"):
        with staged_dir(tmp_path / "hub") as tmp:
            (tmp / "no" / "file").write_text("x")
    # other errors are left alone
    with pytest.raises(FileNotFoundError, match=f"'{tmp_path / 'elsewhere'}'"):
        with atomic_open(tmp_path / "out.bin"):
            open(tmp_path / "elsewhere")
    assert sorted(os.listdir(tmp_path)) == ["gone"]


def test_staged_dir_names_a_file_in_the_way_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="cannot write .*file/sub/out: .*file is a file, not a folder"):
        with staged_dir(tmp_path / "file" / "sub" / "out"):
            pytest.fail("the body must not run")
    assert os.listdir(tmp_path) == ["file"]


def test_a_folder_that_appears_while_staging_is_not_replaced(tmp_path):
    """Mutation testing: dropping the re-check before the final rename went unnoticed. Another process creating
    the output folder meanwhile keeps its folder; ours is refused and leaves nothing behind."""
    out = tmp_path / "out"
    with pytest.raises(FileExistsError):
        with staged_dir(out) as tmp:
            (tmp / "ours.txt").write_text("ours")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert _leftovers(tmp_path) == []


def test_an_unwritable_folder_is_named_before_any_work(tmp_path, monkeypatch):
    """Mutation testing: the tests run as root, for whom every folder is writable, so the os.access check never
    decided anything. os.access stands in for a folder this user may not write."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(tmp_path) else
                        real_access(path, mode))
    with pytest.raises(PermissionError, match=f"folder {tmp_path} is not writable"):
        check_output_file(tmp_path / "new" / "file.bin", force=False)
    with pytest.raises(PermissionError, match="is not writable"):
        with staged_dir(tmp_path / "out"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_removes_the_parent_folders_it_created(tmp_path):
    """'On any error nothing is left behind' held for the temp file / folder but not for the missing parents that
    were created for the output (found by an audit: a full disk during vitzoo convert left out/x/y behind). Parents
    that existed before stay."""
    (tmp_path / "kept").mkdir()
    for target, writer in ((tmp_path / "kept" / "a" / "b" / "file.txt", atomic_open),
                           (tmp_path / "kept" / "c" / "d" / "folder", staged_dir)):
        with pytest.raises(RuntimeError, match="disk full"):
            with writer(target):
                raise RuntimeError("disk full")
        assert os.listdir(tmp_path) == ["kept"] and os.listdir(tmp_path / "kept") == []
    with staged_dir(tmp_path / "kept" / "e" / "out") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "kept" / "e" / "out" / "f").read_text() == "x"


def test_a_failed_write_that_names_no_file_names_the_target(tmp_path):
    """A full disk fails f.write with "[Errno 28] No space left on device" and no file name; the error names the
    output (found by an audit: the CLI printed the errno line alone), and the old file and no temp file remain."""
    out = tmp_path / "model.onnx"
    out.write_bytes(b"old")

    class Full:
        def write(self, data):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as info:
        with atomic_open(out, force=True) as f:
            Full().write(f)
    assert str(info.value) == f"[Errno 28] No space left on device: '{out}'" and info.value.errno == 28
    assert out.read_bytes() == b"old" and _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="^not an OS error$"):  # other errors are not touched
        with atomic_open(out, force=True):
            raise ValueError("not an OS error")
    with pytest.raises(ConnectionResetError) as info:  # nor an OS error that is not a write's (found by a review)
        with atomic_open(out, force=True):
            raise ConnectionResetError(104, "Connection reset by peer")
    assert info.value.filename is None


def test_a_path_through_a_missing_folder_and_back_names_the_folder_it_reaches(tmp_path, monkeypatch):
    """Found by an audit: `x/missing/..` does not exist until `missing` is created, so the checks passed, and the
    writer, which resolved it to `x`, replaced `x` without force (`convert --out x/missing/..` deleted x's files).
    `LINK/..` is the link target's parent, as the kernel reads it, also for the current-folder check."""
    x = tmp_path / "x"
    x.mkdir()
    (x / "thesis.txt").write_text("precious")
    monkeypatch.chdir(tmp_path)
    for out in (x / "missing" / "..", "x/missing/.."):
        with pytest.raises(FileExistsError, match=r"x/missing/\.\. already exists \(it is .*/x\); refusing"):
            with staged_dir(out, force=False):
                pytest.fail("the body must not run")
        with pytest.raises(FileExistsError, match="already exists"):
            atomic_write_text(os.path.join(out, "thesis.txt"), "gone")
    assert (x / "thesis.txt").read_text() == "precious" and sorted(os.listdir(x)) == ["thesis.txt"]
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere" / "deep", x / "link")
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError, match=r"cannot replace .*link/\.\.: it is the current folder"):
        with staged_dir(x / "link" / "..", force=True):
            pytest.fail("the body must not run")
    assert sorted(os.listdir(tmp_path / "elsewhere")) == ["deep"]
    with staged_dir(x / "new" / ".." / "made", force=False) as tmp:  # a new folder on such a path lands where named
        (tmp / "f").write_text("1")
    assert (x / "made" / "f").read_text() == "1" and not (x / "new").exists()


def test_a_long_legal_name_is_written(tmp_path):
    """Found by an audit: the temporary names (`.NAME.XXXXXXXX.partial`) of a 250-byte name were too long."""
    name = "n" * 250
    atomic_write_text(tmp_path / f"{name[:-4]}.txt", "ok")
    with staged_dir(tmp_path / name) as tmp:
        (tmp / "f").write_text("1")
    assert (tmp_path / name / "f").read_text() == "1" and (tmp_path / f"{name[:-4]}.txt").read_text() == "ok"
    assert _leftovers(tmp_path) == []


def test_a_long_non_ascii_name_is_written(tmp_path):
    """Found by a review: the temporary names were cut to 100 characters, not bytes (84 CJK characters: 252 bytes)."""
    name = "名" * 84
    atomic_write_text(tmp_path / name, "ok")
    with staged_dir(tmp_path / ("夹" * 84)) as tmp:
        (tmp / "f").write_text("1")
    assert (tmp_path / name).read_text() == "ok" and (tmp_path / ("夹" * 84) / "f").read_text() == "1"


def test_an_old_folder_that_cannot_be_put_back_is_kept_and_named(tmp_path, monkeypatch):
    """Found by a review: when another writer created the output between the two renames, the old folder could not
    be put back and was then deleted."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".old/out"):  # moved aside: someone else creates out/ now
            out.mkdir()
            (out / "theirs").write_text("x")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.warns(RuntimeWarning, match=r"out was not replaced; the folder that was there is now .*\.old/out"):
        with pytest.raises(OSError):
            with staged_dir(out, force=True) as tmp:
                (tmp / "new").write_text("new")
    kept = list(tmp_path.glob(".out.*.old/out/precious"))
    assert len(kept) == 1 and kept[0].read_text() == "old" and (out / "theirs").exists()


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o755])
def test_replacing_a_file_keeps_its_permissions(tmp_path, mode):
    """A forced replace keeps the replaced file's permissions, as a plain open(..., 'w') does (found by an audit: a
    private 0600 file came back 0644)."""
    out = tmp_path / "secret.json"
    out.write_text("old")
    os.chmod(out, mode)
    atomic_write_text(out, "new", force=True)
    assert out.read_text() == "new" and out.stat().st_mode & 0o777 == mode
    with atomic_open(out, force=True) as f:
        f.write(b"newer")
    assert out.read_bytes() == b"newer" and out.stat().st_mode & 0o777 == mode


def test_staged_dir_flushes_its_files_and_folders_to_disk_around_the_rename(tmp_path, monkeypatch):
    """Every file of the staged folder and the folder itself reach the disk before the rename that publishes it, and
    the parent folder (the rename itself) after it (found by an audit: nothing was flushed)."""
    out = tmp_path / "folder"
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), out.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with staged_dir(out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"y" * 1000)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")
    assert sorted(os.listdir(out)) == ["model.safetensors", "sub"]
    before = [path for path, published in synced if not published]
    after = [path for path, published in synced if published]
    staged = (tmp / "model.safetensors", tmp / "sub" / "config.json", tmp / "sub", tmp)
    assert sorted(before) == sorted(map(str, staged))
    assert before[-1] == str(tmp)  # the folder after its files
    assert after == [str(tmp_path)]
