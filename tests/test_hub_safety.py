"""Weight files that must not pass, and Hub cache entries that must (or must not) be removed."""
import json
import struct
from pathlib import Path

import pytest
import timm
import torch
from filelock import FileLock
from huggingface_hub import constants
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from timm.models._hub import save_for_hf

from hub_server import use_loopback_hub
from vitzoo.hub import CorruptWeightsError, WeightsError, load_pretrained_model, read_safetensors_metadata

REPO = "org/shvit-s1"


@pytest.fixture(scope="module")
def safetensors_bytes(tmp_path_factory):
    """The model.safetensors of a random shvit_s1, as timm's save_for_hf writes it."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("shvit-hub")
    save_for_hf(timm.create_model("shvit_s1").eval(), str(folder), safe_serialization=True)
    return (folder / "model.safetensors").read_bytes()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = use_loopback_hub(monkeypatch, tmp_path)
    yield server
    server.stop()


def _repo_cache() -> Path:
    return Path(constants.HF_HUB_CACHE) / ("models--" + REPO.replace("/", "--"))


def _cache_files():
    return sorted(p.name for p in _repo_cache().rglob("*") if p.is_file()) if _repo_cache().exists() else []


def _safetensors(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _edit_header(data: bytes, edit) -> bytes:
    """``data`` (a safetensors file) with ``edit`` applied to its header; the tensors' bytes are kept."""
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    edit(header)
    return _safetensors(header, data[8 + size:])


