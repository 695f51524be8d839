"""The weights record: manifest validity, agreement with the registered cfgs and the papers, card rendering."""
import copy
import json
import re

import pytest
import timm

from vitzoo.hub import resource_path
from vitzoo.manifest import ManifestError, family_of, load_manifest, parse_manifest
from vitzoo.model_card import card_fields, render_card, render_template


@pytest.fixture(scope="module")
def manifest():
    return load_manifest()


@pytest.fixture(scope="module")
def raw():
    return json.loads(resource_path("manifest.json").read_text())


def _zoo_architectures():
    """Every architecture the zoo registers in timm (``import vitzoo`` imports all its model packages): those whose
    entrypoint is defined outside timm, whatever their name or package, so a new family is covered unlisted."""
    return {m for m in timm.list_models() if timm.models.model_entrypoint(m).__module__.partition(".")[0] != "timm"}


def _registered_zoo_weights():
    """The ``arch.tag`` names of every registered zoo architecture's pretrained cfg that has weights."""
    zoo = _zoo_architectures()
    return {name for name in timm.list_pretrained() if name.partition(".")[0] in zoo}


def test_every_registered_pretrained_weight_is_recorded(manifest):
    """Every weight a zoo architecture registers has a manifest entry, and every entry is registered (before
    2026-11-25 only shvit_s* and nvit_* were looked at: a revit_* or new family's weights went unnoticed)."""
    packages = {timm.models.model_entrypoint(m).__module__.partition(".")[0] for m in _zoo_architectures()}
    assert {"shvit", "nvit"} <= packages and {"revit_t", "revit_s"} <= _zoo_architectures()  # not vacuous
    recorded = {e.name for e in manifest.weights}
    registered = _registered_zoo_weights()
    assert not registered - recorded, f"registered weights with no manifest entry: {sorted(registered - recorded)}"
    assert not recorded - registered, f"manifest entries registered by no zoo model: {sorted(recorded - registered)}"


def test_a_registered_weight_of_any_zoo_family_is_looked_for(manifest, monkeypatch):
    """A family registered from another package (revit_fake.in1k here; no name pattern lists it) is covered: its
    weight is found missing from the manifest. timm's registry is restored afterwards."""
    import copy as copy_module
    import sys
    import types

    from timm.models import _registry, generate_default_cfgs, register_model

    for name in ("_module_to_models", "_model_to_module", "_model_entrypoints", "_model_has_pretrained",
                 "_model_default_cfgs", "_model_pretrained_cfgs", "_model_with_tags"):
        monkeypatch.setattr(_registry, name, copy_module.deepcopy(getattr(_registry, name)))
    module = types.ModuleType("fakezoo.revit_fake")
    module.default_cfgs = generate_default_cfgs({"revit_fake.in1k": {"url": "https://example.invalid/w.pth"},
                                                 "revit_fake.untrained": {}})
    monkeypatch.setitem(sys.modules, module.__name__, module)

    def revit_fake(pretrained=False, **kwargs):
        raise AssertionError("never built")

    revit_fake.__module__ = module.__name__
    register_model(revit_fake)
    recorded = {e.name for e in manifest.weights}
    assert _registered_zoo_weights() - recorded == {"revit_fake.in1k"}  # a cfg without weights needs no entry
    with pytest.raises(AssertionError, match=r"registered weights with no manifest entry: \['revit_fake.in1k'\]"):
        test_every_registered_pretrained_weight_is_recorded(manifest)


def test_entries_agree_with_the_registered_cfgs(manifest):
    for entry in manifest.weights:
        cfg = timm.models.get_pretrained_cfg(entry.name).to_dict()
        assert cfg.get("license") == entry.license, entry.name
        if entry.hub_repo is not None:  # published: pretrained=True must load that copy (found by an audit: a
            assert cfg.get("hf_hub_id") == entry.hub_repo, entry.name  # recorded hub_repo alone changed nothing)
        if not entry.source_url.startswith("https://huggingface.co/"):
            assert cfg.get("url") == entry.source_url, entry.name
        assert tuple(cfg["input_size"]) == (3, entry.metrics["img_size"], entry.metrics["img_size"]), entry.name


