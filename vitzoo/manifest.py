"""The weights record (``weights/manifest.json``): reading, validating and looking up entries.

The manifest lists every pretrained weight of the zoo: model, tag, where the file comes from (URL and, when
known, its sha256), the Hub repo it is published under, its licence and the metrics it reports. Each model
family (``shvit``, ``nvit``) also has one record of paper, code and licence facts shared by its weights.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from .hub import resource_path

__all__ = ["WeightEntry", "Manifest", "ManifestError", "load_manifest", "family_of"]

LICENSES = ("mit", "cc-by-nc-sa-4.0", "apache-2.0")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")  # used with fullmatch (``$`` would let a trailing newline through)
# the Hub's rules for a repo id 'org/name': ASCII letters, digits, '_', '-', '.', neither part starting or ending with
# '-' or '.', no '--' or '..', each part at most 96 characters, no name ending in '.git'
_REPO_PART = r"(?=[^/]{1,96}(?:/|\Z))[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_REPO_RE = re.compile(rf"(?!.*(?:--|\.\.))(?!.*\.git\Z){_REPO_PART}/{_REPO_PART}")
_FAMILY_KEYS = ("paper", "authors", "venue", "arxiv", "code_url", "license", "license_name", "license_url",
                "copyright", "commercial_use", "flops_note")
_ENTRY_KEYS = ("model", "tag", "family", "source_url", "source_sha256", "hub_repo", "license", "metrics", "notes")
_METRIC_KEYS = ("top1", "top5", "params", "flops", "img_size", "source")


class ManifestError(ValueError):
    """The manifest file is malformed; the message names the entry and the field."""


@dataclass(frozen=True)
class WeightEntry:
    """One pretrained weight.

    Args:
        model: architecture name registered in timm (e.g. ``shvit_s1``).
        tag: pretrained tag (e.g. ``in1k``); ``model.tag`` is the timm name of the weight.
        family: model family key into ``Manifest.families``.
        source_url: where the original file comes from.
        source_sha256: sha256 of that file, or None when not yet known.
        hub_repo: ``org/name`` of the Hub copy, or None when not published.
        license: SPDX-style licence id (lower case).
        metrics: ``top1``/``top5`` (%), ``params`` (count), ``flops`` (multiply-adds), ``img_size``, ``source``.
        notes: free text.
    """
    model: str
    tag: str
    family: str
    source_url: str
    source_sha256: Optional[str]
    hub_repo: Optional[str]
    license: str
    metrics: Dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    @property
    def name(self) -> str:
        """The timm name ``model.tag``."""
        return f"{self.model}.{self.tag}"


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest: per-family facts and the list of weights."""
    families: Dict[str, Dict[str, Any]]
    weights: List[WeightEntry]
    path: Optional[Path] = None

    def find(self, model: str, tag: Optional[str] = None) -> Optional[WeightEntry]:
        """The entry for ``model`` (``arch`` or ``arch.tag``) and ``tag``; the first of that model if no tag."""
        if tag is None and "." in model:
            model, tag = model.split(".", 1)
        for entry in self.weights:
            if entry.model == model and (tag is None or entry.tag == tag):
                return entry
        return None

    def release(self, model: str) -> Optional[WeightEntry]:
        """The entry of ``model``'s original release file: the first whose source is not on the Hub."""
        for entry in self.weights:
            if entry.model == model and not entry.source_url.startswith("https://huggingface.co/"):
                return entry
        return None

    def family(self, model: str) -> Dict[str, Any]:
        """Paper/licence facts of ``model``'s family."""
        key = family_of(model)
        if key not in self.families:
            raise ManifestError(f"manifest has no family record '{key}' for model '{model}'.")
        return self.families[key]


def family_of(model: str) -> str:
    """Family key of an architecture name: ``shvit_s1`` -> ``shvit``; ``nvit_b``/``revit_t`` -> ``nvit``."""
    arch = model.split(".", 1)[0].split(":")[-1]
    if arch.startswith("shvit"):
        return "shvit"
    if arch.startswith(("nvit", "revit")):
        return "nvit"
    raise ManifestError(f"'{model}' belongs to no model family of this zoo (shvit_*, nvit_*, revit_*).")


