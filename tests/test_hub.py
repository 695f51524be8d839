"""Loading pretrained weights from a loopback Hub: cfg / hf-hub: routes, .bin fallback, offline reuse, errors."""
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import constants
from timm.models._hub import save_for_hf

from files import damage_largest_member  # tests/files.py
from hub_server import LoopbackHub, use_loopback_hub
from vitzoo.hub import (
    CorruptWeightsError,
    MissingWeightsError,
    WeightsError,
    load_pretrained_model,
    read_safetensors_metadata,
    staged_dir,
    validate_weights_file,
)

REPO = "org/shvit-s1"


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def shvit_files(tmp_path_factory):
    """A random shvit_s1 and its Hub files (safetensors, .bin and config.json) written by timm's save_for_hf."""
    torch.manual_seed(0)
    model = timm.create_model("shvit_s1").eval()
    folder = tmp_path_factory.mktemp("shvit-hub")
    save_for_hf(model, str(folder), safe_serialization="both")
    files = {f: (folder / f).read_bytes() for f in ("model.safetensors", "pytorch_model.bin", "config.json")}
    return model, files


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = use_loopback_hub(monkeypatch, tmp_path)
    yield server
    server.stop()


def _serve(hub: LoopbackHub, files: dict, *names: str, repo: str = REPO) -> None:
    hub.repos[repo] = {n: files[n] for n in names}


def _cache_files(repo: str = REPO):
    folder = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_pretrained_cfg_then_hf_hub_then_offline_with_zero_requests(hub, shvit_files, monkeypatch):
    model, files = shvit_files
    _serve(hub, files, "model.safetensors", "config.json")
    overlay = dict(hf_hub_id=REPO)

    # pretrained=True through the cfg, with timm alone and through our wrapper
    assert _same_weights(timm.create_model("shvit_s1", pretrained=True, pretrained_cfg_overlay=overlay), model)
    assert _same_weights(load_pretrained_model("shvit_s1", pretrained_cfg_overlay=overlay), model)
    assert ("GET", f"/{REPO}/resolve/main/model.safetensors") in hub.requests
    assert not any("pytorch_model.bin" in path for _, path in hub.requests)  # safetensors first
    # the hf-hub: name reads config.json too
    loaded = timm.create_model(f"hf-hub:{REPO}", pretrained=True)
    assert _same_weights(loaded, model)
    assert ("GET", f"/{REPO}/resolve/main/config.json") in hub.requests

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.requests.clear()
    assert _same_weights(load_pretrained_model("shvit_s1", pretrained_cfg_overlay=overlay), model)
    assert _same_weights(timm.create_model(f"hf-hub:{REPO}", pretrained=True), model)
    assert hub.requests == []


def test_default_cfg_points_at_timm_hub_repo(hub, shvit_files):
    model, files = shvit_files
    _serve(hub, files, "model.safetensors", repo="timm/shvit_s1.in1k")
    assert _same_weights(timm.create_model("shvit_s1", pretrained=True), model)
    assert ("GET", "/timm/shvit_s1.in1k/resolve/main/model.safetensors") in hub.requests


def test_falls_back_to_bin_when_no_safetensors(hub, shvit_files, monkeypatch):
    model, files = shvit_files
    _serve(hub, files, "pytorch_model.bin", "config.json")
    assert _same_weights(load_pretrained_model(f"hf-hub:{REPO}"), model)
    assert ("HEAD", f"/{REPO}/resolve/main/model.safetensors") in hub.requests
    assert ("GET", f"/{REPO}/resolve/main/pytorch_model.bin") in hub.requests
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.requests.clear()
    assert _same_weights(load_pretrained_model(f"hf-hub:{REPO}"), model)
    assert hub.requests == []


def test_missing_repo(hub):
    with pytest.raises(MissingWeightsError, match=r"repository 'org/nope' was not found"):
        load_pretrained_model("shvit_s1", pretrained_cfg_overlay=dict(hf_hub_id="org/nope"))


def test_missing_file(hub, shvit_files):
    _serve(hub, shvit_files[1], "config.json")
    with pytest.raises(MissingWeightsError, match=r"has neither model\.safetensors nor pytorch_model\.bin"):
        load_pretrained_model("shvit_s1", pretrained_cfg_overlay=dict(hf_hub_id=REPO))


def test_offline_empty_cache_says_what_to_download(hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MissingWeightsError, match=rf"hf download {REPO} model\.safetensors.*pretrained_cfg_overlay") \
            as info:
        load_pretrained_model("shvit_s1", pretrained_cfg_overlay=dict(hf_hub_id=REPO))
    assert hub.requests == []
    assert "set HF_HUB_OFFLINE=1" not in str(info.value)  # already set: nothing to suggest


def test_hub_failing_after_the_file_was_checked_names_the_repo_not_a_url(hub, shvit_files, monkeypatch):
    """The weight file is fetched and checked, then timm's own Hub call fails (a dropped connection): the error is a
    Hub error naming the repo and HF_HUB_OFFLINE, not a failed URL download with a made-up file name."""
    model, files = shvit_files
    _serve(hub, files, "model.safetensors", "config.json")

    def drop(*args, **kwargs):
        raise RuntimeError("timm could not load") from ConnectionError("Connection reset by peer")

    monkeypatch.setattr(timm, "create_model", drop)
    with pytest.raises(MissingWeightsError) as info:
        load_pretrained_model(f"hf-hub:{REPO}")
    message = str(info.value)
    assert f"Could not reach the Hub for 'hf-hub:{REPO}' (repo {REPO})" in message
    assert "ConnectionError: Connection reset by peer" in message and "set HF_HUB_OFFLINE=1" in message
    assert "Could not download" not in message and "pretrained_cfg_overlay=dict(file='/path/to/" not in message