def _reader_refuses(path: Path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except SafetensorError:
        return True
    return False


def _t(dtype, shape, start, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


@pytest.mark.parametrize("header, size, message", [
    ({"a": _t("F32", [4], 0, 8), "b": _t("F32", [2], 8, 16)}, 16,
     r"tensor 'a' \(F32, shape \[4\]\): its byte range holds 8 bytes, but its dtype and shape need 16"),
    ({"a": _t("F16", [2, 3], 0, 16)}, 16, r"holds 16 bytes, but its dtype and shape need 12"),
    ({"a": _t("F32", [4], 0, 16), "b": _t("F32", [4], 0, 16)}, 16, r"byte range of 'b' \(0 to 16\) overlaps"),
    ({"a": _t("F32", [1], 0, 4), "b": _t("F32", [2], 2, 10)}, 10, r"byte range of 'b' \(2 to 10\) overlaps"),
    ({"a": _t("F32", [1], 0, 4), "b": _t("F32", [1], 8, 12)}, 12, r"'b' \(8 to 12\) leaves the bytes 4 to 8 unused"),
    ({"a": _t("F32", [1], 4, 8)}, 8, r"'a' \(4 to 8\) leaves the bytes 0 to 4 unused"),
    ({"a": _t("U8", [0], 4, 0)}, 4, r"its byte range ends \(at 0\) before it starts \(at 4\)"),
    ({"a": _t("U8", [1], False, True)}, 1, r"entry of 'a' is not a tensor record"),
    ({"a": _t("U8", [4], -4, 0)}, 4, r"entry of 'a' is not a tensor record"),
    ({"a": _t("U8", [4], 0.0, 4.0)}, 4, r"entry of 'a' is not a tensor record"),
    ({"a": _t("U8", [True], 0, 1)}, 1, r"entry of 'a' is not a tensor record"),
    ({"a": _t("U8", [-1], 0, 0)}, 0, r"entry of 'a' is not a tensor record"),
])
def test_a_header_whose_byte_ranges_do_not_fit_its_tensors_is_corrupt(tmp_path, header, size, message):
    """The safetensors reader refuses a file whose tensor byte ranges do not hold exactly their dtype x shape, overlap,
    leave gaps, or are no non-negative integers: so does the header check, naming the tensor (found by an audit:
    only the last range's end was compared with the file's size)."""
    path = tmp_path / "m.safetensors"
    path.write_bytes(_safetensors(header, bytes(size)))
    assert _reader_refuses(path)
    with pytest.raises(CorruptWeightsError, match=message):
        read_safetensors_metadata(path)


def test_headers_the_reader_takes_pass(tmp_path):
    """Empty tensors, tensors out of order in the header, and every dtype the reader writes pass the check."""
    path = tmp_path / "m.safetensors"
    tensors = {"z": torch.zeros(0, 3), "b": torch.ones(3, dtype=torch.bfloat16), "a": torch.arange(5),
               "m": torch.ones(2, 2, dtype=torch.bool), "c": torch.ones(2, dtype=torch.complex64),
               "f": torch.ones(3, dtype=torch.float8_e4m3fn), "u": torch.ones(3, dtype=torch.uint8)}
    save_file(tensors, str(path))
    assert not _reader_refuses(path)
    assert set(read_safetensors_metadata(path)[1]) == set(tensors)
    reordered = _edit_header(path.read_bytes(), lambda h: h.update(dict(reversed(list(h.items())))))
    path.write_bytes(reordered)
    assert not _reader_refuses(path) and set(read_safetensors_metadata(path)[1]) == set(tensors)


def test_a_hub_file_with_a_wrong_tensor_size_is_evicted(hub, safetensors_bytes):
    """A Hub file that fills its size exactly but whose header gives a tensor one element fewer than its byte range
    holds is reported corrupt and removed from the cache, as a hash mismatch is (before: the safetensors reader
    failed on it and the file stayed in the cache)."""
    def drop_one(header):
        header["head.l.bias"]["shape"] = [header["head.l.bias"]["shape"][0] - 1]

    hub.repos[REPO] = {"model.safetensors": _edit_header(safetensors_bytes, drop_one)}
    with pytest.raises(CorruptWeightsError, match=r"corrupt and was removed from the cache \(.*tensor 'head\.l\.bias' "
                                                  r"\(F32, shape \[999\]\): its byte range holds 4000 bytes"):
        load_pretrained_model("shvit_s1", pretrained_cfg_overlay=dict(hf_hub_id=REPO))
    assert _cache_files() == ["main"]  # only the ref is left: no blob, no snapshot entry


def test_the_advice_of_a_long_corrupt_file_error_is_never_cut(hub, safetensors_bytes):
    """A file the header check passes (a dtype it does not know) and the safetensors reader refuses: the error's
    advice, the two cache paths to delete, is kept whole however long the cause (found by an audit: the middle of a
    message of over 600 characters was cut, with the blob's path in it)."""
    hub.repos[REPO] = {"model.safetensors": _edit_header(
        safetensors_bytes, lambda h: h["head.l.bias"].update(dtype="Q32"))}
    with pytest.raises(CorruptWeightsError) as caught:
        load_pretrained_model("shvit_s1", pretrained_cfg_overlay=dict(hf_hub_id=REPO))
    cause = " ".join(str(caught.value.__cause__).split())
    cause_part = cause[:cause.index("To fix:")]
    assert len(cause_part) > 600  # long enough to be shortened
    snapshot = next(_repo_cache().glob("snapshots/*/model.safetensors"))
    blob = next(_repo_cache().glob("blobs/*"))
    message = str(caught.value)
    assert message.endswith(cause[cause.index("To fix:"):])  # the advice, whole
    assert f"To fix: delete {snapshot} and {blob}, the blob it links to, and load again" in message
    assert " ... " in message[:message.index("To fix:")] and len(message[:message.index("To fix:")]) < 700


def test_a_failed_download_leaves_a_partial_file_another_download_holds(hub, safetensors_bytes):
    """A failed download removes the half-downloaded blobs no download holds, and leaves the one whose lock another
    download holds (found by an audit: every *.incomplete blob of the repo was removed)."""
    hub.repos[REPO] = {"model.safetensors": safetensors_bytes}
    hub.tamper[(REPO, "model.safetensors")] = safetensors_bytes[:1000]  # this download is cut short
    blobs = _repo_cache() / "blobs"
    blobs.mkdir(parents=True)
    held = blobs / ("f" * 64 + ".incomplete")  # another process's download, under way
    stale = blobs / ("e" * 64 + ".incomplete")  # left by a download that died
    held.write_bytes(b"x" * 4096)
    stale.write_bytes(b"y" * 4096)
    locks = Path(constants.HF_HUB_CACHE) / ".locks" / _repo_cache().name
    locks.mkdir(parents=True)
    with FileLock(str(locks / ("f" * 64 + ".lock"))):  # as hf_hub_download holds it while it downloads
        with pytest.raises(WeightsError, match=r"Downloading model\.safetensors of 'org/shvit-s1' failed"):
            load_pretrained_model("shvit_s1", pretrained_cfg_overlay=dict(hf_hub_id=REPO))
        assert held.read_bytes() == b"x" * 4096
    assert not stale.exists()
    assert sorted(p.name for p in blobs.iterdir()) == [held.name]
