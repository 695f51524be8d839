"""A torch.save file cut short anywhere is reported as corrupt or truncated by each of the three readers (the shvit
entrypoint, nvit.load_checkpoint, vitzoo's load_pretrained_model), never as an unsafe pickle; a complete file that
pickles a non-allowlisted global is still reported as unsafe.

Found: a legacy (non-zip) file cut inside a global's name (e.g. 782 bytes into a shvit_s1 state dict, in the middle of
``torch.LongStorage``) made weights_only=True report the partial name as a global it does not allow.
"""
import argparse
import ast
import pickle
import re
from pathlib import Path

import pytest
import timm
import torch

import nvit  # noqa: F401  registers the nvit models
import shvit
from nvit.checkpoint import CorruptCheckpointError as NViTCorruptError
from nvit.checkpoint import load_checkpoint
from vitzoo.hub import CorruptWeightsError, WeightsError, load_pretrained_model

ROOT = Path(__file__).resolve().parents[1]
# the legacy format's first 14 bytes (pickle protocol 2, torch's magic number): a shorter cut is not recognisably a
# legacy file, and the readers report it in their older words
LEGACY_HEAD = 14
# the same head in each pickle protocol torch.save takes (pickle_protocol=N): PROTO (2 bytes) and LONG1 (12 bytes) at
# protocols 2 and 3, a FRAME (9 bytes) between them at 4 and 5, and at protocol 1 the number as text ("L<24 digits>L\n")
LEGACY_HEADS = {1: 27, 2: 14, 3: 14, 4: 23, 5: 23}


class Pickled:
    """An object that weights_only=True refuses to unpickle (its global is not allowlisted)."""

    def __reduce__(self):
        return (Pickled, ())