def test_offline_advice_keeps_the_revision(hub, monkeypatch):
    """Found by an audit: the advice for `hf-hub:org/name@v2` dropped the revision (it would fetch main's file).
    An hf-hub: name needs the repo's config.json too, which the advice fetches (since 2026-11-25)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    advice = rf"`hf download {REPO} config\.json model\.safetensors --revision v2`"
    with pytest.raises(MissingWeightsError, match=advice):
        load_pretrained_model(f"hf-hub:{REPO}@v2")
    with pytest.raises(MissingWeightsError, match=rf"`hf download {REPO} config\.json model\.safetensors` "):
        load_pretrained_model(f"hf-hub:{REPO}")
    with pytest.raises(MissingWeightsError, match=rf"`hf download {REPO} model\.safetensors --revision v2`"):
        load_pretrained_model("shvit_s1", pretrained_cfg_overlay=dict(hf_hub_id=f"{REPO}@v2"))


def test_hf_hub_name_offline_without_its_config_json_says_so(hub, shvit_files, monkeypatch):
    """The weights are cached (loaded once through the cfg) but the repo's config.json, which timm reads first for an
    hf-hub: name, is not: before 2026-11-25 the check passed and timm's bare LocalEntryNotFoundError followed."""
    model, files = shvit_files
    _serve(hub, files, "model.safetensors", "config.json")
    assert _same_weights(load_pretrained_model("shvit_s1", pretrained_cfg_overlay=dict(hf_hub_id=REPO)), model)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MissingWeightsError, match=rf"config\.json of '{REPO}'.* is not in the Hub cache.*"
                                                  rf"`hf download {REPO} config\.json model\.safetensors`"):
        load_pretrained_model(f"hf-hub:{REPO}")


def _state_dict_bytes(model: torch.nn.Module, safetensors: bool) -> bytes:
    """``model``'s weights as the bytes of a safetensors file or a torch.save archive."""
    import io

    from safetensors.torch import save

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if safetensors:
        return save(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_hf_hub_filename_is_the_file_fetched_and_checked(hub, shvit_files):
    """Found by an audit: a cfg's hf_hub_filename (which timm reads) was ignored; the check looked for
    model.safetensors / pytorch_model.bin only, and refused a repo that has just the named file."""
    model, files = shvit_files
    hub.repos[REPO] = {"weights.pth": files["pytorch_model.bin"]}
    overlay = dict(hf_hub_id=REPO, hf_hub_filename="weights.pth")
    assert _same_weights(load_pretrained_model("shvit_s1", pretrained_cfg_overlay=overlay), model)
    # timm tries a safetensors alternative for .bin names only (the next test), so for weights.pth nothing else
    assert {path for _, path in hub.requests} == {f"/{REPO}/resolve/main/weights.pth"}

    # the named file is checked: a tampered download is reported and evicted
    hub.repos["org/tampered"] = {"weights.pth": files["pytorch_model.bin"]}
    hub.tamper[("org/tampered", "weights.pth")] = bytes(len(files["pytorch_model.bin"]))
    with pytest.raises(CorruptWeightsError, match=r"weights\.pth of Hub repo 'org/tampered' is corrupt"):
        load_pretrained_model("shvit_s1", pretrained_cfg_overlay=dict(overlay, hf_hub_id="org/tampered"))
    with pytest.raises(MissingWeightsError, match=r"'org/shvit-s1' has no other\.safetensors \(the cfg's hf_hub_f"):
        load_pretrained_model("shvit_s1", pretrained_cfg_overlay=dict(overlay, hf_hub_filename="other.safetensors"))


def test_hf_hub_filename_in_an_hf_hub_repos_config_json(hub, shvit_files):
    model, files = shvit_files
    config = json.loads(files["config.json"])
    config["pretrained_cfg"]["hf_hub_filename"] = "weights.pth"
    hub.repos[REPO] = {"weights.pth": files["pytorch_model.bin"], "config.json": json.dumps(config).encode()}
    assert _same_weights(load_pretrained_model(f"hf-hub:{REPO}"), model)
    assert ("GET", f"/{REPO}/resolve/main/weights.pth") in hub.requests


@pytest.mark.parametrize("name", ["shvit_s1", "nvit_t"])
def test_hf_hub_filename_prefers_its_safetensors_alternative_as_timm_does(hub, name):
    """timm's load_state_dict_from_hf reads w.safetensors when the cfg names w.bin and the repo has both. shvit_s1
    is loaded by timm itself; nvit_t reads the file itself, and read w.bin before 2026-11-25."""
    kwargs = dict(dims=NVIT_DIMS) if name == "nvit_t" else {}
    torch.manual_seed(1)
    in_bin = timm.create_model(name, **kwargs)
    in_safetensors = timm.create_model(name, **kwargs)
    hub.repos[REPO] = {"w.bin": _state_dict_bytes(in_bin, safetensors=False),
                       "w.safetensors": _state_dict_bytes(in_safetensors, safetensors=True)}
    overlay = dict(hf_hub_id=REPO, hf_hub_filename="w.bin")
    assert _same_weights(timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs),
                         in_safetensors)
    assert _same_weights(load_pretrained_model(name, pretrained_cfg_overlay=overlay, **kwargs), in_safetensors)
    assert not any(path.endswith("w.bin") for _, path in hub.requests)


UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """The Hub endpoint is a loopback port nothing listens on (connection refused, as offline), online mode, and
    huggingface_hub's waits between retries recorded instead of slept. Yields the list of the waits."""
    from huggingface_hub.utils import _http

    use_loopback_hub(monkeypatch, tmp_path).stop()  # a fresh cache, online mode
    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE)
    template = UNREACHABLE + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    waits = []
    monkeypatch.setattr(_http.time, "sleep", waits.append)
    yield waits


def test_unreachable_hub_suggests_hf_hub_offline(unreachable_hub):
    """Offline without HF_HUB_OFFLINE=1, the Hub client retries each of the two file names five times, 1+2+4+8+8 s
    (so a load takes 46 s or more); the error says so and how to fail at once, with the offline alternatives."""
    with pytest.raises(MissingWeightsError) as info:
        load_pretrained_model("shvit_s1")
    message = str(info.value)
    assert "'timm/shvit_s1.in1k'" in message and "the Hub cannot be reached (HF_HUB_OFFLINE=0)" in message
    assert "set HF_HUB_OFFLINE=1" in message and "(46 s or more)" in message
    assert "pretrained_cfg_overlay=dict(file=" in message and "hf download timm/shvit_s1.in1k" in message
    assert sum(unreachable_hub) == 46, unreachable_hub  # the retry waits the message (and the docs) cite


