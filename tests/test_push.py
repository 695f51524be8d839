"""`vitzoo push` against the loopback Hub: the upload payload, then loading back what was pushed."""
import json
import os
from pathlib import Path

import pytest
import timm
import torch

from hub_server import use_loopback_hub
from vitzoo.cli import main
from vitzoo.convert import convert_checkpoint
from vitzoo.hub import read_safetensors_metadata


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("shvit_s1").eval()
    root = tmp_path_factory.mktemp("push")
    torch.save(model.state_dict(), root / "src.pth")
    return model, convert_checkpoint(root / "src.pth", "shvit_s1", root / "folder", tag="in1k", flops=False)


def _as_pushed(data: bytes, name: str, repo: str) -> bytes:
    """A converted folder's file as push uploads it: the card's usage line (a folder converted without --repo names
    the release's repo, timm/shvit_s1.in1k) names the repo pushed to."""
    usage = b"timm.create_model('hf-hub:timm/shvit_s1.in1k', pretrained=True)"
    if name != "README.md":
        return data
    assert data.count(usage) == 1
    return data.replace(usage, f"timm.create_model('hf-hub:{repo}', pretrained=True)".encode())


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = use_loopback_hub(monkeypatch, tmp_path)
    yield server
    server.stop()


def test_push_uploads_the_hub_files_and_they_load_back(hub, converted):
    model, folder = converted
    (folder / "notes.txt").write_text("not for the Hub")
    try:
        assert main(["push", str(folder), "--repo", "me/shvit_s1", "--private", "--token", "hf_test"]) == 0
    finally:
        (folder / "notes.txt").unlink()
    assert hub.private == {"me/shvit_s1": True}
    assert [c["repo"] for c in hub.commits] == ["me/shvit_s1"]
    sent = hub.commits[0]["files"]
    assert sorted(sent) == ["README.md", "config.json", "model.safetensors"]
    for name, data in sent.items():
        assert data == _as_pushed((folder / name).read_bytes(), name, "me/shvit_s1")
    header = next(line for line in hub.commits[0]["lines"] if line["key"] == "header")
    assert "shvit_s1" in header["value"]["summary"]

    loaded = timm.create_model("hf-hub:me/shvit_s1", pretrained=True)
    sd, ref = loaded.state_dict(), model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)


def test_push_refuses_an_unverifiable_folder(hub, converted, tmp_path, capsys):
    _, folder = converted
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "README.md"):
        (broken / name).write_bytes((folder / name).read_bytes())
    (broken / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:-100])
    assert main(["push", str(broken), "--repo", "me/broken"]) == 1
    assert "refusing to upload" in capsys.readouterr().err
    assert hub.requests == [] and hub.repos == {}

    config = json.loads((folder / "config.json").read_text())
    (broken / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (broken / "config.json").write_text(json.dumps(dict(config, num_classes=10)))  # does not fit the weights
    assert main(["push", str(broken), "--repo", "me/broken"]) == 1
    assert hub.requests == []
    os.remove(broken / "README.md")
    assert main(["push", str(broken), "--repo", "me/broken"]) == 1
    assert "lacks ['README.md']" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["README.md", "config.json"])
def test_push_refuses_a_folder_whose_licence_was_changed(hub, converted, tmp_path, capsys, where):
    """The weights keep their source's licence: a card or config claiming another one is not uploaded."""
    _, folder = converted
    changed = tmp_path / "changed"
    changed.mkdir()
    for name in ("config.json", "README.md", "model.safetensors"):
        (changed / name).write_bytes((folder / name).read_bytes())
    text = (changed / where).read_text()
    assert "license: mit" in text or '"license": "mit"' in text
    (changed / where).write_text(text.replace("license: mit", "license: apache-2.0", 1)
                                 .replace('"license": "mit"', '"license": "apache-2.0"', 1))
    assert main(["push", str(changed), "--repo", "me/changed"]) == 1
    err = capsys.readouterr().err
    assert "metadata says license 'mit'" in err and "'apache-2.0'" in err
    assert hub.requests == [] and hub.repos == {}


def _edited_copy(folder, into, old, new):
    into.mkdir()
    for name in ("config.json", "README.md", "model.safetensors"):
        (into / name).write_bytes((folder / name).read_bytes())
    card = (into / "README.md").read_text()
    assert card.count(old) == 1, old
    (into / "README.md").write_text(card.replace(old, new))


