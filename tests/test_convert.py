"""`vitzoo convert`: official-layout checkpoints -> verified Hub folders, for SHViT and NViT; refusals."""
import argparse
import contextlib
import json
import os
import re
import warnings

import pytest
import safetensors.torch
import timm
import torch
from timm.utils import reparameterize_model

import nvit
from vitzoo.cli import main
from vitzoo.convert import VerificationError, convert_checkpoint, tensors_sha256, verify_folder
from vitzoo.hub import CorruptWeightsError, WeightsError, read_safetensors_metadata, sha256_file

from norms import randomize_norms  # tests/norms.py

NVIT_DIMS = nvit.NViTDims(embed_dim=32, heads=[2, 1, 2], qk_dim=[8, 8, 16], v_dim=[8, 16, 8], mlp_dim=[64, 32, 48])


def _randomize_norms(model: torch.nn.Module) -> torch.nn.Module:
    return randomize_norms(model, torch.Generator().manual_seed(1)).eval()


def _shvit_to_official(state_dict):
    """timm layout -> the official SHViT layout (blocks1/2/3), written from the reference's key rules."""
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"stages\.(\d)\.(downsample|blocks)\.(\d+)\.(.*)", key)
        if m is None:
            out[key] = value  # patch_embed.*, head.*
            continue
        stage, part, idx, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        if part == "blocks":
            new = f"blocks{stage + 1}.{idx + (3 if stage else 0)}.{rest}"
        elif idx < 2:
            new = f"blocks{stage + 1}.0.{idx}.{rest}"
        elif idx == 2:
            new = f"blocks{stage + 1}.1.{rest}"
        else:
            new = f"blocks{stage + 1}.2.{idx - 3}.{rest}"
        out[new] = value
    return out


def _nvit_to_official(state_dict, dims):
    """Our NViT layout -> the official one: separate Q/K/V, token_mask under qkv, proj.proj, 1x1 patch conv."""
    out = {}
    for key, value in state_dict.items():
        if key == "patch_embed.proj.weight":  # (E, c, p1, p2) -> (E, p1*p2*c, 1, 1) with channel order (p1, p2, c)
            out[key] = value.permute(0, 2, 3, 1).reshape(value.shape[0], -1, 1, 1).clone()
        elif ".attn.qkv." in key:
            i = int(key.split(".")[1])
            qk, v = dims.heads[i] * dims.qk_dim[i], dims.heads[i] * dims.v_dim[i]
            kind = key.rsplit(".", 1)[1]
            for name, part in zip("QKV", torch.split(value, [qk, qk, v], dim=0)):
                out[f"blocks.{i}.attn.qkv.{name}.{kind}"] = part.clone()
        elif ".attn.proj." in key:
            out[key.replace(".attn.proj.", ".attn.proj.proj.")] = value
        elif key.endswith(".attn.token_mask"):
            out[key.replace(".attn.token_mask", ".attn.qkv.token_mask")] = value
        else:
            out[key] = value
    for i in range(dims.depth):
        out.setdefault(f"blocks.{i}.attn.qkv.token_mask", torch.ones(198, 1))
    return out


def _outputs(model, size, seed=0):
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def shvit_official(tmp_path_factory):
    """A random shvit_s1 and its checkpoint in the official training-checkpoint format."""
    torch.manual_seed(0)
    model = _randomize_norms(timm.create_model("shvit_s1"))
    path = tmp_path_factory.mktemp("src") / "shvit_s1.pth"
    torch.save({"model": _shvit_to_official(model.state_dict()), "epoch": 299}, path)
    return model, path