def test_unreachable_hub_for_an_hf_hub_name_fails_on_its_config_json(unreachable_hub):
    """timm reads an hf-hub: repo's config.json before its weights; unreachable, that one file's retries (1+2+4+8+8 s)
    are the wait, and the advice fetches both files."""
    with pytest.raises(MissingWeightsError) as info:
        load_pretrained_model(f"hf-hub:{REPO}")
    message = str(info.value)
    assert f"config.json of '{REPO}'" in message and "the Hub cannot be reached (HF_HUB_OFFLINE=0)" in message
    assert "set HF_HUB_OFFLINE=1" in message and "(23 s or more)" in message
    assert f"hf download {REPO} config.json model.safetensors" in message
    assert sum(unreachable_hub) == 23, unreachable_hub


@pytest.mark.parametrize("name, first_file", [("shvit_s1", "model.safetensors"), (f"hf-hub:{REPO}", "config.json")])
def test_a_hub_answering_with_an_http_error_is_not_called_unreachable(hub, monkeypatch, name, first_file):
    """The Hub client words a 503 (after its retries) as a connection problem; online, the error says what the Hub
    answered, and no advice for an offline machine follows (before 2026-11-26: "cannot be reached", "set
    HF_HUB_OFFLINE=1")."""
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http.time, "sleep", lambda seconds: None)
    hub.down = 503
    with pytest.raises(MissingWeightsError) as info:
        load_pretrained_model(name)
    message = str(info.value)
    assert "the Hub answered HTTP 503" in message and "cannot be reached" not in message, message
    assert "HF_HUB_OFFLINE=1" not in message and "hf download" in message
    assert hub.requests[0][1].endswith(f"/resolve/main/{first_file}"), hub.requests[:1]


def test_unreachable_hub_through_the_shvit_entrypoint(unreachable_hub, monkeypatch):
    with pytest.raises(RuntimeError, match=r"(?s)Hugging Face Hub repo org/shvit-s1.*set HF_HUB_OFFLINE=1") as info:
        timm.create_model("shvit_s1", pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=REPO))
    assert f"hf download {REPO}" in str(info.value) and "pretrained_cfg_overlay=dict(file=" in str(info.value)
    unreachable_hub.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="not in the Hub cache") as info:
        timm.create_model("shvit_s1", pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=REPO))
    assert "set HF_HUB_OFFLINE=1" not in str(info.value) and unreachable_hub == []


def test_unknown_model_name_is_an_unknown_model_error():
    """An unknown architecture is not a model without weights: the error names the closest registered names."""
    from vitzoo.models import UnknownModelError

    with pytest.raises(UnknownModelError, match=r"unknown model 'shvit_s9'; closest matches: .*shvit_s1") as info:
        load_pretrained_model("shvit_s9")
    assert not isinstance(info.value, WeightsError) and "no pretrained weights" not in str(info.value)
    with pytest.raises(UnknownModelError, match=r"unknown pretrained tag 'nope' for model 'shvit_s1'.*in1k"):
        load_pretrained_model("shvit_s1.nope")
    with pytest.raises(MissingWeightsError, match="'revit_t' has no pretrained weights configured"):
        load_pretrained_model("revit_t")  # registered, but no weights were released


@pytest.mark.parametrize("name", ["shvit_s1.in1k_official", "nvit_b"])
def test_failed_url_download_is_a_missing_weights_error(tmp_path, name):
    """URL-hosted weights (GitHub / Dropbox) that cannot be downloaded (offline, empty cache) are a
    MissingWeightsError, like the Hub's; still a RuntimeError and an OSError for code that catches those."""
    url = f"{UNREACHABLE}/weights/{name.split('.')[0]}.pth"
    with pytest.raises(MissingWeightsError) as info:
        load_pretrained_model(name, cache_dir=str(tmp_path), pretrained_cfg_overlay=dict(url=url))
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, OSError)
    message = str(info.value)
    assert f"Could not download the pretrained weights of '{name}' from {url}" in message
    assert "Connection refused" in message
    assert f"pretrained_cfg_overlay=dict(file='/path/to/{name.split('.')[0]}.pth')" in message
    assert str(tmp_path / f"{name.split('.')[0]}.pth") in message
    assert os.listdir(tmp_path) == []


def test_file_put_where_the_download_error_says_is_used(tmp_path, shvit_files):
    """The download error's advice works: a file at the cache path it names loads with the URL unreachable."""
    model, files = shvit_files
    url = f"{UNREACHABLE}/weights/shvit_s1.pth"
    with pytest.raises(MissingWeightsError, match=str(tmp_path / "shvit_s1.pth")):
        load_pretrained_model("shvit_s1.in1k_official", cache_dir=str(tmp_path), pretrained_cfg_overlay=dict(url=url))
    (tmp_path / "shvit_s1.pth").write_bytes(files["pytorch_model.bin"])
    loaded = load_pretrained_model("shvit_s1.in1k_official", cache_dir=str(tmp_path),
                                   pretrained_cfg_overlay=dict(url=url))
    assert _same_weights(loaded, model)


def test_hash_mismatch_is_reported_and_evicted(hub, shvit_files):
    model, files = shvit_files
    _serve(hub, files, "model.safetensors")
    data = bytearray(files["model.safetensors"])
    data[-1] ^= 0xFF  # same size, one flipped byte: only the hash can tell
    hub.tamper[(REPO, "model.safetensors")] = bytes(data)
    with pytest.raises(CorruptWeightsError, match=r"corrupt and was removed from the cache \(sha256 mismatch"):
        load_pretrained_model("shvit_s1", pretrained_cfg_overlay=dict(hf_hub_id=REPO))
    assert _cache_files() == ["main"]  # only the ref is left: no blob, no snapshot entry
    del hub.tamper[(REPO, "model.safetensors")]
    assert _same_weights(load_pretrained_model("shvit_s1", pretrained_cfg_overlay=dict(hf_hub_id=REPO)), model)