def test_licences_and_paper_numbers(manifest):
    assert manifest.families["shvit"]["license"] == "mit"
    assert manifest.families["shvit"]["copyright"] == "Copyright (c) 2024 ysj9909"
    assert manifest.families["nvit"]["license"] == "cc-by-nc-sa-4.0"
    assert manifest.families["nvit"]["commercial_use"] is False
    # SHViT paper Table 2 and NViT paper Table 1 (top-1 %)
    expected = {"shvit_s1.in1k_official": 72.8, "shvit_s4.in1k_official": 79.4, "nvit_b.in1k": 83.29,
                "nvit_t.in1k": 76.21}
    for name, top1 in expected.items():
        assert manifest.find(name).metrics["top1"] == top1
    assert manifest.find("shvit_s4.in1k").metrics["flops"] == 986_430_000  # fvcore, fused, 256 px
    assert manifest.release("shvit_s1").tag == "in1k_official" and manifest.release("nvit_b").tag == "in1k"
    assert family_of("revit_t") == "nvit" and family_of("shvit_s2.in1k") == "shvit"
    with pytest.raises(ManifestError, match="no model family"):
        family_of("resnet50")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["weights"][0].update(source_sha256="abc"), r"weights\[0\] \(shvit_s1.in1k\): source_sha256"),
    (lambda d: d["weights"][1].update(license="apache-2.0"), "license differs from its family"),
    (lambda d: d["weights"][2]["metrics"].update(top1=720), r"metrics.top1 must be a percentage"),
    (lambda d: d["weights"][2]["metrics"].update(top1=0), r"metrics.top1 must be a percentage"),
    (lambda d: d["weights"][2]["metrics"].update(top5=-1.0), r"metrics.top5 must be a percentage"),
    (lambda d: d["weights"].append(copy.deepcopy(d["weights"][0])), "duplicate entry for shvit_s1.in1k"),
    (lambda d: d["weights"][0].pop("hub_repo"), r"missing fields \['hub_repo'\]"),
    (lambda d: d["weights"][0].update(hub_repo="no-org"), "hub_repo must be 'org/name'"),
    # found by an audit: re.match with `$` let a trailing newline through, and a family that is no object was a
    # TypeError ("string indices must be integers")
    (lambda d: d["weights"][0].update(hub_repo="timm/shvit_s1.in1k\n"), "hub_repo must be 'org/name'"),
    (lambda d: d["weights"][0].update(source_sha256="a" * 64 + "\n"), r"source_sha256 must be 64 lower-case hex"),
    (lambda d: d["families"].update(shvit="MIT"), "family 'shvit' must be an object with the fields"),
])
def test_malformed_manifest_names_the_entry(raw, edit, message):
    doc = copy.deepcopy(raw)
    edit(doc)
    with pytest.raises(ManifestError, match=message):
        parse_manifest(doc)


@pytest.mark.parametrize("key", ["params", "flops", "img_size"])
@pytest.mark.parametrize("value", [0, -224, 224.0, 6.3e6, "224", "6.3M", True])
def test_counts_must_be_positive_integers(raw, key, value):
    """metrics.params/flops/img_size: a positive whole number or null; 0, a negative, a float (even a whole one), a
    string or a boolean is refused naming the entry and the field (found by an audit: untested)."""
    doc = copy.deepcopy(raw)
    doc["weights"][2]["metrics"][key] = value
    name = f"{raw['weights'][2]['model']}.{raw['weights'][2]['tag']}"
    with pytest.raises(ManifestError) as caught:
        parse_manifest(doc)
    assert str(caught.value) == (f"weights[2] ({name}): metrics.{key} must be a positive integer or null, "
                                 f"got {value!r}.")
    doc["weights"][2]["metrics"][key] = None
    assert parse_manifest(doc).weights[2].metrics[key] is None
    doc["weights"][2]["metrics"][key] = 1
    assert parse_manifest(doc).weights[2].metrics[key] == 1


@pytest.mark.parametrize("key", ["top1", "top5"])
@pytest.mark.parametrize("value", [0, -1.5, 100.5, "72.8", True])
def test_accuracies_must_be_percentages(raw, key, value):
    """metrics.top1/top5: a number in (0, 100] or null; JSON true (Python's 1) is not a percentage."""
    doc = copy.deepcopy(raw)
    doc["weights"][2]["metrics"][key] = value
    name = f"{raw['weights'][2]['model']}.{raw['weights'][2]['tag']}"
    with pytest.raises(ManifestError) as caught:
        parse_manifest(doc)
    assert str(caught.value) == f"weights[2] ({name}): metrics.{key} must be a percentage or null, got {value!r}."
    for ok in (None, 72.8, 100, 0.01):
        doc["weights"][2]["metrics"][key] = ok
        assert parse_manifest(doc).weights[2].metrics[key] == ok


def test_card_renders_every_placeholder(manifest, tmp_path):
    entry = manifest.find("nvit_t.in1k")
    card = render_card(card_fields(entry, manifest))
    assert "{{" not in card and "license: cc-by-nc-sa-4.0" in card and "top-1 76.21%" in card
    assert "6.90M (reported)" in card and "1.30G (reported" in card and "top-5 not reported" in card
    template = tmp_path / "t.md"
    template.write_text("{{ name }} {{unknown}}")
    with pytest.raises(KeyError, match="unknown"):
        render_card(card_fields(entry, manifest), template)
    assert render_template("a {{x}} b", {"x": 1}) == "a 1 b"


