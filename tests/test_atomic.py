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


def test_forced_staged_dir_puts_the_old_folder_back_when_the_new_one_cannot_land(tmp_path, monkeypatch):
    out = tmp_path / "hub_folder"
    out.mkdir()
    (out / "f").write_text("old")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the second rename: new folder into place
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(out, force=True) as tmp:
            (tmp / "f").write_text("new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert (out / "f").read_text() == "old" and _leftovers(tmp_path) == []


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