def test_truncated_download_leaves_nothing_in_cache(hub, shvit_files):
    _serve(hub, shvit_files[1], "model.safetensors")
    hub.tamper[(REPO, "model.safetensors")] = shvit_files[1]["model.safetensors"][:1000]
    with pytest.raises(WeightsError, match=r"Downloading model\.safetensors of 'org/shvit-s1' failed"):
        load_pretrained_model("shvit_s1", pretrained_cfg_overlay=dict(hf_hub_id=REPO))
    assert not [f for f in _cache_files() if f.endswith(".incomplete") or len(f) == 64]


def test_corrupt_file_on_the_hub(hub):
    hub.repos[REPO] = {"model.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"}
    with pytest.raises(CorruptWeightsError, match=r"model\.safetensors of Hub repo 'org/shvit-s1' is corrupt"):
        load_pretrained_model("shvit_s1", pretrained_cfg_overlay=dict(hf_hub_id=REPO))


def test_weights_of_another_model(hub, shvit_files):
    _serve(hub, shvit_files[1], "model.safetensors")
    with pytest.raises(WeightsError, match=r"do not fit 'shvit_s2'"):
        load_pretrained_model("shvit_s2", pretrained_cfg_overlay=dict(hf_hub_id=REPO))


def test_local_file_errors(tmp_path, shvit_files):
    with pytest.raises(MissingWeightsError, match="does not exist"):
        load_pretrained_model("shvit_s1", pretrained_cfg_overlay=dict(file=str(tmp_path / "nope.safetensors")))
    truncated = tmp_path / "short.safetensors"
    truncated.write_bytes(shvit_files[1]["model.safetensors"][:-10])
    with pytest.raises(CorruptWeightsError, match="truncated"):
        load_pretrained_model("shvit_s1", pretrained_cfg_overlay=dict(file=str(truncated)))
    broken_zip = tmp_path / "short.bin"
    broken_zip.write_bytes(shvit_files[1]["pytorch_model.bin"][: len(shvit_files[1]["pytorch_model.bin"]) // 2])
    with pytest.raises(CorruptWeightsError, match="neither a safetensors file nor a torch.save archive"):
        validate_weights_file(broken_zip)
    with pytest.raises(MissingWeightsError, match="not a converted model folder"):
        load_pretrained_model(f"local-dir:{tmp_path}")


def test_local_dir_checks_the_file_timm_reads(tmp_path, shvit_files):
    """local-dir: needs config.json and a weight file; with both files present timm reads model.safetensors, so a
    broken pytorch_model.bin beside it does not matter; pytorch_model.bin alone is the fallback."""
    model, files = shvit_files
    both = tmp_path / "both"
    both.mkdir()
    (both / "config.json").write_bytes(files["config.json"])
    (both / "model.safetensors").write_bytes(files["model.safetensors"])
    (both / "pytorch_model.bin").write_bytes(files["pytorch_model.bin"][: len(files["pytorch_model.bin"]) // 2])
    assert _same_weights(load_pretrained_model(f"local-dir:{both}"), model)
    only_bin = tmp_path / "bin"
    only_bin.mkdir()
    (only_bin / "config.json").write_bytes(files["config.json"])
    (only_bin / "pytorch_model.bin").write_bytes(files["pytorch_model.bin"])
    assert _same_weights(load_pretrained_model(f"local-dir:{only_bin}"), model)
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(files["model.safetensors"])
    with pytest.raises(MissingWeightsError, match="needs config.json"):
        load_pretrained_model(f"local-dir:{no_config}")


@pytest.mark.parametrize("arch", ["shvit_s1", "revit_t"])
@pytest.mark.parametrize("name", ["pytorch_model.pth", "checkpoint.pth", "weights.pth.tar"])
def test_local_dir_takes_and_checks_any_weight_file_timm_picks(tmp_path, arch, name):
    """A folder whose weights are not named model.safetensors / pytorch_model.bin: timm's local-dir: loader (and both
    model packages) pick it by timm's rule, and so does load_pretrained_model (before 2026-11-25 it refused such a
    folder as "not a converted model folder"); the picked file is checked, so a truncated one is corrupt."""
    model = timm.create_model(arch).eval()
    save_for_hf(model, str(tmp_path / "hf"), safe_serialization=False)
    (tmp_path / "hf" / "pytorch_model.bin").rename(tmp_path / "hf" / name)
    assert _same_weights(load_pretrained_model(f"local-dir:{tmp_path / 'hf'}"), model)
    data = (tmp_path / "hf" / name).read_bytes()
    (tmp_path / "hf" / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptWeightsError):
        load_pretrained_model(f"local-dir:{tmp_path / 'hf'}")


def test_damaged_archive_member_is_corrupt(tmp_path):
    path = tmp_path / 'damaged.pth'
    torch.save({'w': torch.randn(1000)}, path)
    validate_weights_file(path)
    member = damage_largest_member(path)
    with pytest.raises(CorruptWeightsError, match=f"member {member} of the checkpoint archive fails its CRC check"):
        validate_weights_file(path)


def test_truncated_legacy_torch_file_is_corrupt(tmp_path, shvit_files):
    """A pre-1.6 torch.save file passes the up-front check (only torch.load can read it); cut short, loading it
    fails and the error is CorruptWeightsError, not only the WeightsError base class."""
    model, _ = shvit_files
    legacy = tmp_path / "legacy.pth"
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    validate_weights_file(legacy)
    legacy.write_bytes(legacy.read_bytes()[:4000])  # cut inside the pickled structure
    with pytest.raises(CorruptWeightsError, match="corrupt or truncated"):
        load_pretrained_model("shvit_s1", pretrained_cfg_overlay=dict(file=str(legacy)))


def test_incomplete_checkpoint_is_a_weights_error_with_the_models_reason(tmp_path, shvit_files):
    """shvit's IncompleteCheckpointError already says what is wrong: load_pretrained_model passes its words on as a
    WeightsError, without the "weights of another model?" guess."""
    from safetensors.torch import save_file

    model, _ = shvit_files
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("stages.2.blocks.4.")}
    path = tmp_path / "incomplete.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError, match=r"do not fit 'shvit_s1': Checkpoint is incomplete") as info:
        load_pretrained_model("shvit_s1", pretrained_cfg_overlay=dict(file=str(path)))
    assert "another model" not in str(info.value)


def test_model_entrypoint_errors_are_clear_without_our_wrapper(tmp_path, shvit_files):
    """The SHViT entrypoint itself must explain a missing or truncated file (RuntimeError naming the file)."""
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(RuntimeError, match="missing.safetensors"):
        timm.create_model("shvit_s1", pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))
    truncated = tmp_path / "short.safetensors"
    truncated.write_bytes(shvit_files[1]["model.safetensors"][:-10])
    with pytest.raises(RuntimeError, match="short.safetensors"):
        timm.create_model("shvit_s1", pretrained=True, pretrained_cfg_overlay=dict(file=str(truncated)))


def test_safetensors_header_checks(tmp_path, shvit_files):
    good = tmp_path / "m.safetensors"
    good.write_bytes(shvit_files[1]["model.safetensors"])
    metadata, tensors = read_safetensors_metadata(good)
    assert metadata == {} and "head.l.weight" in tensors and tensors["head.l.weight"]["shape"] == [1000, 320]
    good.write_bytes(shvit_files[1]["model.safetensors"] + b"\0")
    with pytest.raises(CorruptWeightsError, match="truncated or corrupt"):
        read_safetensors_metadata(good)
    good.write_bytes(b"\xff" * 8)
    with pytest.raises(CorruptWeightsError, match="header claims"):
        read_safetensors_metadata(good)
    for entry in ({"dtype": "F32", "shape": [1]}, 5, {"dtype": "F32", "shape": [1], "data_offsets": ["0", 4]}):
        header = json.dumps({"w": entry}).encode()
        good.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
        with pytest.raises(CorruptWeightsError, match="header entry of 'w' is not a tensor record"):
            read_safetensors_metadata(good)


def test_legacy_torch_save_format_is_a_checkpoint_and_a_folder_is_not(tmp_path):
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(3)}, legacy, _use_new_zipfile_serialization=False)
    validate_weights_file(legacy)  # timm and torch.load read it; so must the check
    assert torch.equal(torch.load(legacy, weights_only=True)["w"], torch.zeros(3))
    data = legacy.read_bytes()
    legacy.write_bytes(data[:-20])  # since 2026-11-25 its structure is walked to the end (before: passed unchecked)
    with pytest.raises(CorruptWeightsError, match=f"ends at byte {len(data) - 20}, inside the data of storage 1 of 1"):
        validate_weights_file(legacy)
    with pytest.raises(MissingWeightsError, match="is a folder; give the weight file in it"):
        validate_weights_file(tmp_path)