def _shvit(path):
    return timm.create_model("shvit_s1", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def _vitzoo(path):
    return load_pretrained_model("shvit_s1", pretrained_cfg_overlay=dict(file=str(path)))


READERS = {  # reader, the error it raises for a corrupt or truncated file
    "shvit": (_shvit, shvit.CorruptCheckpointError),
    "nvit": (load_checkpoint, NViTCorruptError),
    "vitzoo": (_vitzoo, CorruptWeightsError),
}


def _small_state(unsafe=False):
    """A few tensors of several dtypes, one a view sharing another's storage (and, if ``unsafe``, a pickled
    object)."""
    base = torch.arange(12.0)
    state = {"w": base[2:8], "v": base, "i": torch.arange(3), "h": torch.ones(2, dtype=torch.float16)}
    if unsafe:
        state["obj"] = Pickled()
    return state


def _save(path, unsafe=False, legacy=True):
    torch.save(_small_state(unsafe), path, _use_new_zipfile_serialization=not legacy)
    return path.read_bytes()


def _sweep(reader, data, cut):
    """Every prefix of ``data`` (all but the whole) written to ``cut`` and read: the reader's error for each."""
    errors = {}
    for size in range(len(data)):
        cut.write_bytes(data[:size])
        with pytest.raises(Exception) as info:
            reader(cut)
        errors[size] = info.value
    return errors


def _sweep_expecting(reader, corrupt, data, cut):
    """``_sweep``, asserting that every cut raised ``corrupt`` exactly; the errors by cut size."""
    errors = _sweep(reader, data, cut)
    wrong = {size: f"{type(e).__name__}: {str(e)[:150]}" for size, e in errors.items() if type(e) is not corrupt}
    assert not wrong, f"{len(wrong)} of {len(data)} cuts (at {sorted(wrong)}) are not {corrupt.__name__}: {wrong}"
    return errors


@pytest.mark.parametrize("unsafe", [False, True], ids=["plain", "unsafe"])
@pytest.mark.parametrize("name", list(READERS))
def test_every_cut_of_a_legacy_file_is_truncated_not_unsafe(tmp_path, name, unsafe):
    reader, corrupt = READERS[name]
    data = _save(tmp_path / "full.pth", unsafe=unsafe)
    cut = tmp_path / "cut.pth"
    errors = _sweep_expecting(reader, corrupt, data, cut)
    for size, error in errors.items():
        text = str(error)
        assert str(cut) in text and "pickles" not in text, (size, text)
        if size >= LEGACY_HEAD:
            assert f"legacy (non-zip) torch.save file that ends at byte {size}, inside" in text, (size, text)
            assert re.search("download or convert (it|the file) again", text, re.IGNORECASE), (size, text)


@pytest.mark.parametrize("name", list(READERS))
def test_every_cut_of_a_zip_file_is_corrupt_not_unsafe(tmp_path, name):
    """Found by the same sweep on the zip format: the shvit entrypoint called a file cut to 1-3 bytes ('P', 'PK',
    'PK\\x03') one that "requires non-allowlisted pickle globals" (timm's words for any refusal of torch's
    weights-only unpickler; this one was "Unsupported operand 80", 'P' being the PERSID opcode)."""
    reader, corrupt = READERS[name]
    data = _save(tmp_path / "full.pth", legacy=False)
    cut = tmp_path / "cut.pth"
    errors = _sweep_expecting(reader, corrupt, data, cut)
    for size, error in errors.items():
        text = str(error)
        assert str(cut) in text and "pickles" not in text and "allowlisted" not in text, (size, text)


@pytest.mark.parametrize("name", list(READERS))
def test_a_complete_legacy_file_with_an_unsafe_global_is_still_unsafe(tmp_path, name):
    reader, corrupt = READERS[name]
    path = tmp_path / "unsafe.pth"
    _save(path, unsafe=True)
    with pytest.raises(RuntimeError) as info:
        reader(path)
    assert not isinstance(info.value, corrupt) and "pickles" in str(info.value), str(info.value)
    if name == "vitzoo":
        assert isinstance(info.value, WeightsError)


@pytest.mark.parametrize("protocol", list(LEGACY_HEADS))
@pytest.mark.parametrize("module", ["shvit.torch_legacy", "nvit.torch_legacy"])
def test_the_structure_walk_passes_complete_files_and_names_every_cut(tmp_path, module, protocol):
    """Complete legacy files of every dtype a legacy file can hold (with shared storages, an empty tensor and a
    training checkpoint's argparse.Namespace) pass; every cut past the head (the pickle of torch's magic number) is
    found, at its own size, in every pickle protocol torch.save takes (before 2026-11-25 only protocol 2, torch's
    default, was recognised: a file saved with pickle_protocol=3, 4 or 5 or 1 was not walked, and its cuts were left
    to torch.load)."""
    legacy_file_cut = __import__(module, fromlist=["legacy_file_cut"]).legacy_file_cut
    dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool, torch.complex128, torch.complex64]
    state = {str(d): torch.ones(3, dtype=d) for d in dtypes}
    base = torch.arange(10.0)
    checkpoint = {"model": dict(state, view=base[3:], base=base, empty=torch.empty(0)), "epoch": 3,
                  "args": argparse.Namespace(lr=0.1), "dims": [(1, 2), (3, 4)]}
    path = tmp_path / "full.pth"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    data = path.read_bytes()
    assert torch.equal(torch.load(path, weights_only=False)["model"]["view"], base[3:])  # torch reads it back
    assert legacy_file_cut(path) is None
    torch.save(checkpoint, path)  # the zip format is not walked
    assert legacy_file_cut(path) is None
    head = LEGACY_HEADS[protocol]
    path.write_bytes(data[:head - 1])  # not recognisably a legacy file: left to the readers' other checks
    assert legacy_file_cut(path) is None
    # a dense sample of the cuts, each part of the file included (sparser for the protocols torch.save does not default
    # to, to keep the test short)
    step = max(1, len(data) // (1500 if protocol == 2 else 300))
    sizes = sorted({*range(head, head + 40), *range(head, len(data), step), *range(len(data) - 40, len(data))})
    for size in sizes:
        path.write_bytes(data[:size])
        assert f"ends at byte {size}, inside" in (legacy_file_cut(path) or ""), size


def test_the_two_copies_of_the_structure_walk_are_the_same_code():
    """The model packages may not import vitzoo or each other, so each has its copy (vitzoo uses shvit's): the same
    code (quotes aside)."""
    trees = {p: ast.dump(ast.parse((ROOT / p).read_text())) for p in ("shvit/torch_legacy.py", "nvit/torch_legacy.py")}
    assert len(set(trees.values())) == 1, list(trees)


@pytest.mark.parametrize("protocol", [1, 3, 4, 5])
@pytest.mark.parametrize("name", list(READERS))
def test_a_legacy_file_of_another_pickle_protocol_cut_short_is_truncated(tmp_path, name, protocol):
    """A legacy file saved with torch.save(..., pickle_protocol=N), N other than torch's default 2, cut inside its
    first storage's type name or in its last bytes, is truncated for every reader. Before 2026-11-25 such a file was
    not recognised as a legacy file (only protocol 2's first bytes were), so the cut went to torch.load, and the shvit
    entrypoint reported the cut inside the type name as a file that pickles an unsafe global."""
    reader, corrupt = READERS[name]
    path = tmp_path / "cut.pth"
    torch.save(_small_state(), path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    data = path.read_bytes()
    for size in (data.index(b"Storage") + 4, len(data) - 1):
        path.write_bytes(data[:size])
        with pytest.raises(corrupt) as info:
            reader(path)
        text = str(info.value)
        assert f"legacy (non-zip) torch.save file that ends at byte {size}, inside" in text, (size, text)
        assert str(path) in text and "pickles" not in text, (size, text)


NOT_TORCH = {  # files that are no torch.save file at all, and what torch's weights-only unpickler answers them with
    "garbage": bytes(range(7, 250)) * 20,  # "Unsupported operand 7", with the advice to retry with weights_only=False
    "html": b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body></body></html>\n" * 20,  # operand 60
    "text": b"junk\n",  # a bare KeyError
    "empty": b"",  # a bare EOFError
    "zeros": bytes(4096),  # a failed copy; tarfile takes it for an empty tar, torch for its legacy tar format
}
# torch's advice for files it refuses to unpickle, for trusted complete files only, and its bare exceptions
TORCH_WORDS = ("weights_only` set to `False`", "weights_only=False", "trust", "allowlisted", "KeyError", "EOFError",
               "Unsupported operand")


@pytest.mark.parametrize("case", list(NOT_TORCH))
@pytest.mark.parametrize("name", list(READERS))
def test_a_file_that_is_no_torch_save_file_is_named_so_without_torchs_words(tmp_path, name, case):
    """A .pth file that is no torch.save file (random bytes, an HTML page, text, nothing) is corrupt or not a
    checkpoint, in the readers' words: named, said to be no torch.save file (or empty), with the advice to download or
    convert it again. Before 2026-11-25 nvit.load_checkpoint quoted torch's whole message, with its advice to load
    the file with weights_only=False ("Re-running torch.load with weights_only set to False will likely succeed"), or
    a bare KeyError / EOFError, and the shvit entrypoint gave torch's "Unsupported operand 7", KeyError or EOFError."""
    reader, corrupt = READERS[name]
    path = tmp_path / "weights.pth"
    path.write_bytes(NOT_TORCH[case])
    with pytest.raises(corrupt) as info:
        reader(path)
    text = str(info.value)
    assert str(path) in text and not [words for words in TORCH_WORDS if words in text], text
    if name == "vitzoo":
        assert "truncated or not a checkpoint: it is neither a safetensors file nor a torch.save archive" in text, text
    else:
        reason = "it is empty" if case == "empty" else "it is not a torch.save file: its first bytes"
        assert "not a checkpoint at all" in text and reason in text, text
        assert re.search("download or convert (it|the file) again", text), text


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
@pytest.mark.parametrize("protocol", [1, 4, 5])
@pytest.mark.parametrize("name", list(READERS))
def test_a_complete_file_in_a_protocol_safe_loading_does_not_read_is_named_so(tmp_path, name, protocol, legacy):
    """A complete torch.save file saved with pickle_protocol=4 or 5 (or 0 / 1), which torch.load(weights_only=True)
    does not read ("Unsupported operand": the FRAME opcode of protocols 4 and 5, the text opcodes of 0 and 1), is
    neither damaged nor unsafe: every reader names the file and its protocol, and says to re-save it in the default
    protocol if trusted. Before 2026-11-25 the shvit entrypoint (and so vitzoo) called it corrupt, "not a pickle that
    torch.save writes", and nvit.load_checkpoint quoted torch's whole message and called it truncated or corrupt."""
    reader, corrupt = READERS[name]
    path = tmp_path / "weights.pth"
    state = _small_state()
    torch.save(state, path, _use_new_zipfile_serialization=not legacy, pickle_protocol=protocol)
    # the reference: torch reads the file back unrestricted, but not with weights-only loading
    assert torch.equal(torch.load(path, weights_only=False)["w"], state["w"])
    with pytest.raises(pickle.UnpicklingError, match="Unsupported operand"):
        torch.load(path, weights_only=True)
    with pytest.raises(RuntimeError) as info:
        reader(path)
    text = str(info.value)
    assert not isinstance(info.value, corrupt) and type(info.value).__name__ in ("PickleProtocolError", "WeightsError")
    named = "0 or 1" if protocol == 1 else str(protocol)
    assert f"{path} is a torch.save file saved in pickle protocol {named}" in text, text
    assert f'torch.save(torch.load("{path}", weights_only=False), "resaved.pth")' in text, text
    assert "corrupt" not in text and "truncated" not in text and "allowlisted" not in text, text
    resaved = tmp_path / "resaved.pth"  # what the advice does gives a file weights-only loading reads
    torch.save(torch.load(path, weights_only=False), resaved)
    assert torch.equal(torch.load(resaved, weights_only=True)["w"], state["w"])