@pytest.mark.parametrize("field, old, new, shown, recorded", [
    ("Source weights", "- **Source weights:** https://huggingface.co/timm/shvit_s1.in1k",
     "- **Source weights:** https://example.com/other/shvit_s1.in1k",
     "says 'https://example.com/other/shvit_s1.in1k (converted file: `src.pth`)'",
     "source 'src.pth' (the release shvit_s1.in1k is https://huggingface.co/timm/shvit_s1.in1k)"),
    ("Source weights", " (converted file: `src.pth`)", " (converted file: `other.pth`)",
     "says 'https://huggingface.co/timm/shvit_s1.in1k (converted file: `other.pth`)'", "source 'src.pth'"),
    ("sha256 of the source file", "of the source file:** `", "of the source file:** `0123456789abcdef",
     "says '0123456789abcdef", "source_sha256 '"),
    ("sha256 of the source file", "- **sha256 of the source file:**", "- **sha256 (removed):**",
     "has no such line", "source_sha256 '"),
    ("title", "# shvit_s1.in1k\n", "# shvit_s1.in1k_official\n", "says 'shvit_s1.in1k_official'",
     "model.tag 'shvit_s1.in1k'"),
    ("Architecture", "- **Architecture:** `shvit_s1`", "- **Architecture:** `shvit_s4`", "says 'shvit_s4'",
     "model 'shvit_s1'"),
])
def test_push_refuses_a_card_naming_another_source(hub, converted, tmp_path, capsys, field, old, new, shown,
                                                   recorded):
    """The card shows where the weights come from: a card edited to name another source URL, file, sha256 (or
    weight, architecture) than the weights' metadata records is not uploaded, and the error names the field and
    both values (since 2026-11-25; before, only the licence was compared and such a card was published)."""
    _, folder = converted
    edited = tmp_path / "edited"
    _edited_copy(folder, edited, old, new)
    assert main(["push", str(edited), "--repo", "me/edited"]) == 1
    err = capsys.readouterr().err
    assert f"README.md: the card's {field!r} {shown}" in err, err
    assert f"the weights' metadata records {recorded}" in err, err
    assert hub.requests == [] and hub.repos == {}


def test_card_source_checks_accept_every_converted_card(converted, tmp_path):
    """Cards as convert writes them pass: a release URL with the converted file's name, the URL alone when the
    file is named like it, the file's own name for weights not in the manifest (each verified inside convert),
    and a card whose sha256 is written in capitals."""
    from vitzoo.convert import verify_folder

    model, folder = converted
    assert "https://huggingface.co/timm/shvit_s1.in1k (converted file: `src.pth`)" in (folder / "README.md").read_text()
    named = tmp_path / "src" / "shvit_s1.pth"
    named.parent.mkdir()
    torch.save(model.state_dict(), named)
    out = convert_checkpoint(named, "shvit_s1", tmp_path / "release", flops=False)
    assert "- **Source weights:** https://github.com/ysj9909/SHViT/releases/download/v1.0/shvit_s1.pth - not" in \
        (out / "README.md").read_text()
    out = convert_checkpoint(named, "shvit_s1", tmp_path / "mine", tag="mine", flops=False)
    assert "- **Source weights:** shvit_s1.pth\n" in (out / "README.md").read_text()
    sha = read_safetensors_metadata(folder / "model.safetensors")[0]["source_sha256"]
    _edited_copy(folder, tmp_path / "upper", sha, sha.upper())
    verify_folder(tmp_path / "upper")


def test_a_quoted_card_licence_is_the_same_licence(converted, tmp_path):
    """YAML allows ``license: "mit"``; mutation testing: not stripping the quotes went unnoticed."""
    from vitzoo.convert import verify_folder

    _, folder = converted
    quoted = tmp_path / "quoted"
    quoted.mkdir()
    for name in ("config.json", "README.md", "model.safetensors"):
        (quoted / name).write_bytes((folder / name).read_bytes())
    card = (quoted / "README.md").read_text()
    (quoted / "README.md").write_text(card.replace("license: mit", 'license: "mit"', 1))
    assert 'license: "mit"' in (quoted / "README.md").read_text()
    verify_folder(quoted)  # no licence mismatch