def test_staged_dir_is_atomic(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ZeroDivisionError):
        with staged_dir(out) as tmp:
            (tmp / "half.txt").write_text("x")
            1 / 0
    assert os.listdir(tmp_path) == []
    with staged_dir(out) as tmp:
        (tmp / "a.txt").write_text("a")
    with pytest.raises(FileExistsError, match="--force"):
        with staged_dir(out):
            pass
    with staged_dir(out, force=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["b.txt"]


def test_expected_sha256_is_compared_without_regard_to_case(tmp_path):
    # mutation testing: a case-sensitive comparison went unnoticed (sha256 sums are often written upper-case)
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(4.0)}, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    validate_weights_file(path, digest.upper())
    validate_weights_file(path, digest)
    with pytest.raises(CorruptWeightsError, match="sha256 mismatch"):
        validate_weights_file(path, hashlib.sha256(b"other").hexdigest().upper())


NVIT_DIMS = dict(embed_dim=64, heads=[2, 1, 2], qk_dim=[16, 16, 16], v_dim=[16, 32, 16], mlp_dim=[128, 96, 64])


def _save_nvit(path, distilled=True, drop=(), metadata=None):
    """A random small nvit_t (NVIT_DIMS) saved as safetensors with its dims record, less the tensors in ``drop``."""
    import nvit
    from safetensors.torch import save_file

    model = timm.create_model("nvit_t", dims=NVIT_DIMS, distilled=distilled)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith(tuple(drop) or "\0")}
    save_file(state, str(path), metadata=metadata or nvit.dims_metadata(model))
    return path


def _legacy_cut(model, path, keep):
    """``model``'s state dict in torch.save's legacy (pre-1.6) format, cut short by ``keep(size)`` bytes."""
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])
    return path


@pytest.mark.parametrize("case", ["nvit_into_shvit", "shvit_into_nvit", "incomplete_nvit", "distilled_into_plain",
                                  "plain_into_distilled", "invalid_dims_record", "legacy_cut_in_pickle",
                                  "legacy_cut_in_tensors", "nvit_legacy_cut"])