def test_card_input_size_is_the_counted_one(manifest):
    """Mutation testing: ignoring the input size FLOPs were counted at (a model converted at another size) went
    unnoticed; without one the card shows the release's size."""
    entry = manifest.find("shvit_s4.in1k")
    assert card_fields(entry, manifest)["input_size"] == "3 x 256 x 256"
    assert card_fields(entry, manifest, flops=123, input_size=(3, 160, 192))["input_size"] == "3 x 160 x 192"


def test_an_entry_filed_under_another_family_is_refused(raw, tmp_path):
    """An nvit_b weight filed under the shvit family (and so under SHViT's licence and paper) is refused, through
    parse_manifest and, naming the file, load_manifest (found by an audit: only the family's existence was checked)."""
    doc = copy.deepcopy(raw)
    doc["weights"][8].update(family="shvit", license=doc["families"]["shvit"]["license"])
    assert doc["weights"][8]["model"] == "nvit_b"
    with pytest.raises(ManifestError) as caught:
        parse_manifest(doc)
    assert str(caught.value) == ("weights[8] (nvit_b.in1k): family 'shvit' is not the family of model 'nvit_b', "
                                 "which is 'nvit'; file it under 'nvit' (with that family's license).")
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    where = rf"^{re.escape(str(path))}: weights\[8\] \(nvit_b.in1k\)"
    with pytest.raises(ManifestError, match=where + ": family 'shvit' is not the family of model 'nvit_b'"):
        load_manifest(path)


def test_a_key_given_twice_is_refused(tmp_path):
    """json keeps the last of two equal keys without a word: the manifest refuses them, naming the file, the key and
    the entry."""
    text = resource_path("manifest.json").read_text(encoding="utf-8")
    twice = text.replace('"license": "cc-by-nc-sa-4.0",\n      "metrics"',
                         '"license": "cc-by-nc-sa-4.0",\n      "license": "mit",\n      "metrics"', 1)
    assert twice != text
    path = tmp_path / "manifest.json"
    path.write_text(twice, encoding="utf-8")
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert str(caught.value) == (f"{path}: key 'license' is given twice in the entry of model 'nvit_b'; keep one "
                                 "of them.")
    path.write_text('{"schema_version": 1, "schema_version": 1}', encoding="utf-8")
    with pytest.raises(ManifestError, match="key 'schema_version' is given twice in one object"):
        load_manifest(path)


def test_a_missing_or_non_utf8_manifest_is_a_manifest_error(tmp_path):
    """Not a bare FileNotFoundError or UnicodeDecodeError: the error names the file and what to do."""
    missing = tmp_path / "missing.json"
    with pytest.raises(ManifestError) as caught:
        load_manifest(missing)
    assert str(caught.value) == (f"{missing} does not exist; give the path of a manifest file (the zoo's is "
                                 "weights/manifest.json).")
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('{"schema_version": 1, "description": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(ManifestError) as caught:
        load_manifest(latin1)
    assert str(caught.value) == (f"{latin1} is not UTF-8 text (byte 41: invalid continuation byte); save it as "
                                 "UTF-8.")
    with pytest.raises(ManifestError, match=rf"^{re.escape(str(tmp_path))} cannot be read \(Is a directory\)"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("layout", ["target", "prefix"])
def test_the_weights_record_is_found_beside_a_target_or_prefix_install(tmp_path, monkeypatch, layout):
    """Found by an audit: `pip install --target DIR` puts the data files in DIR/share/vitzoo/weights and
    `--prefix P` in P/share/vitzoo/weights, neither under sys.prefix or the user base, and resource_path did not find
    them."""
    import site
    import sys

    import vitzoo.hub as hub

    root = tmp_path / "install"
    packages = root if layout == "target" else root / "lib" / "python3.11" / "site-packages"
    (packages / "vitzoo").mkdir(parents=True)
    data = root / "share" / "vitzoo" / "weights"
    data.mkdir(parents=True)
    (data / "manifest.json").write_text("{}")
    monkeypatch.setattr(hub, "__file__", str(packages / "vitzoo" / "hub.py"))
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "elsewhere"))
    monkeypatch.setattr(site, "getuserbase", lambda: str(tmp_path / "user"))
    assert hub.resource_path("manifest.json") == data / "manifest.json"
    with pytest.raises(FileNotFoundError, match="weights/card_template.md not found in"):
        hub.resource_path("card_template.md")