def _check_entry(i: int, raw: Any, families: Dict[str, Any], path: Optional[Path] = None) -> WeightEntry:
    where = f"{path}: weights[{i}]" if path is not None else f"weights[{i}]"
    if not isinstance(raw, dict):
        raise ManifestError(f"{where} must be an object, got {type(raw).__name__}.")
    missing = [k for k in _ENTRY_KEYS if k not in raw]
    unknown = sorted(set(raw) - set(_ENTRY_KEYS))
    if missing or unknown:
        raise ManifestError(f"{where} ({raw.get('model')}): missing fields {missing}, unknown fields {unknown}.")
    where = f"{where} ({raw['model']}.{raw['tag']})"
    for key in ("model", "tag", "family", "source_url", "license"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise ManifestError(f"{where}: '{key}' must be a non-empty string.")
    if raw["family"] not in families:
        raise ManifestError(f"{where}: family '{raw['family']}' is not one of {sorted(families)}.")
    try:
        family = family_of(raw["model"])
    except ManifestError as e:
        raise ManifestError(f"{where}: {e}") from e
    if raw["family"] != family:  # its licence and paper would be the other family's
        raise ManifestError(f"{where}: family '{raw['family']}' is not the family of model '{raw['model']}', which is "
                            f"'{family}'; file it under '{family}' (with that family's license).")
    if raw["license"] not in LICENSES:
        raise ManifestError(f"{where}: license '{raw['license']}' is not one of {LICENSES}.")
    if raw["license"] != families[raw["family"]]["license"]:
        raise ManifestError(f"{where}: license differs from its family's ({families[raw['family']]['license']}).")
    sha = raw["source_sha256"]
    if sha is not None and not (isinstance(sha, str) and _SHA256_RE.fullmatch(sha)):
        raise ManifestError(f"{where}: source_sha256 must be 64 lower-case hex digits or null, got {sha!r}.")
    repo = raw["hub_repo"]
    if repo is not None and not (isinstance(repo, str) and _REPO_RE.fullmatch(repo)):
        raise ManifestError(f"{where}: hub_repo must be 'org/name' or null, got {repo!r}.")
    metrics = raw["metrics"]
    if not isinstance(metrics, dict) or sorted(metrics) != sorted(_METRIC_KEYS):
        raise ManifestError(f"{where}: metrics must have exactly the fields {list(_METRIC_KEYS)}.")
    for key in ("top1", "top5"):
        value = metrics[key]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and not (number and 0 < value <= 100):
            raise ManifestError(f"{where}: metrics.{key} must be a percentage or null, got {value!r}.")
    for key in ("params", "flops", "img_size"):
        value = metrics[key]
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ManifestError(f"{where}: metrics.{key} must be a positive integer or null, got {value!r}.")
    return WeightEntry(**{k: raw[k] for k in _ENTRY_KEYS})


def parse_manifest(doc: Any, path: Optional[Path] = None) -> Manifest:
    """Validate a manifest document (already JSON-decoded) and return it as a :class:`Manifest`."""
    label = path or "manifest"
    if not isinstance(doc, dict) or doc.get("schema_version") != 1:
        raise ManifestError(f"{label}: expected an object with schema_version 1.")
    families = doc.get("families")
    if not isinstance(families, dict) or not families:
        raise ManifestError(f"{label}: 'families' must be a non-empty object.")
    for key, fam in families.items():
        if not isinstance(fam, dict):
            raise ManifestError(f"{label}: family '{key}' must be an object with the fields {list(_FAMILY_KEYS)}.")
        missing = [k for k in _FAMILY_KEYS if k not in fam]
        if missing:
            raise ManifestError(f"{label}: family '{key}' lacks {missing}.")
    raw_weights = doc.get("weights")
    if not isinstance(raw_weights, list):
        raise ManifestError(f"{label}: 'weights' must be a list.")
    weights = [_check_entry(i, raw, families, path) for i, raw in enumerate(raw_weights)]
    seen = set()
    for entry in weights:
        if entry.name in seen:
            raise ManifestError(f"{label}: duplicate entry for {entry.name}.")
        seen.add(entry.name)
    return Manifest(families=families, weights=weights, path=path)


def load_manifest(path: Union[str, Path, None] = None) -> Manifest:
    """Read and validate the manifest (default: the packaged ``weights/manifest.json``).

    Raises:
        ManifestError: a file that is missing or unreadable, not UTF-8, not valid JSON, has a key twice in one
            object, or is malformed (the message names the file, the entry and the field).
    """
    path = Path(path) if path is not None else resource_path("manifest.json")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ManifestError(f"{path} does not exist; give the path of a manifest file (the zoo's is "
                            "weights/manifest.json).") from e
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8.") from e
    except OSError as e:
        raise ManifestError(f"{path} cannot be read ({e.strerror or e}); give the path of a readable manifest "
                            "file.") from e
    try:
        doc = json.loads(text, object_pairs_hook=lambda pairs: _unique_keys(pairs, path))
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from e
    return parse_manifest(doc, path)


def _unique_keys(pairs: List[Tuple[str, Any]], path: Path) -> Dict[str, Any]:
    """A JSON object as a dict, refusing a key given twice (``json`` would keep the last one without a word)."""
    obj: Dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            model = dict(pairs).get("model")
            within = f"the entry of model {model!r}" if isinstance(model, str) else "one object"
            raise ManifestError(f"{path}: key {key!r} is given twice in {within}; keep one of them.")
        obj[key] = value
    return obj