def test_every_weight_caused_failure_is_a_weights_error(tmp_path, shvit_files, case):
    """Found by an audit: weights of another family, an incomplete NViT file, a distilled / plain mismatch and some
    truncated legacy .pth files got through load_pretrained_model as a bare ValueError / RuntimeError."""
    model, files = shvit_files
    shvit_file = tmp_path / "shvit.safetensors"
    shvit_file.write_bytes(files["model.safetensors"])
    name, kwargs, error, words = {
        "nvit_into_shvit": ("shvit_s1", {}, WeightsError, "expected shvit_s1"),
        "shvit_into_nvit": ("nvit_t", {}, WeightsError, "is a SHViT checkpoint"),
        "incomplete_nvit": ("nvit_t", {}, WeightsError, "depth 3 vs weights 2 blocks"),
        "distilled_into_plain": ("nvit_t", dict(distilled=False), WeightsError, "create it with distilled=True"),
        "plain_into_distilled": ("nvit_t", dict(distilled=True), WeightsError, "create it with distilled=False"),
        "invalid_dims_record": ("nvit_t", {}, WeightsError, "its NViT dims record is invalid"),
        "legacy_cut_in_pickle": ("shvit_s1", {}, CorruptWeightsError, "corrupt or truncated"),
        "legacy_cut_in_tensors": ("shvit_s1", {}, CorruptWeightsError, "corrupt or truncated"),
        "nvit_legacy_cut": ("nvit_t", {}, CorruptWeightsError, "corrupt or truncated"),
    }[case]
    path = {
        "nvit_into_shvit": lambda: _save_nvit(tmp_path / "nvit.safetensors"),
        "shvit_into_nvit": lambda: shvit_file,
        "incomplete_nvit": lambda: _save_nvit(tmp_path / "nvit.safetensors", drop=["blocks.2."]),
        "distilled_into_plain": lambda: _save_nvit(tmp_path / "nvit.safetensors"),
        "plain_into_distilled": lambda: _save_nvit(tmp_path / "nvit.safetensors", distilled=False),
        "invalid_dims_record": lambda: _save_nvit(tmp_path / "nvit.safetensors", metadata={"nvit_dims": "[1, 2]"}),
        # cut 297 bytes in (inside the pickled header), the reader raises struct.error; 20 bytes short, torch's
        # "unexpected EOF" RuntimeError
        "legacy_cut_in_pickle": lambda: _legacy_cut(model, tmp_path / "legacy.pth", lambda n: 297),
        "legacy_cut_in_tensors": lambda: _legacy_cut(model, tmp_path / "legacy.pth", lambda n: n - 20),
        "nvit_legacy_cut": lambda: _legacy_cut(timm.create_model("nvit_t", dims=NVIT_DIMS), tmp_path / "nvit.pth",
                                               lambda n: n - 20),
    }[case]()
    with pytest.raises(error) as info:
        load_pretrained_model(name, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    assert words in str(info.value) and str(path) in str(info.value)
    if "legacy" in case:  # since 2026-11-25 found cut by validate_weights_file, before loading: nothing to chain
        assert f"ends at byte {path.stat().st_size}" in str(info.value)
    else:
        assert info.value.__cause__ is not None and not isinstance(info.value.__cause__, WeightsError)


@pytest.mark.parametrize("kwargs, error", [
    (dict(bogus=1), TypeError),  # an argument the model does not take
    (dict(img_size=-3), ValueError),  # a value the model refuses
    (dict(global_pool="nope"), ValueError),
])
def test_programming_errors_stay_what_they_are(tmp_path, kwargs, error):
    """Only the weights' faults become WeightsError: a bad argument to the model is raised unchanged."""
    path = _save_nvit(tmp_path / "nvit.safetensors")
    with pytest.raises(error) as info:
        load_pretrained_model("nvit_t", pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    assert not isinstance(info.value, WeightsError)


@pytest.mark.parametrize("name, first_conv", [("shvit_s1", "patch_embed.0.c.weight"),
                                              ("nvit_t", "patch_embed.proj.weight")])
def test_a_checkpoint_of_other_input_channels_names_both_counts(tmp_path, name, first_conv):
    """Found by an audit: a 1-channel checkpoint loaded into a 3-channel model gave timm's "inconsistent with
    input_size" RuntimeError (bare, through load_pretrained_model). The error names both counts and in_chans=1."""
    from safetensors.torch import save_file

    kwargs = dict(dims=NVIT_DIMS) if name == "nvit_t" else {}
    gray = timm.create_model(name, in_chans=1, **kwargs)
    path = tmp_path / "gray.safetensors"
    metadata = {"nvit_dims": gray.dims.to_json()} if name == "nvit_t" else None
    save_file({k: v.contiguous() for k, v in gray.state_dict().items()}, str(path), metadata=metadata)
    overlay = dict(file=str(path))
    with pytest.raises(WeightsError, match=r"takes 1 input channel, the model 3\. Create the model with in_chans=1"):
        load_pretrained_model(name, pretrained_cfg_overlay=overlay, **kwargs)
    with pytest.raises((RuntimeError, ValueError), match=r"takes 1 input channel, the model 3"):  # entrypoint alone
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    # both ways out the message gives: in_chans=1, or in_chans=3 with the checkpoint's channels declared (timm then
    # adapts the conv: adapt_input_conv repeats the one channel and scales by 1/3)
    assert _same_weights(load_pretrained_model(name, in_chans=1, pretrained_cfg_overlay=overlay, **kwargs), gray)
    declared = dict(overlay, input_size=(1, 224, 224))
    color = load_pretrained_model(name, in_chans=3, pretrained_cfg_overlay=declared, **kwargs)
    expected = gray.state_dict()[first_conv].repeat(1, 3, 1, 1) / 3
    assert color.in_chans == 3 and torch.allclose(color.state_dict()[first_conv], expected)
    # two channels: neither the checkpoint's nor the declared three
    advice = r"takes 1 input channel, the model 2\..*here 3\).*in_chans=2 and.*input_size=\(1, H, W\)"
    with pytest.raises(WeightsError, match=advice):
        load_pretrained_model(name, in_chans=2, pretrained_cfg_overlay=overlay, **kwargs)


@pytest.mark.parametrize("content, name, new_name", [
    ("safetensors", "weights.bin", "weights.safetensors"),
    ("safetensors", "pytorch_model.bin", "model.safetensors"),  # the name timm's folder loader looks for
    ("zip", "weights.safetensors", "weights.pth"),
    ("legacy", "model.safetensors", "pytorch_model.bin"),
])
def test_a_file_of_the_other_format_than_its_name_says_is_named(tmp_path, shvit_files, content, name, new_name):
    """Found by an audit: the file type was decided by the name, so a safetensors file named .bin was "neither a
    safetensors file nor a torch.save archive" and a torch.save file named .safetensors was "truncated". timm picks
    the reader by the name too (it cannot load either), so the error names the real format and the name to give."""
    model, files = shvit_files
    path = tmp_path / name
    if content == "legacy":
        torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(files["model.safetensors" if content == "safetensors" else "pytorch_model.bin"])
    real = "a safetensors file" if content == "safetensors" else "a torch.save file"
    with pytest.raises(WeightsError, match=rf"{name} is {real}, but its name says .*Rename it to {new_name}"):
        validate_weights_file(path)
    with pytest.raises(WeightsError, match=rf"Rename it to {new_name}"):
        load_pretrained_model("shvit_s1", pretrained_cfg_overlay=dict(file=str(path)))
    path.rename(tmp_path / new_name)  # the advice works
    assert _same_weights(load_pretrained_model("shvit_s1", pretrained_cfg_overlay=dict(file=str(tmp_path / new_name))),
                         model)


@pytest.mark.parametrize("name", ["shvit_s1", "nvit_t"])
def test_entrypoints_name_a_file_of_the_other_format_too(tmp_path, shvit_files, name):
    """Without load_pretrained_model: before, shvit_s1 called a safetensors file named .bin a checkpoint with
    "non-allowlisted pickle globals", nvit_t called it truncated or corrupt."""
    if name == "nvit_t":
        _save_nvit(tmp_path / "w.safetensors")
    else:
        (tmp_path / "w.safetensors").write_bytes(shvit_files[1]["model.safetensors"])
    (tmp_path / "w.safetensors").rename(tmp_path / "w.bin")
    kwargs = dict(dims=NVIT_DIMS) if name == "nvit_t" else {}
    advice = r"(?s)is a safetensors file, but its name says a torch\.save file.*[Rr]ename it to w\.safetensors"
    with pytest.raises(RuntimeError, match=advice) as info:
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "w.bin")), **kwargs)
    assert "pickle globals" not in str(info.value) and "truncated" not in str(info.value)