# the last five break the Hub's rules (no '--' or '..', no part starting or ending with '-' or '.', at most 96
# characters, ASCII): found by an audit, they were verified and then refused by the Hub client with exit 1
@pytest.mark.parametrize("repo", ["no-slash", "a b/c", "/name", "org/", "me/a--b", "me/a..b", "me/-ab", "me/ab.",
                                  "me/" + "x" * 97, "me/café", "me/x.git", "o" * 97 + "/x"])
def test_push_rejects_bad_repo_id(hub, converted, capsys, repo):
    """A bad --repo is a usage error: exit code 2 before any work (was 1, and 'a b/c' went to the Hub)."""
    assert main(["push", str(converted[1]), "--repo", repo]) == 2
    assert "org/name" in capsys.readouterr().err and hub.requests == []


def test_push_network_errors_and_a_missing_folder_are_one_line(converted, tmp_path, capsys, monkeypatch):
    assert main(["push", str(tmp_path / "nowhere"), "--repo", "me/x"]) == 1
    assert "does not exist; give a folder written by `vitzoo convert`" in capsys.readouterr().err

    class ConnectError(Exception):  # what an HTTP client library raises (httpx-style), not an OSError
        __module__ = "httpx._exceptions"

    from huggingface_hub.errors import OfflineModeIsEnabled

    for error in (OfflineModeIsEnabled("offline mode is enabled"), ConnectError("connection refused"),
                  ConnectError("set the HF_HUB_OFFLINE environment variable.")):  # its end: ".. Check", before
        def failing(*args, _error=error, **kwargs):
            raise _error

        monkeypatch.setattr("vitzoo.push.push_folder", failing)
        assert main(["push", str(converted[1]), "--repo", "me/x"]) == 1
        err = capsys.readouterr().err
        assert "network error, nothing was uploaded" in err and "Traceback" not in err and ".." not in err, err


def _edit(config, change):
    config = json.loads(json.dumps(config))
    return change(config) or config


@pytest.mark.parametrize("change, message", [
    (lambda c: [1], "config.json holds a list, not an object with 'architecture', 'num_classes'"),
    (lambda c: c.pop("num_classes") and None,
     "config.json lacks 'num_classes', a whole number >= 0 (the weights' head (head.l) has 1000 outputs); add it"),
    (lambda c: c.pop("pretrained_cfg") and None, "config.json lacks 'pretrained_cfg', an object; add it"),
    (lambda c: c.update(num_classes="1000"), "config.json: 'num_classes' is \"1000\", not a whole number >= 0"),
    (lambda c: c["model_args"].update(foo=1),
     "config.json: model_args has 'foo', which shvit_s1 does not accept; remove it from model_args"),
    (lambda c: c["model_args"].update(pretrained=True),
     "config.json: model_args has 'pretrained', an argument of timm.create_model, not of shvit_s1"),
    (lambda c: c.update(model_args=[]), "config.json: 'model_args' is a list, not an object"),
    (lambda c: c["model_args"].update(embed_dim=[8, 8, 8]),
     "config.json: shvit_s1 cannot be built with model_args {\"in_chans\":3,\"global_pool\":\"avg\",\"embed_dim\":"
     "[8,8,8]} (ValueError: SHSA needs 0 < pdim < dim"),
    (lambda c: c["model_args"].update(embed_dim=[128, 256, 384]),
     "model.safetensors does not fit the shvit_s1 its config.json describes: 254 tensor(s) of another shape (e.g. "),
    (lambda c: c.update(num_classes=10),
     "config.json says num_classes=10 but the weights' head (head.l) has 1000 outputs; set num_classes (and "
     "model_args.num_classes) to 1000"),
    (lambda c: c.update(num_classes=10) or c["model_args"].update(num_classes=10),
     "config.json says num_classes=10 but the weights' head (head.l) has 1000 outputs"),
    (lambda c: c["model_args"].update(num_classes=10),
     "config.json: 'num_classes' is 1000 but 'model_args' has num_classes=10; make them agree"),
    (lambda c: c["pretrained_cfg"].update(input_size=[3, "a", 2]),
     "config.json: pretrained_cfg.input_size is [3, \"a\", 2], not [channels, height, width]"),
], ids=["list", "no-num_classes", "no-pretrained_cfg", "num_classes-string", "unknown-model_arg", "factory-arg",
        "model_args-list", "model_arg-value", "model_arg-shapes", "num_classes-10", "both-num_classes-10",
        "model_args-num_classes-10", "input_size"])