def test_shvit_official_roundtrip(shvit_official, tmp_path):
    model, src = shvit_official
    out = tmp_path / "shvit_s1.in1k_official"
    assert main(["convert", str(src), "--model", "shvit_s1", "--out", str(out), "--repo", "me/shvit_s1"]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    assert os.listdir(tmp_path) == [out.name]  # no temp dirs left behind

    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert (_outputs(loaded, (3, 224, 224)) - _outputs(model, (3, 224, 224))).abs().max().item() == 0.0

    metadata, _ = read_safetensors_metadata(out / "model.safetensors")
    assert metadata["format"] == "pt" and metadata["model"] == "shvit_s1" and metadata["license"] == "mit"
    assert metadata["tag"] == "in1k_official" and metadata["source"] == "shvit_s1.pth"
    assert metadata["source_sha256"] == sha256_file(src)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "shvit_s1" and config["num_classes"] == 1000
    assert config["num_features"] == 320 and config["pretrained_cfg"]["license"] == "mit"
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: mit\n") and "{{" not in card
    assert "Copyright (c) 2024 ysj9909" in card and "https://arxiv.org/abs/2401.16456" in card
    assert "hf-hub:me/shvit_s1" in card and metadata["source_sha256"] in card
    assert "6.33M (counted" in card and "241.40M multiply-adds" in card  # FLOPs: paper says 241M (fused, fvcore)
    assert "top-1 72.8%" in card and "top-5 91.0%" in card  # as the manifest reports it, not "91%"
    # the file is only named like the release: the card says it was not verified to be it
    assert "not verified to be that release" in card


def _manifest_recording(model: str, tag: str, sha256: str):
    """The package's weights manifest with ``sha256`` recorded as the source hash of release ``model.tag``."""
    import dataclasses

    from vitzoo.manifest import load_manifest

    manifest = load_manifest()
    weights = [dataclasses.replace(e, source_sha256=sha256) if (e.model, e.tag) == (model, tag) else e
               for e in manifest.weights]
    return dataclasses.replace(manifest, weights=weights)


def test_card_of_a_verified_file_and_of_another_class_count(shvit_official, tmp_path):
    """With the release's sha256 recorded in the manifest, the card names the release plainly; a 10-class checkpoint
    is not the release, whatever its file name (found by an audit: it was labelled in1k_official with the paper's
    top-1)."""
    _, src = shvit_official
    manifest = _manifest_recording("shvit_s1", "in1k_official", sha256_file(src))
    out = convert_checkpoint(src, "shvit_s1", tmp_path / "verified", flops=False, manifest=manifest)
    assert "not verified" not in (out / "README.md").read_text()
    ten = timm.create_model("shvit_s1", num_classes=10)
    path = tmp_path / "src10" / "shvit_s1.pth"
    path.parent.mkdir()
    torch.save({"model": _shvit_to_official(ten.state_dict())}, path)
    out = convert_checkpoint(path, "shvit_s1", tmp_path / "ten", num_classes=10, flops=False)
    metadata, _ = read_safetensors_metadata(out / "model.safetensors")
    assert metadata["tag"] == "converted"
    card = (out / "README.md").read_text()
    assert "72.8%" not in card
    # found by an audit: the 10-class card said `datasets: imagenet-1k`; the file does not tell its data
    front = card.split("\n---\n")[0]
    assert "imagenet" not in front.lower() and "datasets" not in front and front.startswith("---\nlicense: mit\n")
    assert "datasets:\n- imagenet-1k\n" in (tmp_path / "verified" / "README.md").read_text()
    # config.json too: the release's top-1 and params stay out of a fine-tune's pretrained_cfg.notes (audit)
    release_notes = json.loads((tmp_path / "verified" / "config.json").read_text())["pretrained_cfg"]["notes"]
    assert any("top-1 72.780" in n for n in release_notes)
    assert "notes" not in json.loads((out / "config.json").read_text())["pretrained_cfg"]
    # an explicit --num-classes 1000 is the release's class count: still the release (mutation testing), and the
    # sha256 is compared without regard to case
    out = convert_checkpoint(src, "shvit_s1", tmp_path / "explicit", num_classes=1000,
                             sha256=sha256_file(src).upper(), flops=False)
    metadata, _ = read_safetensors_metadata(out / "model.safetensors")
    assert metadata["tag"] == "in1k_official" and "top-1 72.8%" in (out / "README.md").read_text()


def test_config_of_an_unverified_file_states_the_release_accuracy_only_with_a_caveat(shvit_official, tmp_path):
    """The card of a file not verified to be the release says so; config.json's pretrained_cfg.notes stated the
    release's top-1 plainly (found by an audit, before 2026-11-25). A verified file keeps the plain statement."""
    _, src = shvit_official
    # the release's reported numbers (shvit_s1, timm's evaluation: /work/shared/reference), written out here
    plain = "ImageNet-1k top-1 72.780 / top-5 91.024 (timm's evaluation of the in1k weights; paper 72.8)"
    sizes = ["params 6,330,808 (fused 6,308,660)", "fvcore fused 241.40 MMACs at 224x224"]
    unverified = convert_checkpoint(src, "shvit_s1", tmp_path / "unverified", flops=False)
    assert "not verified to be that release" in (unverified / "README.md").read_text()
    notes = json.loads((unverified / "config.json").read_text())["pretrained_cfg"]["notes"]
    assert notes[:2] == sizes and len(notes) == 3  # the architecture's size: not the release's claim
    assert notes[2].startswith(plain + " - reported for the release shvit_s1.in1k_official; ")
    assert "not verified to be that release" in notes[2]
    # --sha256 of the file itself shows it intact, not that it is the release: still the caveat
    given = convert_checkpoint(src, "shvit_s1", tmp_path / "given", sha256=sha256_file(src), flops=False)
    assert json.loads((given / "config.json").read_text())["pretrained_cfg"]["notes"] == notes
    manifest = _manifest_recording("shvit_s1", "in1k_official", sha256_file(src))
    verified = convert_checkpoint(src, "shvit_s1", tmp_path / "verified", flops=False, manifest=manifest)
    assert json.loads((verified / "config.json").read_text())["pretrained_cfg"]["notes"] == [*sizes, plain]


def test_explicit_tag_wins_over_the_tag_in_the_name(shvit_official, tmp_path):
    """tag= (--tag) is the documented override of the name's tag; the name's tag is only the default."""
    _, src = shvit_official
    out = convert_checkpoint(src, "shvit_s1.mine", tmp_path / "out", tag="in1k_official", flops=False)
    metadata, _ = read_safetensors_metadata(out / "model.safetensors")
    assert metadata["tag"] == "in1k_official" and "top-1 72.8%" in (out / "README.md").read_text()


def test_nvit_official_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = _randomize_norms(timm.create_model("nvit_b", dims=NVIT_DIMS))
    src = tmp_path / "NViT_tiny.pth"
    torch.save({"model": _nvit_to_official(model.state_dict(), NVIT_DIMS), "dim": NVIT_DIMS.to_dict(official=True),
                "epoch": 299, "args": argparse.Namespace(model="deit_base_distilled_patch16_224_small")}, src)
    out = tmp_path / "out"
    # a stand-in for the release file, far smaller than NViT-B: only the release's recorded sha256 lets it pass
    release = _manifest_recording("nvit_b", "in1k", sha256_file(src))
    convert_checkpoint(src, "nvit_b", out, flops=False, manifest=release)

    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert loaded.dims == NVIT_DIMS
    assert (_outputs(loaded, (3, 224, 224)) - _outputs(model, (3, 224, 224))).abs().max().item() == 0.0
    metadata, _ = read_safetensors_metadata(out / "model.safetensors")
    assert json.loads(metadata["nvit_dims"]) == NVIT_DIMS.to_dict()
    assert metadata["license"] == "cc-by-nc-sa-4.0" and metadata["tag"] == "in1k"
    assert json.loads((out / "config.json").read_text())["model_args"]["dims"] == NVIT_DIMS.to_dict()
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: cc-by-nc-sa-4.0\n") and "Non-commercial use only" in card
    assert "https://arxiv.org/abs/2110.04869" in card and '"embed_dim":32' in card


def test_file_of_another_size_than_the_release_is_not_credited_to_it(tmp_path, capsys):
    """NViT-B's file converted as nvit_s (found by an audit: the card claimed NViT-S's source and 82.19% top-1):
    without a sha256, a parameter count off the release's reported one by more than 10% is not the release."""
    model = timm.create_model("nvit_b", dims=NVIT_DIMS)  # 0.03M parameters against NViT-S's reported 21M
    src = tmp_path / "NViT_S.pth"
    torch.save({"model": _nvit_to_official(model.state_dict(), NVIT_DIMS),
                "dim": NVIT_DIMS.to_dict(official=True)}, src)
    import hashlib

    own_sha = hashlib.sha256(src.read_bytes()).hexdigest()
    # --sha256 of the file itself shows it is intact, not that it is the release: the size check still applies
    # (before 2026-11-25 any --sha256 switched it off and the card claimed the release; found by an audit)
    for i, sha in enumerate((None, own_sha)):
        out = convert_checkpoint(src, "nvit_s", tmp_path / f"out{i}", flops=False, sha256=sha)
        assert "not the 21M reported for nvit_s.in1k" in capsys.readouterr().err
        metadata, _ = read_safetensors_metadata(out / "model.safetensors")
        assert metadata["tag"] == "converted"
        card = (out / "README.md").read_text()
        assert "82.19" not in card and "NViT_S.pth?rlkey" not in card


def test_refuses_to_overwrite_unless_forced(shvit_official, tmp_path):
    _, src = shvit_official
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", str(src), "--model", "shvit_s1", "--out", str(out), "--no-flops"]) == 1
    assert os.listdir(out) == ["keep.txt"]
    with pytest.raises(FileExistsError, match="--force"):
        convert_checkpoint(src, "shvit_s1", out)
    convert_checkpoint(src, "shvit_s1", out, force=True, flops=False)
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    assert os.listdir(tmp_path) == ["out"]


def test_force_never_replaces_the_folder_holding_the_source_nor_a_file(shvit_official, tmp_path, capsys):
    _, official = shvit_official
    work = tmp_path / "work"
    work.mkdir()
    src = work / "shvit_s1.pth"
    src.write_bytes(official.read_bytes())
    (work / "notes.txt").write_text("mine")
    afile = tmp_path / "afile"
    afile.write_text("mine")
    # found by an audit: without --force these said "already exists ... Pass force=True (--force)", and --force
    # then refused for another reason; the reason comes first, and --force is not offered where it cannot help
    for force in (["--force"], []):
        for out in (work, tmp_path):  # the folder holding the source, and one holding it further down
            assert main(["convert", str(src), "--model", "shvit_s1", "--out", str(out), *force, "--no-flops"]) == 1
            err = capsys.readouterr().err
            assert f"cannot replace {out}: it holds the input {src}" in err and err.count("\n") == 1
            assert "already exists" not in err and "force=True" not in err and "Pass --force" not in err
        assert main(["convert", str(src), "--model", "shvit_s1", "--out", str(afile), *force, "--no-flops"]) == 1
        err = capsys.readouterr().err
        assert f"{afile} is a file, and the output is a folder" in err and "not even with --force" in err
        assert "already exists" not in err and "force=True" not in err and "Pass --force" not in err
    assert sorted(os.listdir(work)) == ["notes.txt", "shvit_s1.pth"]
    assert afile.read_text() == "mine"


def test_a_dangling_link_as_output_is_named_as_a_link(shvit_official, tmp_path, capsys):
    """Found by an audit: a link whose target is gone was reported as "is a file"."""
    _, src = shvit_official
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    for force in (["--force"], []):
        assert main(["convert", str(src), "--model", "shvit_s1", "--out", str(link), *force, "--no-flops"]) == 1
        err = capsys.readouterr().err
        assert f"{link} is a link to {tmp_path / 'gone'}, which does not exist, and the output is a folder" in err
        assert "is a file" not in err and "not even with --force" in err
    assert os.path.islink(link) and not os.path.exists(tmp_path / "gone")


def test_an_existing_output_folder_asks_for_the_cli_option_only(shvit_official, tmp_path, capsys):
    _, src = shvit_official
    out = tmp_path / "out"
    out.mkdir()
    assert main(["convert", str(src), "--model", "shvit_s1", "--out", str(out), "--no-flops"]) == 1
    err = capsys.readouterr().err
    assert err == (f"vitzoo convert: error: {out} already exists; refusing to overwrite it. Pass --force to replace "
                   "it.\n")
    with pytest.raises(FileExistsError, match=r"force=True"):  # the Python API names its argument
        convert_checkpoint(src, "shvit_s1", out)


def test_a_file_pickling_more_than_tensors_is_named_as_such_not_corrupt(shvit_official, tmp_path, capsys):
    import numpy as np
    model, _ = shvit_official
    src = tmp_path / "with_numpy.pth"
    torch.save({"model": model.state_dict(), "best_acc": np.float64(72.8)}, src)
    assert main(["convert", str(src), "--model", "shvit_s1", "--out", str(tmp_path / "out"), "--no-flops"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "it pickles Python objects other than tensors (numpy." in err and "corrupt" not in err
    assert "weights_only=False" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("num_classes", ["10", "0"])
def test_num_classes_unlike_the_checkpoint_says_which_to_pass(shvit_official, tmp_path, capsys, num_classes):
    _, src = shvit_official
    assert main(["convert", str(src), "--model", "shvit_s1", "--out", str(tmp_path / "out"), "--num-classes",
                 num_classes, "--no-flops"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("classifier has 1000 outputs; convert it with --num-classes 1000."), err
    assert "another model" not in err and "..." not in err and "create_model" not in err
    assert main(["convert", str(src), "--model", "shvit_s1", "--out", str(tmp_path / "out"), "--num-classes",
                 "-3", "--no-flops"]) == 2  # a usage error
    assert "must be a whole number >= 0" in capsys.readouterr().err


def test_unreachable_source_url_is_named(tmp_path, capsys):
    url = "http://127.0.0.1:9/shvit_s1.pth"  # loopback discard port: refused at once, no network involved
    assert main(["convert", url, "--model", "shvit_s1", "--out", str(tmp_path / "out"), "--no-flops"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"vitzoo convert: error: Could not download {url}: URLError") and "offline" in err
    assert os.listdir(tmp_path) == []


@contextlib.contextmanager
def _serving(folder):
    """A loopback HTTP server over ``folder``; yields its base URL."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_source_url_is_downloaded_and_recorded_by_url(shvit_official, tmp_path):
    """A source given as a URL (served by a loopback HTTP server over the fixture's folder) is downloaded beside
    the output, converted as the local file would be, and recorded by its URL; nothing is left behind."""
    model, src = shvit_official
    out = tmp_path / "out"
    with _serving(src.parent) as base:
        url = f"{base}/{src.name}?download=true"
        assert main(["convert", url, "--model", "shvit_s1", "--out", str(out), "--no-flops"]) == 0
    assert os.listdir(tmp_path) == ["out"]  # the download's temp folder is gone
    metadata, _ = read_safetensors_metadata(out / "model.safetensors")
    assert metadata["source"] == url and metadata["source_sha256"] == sha256_file(src)
    assert url in (out / "README.md").read_text()
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert (_outputs(loaded, (3, 224, 224)) - _outputs(model, (3, 224, 224))).abs().max().item() == 0.0


def test_another_models_checkpoint_fails_and_leaves_nothing(shvit_official, tmp_path, capsys):
    _, src = shvit_official
    out = tmp_path / "out"
    with pytest.raises(WeightsError, match="shvit_s2"):
        convert_checkpoint(src, "shvit_s2", out, flops=False)
    assert main(["convert", str(src), "--model", "shvit_s2", "--out", str(out), "--no-flops"]) == 1
    assert "shvit_s2" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_unknown_architecture_is_named_before_any_work(shvit_official, tmp_path, capsys):
    _, src = shvit_official
    out = tmp_path / "out"
    assert main(["convert", str(src), "--model", "shvit_s9", "--out", str(out), "--no-flops"]) == 2  # usage
    err = capsys.readouterr().err
    assert "vitzoo convert: error: unknown model 'shvit_s9'; closest matches: shvit_s4" in err
    assert "Traceback" not in err and os.listdir(tmp_path) == []


def test_source_hash_mismatch_and_missing_source(shvit_official, tmp_path):
    _, src = shvit_official
    with pytest.raises(CorruptWeightsError, match="sha256 mismatch"):
        convert_checkpoint(src, "shvit_s1", tmp_path / "out", sha256="0" * 64, flops=False)
    with pytest.raises(WeightsError, match="does not exist"):
        convert_checkpoint(tmp_path / "nope.pth", "shvit_s1", tmp_path / "out", flops=False)
    assert os.listdir(tmp_path) == []


def test_cli_sha256_option(shvit_official, tmp_path, capsys):
    """--sha256 reaches the conversion (found by an audit: only the sha256= argument was tested): another hash fails
    naming both and writes nothing; the file's own hash converts it, and the card says the hash shows the file is
    the one meant, not that it is the release (only the manifest's recorded sha256 verifies that)."""
    import hashlib

    _, src = shvit_official
    right = hashlib.sha256(src.read_bytes()).hexdigest()
    wrong = hashlib.sha256(b"another file").hexdigest()
    out = tmp_path / "out"
    assert main(["convert", str(src), "--model", "shvit_s1", "--out", str(out), "--no-flops", "--sha256", wrong]) == 1
    err = capsys.readouterr().err
    assert (f"vitzoo convert: error: sha256 mismatch for {src}: expected {wrong} (given), got {right}. The file is "
            "corrupt or is not shvit_s1.in1k_official; download it again.\n") in err
    assert "Traceback" not in err and os.listdir(tmp_path) == []
    assert main(["convert", str(src), "--model", "shvit_s1", "--out", str(out), "--no-flops", "--sha256", right]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    card = (out / "README.md").read_text()
    assert right in card and ("not verified to be that release: the manifest records no sha256 of the release; "
                              "the file matches the sha256 given with --sha256") in card


def test_release_verified_by_the_manifests_sha256(shvit_official, tmp_path):
    """A release whose sha256 the manifest records: a matching file is that release (no caveat on the card)."""
    _, src = shvit_official
    manifest = _manifest_recording("shvit_s1", "in1k_official", sha256_file(src))
    out = convert_checkpoint(src, "shvit_s1", tmp_path / "out", flops=False, manifest=manifest)
    card = (out / "README.md").read_text()
    assert sha256_file(src) in card and "not verified" not in card


def test_a_full_disk_is_one_line_and_leaves_nothing(shvit_official, tmp_path, capsys, monkeypatch):
    """safetensors raises its own SafetensorError (not an OSError) on a full disk: that was a traceback, and the
    output's new parent folders stayed (found by an audit with a 10 MB tmpfs)."""
    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    _, src = shvit_official
    work = tmp_path / "work"
    work.mkdir()
    out = work / "x" / "y" / "out"
    assert main(["convert", str(src), "--model", "shvit_s1", "--out", str(out), "--no-flops"]) == 1
    err = capsys.readouterr().err
    assert f"vitzoo convert: error: cannot write {out / 'model.safetensors'}: Error while serializing" in err
    assert "No space left on device" in err and "Traceback" not in err
    assert os.listdir(work) == []


def test_legacy_torch_save_source_converts_and_a_truncated_one_is_one_line(shvit_official, tmp_path, capsys):
    model, src = shvit_official
    legacy = tmp_path / "src" / "legacy.pth"
    legacy.parent.mkdir()
    torch.save(torch.load(src, weights_only=True), legacy, _use_new_zipfile_serialization=False)  # pre-1.6 format
    out = convert_checkpoint(legacy, "shvit_s1", tmp_path / "out", flops=False)
    assert (out / "model.safetensors").is_file()
    legacy.write_bytes(legacy.read_bytes()[:100_000])
    assert main(["convert", str(legacy), "--model", "shvit_s1", "--out", str(tmp_path / "o2"), "--no-flops"]) == 1
    err = capsys.readouterr().err
    # load_pretrained_model's check of the file's structure (since 2026-11-25; before, the shvit entrypoint's error,
    # and before that its bare RuntimeError)
    assert f"vitzoo convert: error: {legacy} is corrupt or truncated: it is a legacy (non-zip) torch.save file that " \
        "ends at byte 100000, inside the data of storage" in err and "Traceback" not in err
    assert not (tmp_path / "o2").exists()
    assert main(["convert", str(tmp_path), "--model", "shvit_s1", "--out", str(tmp_path / "o3"), "--no-flops"]) == 1
    assert "is a folder; give the checkpoint file in it" in capsys.readouterr().err


def test_verify_folder_catches_inconsistent_folders(shvit_official, tmp_path):
    _, src = shvit_official
    out = convert_checkpoint(src, "shvit_s1", tmp_path / "out", flops=False)
    assert verify_folder(out).max_abs_diff == 0.0
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, architecture="shvit_s2")))
    with pytest.raises(VerificationError, match="architecture 'shvit_s2' differs"):
        verify_folder(out)
    (out / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file
    weights = out / "model.safetensors"
    metadata, _ = read_safetensors_metadata(weights)
    good = weights.read_bytes()
    state = load_file(str(weights))
    state["extra.weight"] = state.pop("head.bn.running_mean")  # one tensor renamed: missing + unexpected
    save_file(state, str(weights), metadata=metadata)
    with pytest.raises(VerificationError, match=r"1 tensor\(s\) missing \(e.g. head.bn.running_mean\); 1 tensor\(s\) "
                                                r"the model does not have \(e.g. extra.weight\)"):
        verify_folder(out)
    weights.write_bytes(good)
    (out / "README.md").unlink()
    with pytest.raises(VerificationError, match="lacks"):
        verify_folder(out)


def test_verify_folder_compares_weights_with_the_source_model(shvit_official, tmp_path):
    """A folder whose file is self-consistent but holds other numbers than the source model is refused (found by
    an audit: the comparison with the source never fired in a test)."""
    from safetensors.torch import load_file, save_file

    model, src = shvit_official
    out = convert_checkpoint(src, "shvit_s1", tmp_path / "out", flops=False)
    assert verify_folder(out, reference=model).max_abs_diff == 0.0
    weights = out / "model.safetensors"
    metadata, _ = read_safetensors_metadata(weights)
    state = load_file(str(weights))
    state["head.l.weight"][3, 5] += 0.5  # one number of one tensor; names, shapes and dtypes unchanged
    save_file(state, str(weights), metadata=metadata)
    # the metadata records the converted tensors' sha256, so the folder alone tells (found by an audit: weights
    # swapped for others of the same architecture, metadata and card kept, were pushed under the release's name)
    with pytest.raises(VerificationError) as caught:
        verify_folder(out)
    assert str(caught.value) == (f"{out}/model.safetensors holds other tensors than the ones converted (their "
                                 "sha256 differs from the tensors_sha256 its metadata records); convert the source "
                                 "again.")
    save_file(state, str(weights), metadata={**metadata, "tensors_sha256": tensors_sha256(state)})
    assert verify_folder(out).max_abs_diff == 0.0  # the folder agrees with itself again: only the source can tell
    with pytest.raises(VerificationError) as caught:
        verify_folder(out, reference=model)
    assert str(caught.value) == f"{out}: the loaded weights differ from the source model's."


def test_verify_folder_compares_outputs_with_the_source_model(shvit_official, tmp_path):
    """The same tensors under a config.json whose model_args change the forward (max instead of average pooling
    before the head) load into a model that computes something else than the source: refused, with the difference
    (found by an audit: the output comparison never fired in a test)."""
    model, src = shvit_official
    out = convert_checkpoint(src, "shvit_s1", tmp_path / "out", flops=False)
    config = json.loads((out / "config.json").read_text())
    config["model_args"] = dict(config.get("model_args", {}), global_pool="max")
    (out / "config.json").write_text(json.dumps(config))
    # the reference's own outputs under the two poolings, computed here without vitzoo's comparison
    size = (3, 224, 224)
    max_pooled = timm.create_model("shvit_s1", global_pool="max")
    max_pooled.load_state_dict(model.state_dict())
    diff = (_outputs(model, size) - _outputs(max_pooled, size)).abs().max().item()
    assert diff > 1e-3
    with pytest.raises(VerificationError) as caught:
        verify_folder(out, reference=model)
    assert str(caught.value) == (f"{out}: outputs differ from the source model (max abs diff {diff:.3g} > 1e-06).")
    # atol is the bound, inclusive: the weights themselves were never in question
    assert verify_folder(out, reference=model, atol=diff).max_abs_diff == diff
    with pytest.raises(VerificationError, match="outputs differ"):
        verify_folder(out, reference=model, atol=diff * (1 - 1e-6))


def test_forced_output_in_the_current_folder_is_one_line_and_leaves_nothing(shvit_official, tmp_path, monkeypatch,
                                                                            capsys):
    _, src = shvit_official
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["convert", str(src), "--model", "shvit_s1", "--out", ".", "--force", "--no-flops"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vitzoo convert: error: cannot replace .: it is the current folder") and "--out" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert os.listdir(tmp_path) == ["empty"] and os.listdir(work) == []


def test_os_errors_name_the_output_not_a_temp_folder(shvit_official, tmp_path, monkeypatch, capsys):
    _, src = shvit_official
    import tempfile

    real_mkdtemp = tempfile.mkdtemp

    def refused(suffix=None, prefix=None, dir=None):  # what mkdir in /proc gives
        if dir is not None and str(dir) == str(tmp_path):
            raise FileNotFoundError(2, "No such file or directory", os.path.join(dir, f"{prefix}x1y2z3{suffix or ''}"))
        return real_mkdtemp(suffix, prefix, dir)

    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    out = tmp_path / "out"
    assert main(["convert", str(src), "--model", "shvit_s1", "--out", str(out), "--no-flops"]) == 1
    err = capsys.readouterr().err
    assert err == f"vitzoo convert: error: [Errno 2] No such file or directory: '{out}'\n"
    monkeypatch.undo()
    (tmp_path / "file").write_text("x")
    assert main(["convert", str(src), "--model", "shvit_s1", "--out", str(tmp_path / "file" / "out")]) == 1
    assert capsys.readouterr().err.endswith(f"cannot write {tmp_path / 'file' / 'out'}: {tmp_path / 'file'} is a file, "
                                            "not a folder.\n")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_revit_weights_get_no_borrowed_licence(tmp_path):
    """ReViT has no released weights: a conversion must not stamp NVIDIA's non-commercial NViT licence on someone's
    own training (found by an audit), and a card without counted FLOPs says 'not reported' once."""
    from safetensors.torch import save_file

    model = timm.create_model("revit_t")
    src = tmp_path / "my_revit.safetensors"
    save_file(model.state_dict(), str(src), metadata=nvit.dims_metadata(model))
    out = convert_checkpoint(src, "revit_t", tmp_path / "out", flops=False)
    metadata, _ = read_safetensors_metadata(out / "model.safetensors")
    assert metadata["license"] == "other"
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["license"] == "other"
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: other\n") and "Set by the owner of these weights" in card
    assert "NVIDIA" not in card and "Non-commercial" not in card
    assert "not reported (reported" not in card
    verify_folder(out)


@pytest.mark.parametrize("arch, tag", [("revit_t", None), ("shvit_s1", "mine")])
def test_license_option_states_the_licence_of_own_weights_everywhere(tmp_path, capsys, arch, tag):
    """`--license` was missing: weights of one's own training (a ReViT, or a SHViT under an own tag) could only be
    converted with licence `other` (ReViT) or the release's, and the card asked the owner to edit three places by
    hand. The licence now goes into the weights' metadata, config.json and the card's front matter, and the folder
    verifies."""
    from safetensors.torch import save_file

    model = timm.create_model(arch)
    src = tmp_path / "mine.safetensors"
    save_file(model.state_dict(), str(src), metadata=nvit.dims_metadata(model) if arch == "revit_t" else None)
    out = tmp_path / "out"
    argv = ["convert", str(src), "--model", arch, "--out", str(out), "--no-flops", "--license", "apache-2.0"]
    assert main(argv + (["--tag", tag] if tag else [])) == 0, capsys.readouterr().err
    metadata, _ = read_safetensors_metadata(out / "model.safetensors")
    assert metadata["license"] == "apache-2.0"
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["license"] == "apache-2.0"
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\n") and "as stated by the owner of these weights" in card
    from vitzoo.manifest import load_manifest

    family = load_manifest().families["nvit" if arch == "revit_t" else "shvit"]
    assert family["copyright"] not in card and family["license_url"] not in card  # the release's licence is not it
    verify_folder(out)


@pytest.mark.parametrize("argv, says", [
    (["--license", "apache-2.0"], "--license (license=) is for weights that are not a release: shvit_s1.in1k_official "
                                  "is the release the weights manifest records, and it keeps its licence (mit)"),
    (["--tag", "mine", "--license", "Apache 2.0"], "license (--license) must be a licence id as Hub model cards "
                                                   "write it (lower case, e.g. apache-2.0, cc-by-4.0, mit), got "
                                                   "'Apache 2.0'"),
])
def test_license_option_is_refused_for_a_release_or_a_malformed_id(tmp_path, capsys, argv, says):
    src = tmp_path / "s1.pth"
    torch.save(timm.create_model("shvit_s1").state_dict(), src)
    assert main(["convert", str(src), "--model", "shvit_s1", "--out", str(tmp_path / "out"), *argv]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_weights_that_are_not_the_release_say_so_beside_the_releases_licence(tmp_path):
    """A file converted as nvit_b that is not NViT-B's release (here a ReViT of EMB 192, whose only route is nvit_b)
    keeps the release's non-commercial licence, which a conversion or fine-tune of the release must keep, but its
    card says the weights are not the release and that NVIDIA's licence and copyright do not cover someone's own
    training (found by an audit: the card gave NVIDIA's copyright line alone)."""
    from safetensors.torch import save_file

    model = timm.create_model("revit_t", dims=nvit.revit_dims(192))
    src = tmp_path / "my_revit192.safetensors"
    save_file(model.state_dict(), str(src), metadata=nvit.dims_metadata(model))
    out = convert_checkpoint(src, "nvit_b", tmp_path / "out", flops=False)
    metadata, _ = read_safetensors_metadata(out / "model.safetensors")
    assert (metadata["tag"], metadata["license"]) == ("converted", "cc-by-nc-sa-4.0")
    card = (out / "README.md").read_text()
    assert "These weights are not the release of `nvit_b` that the weights manifest records (tag `converted`)" in card
    assert "If these weights are your own training, not derived from the release, that licence and copyright do " \
           "not apply to them" in card
    assert "Copyright (c) 2023 NVIDIA" in card
    verify_folder(out)


@pytest.mark.parametrize("kwargs", [dict(token_mask=False), dict(distilled=False),
                                    dict(distilled=False, token_mask=False)])
def test_revit_trained_without_token_scales_or_distillation_converts(tmp_path, kwargs):
    """revit_t takes distilled / token_mask from the checkpoint's keys, as nvit_* do (found by an audit: it forced
    both on, so such a file was refused as "incomplete ... may be truncated", or with advice convert has no option
    for). The reference is the trained model itself."""
    torch.manual_seed(0)
    model = _randomize_norms(timm.create_model("revit_t", **kwargs)).eval()
    src = tmp_path / "revit.pth"
    torch.save({"model": model.state_dict()}, src)
    out = convert_checkpoint(src, "revit_t", tmp_path / "out", flops=False)
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert (_outputs(loaded, (3, 224, 224)) - _outputs(model, (3, 224, 224))).abs().max().item() == 0.0


def test_a_checkpoint_trained_with_avg_pooling_converts_with_global_pool(tmp_path, capsys):
    """A ReViT trained with global_pool='avg' (its norm after pooling, timm's fc_norm) is refused with the
    --global-pool to pass, and converts with it (found by an audit: the advice was fc_norm=True, which keeps token
    pooling, 0.89 off, and convert had no option for the pooling)."""
    torch.manual_seed(0)
    model = _randomize_norms(timm.create_model("revit_t", global_pool="avg")).eval()
    src = tmp_path / "revit_avg.pth"
    torch.save({"model": model.state_dict()}, src)
    out = tmp_path / "out"
    assert main(["convert", str(src), "--model", "revit_t", "--out", str(out), "--no-flops"]) == 1
    err = capsys.readouterr().err
    assert "applies its final norm after pooling (fc_norm); convert it with --global-pool avg" in err
    assert main(["convert", str(src), "--model", "revit_t", "--out", str(out), "--no-flops",
                 "--global-pool", "avg"]) == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["model_args"]["global_pool"] == "avg"
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert (_outputs(loaded, (3, 224, 224)) - _outputs(model, (3, 224, 224))).abs().max().item() == 0.0
    assert main(["convert", str(src), "--model", "shvit_s1", "--out", str(tmp_path / "o2"),
                 "--global-pool", "avg"]) == 2
    assert "--global-pool (global_pool=) is for nvit_* / revit_* models only" in capsys.readouterr().err


def _random_nvit(**kwargs):
    """An nvit_b with NVIT_DIMS, random norms and random token scales (so a resampling would show)."""
    torch.manual_seed(0)
    model = _randomize_norms(timm.create_model("nvit_b", dims=NVIT_DIMS, **kwargs))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.token_mask.copy_(torch.rand(block.attn.token_mask.shape, generator=gen) + 0.5)
    return model.eval()


def test_nvit_ddp_wrapped_checkpoint_converts(tmp_path, capsys):
    """A DDP-saved NViT checkpoint ('module.' on every key) converts (found by an audit: refused as not NViT)."""
    model = _random_nvit()
    src = tmp_path / "ddp.pth"
    official = _nvit_to_official(model.state_dict(), NVIT_DIMS)
    torch.save({"model": {"module." + k: v for k, v in official.items()}, "dim": NVIT_DIMS.to_dict(official=True)},
               src)
    out = tmp_path / "out"
    assert main(["convert", str(src), "--model", "nvit_b", "--out", str(out), "--no-flops"]) == 0, \
        capsys.readouterr().err
    tensors = safetensors.torch.load_file(out / "model.safetensors")
    expected = model.state_dict()
    assert sorted(tensors) == sorted(expected) and all(torch.equal(tensors[k], expected[k]) for k in expected)


def test_nvit_checkpoint_keeps_its_resolution(tmp_path):
    """An NViT trained at 384 (24x24 grid) converts at 384, nothing resampled (found by an audit: pos_embed and token
    scales were resampled to 224 and the folder claimed the source's outputs)."""
    model = _random_nvit(img_size=384)
    assert model.pos_embed.shape[1] == 2 + 24 * 24
    src = tmp_path / "NViT_384.pth"
    torch.save({"model": _nvit_to_official(model.state_dict(), NVIT_DIMS),
                "dim": NVIT_DIMS.to_dict(official=True)}, src)
    source = torch.load(src, weights_only=True)["model"]
    out = convert_checkpoint(src, "nvit_b", tmp_path / "out", flops=False)
    tensors = safetensors.torch.load_file(out / "model.safetensors")
    assert torch.equal(tensors["pos_embed"], source["pos_embed"])
    assert torch.equal(tensors["blocks.1.attn.token_mask"], source["blocks.1.attn.qkv.token_mask"])
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 384, 384]
    assert config["model_args"]["img_size"] in (384, [384, 384])
    assert "384" in (out / "README.md").read_text()
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert (_outputs(loaded, (3, 384, 384)) - _outputs(model, (3, 384, 384))).abs().max().item() == 0.0


@pytest.mark.parametrize("patch_size", [8, 14])  # 28x28 and 16x16 grids at 224: the size alone cannot tell
def test_nvit_checkpoint_keeps_its_patch_size(tmp_path, patch_size):
    """An NViT with 8- or 14-pixel patches converts with them (found by an audit: the model was built with 16-pixel
    patches, the patch embedding and position embedding resampled, and the folder claimed the source's outputs)."""
    model = _random_nvit(patch_size=patch_size)
    src = tmp_path / "NViT_p.pth"
    torch.save({"model": _nvit_to_official(model.state_dict(), NVIT_DIMS),
                "dim": NVIT_DIMS.to_dict(official=True)}, src)
    out = convert_checkpoint(src, "nvit_b", tmp_path / "out", flops=False)
    tensors = safetensors.torch.load_file(out / "model.safetensors")
    expected = model.state_dict()
    assert torch.equal(tensors["patch_embed.proj.weight"], expected["patch_embed.proj.weight"])
    assert torch.equal(tensors["pos_embed"], expected["pos_embed"])
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"]["patch_size"] == patch_size
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    size = 224 // patch_size * patch_size
    assert (_outputs(loaded, (3, size, size)) - _outputs(model, (3, size, size))).abs().max().item() == 0.0


def test_revit_checkpoint_keeps_its_resolution(tmp_path):
    """A ReViT trained at 384 converts at 384 too (found by an audit: only nvit_* kept theirs; a revit_* position
    embedding was resampled to 224)."""
    torch.manual_seed(0)
    model = _randomize_norms(timm.create_model("revit_t", img_size=384)).eval()
    src = tmp_path / "revit_384.pth"
    torch.save({"model": model.state_dict()}, src)
    out = convert_checkpoint(src, "revit_t", tmp_path / "out", flops=False)
    tensors = safetensors.torch.load_file(out / "model.safetensors")
    assert torch.equal(tensors["pos_embed"], model.state_dict()["pos_embed"])
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 384, 384]
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert (_outputs(loaded, (3, 384, 384)) - _outputs(model, (3, 384, 384))).abs().max().item() == 0.0


def test_nvit_checkpoint_without_dims_converts_with_the_dims_option(tmp_path, capsys):
    """A plain NViT state dict has no dims record: the error names --dims, and --dims (JSON or a .json file, either
    key style) converts it (found by an audit: the error advised an option convert did not have)."""
    model = _random_nvit()
    src = tmp_path / "plain.pth"
    torch.save(model.state_dict(), src)
    out = tmp_path / "out"
    assert main(["convert", str(src), "--model", "nvit_b", "--out", str(out), "--no-flops"]) == 1
    err = capsys.readouterr().err
    assert "--dims" in err and "Traceback" not in err and not out.exists()
    dims_file = tmp_path / "dims.json"
    dims_file.write_text(json.dumps(NVIT_DIMS.to_dict(official=True)))
    expected = model.state_dict()
    for i, given in enumerate([str(dims_file), NVIT_DIMS.to_json()]):
        folder = tmp_path / f"out{i}"
        assert main(["convert", str(src), "--model", "nvit_b", "--out", str(folder), "--no-flops",
                     "--dims", given]) == 0, capsys.readouterr().err
        tensors = safetensors.torch.load_file(folder / "model.safetensors")
        assert sorted(tensors) == sorted(expected) and all(torch.equal(tensors[k], expected[k]) for k in expected)
        loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
        assert loaded.dims == NVIT_DIMS
        assert (_outputs(loaded, (3, 224, 224)) - _outputs(model, (3, 224, 224))).abs().max().item() == 0.0
    with pytest.raises(ValueError, match="neither an existing file nor a JSON object"):
        convert_checkpoint(src, "nvit_b", tmp_path / "bad", flops=False, dims="dims.json")
    with pytest.raises(ValueError, match="not valid JSON"):
        convert_checkpoint(src, "nvit_b", tmp_path / "bad", flops=False, dims="{EMB: 32}")


def test_dims_option_is_refused_for_other_models(shvit_official, tmp_path, capsys):
    _, src = shvit_official
    out = tmp_path / "out"
    assert main(["convert", str(src), "--model", "shvit_s1", "--out", str(out), "--no-flops",
                 "--dims", NVIT_DIMS.to_json()]) == 2  # a usage error
    err = capsys.readouterr().err
    assert "--dims" in err and "nvit_* models only" in err and "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("arch, kwargs, prefix", [
    ("revit_t", dict(patch_size=8), "model."),  # a Lightning module's checkpoint
    ("revit_t", dict(img_size=384), "backbone."),  # a detector's, beside its neck
    ("shvit_s1", dict(distilled=True), "model."),
])
def test_a_model_under_a_prefix_converts_with_its_own_geometry_and_heads(tmp_path, arch, kwargs, prefix):
    """A model held under a prefix converts as the same model held plainly: its resolution, patch size and
    distillation head kept (found by an audit: the probes saw no pos_embed / head_dist under the prefix, so the
    folder was resampled to 224 / 16 px, or lost the head, and was "verified" against the resampled source)."""
    torch.manual_seed(0)
    model = _randomize_norms(timm.create_model(arch, **kwargs))
    state_dict = {prefix + k: v for k, v in model.state_dict().items()}
    if prefix == "backbone.":
        state_dict["neck.conv.weight"] = torch.zeros(8, 192, 1, 1)
    src = tmp_path / "nested.pth"
    torch.save({"state_dict": state_dict, "epoch": 3}, src)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Loading the (ViT|SHViT) under", UserWarning)
        out = convert_checkpoint(src, arch, tmp_path / "out", flops=False)
    tensors = safetensors.torch.load_file(out / "model.safetensors")
    expected = model.state_dict()
    assert sorted(tensors) == sorted(expected) and all(torch.equal(tensors[k], expected[k]) for k in expected)
    side = kwargs.get("img_size", 224)
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert (_outputs(loaded, (3, side, side)) - _outputs(model, (3, side, side))).abs().max().item() == 0.0


def test_a_distilled_nvit_without_its_token_is_named_by_convert(tmp_path, capsys):
    """Found by an audit: convert's resolution probe counted the distillation token's position embedding as a
    patch (198 - 1 = 197 "not a square grid") before the loader could say what is wrong."""
    state_dict = _nvit_to_official(_random_nvit().state_dict(), NVIT_DIMS)
    del state_dict["dist_token"]
    src = tmp_path / "NViT_no_dist_token.pth"
    torch.save({"model": state_dict, "dim": NVIT_DIMS.to_dict(official=True)}, src)
    err = _cli_error(capsys, src, "--model", "nvit_b", "--out", tmp_path / "out")
    assert "no distillation token (dist_token)" in err and "square" not in err, err


def test_shvit_distillation_head_is_kept(tmp_path):
    """An official SHViT checkpoint with head_dist.* converts with distilled=True: the head is in the folder, and
    local-dir: rebuilds it (found by an audit: it was dropped and the outputs differed from the distilled model)."""
    torch.manual_seed(0)
    model = _randomize_norms(timm.create_model("shvit_s1", distilled=True))
    src = tmp_path / "shvit_s1_dist.pth"
    official = _shvit_to_official(model.state_dict())
    torch.save({"model": official, "epoch": 299}, src)
    head_dist = {k: v for k, v in official.items() if k.startswith("head_dist.")}
    assert head_dist
    out = convert_checkpoint(src, "shvit_s1", tmp_path / "out", flops=False)
    tensors = safetensors.torch.load_file(out / "model.safetensors")
    assert all(torch.equal(tensors[k], v) for k, v in head_dist.items())
    assert json.loads((out / "config.json").read_text())["model_args"]["distilled"] is True
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    direct = timm.create_model("shvit_s1", distilled=True, pretrained=True, pretrained_cfg_overlay=dict(file=str(src)))
    expected = _outputs(direct, (3, 224, 224))
    assert (_outputs(loaded, (3, 224, 224)) - expected).abs().max().item() == 0.0
    assert (_outputs(model, (3, 224, 224)) - expected).abs().max().item() == 0.0


@pytest.mark.parametrize("family", ["shvit", "nvit", "shvit-legacy-format", "shvit-ddp-safetensors"])
def test_the_source_is_read_whole_once(tmp_path, monkeypatch, family):
    """convert probes a checkpoint (distillation head, NViT resolution) from its header or a memory map and reads
    its tensors once, in the model's loader (found by the known-gaps list: the probes read the whole file too, so a
    large checkpoint was read two or three times). A legacy torch.save file cannot be memory-mapped: its probe
    reads it, and still finds the distillation head. A safetensors file with DDP-prefixed keys is probed from its
    header (no torch.load at all)."""
    torch.manual_seed(0)
    if family == "nvit":
        model, arch = _random_nvit(img_size=384), "nvit_b"
        checkpoint = {"model": _nvit_to_official(model.state_dict(), NVIT_DIMS),
                      "dim": NVIT_DIMS.to_dict(official=True)}
    else:
        model, arch = _randomize_norms(timm.create_model("shvit_s1", distilled=True)).eval(), "shvit_s1"
        checkpoint = {"model": _shvit_to_official(model.state_dict())}
    if family == "shvit-ddp-safetensors":
        src = tmp_path / "source.safetensors"
        safetensors.torch.save_file({"module." + k: v.contiguous() for k, v in checkpoint["model"].items()}, src)
    else:
        src = tmp_path / "source.pth"
        torch.save(checkpoint, src, _use_new_zipfile_serialization=family != "shvit-legacy-format")
    whole_reads = []
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        if os.fspath(f) == str(src) and not kwargs.get("mmap"):
            whole_reads.append(kwargs)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    out = convert_checkpoint(src, arch, tmp_path / "out", flops=False)
    assert len(whole_reads) == {"shvit-legacy-format": 2, "shvit-ddp-safetensors": 0}.get(family, 1), whole_reads
    args = json.loads((out / "config.json").read_text())["model_args"]
    if family == "nvit":
        assert args["img_size"] in (384, [384, 384]) and args["dims"] == NVIT_DIMS.to_dict()
    else:
        assert args["distilled"] is True
    size = (3, 384, 384) if family == "nvit" else (3, 224, 224)
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert (_outputs(loaded, size) - _outputs(model, size)).abs().max().item() == 0.0


def _cli_error(capsys, *argv, code=1):
    assert main(["convert", *map(str, argv), "--no-flops"]) == code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    short = err  # one short line, whatever the length of the test's temporary paths
    for arg in argv:
        short = short.replace(str(arg), "PATH") if isinstance(arg, os.PathLike) else short
    assert err.startswith("vitzoo convert: error: ") and len(short) < 300, err
    assert "pretrained=False" not in err and "entrypoint" not in err
    return err


def test_cli_errors_name_the_checkpoints_variant_as_a_cli_option(shvit_official, tmp_path, capsys):
    """Found by an audit: CLI errors gave Python advice (entrypoints, pretrained=False) over ~630 characters, never
    the --model that converts the file; a headless checkpoint got no advice at all."""
    model, src = shvit_official
    out = tmp_path / "out"
    err = _cli_error(capsys, src, "--model", "shvit_s2", "--out", out)
    assert "shvit_s1 weights" in err and "--model shvit_s1" in err
    official = _nvit_to_official(_random_nvit().state_dict(), NVIT_DIMS)
    nv = tmp_path / "src" / "nvit.pth"
    nv.parent.mkdir()
    torch.save({"model": official, "dim": NVIT_DIMS.to_dict(official=True)}, nv)
    err = _cli_error(capsys, nv, "--model", "shvit_s1", "--out", out)
    assert "not an SHViT checkpoint" in err and "--model nvit_b/h/s/t" in err
    err = _cli_error(capsys, nv, "--model", "revit_t", "--out", out)
    assert "NViT checkpoint" in err and "--model nvit_b/h/s/t" in err and "block heads" not in err
    headless = tmp_path / "src" / "headless.pth"
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("head.")}, headless)
    err = _cli_error(capsys, headless, "--model", "shvit_s1", "--out", out)
    assert "--num-classes 0" in err
    assert sorted(os.listdir(tmp_path)) == ["src"]
    assert main(["convert", str(headless), "--model", "shvit_s1", "--out", str(out), "--no-flops",
                 "--num-classes", "0"]) == 0
    # only the classifier removed (head.bn kept): the same advice, and --num-classes 0 converts the body
    no_classifier = tmp_path / "src" / "no_classifier.pth"
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("head.l.")}, no_classifier)
    err = _cli_error(capsys, no_classifier, "--model", "shvit_s1", "--out", tmp_path / "out2")
    assert "has no classifier head; convert it with --num-classes 0" in err
    assert main(["convert", str(no_classifier), "--model", "shvit_s1", "--out", str(tmp_path / "out2"),
                 "--no-flops", "--num-classes", "0"]) == 0
    tensors = safetensors.torch.load_file(tmp_path / "out2" / "model.safetensors")
    assert not any(k.startswith("head.") for k in tensors) and len(tensors) == len(torch.load(headless))
    # fused weights (saved after fuse()): a folder is loaded into the unfused model, so they cannot be converted
    fused = tmp_path / "src" / "fused.pth"
    torch.save(reparameterize_model(model).state_dict(), fused)
    err = _cli_error(capsys, fused, "--model", "shvit_s1", "--out", tmp_path / "out3")
    assert err.endswith("fused.pth holds fused shvit_s1 weights (saved after fuse()), which cannot be unfused; "
                        "convert the unfused checkpoint they were made from."), err


@pytest.mark.parametrize("option, value, says", [
    ("--sha256", "xyz", "--sha256) must be 64 hex digits"),
    ("--sha256", "g" * 64, "--sha256) must be 64 hex digits"),
    ("--repo", "not a repo", "--repo) must be a Hub repo id ORG/NAME"),
    ("--repo", "noslash", "--repo) must be a Hub repo id ORG/NAME"),
    ("--tag", "a.b", "--tag, or the name's .TAG) must be letters"),
    ("--num-classes", "-1", "--num-classes) must be a whole number >= 0"),
    ("--in-chans", "0", "--in-chans) must be a whole number >= 1"),
    ("--dims", "nonsense", "--dims 'nonsense' is neither an existing file nor a JSON object"),
    ("--model", "resnet18", "'resnet18' belongs to no model family of this zoo"),
])
def test_bad_options_are_refused_before_any_work(shvit_official, tmp_path, capsys, option, value, says):
    """Found by an audit: --sha256 xyz was hashed against and reported as a corrupt file, and --repo 'not a repo'
    was written into the card as hf-hub:not a repo. A later audit: these are usage errors, exit code 2 as in the
    other commands (they exited with 1, the code of a failed conversion), and a timm model of no family of the zoo
    (resnet18) was found out only after the source was read."""
    _, src = shvit_official
    out = tmp_path / "out"
    model = "nvit_b" if option == "--dims" else "shvit_s1"
    argv = ["--model", value] if option == "--model" else ["--model", model, option, value]
    err = _cli_error(capsys, src, "--out", out, *argv, code=2)
    assert says in err and "corrupt" not in err
    assert value in err
    assert os.listdir(tmp_path) == []


def test_a_tag_of_ones_own_weights_is_kept_with_a_note(shvit_official, tmp_path, capsys):
    """An unknown tag names one's own weights (a fine-tune): kept, but no longer silently."""
    _, src = shvit_official
    out = tmp_path / "out"
    assert main(["convert", str(src), "--model", "shvit_s1", "--out", str(out), "--no-flops", "--tag", "mine"]) == 0
    err = capsys.readouterr().err
    assert "tag 'mine' is not a release of shvit_s1" in err and "in1k_official" in err
    metadata, _ = read_safetensors_metadata(out / "model.safetensors")
    assert metadata["tag"] == "mine" and "72.8%" not in (out / "README.md").read_text()


def test_a_one_channel_checkpoint_converts_with_in_chans(tmp_path, capsys):
    """Found by an audit: a 1-channel checkpoint could not be converted (timm's "inconsistent with input_size",
    reported as a corrupt file); --in-chans 1 builds the model for it and records it for local-dir:."""
    torch.manual_seed(0)
    gray = _randomize_norms(timm.create_model("shvit_s4", in_chans=1)).eval()
    src = tmp_path / "gray.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in gray.state_dict().items()}, str(src))
    out = tmp_path / "out"
    assert main(["convert", str(src), "--model", "shvit_s4", "--out", str(out), "--no-flops"]) == 1
    err = capsys.readouterr().err
    assert f"vitzoo convert: error: {src}'s first conv takes 1 input channel; convert it with --in-chans 1." in err
    assert not out.exists()
    assert main(["convert", str(src), "--model", "shvit_s4", "--out", str(out), "--no-flops", "--in-chans", "1"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"]["in_chans"] == 1 and config["pretrained_cfg"]["input_size"] == [1, 256, 256]
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert loaded.in_chans == 1
    expected = gray.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(ValueError, match=r"in_chans \(--in-chans\) must be a whole number >= 1"):
        convert_checkpoint(src, "shvit_s4", tmp_path / "o2", in_chans=0)


@pytest.mark.parametrize("key", ["model_ema", "state_dict_ema"])
def test_a_checkpoint_with_only_its_ema_copy_says_which_key_holds_the_weights(shvit_official, tmp_path, capsys, key):
    """Found by an audit: {'model_ema': ...} (weights under no 'model' / 'state_dict' key) failed with
    "AttributeError: 'dict' object has no attribute 'shape'"; saved as a plain state dict, it converts."""
    model, src = shvit_official
    ema_only = tmp_path / "ema_only.pth"
    torch.save({key: torch.load(src)["model"], "epoch": 299}, ema_only)
    out = tmp_path / "out"
    err = _cli_error(capsys, ema_only, "--model", "shvit_s1", "--out", out)
    assert f"{ema_only} holds its weights under ['{key}'], not under 'model' or 'state_dict'" in err
    assert f"torch.save(torch.load(PATH)['{key}'], 'weights.pth')) and convert that." in err
    assert "AttributeError" not in err and not out.exists()
    plain = tmp_path / "weights.pth"
    torch.save(torch.load(ema_only)[key], plain)
    assert main(["convert", str(plain), "--model", "shvit_s1", "--out", str(out), "--no-flops"]) == 0
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert torch.equal(_outputs(loaded, (3, 224, 224)), _outputs(model, (3, 224, 224)))


@pytest.mark.parametrize("family", ["shvit", "nvit"])
@pytest.mark.parametrize("damage", ["missing", "extra"])
def test_an_incomplete_or_extended_checkpoint_is_one_cli_line_without_python_advice(tmp_path, capsys, family, damage):
    """Found by an audit: the CLI error advised `pretrained_strict=False` (a Python argument convert does not take,
    for a partial load convert must not write), in over 500 characters."""
    if family == "shvit":
        model, name = "shvit_s1", "stages.1.blocks.0.conv.m.bn.weight"
        state = dict(timm.create_model(model).state_dict())
        checkpoint = state
    else:
        model, name = "nvit_b", "blocks.1.norm1.weight"
        state = _nvit_to_official(_random_nvit().state_dict(), NVIT_DIMS)
        checkpoint = {"model": state, "dim": NVIT_DIMS.to_dict(official=True)}
    if damage == "missing":
        del state[name]
    else:
        state["blocks.1.extra"] = torch.zeros(3)
    src = tmp_path / "src" / "ckpt.pth"
    src.parent.mkdir()
    torch.save(checkpoint, src)
    err = _cli_error(capsys, src, "--model", model, "--out", tmp_path / "out")
    if damage == "missing":
        assert f"{src} is incomplete: 1 of {model}'s tensors are missing (e.g. {name})" in err
    else:
        assert f"{src} has 1 tensor(s) that {model} does not have (e.g. blocks.1.extra)" in err
    assert "pretrained_strict" not in err and os.listdir(tmp_path) == ["src"]


def test_a_cut_or_damaged_source_says_what_to_do(shvit_official, tmp_path, capsys):
    """Found by an audit: a cut .pth, or one whose archive member fails its CRC, was named as such but with no
    advice on what to do."""
    from files import damage_largest_member  # tests/files.py

    _, src = shvit_official
    data = src.read_bytes()
    cut = tmp_path / "src" / "cut.pth"
    cut.parent.mkdir()
    cut.write_bytes(data[:len(data) // 2])
    err = _cli_error(capsys, cut, "--model", "shvit_s1", "--out", tmp_path / "out")
    assert "neither a safetensors file nor a torch.save archive" in err and "download or copy it again" in err
    damaged = tmp_path / "src" / "damaged.pth"
    damaged.write_bytes(data)
    damage_largest_member(damaged)
    err = _cli_error(capsys, damaged, "--model", "shvit_s1", "--out", tmp_path / "out")
    assert "fails its CRC check" in err and "Download or copy it again" in err
    assert os.listdir(tmp_path) == ["src"]


def test_a_file_other_than_the_recorded_release_is_converted_as_own_weights(shvit_official, tmp_path):
    """Found by an audit: with a release sha256 recorded in the manifest, a file whose own sha256 was given as
    --sha256 passed the check (expected = --sha256) and was credited to the release, with a card saying the manifest
    records no sha256; it is not the release, so it is converted as `converted`, without the release's metrics."""
    _, src = shvit_official
    manifest = _manifest_recording("shvit_s1", "in1k_official", "0" * 64)
    out = convert_checkpoint(src, "shvit_s1", tmp_path / "out", sha256=sha256_file(src), flops=False,
                             manifest=manifest)
    metadata, _ = read_safetensors_metadata(out / "model.safetensors")
    assert metadata["tag"] == "converted"
    card = (out / "README.md").read_text()
    assert "72.8%" not in card and "records no sha256" not in card
    assert "notes" not in json.loads((out / "config.json").read_text())["pretrained_cfg"]


def test_non_finite_weights_are_named_before_anything_is_written(shvit_official, tmp_path, capsys):
    """Found by an audit: a checkpoint with a NaN was converted up to the final check, which said that the weights
    in the hidden staging folder "differ from the source model's" (NaN != NaN) and named that folder."""
    model, _ = shvit_official
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.l.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    assert main(["convert", str(tmp_path / "nan.pth"), "--model", "shvit_s1", "--out", str(tmp_path / "out"),
                 "--no-flops"]) == 1
    err = capsys.readouterr().err
    assert "1 tensor(s) hold NaN or infinite values (head.l.weight)" in err and ".partial" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["nan.pth"]


def test_a_failed_final_check_names_the_output_folder_not_the_staging_one(shvit_official, tmp_path, capsys,
                                                                          monkeypatch):
    """The final check runs on the staging folder: its error names --out (found by an audit)."""
    import vitzoo.convert

    _, src = shvit_official
    calls = []

    def outputs(model, input_size):  # the second call (the folder's model) differs from the first (the source's)
        calls.append(1)
        return torch.full((1, 3), float(len(calls)))

    monkeypatch.setattr(vitzoo.convert, "_outputs", outputs)
    out = tmp_path / "out"
    assert main(["convert", str(src), "--model", "shvit_s1", "--out", str(out), "--no-flops"]) == 1
    err = capsys.readouterr().err
    assert err.endswith(f"vitzoo convert: error: {out}: outputs differ from the source model (max abs diff 1 > "
                        "1e-06).\n") and ".partial" not in err, err
    assert not out.exists()


def test_a_plain_pickle_is_named_without_torchs_warning_first(tmp_path, capsys):
    """Found by a review: the shape probe's torch.load printed torch's warning about the pickle protocol before the
    error that names the file as no checkpoint."""
    import pickle
    import warnings

    src = tmp_path / "src" / "plain.pth"
    src.parent.mkdir()
    src.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        err = _cli_error(capsys, src, "--model", "shvit_s1", "--out", tmp_path / "out")
    assert "neither a safetensors file nor a torch.save archive" in err
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("name", ["a`b.pth", "`ab.pth", "ab``.pth", "a b.pth", " a.pth "])
def test_a_file_name_with_backticks_is_a_code_span_on_the_card(shvit_official, tmp_path, name):
    """Found by a review: the card wrote the converted file's name between single backticks, so a name holding one
    read back (the card check) as another file, and converting it failed. A Markdown renderer shows the name."""
    from markdown_it import MarkdownIt  # rich's Markdown parser, a dependency of this package through rich

    _, official = shvit_official
    src = tmp_path / "src" / name
    src.parent.mkdir()
    src.write_bytes(official.read_bytes())
    out = tmp_path / "out"
    assert main(["convert", str(src), "--model", "shvit_s1", "--out", str(out), "--no-flops"]) == 0
    (line,) = [ln for ln in (out / "README.md").read_text().splitlines() if ln.startswith("- **Source weights:**")]
    html = MarkdownIt().renderInline(line)
    assert f"(converted file: <code>{name}</code>)" in html, html


def test_errors_about_a_url_source_name_the_url(shvit_official, tmp_path, capsys):
    """Found by a review: a cut file, or another model's, converted from a URL was named by the path of its
    downloaded copy, which was deleted by the time the error was read."""
    _, official = shvit_official
    served = tmp_path / "served"
    served.mkdir()
    data = official.read_bytes()
    (served / "cut.pth").write_bytes(data[:len(data) // 2])
    (served / "shvit_s1.pth").write_bytes(data)
    with _serving(served) as base:
        for name, model, says in (("cut.pth", "shvit_s1", "is truncated or not a checkpoint"),
                                  ("shvit_s1.pth", "shvit_s2", "shvit_s1")):
            url = f"{base}/{name}?download=1"
            err = _cli_error(capsys, url, "--model", model, "--out", tmp_path / "out")
            assert says in err and f"{url} " in err and ".vitzoo-src-" not in err, err
    assert os.listdir(tmp_path) == ["served"]


def test_an_os_error_about_a_url_source_names_the_url(tmp_path):
    """An OSError about the downloaded copy (a full disk while downloading) printed the copy's deleted path: Python
    prints an OSError's file name from its ``filename``, which was left as it was."""
    import errno
    from vitzoo.convert import _download_path, _naming_the_url
    url = "https://example.org/w/shvit_s1.pth?download=1"
    copy = _download_path(url, tmp_path)
    with pytest.raises(OSError) as raised, _naming_the_url(url, tmp_path):
        raise OSError(errno.ENOSPC, "No space left on device", str(copy))
    assert str(raised.value) == f"[Errno 28] No space left on device: {url!r}"
    with pytest.raises(OSError) as raised, _naming_the_url(url, tmp_path):
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(tmp_path / "x"), None, str(copy))
    assert str(raised.value) == f"[Errno 18] Invalid cross-device link: {str(tmp_path / 'x')!r} -> {url!r}"


def test_tensors_sha256_changes_with_any_tensor_and_not_with_key_order():
    """The record behind the swap check: one bit of one tensor, a dtype or a shape changes it (each differently),
    the order of the keys does not; hashed as key, dtype, shape and the tensor's bytes (checked here with hashlib
    directly for a one-tensor dict)."""
    import hashlib

    a = {"x": torch.arange(6, dtype=torch.float32).view(2, 3), "y": torch.ones(2, dtype=torch.bfloat16)}
    base = tensors_sha256(a)
    assert tensors_sha256({"y": a["y"], "x": a["x"]}) == base
    flipped = a["x"].clone()
    flipped.view(torch.int32)[1, 2] ^= 1  # the lowest mantissa bit of 5.0
    variants = [{**a, "x": flipped}, {**a, "x": a["x"].double()}, {**a, "x": a["x"].view(3, 2)},
                {"x2": a["x"], "y": a["y"]}]
    digests = {tensors_sha256(v) for v in variants}
    assert base not in digests and len(digests) == len(variants)
    one = torch.tensor([1.0, -2.0])
    expected = hashlib.sha256(b"w\0float32\0[2]\0" + one.numpy().tobytes()).hexdigest()
    assert tensors_sha256({"w": one}) == expected


def test_a_folder_without_tensors_sha256_is_refused_as_incomplete(shvit_official, tmp_path):
    """A folder converted before the record existed (or with it removed) lacks tensors_sha256: refused as incomplete
    metadata, so that dropping the field cannot skip the swap check."""
    from safetensors.torch import load_file, save_file

    _, src = shvit_official
    out = convert_checkpoint(src, "shvit_s1", tmp_path / "out", flops=False)
    weights = out / "model.safetensors"
    metadata, _ = read_safetensors_metadata(weights)
    without = {k: v for k, v in metadata.items() if k != "tensors_sha256"}
    save_file(load_file(str(weights)), str(weights), metadata=without)
    with pytest.raises(VerificationError) as caught:
        verify_folder(out)
    assert str(caught.value) == f"{out}/model.safetensors metadata lacks ['tensors_sha256']; convert it again."