@pytest.mark.parametrize("protocol", [1, 2, 3, 4, 5])
def test_legacy_files_of_every_pickle_protocol_pass_the_check(tmp_path, protocol):
    """torch.save(..., _use_new_zipfile_serialization=False, pickle_protocol=N) writes the legacy format in pickle
    protocol N; the file is a torch.save file whatever N (torch.load reads it back), so the check passes it complete
    and calls it truncated cut short. Before 2026-11-25 only protocol 2, torch's default, was recognised: any other
    was "neither a safetensors file nor a torch.save archive"."""
    path = tmp_path / "legacy.pth"
    state = {"w": torch.arange(6.0), "i": torch.arange(3)}
    torch.save(state, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    assert torch.equal(torch.load(path, weights_only=False)["w"], state["w"])
    validate_weights_file(path)
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    cut = rf"is corrupt or truncated: it is a legacy \(non-zip\) torch.save file that ends at byte {len(data) - 5},"
    with pytest.raises(CorruptWeightsError, match=cut):
        validate_weights_file(path)
    named = tmp_path / "legacy.safetensors"
    named.write_bytes(data)
    with pytest.raises(WeightsError, match="is a torch.save file, but its name says a safetensors file"):
        validate_weights_file(named)


def test_a_legacy_file_of_pickle_protocol_3_loads(tmp_path, shvit_files):
    """torch.load(weights_only=True), which timm uses, reads a legacy file of pickle protocol 3 (as it does one of 2):
    load_pretrained_model loads it (before 2026-11-25 it refused it as "neither a safetensors file nor a torch.save
    archive")."""
    model, _ = shvit_files
    path = tmp_path / "legacy3.pth"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False, pickle_protocol=3)
    assert _same_weights(load_pretrained_model("shvit_s1", pretrained_cfg_overlay=dict(file=str(path))), model)


def test_weights_with_nan_or_infinity_are_refused_by_name(tmp_path):
    """Found by an audit: a file with a NaN loaded, and each tool then failed on it in its own misleading words
    (convert: "weights differ from the source model's", export: an output difference of nan, finetune-det: a NaN
    loss, "lower --lr"). A parameter with NaN or infinity, or a buffer with NaN, is a CorruptWeightsError naming
    it; infinity in a buffer (an attention mask) is kept."""
    import math

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    state = model.state_dict()
    path = tmp_path / "w.pth"

    def load(changes):
        torch.save({k: (changes[k] if k in changes else v) for k, v in state.items()}, path)
        overlay = dict(file=str(path), num_classes=10)
        return load_pretrained_model("resnet18", num_classes=10, pretrained_cfg_overlay=overlay)

    weight = state["fc.weight"].clone()
    weight[2, 3] = math.inf
    with pytest.raises(CorruptWeightsError) as caught:
        load({"fc.weight": weight})
    assert f"The pretrained weights from {path} for 'resnet18': 1 tensor(s) hold NaN or infinite values " \
        "(fc.weight): the weights of a training run that diverged" in str(caught.value)
    running_var = state["bn1.running_var"].clone()
    running_var[0] = math.nan
    with pytest.raises(CorruptWeightsError, match=r"2 tensor\(s\) hold NaN .*\(fc.weight, bn1.running_var\)"):
        load({"fc.weight": weight, "bn1.running_var": running_var})
    running_mean = state["bn1.running_mean"].clone()
    running_mean[0] = -math.inf
    assert load({"bn1.running_mean": running_mean}).bn1.running_mean[0] == -math.inf


# ----------------------------------------------------------------------------------- found by the session-30 audit