def test_push_refuses_a_malformed_config_in_one_line_before_any_request(hub, converted, tmp_path, capsys, change,
                                                                        message):
    _, folder = converted
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("model.safetensors", "README.md"):
        (broken / name).write_bytes((folder / name).read_bytes())
    (broken / "config.json").write_text(json.dumps(_edit(json.loads((folder / "config.json").read_text()), change)))
    assert main(["push", str(broken), "--repo", "me/broken"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"vitzoo push: refusing to upload {broken}: {broken}") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert hub.requests == [] and hub.repos == {}


@pytest.mark.parametrize("revision, branch", [("dev", ["dev"]), ("main", []), (None, [])])
def test_push_to_a_branch_creates_it_and_commits_there(converted, monkeypatch, revision, branch):
    """Mutation testing: not creating the branch went unnoticed (the loopback Hub has no branch endpoint, so the
    Hub client is stood in for here)."""
    import types

    import huggingface_hub

    calls = {"branches": [], "uploads": [], "cards": []}

    class RecordingApi:
        def __init__(self, token=None):
            pass

        def repo_info(self, repo_id):
            return types.SimpleNamespace(private=False)

        def create_repo(self, repo_id, private=False, exist_ok=False):
            pass

        def create_branch(self, repo_id, branch, exist_ok=False):
            calls["branches"].append(branch)

        def upload_folder(self, **kwargs):
            calls["uploads"].append(kwargs)
            calls["cards"].append((Path(kwargs["folder_path"]) / "README.md").read_text())
            return types.SimpleNamespace(commit_url=f"https://hub/{kwargs['repo_id']}/commit/1")

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    _, folder = converted
    args = ["push", str(folder), "--repo", "me/shvit_s1"] + (["--revision", revision] if revision else [])
    assert main(args) == 0
    assert calls["branches"] == branch
    assert [u["revision"] for u in calls["uploads"]] == [revision]
    shown = "me/shvit_s1@dev" if revision == "dev" else "me/shvit_s1"  # timm loads a branch as org/name@branch
    assert f"timm.create_model('hf-hub:{shown}', pretrained=True)" in calls["cards"][0]


def test_what_is_uploaded_is_what_was_verified(hub, converted, tmp_path, monkeypatch):
    """Found by an audit: the folder was verified, then read again for the upload, so a file changed in between (a
    convert --force over it, an editor saving the card) was published unverified. The model card is replaced here
    right after verification passes; the Hub must get the verified bytes."""
    import shutil

    import vitzoo.push

    _, folder = converted
    mine = tmp_path / "mine"
    shutil.copytree(folder, mine)
    verified = {name: (mine / name).read_bytes() for name in ("README.md", "config.json", "model.safetensors")}
    real_verify = vitzoo.push.verify_folder

    def verify_then_edit(path, *args, **kwargs):
        report = real_verify(path, *args, **kwargs)
        (mine / "README.md").write_text("---\nlicense: apache-2.0\n---\nedited after verification\n")
        return report

    monkeypatch.setattr(vitzoo.push, "verify_folder", verify_then_edit)
    assert main(["push", str(mine), "--repo", "me/race"]) == 0
    assert hub.commits[0]["files"] == {name: _as_pushed(data, name, "me/race") for name, data in verified.items()}


def test_push_refuses_weights_with_nan_or_infinity_by_name(hub, converted, tmp_path, capsys):
    """Found by an audit: a folder with a NaN was refused as "the loaded weights differ from the source model's"
    (push has no source model; NaN != NaN)."""
    from safetensors.torch import load_file, save_file

    _, folder = converted
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "README.md"):
        (broken / name).write_bytes((folder / name).read_bytes())
    metadata, _ = read_safetensors_metadata(folder / "model.safetensors")
    state = load_file(str(folder / "model.safetensors"))
    state["head.l.weight"][1, 2] = float("inf")
    save_file(state, str(broken / "model.safetensors"), metadata=metadata)
    assert main(["push", str(broken), "--repo", "me/broken"]) == 1
    err = capsys.readouterr().err
    assert "1 tensor(s) hold NaN or infinite values (head.l.weight)" in err and "differ" not in err, err
    assert hub.requests == []


def test_push_names_the_repo_in_the_cards_usage_line(hub, converted):
    """Found by an audit: a folder converted without --repo and pushed to me/shvit told readers to load
    hf-hub:timm/shvit_s1.in1k (or hf-hub:ORG/NAME); the uploaded card now loads what was pushed. The folder itself is
    left as it was."""
    _, folder = converted
    before = (folder / "README.md").read_bytes()
    assert main(["push", str(folder), "--repo", "me/shvit"]) == 0
    card = hub.commits[0]["files"]["README.md"].decode()
    assert "timm.create_model('hf-hub:me/shvit', pretrained=True)" in card and "hf-hub:timm/" not in card
    assert (folder / "README.md").read_bytes() == before


def test_push_private_to_an_existing_public_repo_is_refused(hub, converted, capsys):
    """Found by an audit: --private was ignored for an existing repo (exit 0, "pushed"), so weights under a
    non-commercial licence could go public although private was asked for."""
    _, folder = converted
    hub.repos["me/public"] = {"README.md": b"someone's"}
    hub.private["me/public"] = False
    assert main(["push", str(folder), "--repo", "me/public", "--private"]) == 1  # refused, not a usage error
    err = capsys.readouterr().err
    assert err == ("vitzoo push: error: Hub repo 'me/public' exists and is public; --private does not make it "
                   "private, and nothing was uploaded. Make it private in its settings on the Hub first, or push to a "
                   "new repo.\n")
    assert hub.commits == [] and hub.repos["me/public"] == {"README.md": b"someone's"}
    hub.private["me/public"] = True  # an existing private repo, or a public one without --private: updated
    assert main(["push", str(folder), "--repo", "me/public", "--private"]) == 0
    hub.private["me/public"] = False
    assert main(["push", str(folder), "--repo", "me/public"]) == 0
    assert [c["repo"] for c in hub.commits] == ["me/public", "me/public"] and hub.private["me/public"] is False


def _installed_mit_notices() -> set:
    """The MIT permission notice as installed packages ship it (the independent reference): each text from
    "Permission is hereby granted" to "DEALINGS IN THE SOFTWARE.", whitespace collapsed. Several, since some
    packages ship variants (comment marks, other licences' wording); the directory order decides nothing."""
    import importlib.metadata
    import re

    found = set()
    for dist in importlib.metadata.distributions():
        for file in dist.files or ():
            if "LICEN" in file.name.upper():
                try:
                    text = " ".join(file.read_text().split())
                except (OSError, UnicodeDecodeError, TypeError):
                    continue
                found.update(re.findall(r"Permission is hereby granted, free of charge.*?DEALINGS IN THE SOFTWARE\.",
                                        text))
    if not found:
        pytest.skip("no installed package ships the MIT licence text")
    return found


def test_an_mit_card_carries_the_copyright_and_permission_notice(converted):
    """Found by an audit: the SHViT card said "keep the copyright notice and the permission notice with any copy"
    but only linked the licence; MIT requires the notice itself in copies."""
    _, folder = converted
    card = (folder / "README.md").read_text()
    licence = card.split("## Licence", 1)[1].split("\n## ", 1)[0]
    plain = " ".join(licence.replace(">", " ").split())
    assert any("Copyright (c) 2024 ysj9909 " + notice in plain for notice in _installed_mit_notices())


@pytest.mark.parametrize("metadata", ["oops", {"format": 1}, [], ""])
def test_a_weight_file_with_bad_metadata_is_refused_by_name(hub, converted, tmp_path, capsys, metadata):
    """Found by an audit: a model.safetensors whose __metadata__ is not an object of strings passed the header check
    (the safetensors reader refuses it: the reference) and push crashed with an AttributeError traceback."""
    import shutil

    import safetensors.torch

    _, folder = converted
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    data = (bad / "model.safetensors").read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    header["__metadata__"] = metadata
    encoded = json.dumps(header).encode()
    (bad / "model.safetensors").write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + size:])
    with pytest.raises(Exception, match="invalid JSON in header"):
        safetensors.torch.load_file(bad / "model.safetensors")
    assert main(["push", str(bad), "--repo", "me/shvit_s1", "--token", "hf_test"]) == 1
    err = capsys.readouterr().err
    assert f"{bad / 'model.safetensors'} is corrupt: its safetensors metadata (__metadata__) is not a JSON object of " \
           "strings" in err and "Traceback" not in err, err
    assert hub.commits == []