def test_pretrained_cfg_as_a_tag_or_a_pretrained_cfg_object_as_timm_takes_them(tmp_path, shvit_files):
    """Found by an audit: load_pretrained_model(..., pretrained_cfg="in1k_official") raised "dictionary update
    sequence element #0 has length 1" and a PretrainedCfg object "'PretrainedCfg' object is not iterable"; timm's
    create_model takes both."""
    import dataclasses

    from vitzoo.hub import _weight_source
    from vitzoo.models import UnknownModelError

    official = timm.models.get_pretrained_cfg("shvit_s1.in1k_official")  # timm's registry: where the tag points
    assert _weight_source("shvit_s1", {"pretrained_cfg": "in1k_official"}) == ("url", official.url)
    assert _weight_source("shvit_s1.in1k_official", {}) == ("url", official.url)
    model, files = shvit_files
    (tmp_path / "s1.safetensors").write_bytes(files["model.safetensors"])
    cfg = dataclasses.replace(timm.models.get_pretrained_cfg("shvit_s1.in1k"), file=str(tmp_path / "s1.safetensors"),
                              hf_hub_id=None)
    assert _same_weights(load_pretrained_model("shvit_s1", pretrained_cfg=cfg), model)
    with pytest.raises(UnknownModelError, match=r"unknown pretrained tag 'in1k_oficial' for model 'shvit_s1'; known "):
        load_pretrained_model("shvit_s1", pretrained_cfg="in1k_oficial")


@pytest.mark.parametrize("config, error, message", [
    (None, MissingWeightsError, "Hub repository 'org/shvit-s1' has no config.json, which timm reads first for an "
                                "hf-hub: name (architecture, classes, input size): it is not a timm model repo."),
    (b'{"architecture": "shvit_s1",', WeightsError, "config.json of Hub repo 'org/shvit-s1' is not valid JSON "
                                                    "(Expecting property name enclosed in double quotes"),
    (b'{"model_type": "vit", "architectures": ["ViTForImageClassification"]}', WeightsError,
     "config.json of Hub repo 'org/shvit-s1' names no architecture (its \"architecture\" key), so it is not a timm "
     "config (it looks like a transformers config)"),
    (b'{"architecture": "shvit_s9"}', ValueError, "config.json of Hub repo 'org/shvit-s1' names architecture "
                                                  "'shvit_s9': unknown model 'shvit_s9'; closest matches: shvit_s4"),
])
def test_an_hf_hub_repos_config_json_that_timm_cannot_use_is_named(hub, shvit_files, config, error, message):
    """Found by an audit: timm's raw RemoteEntryNotFoundError, KeyError: 'architecture', a JSONDecodeError naming no
    file, and "Unknown model" reached the caller of load_pretrained_model (which promises its own errors)."""
    _, files = shvit_files
    hub.repos[REPO] = {"model.safetensors": files["model.safetensors"],
                       **({"config.json": config} if config is not None else {})}
    with pytest.raises(error) as info:
        load_pretrained_model(f"hf-hub:{REPO}")
    assert str(info.value).startswith(message), str(info.value)
    with pytest.raises(Exception) as raw:  # what timm alone says, for comparison: not these words
        timm.create_model(f"hf-hub:{REPO}", pretrained=True)
    assert not str(raw.value).startswith(message[:30])


def test_a_gated_repo_says_so(hub, shvit_files):
    """Found by the review: a gated repo whose conditions were not accepted was "not found ... Check the name"."""
    _serve(hub, shvit_files[1], "model.safetensors", "config.json")
    hub.gated.add(REPO)
    for name, kwargs in ((f"hf-hub:{REPO}", {}), ("shvit_s1", dict(pretrained_cfg_overlay=dict(hf_hub_id=REPO)))):
        with pytest.raises(MissingWeightsError, match=rf"^Hub repository '{REPO}' is gated: accept its conditions on "
                                                      rf"http://127\.0\.0\.1:\d+/{REPO} while logged in"):
            load_pretrained_model(name, **kwargs)


def test_a_corrupt_cache_entry_linked_to_a_file_outside_the_cache_leaves_that_file(tmp_path, shvit_files, monkeypatch):
    """Found by an audit: a snapshot entry symlinked by hand to the user's own (truncated) file got that file
    deleted, with the advice "Retry the download" while HF_HUB_OFFLINE=1."""
    _, files = shvit_files
    mine = tmp_path / "mine" / "s1.safetensors"
    mine.parent.mkdir()
    mine.write_bytes(files["model.safetensors"][:-10])
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--me--s1"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "snapshots" / sha).mkdir(parents=True)
    os.symlink(mine, repo / "snapshots" / sha / "model.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CorruptWeightsError) as info:
        load_pretrained_model("shvit_s1", cache_dir=str(tmp_path / "cache"),
                              pretrained_cfg_overlay=dict(hf_hub_id="me/s1"))
    assert "removed from the cache" in str(info.value) and "Download it again while online (`hf download me/s1 " \
        "model.safetensors`; HF_HUB_OFFLINE=1 is set here)." in str(info.value)
    assert mine.read_bytes() == files["model.safetensors"][:-10]  # the user's file is left as it was
    assert not (repo / "snapshots" / sha / "model.safetensors").exists()  # the cache's entry is gone


@pytest.mark.parametrize("where", ["hub", "dir"])
def test_a_config_with_two_class_counts_is_refused(hub, tmp_path, where):
    """Found by an audit: a config.json with num_classes 10 at the top and 1000 in model_args loaded 1000-class
    weights without their classifier and no error. The reference: timm alone builds that model (timm's test_vit)
    with a classifier that is not the file's."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit")
    save_for_hf(model, str(tmp_path / "saved"), safe_serialization=True)
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    config["num_classes"] = 10
    (tmp_path / "saved" / "config.json").write_text(json.dumps(config))
    if where == "hub":
        hub.repos[REPO] = {n: (tmp_path / "saved" / n).read_bytes() for n in ("model.safetensors", "config.json")}
        name, shown = f"hf-hub:{REPO}", f"config.json of Hub repo '{REPO}'"
    else:
        name, shown = f"local-dir:{tmp_path / 'saved'}", str(tmp_path / "saved" / "config.json")
    plain = timm.create_model(name, pretrained=True)
    assert plain.head.weight.shape == model.head.weight.shape
    assert not torch.equal(plain.head.weight, model.head.weight)  # timm alone: a random classifier, no error
    with pytest.raises(WeightsError, match=re.escape(f"{shown} says num_classes 10 at the top and 1000 in model_args")):
        load_pretrained_model(name)
