"""``vitzoo convert``: turn a checkpoint into a verified, Hub-ready folder.

The folder holds exactly the files a timm Hub repo needs:

* ``model.safetensors``: the timm-layout state dict, with metadata ``format``, ``model``, ``tag``, ``source``,
  ``source_sha256``, ``license``, ``converted_by``, ``tensors_sha256`` (:func:`tensors_sha256`, checked by
  :func:`verify_folder`) and ``nvit_dims`` for NViT (a JSON string);
* ``config.json``: timm's format (``architecture``, ``num_classes``, ``num_features``, ``model_args``,
  ``pretrained_cfg``), written by ``timm.models.save_config_for_hf``;
* ``README.md``: the model card, rendered from the manifest and ``weights/card_template.md``.

The source is loaded through the model's own pretrained filter (official layouts are converted there), the
folder is built in a temp dir next to the output, loaded back with ``timm.create_model('local-dir:...')`` and
compared with the source model, and only then moved into place.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
from tqdm import tqdm

from .hub import (
    CorruptWeightsError,
    MissingWeightsError,
    WeightsError,
    load_pretrained_model,
    read_safetensors_metadata,
    sha256_file,
    staged_dir,
)
from .atomic import _naming_target, check_output_dir
from .cli import named_output
from .compare import UsageError
from .manifest import _REPO_RE, _SHA256_RE, Manifest, WeightEntry, family_of, load_manifest
from .messages import cli_message, error_message, help_description
from .model_card import card_fields, render_card

__all__ = ["HUB_FILES", "UsageError", "VerificationError", "VerifyReport", "convert_checkpoint", "tensors_sha256",
           "verify_folder", "register", "run"]

NAME = "convert"
HUB_FILES = ("model.safetensors", "config.json", "README.md")
REQUIRED_METADATA = ("format", "model", "source", "source_sha256", "license", "tensors_sha256")
#: The licence field of weights whose licence only their owner can state (Hub card id "other").
OWNERS_LICENSE = "other"
#: ``--global-pool`` values: timm ViT's poolings (``avg`` / ``max`` / ``avgmax`` with the norm after pooling)
GLOBAL_POOLS = ("token", "avg", "max", "avgmax")
PathLike = Union[str, os.PathLike]
#: A weight tag (the TAG of ``arch.TAG``): a release's in the manifest, or a name for one's own weights.
_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
# a licence id as the Hub's model cards write it (lower case: "apache-2.0", "cc-by-4.0", "mit", "other")
_LICENSE_RE = re.compile(r"[a-z0-9][a-z0-9.+-]*")


class VerificationError(RuntimeError):
    """A converted folder is incomplete, inconsistent, or does not reproduce its source model."""


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify_folder` checked.

    Attributes:
        model: architecture name recorded in the folder.
        metadata: the safetensors metadata.
        max_abs_diff: largest output difference against the reference model (or against the file loaded
            without timm's loader when no reference is given).
    """
    model: str
    metadata: Dict[str, str]
    max_abs_diff: float


# ---------------------------------------------------------------------------------------------------------------------
# verification


def _outputs(model: torch.nn.Module, input_size: Tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *input_size, generator=gen)
    with torch.no_grad():
        return model.eval()(x)


def tensors_sha256(state: Dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's tensors, in key order: each key, dtype, shape and the tensor's bytes.

    ``vitzoo convert`` records it in the weights' metadata and :func:`verify_folder` (so ``vitzoo push``) checks it:
    other tensors in a converted folder, its metadata and card kept, are refused (found by an audit: such a swap
    went to the Hub under the release's name).
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _read_folder(folder: Path, manifest: Optional[Manifest] = None) -> Tuple[Dict[str, str], Dict[str, Any]]:
    if not folder.is_dir():
        raise VerificationError(f"{folder} {'is a file, not' if folder.exists() else 'does not exist; give'} a folder "
                                "written by `vitzoo convert`.")
    missing = [f for f in HUB_FILES if not (folder / f).is_file()]
    if missing:
        raise VerificationError(f"{folder} lacks {missing}; convert it again with `vitzoo convert`.")
    try:
        metadata, tensors = read_safetensors_metadata(folder / "model.safetensors")
    except CorruptWeightsError as e:
        raise VerificationError(str(e)) from e
    lacking = [k for k in REQUIRED_METADATA if not metadata.get(k)]
    if lacking:
        raise VerificationError(f"{folder}/model.safetensors metadata lacks {lacking}; convert it again.")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VerificationError(f"{folder}/config.json is not valid JSON: {e}") from e
    _check_config(folder, config, tensors)
    if config["architecture"] != metadata["model"]:
        raise VerificationError(
            f"{folder}: config.json architecture {config['architecture']!r} differs from the weights' model "
            f"{metadata['model']!r}."
        )
    if "nvit_dims" in metadata:
        try:
            dims = json.loads(metadata["nvit_dims"])
        except json.JSONDecodeError as e:
            raise VerificationError(f"{folder}/model.safetensors metadata nvit_dims is not valid JSON ({e}); "
                                    "convert it again.") from e
        if config.get("model_args", {}).get("dims") != dims:
            raise VerificationError(f"{folder}: config.json model_args.dims differs from the weights' nvit_dims.")
    _check_license(folder, metadata["license"], config)
    _check_card(folder, metadata, manifest)
    return metadata, config


def _card_license(card: str) -> Optional[str]:
    """The ``license:`` field of a model card's YAML front matter (None without one)."""
    lines = card.splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            return None
        key, _, value = line.partition(":")
        if key.strip() == "license":
            return value.strip().strip("'\"") or None
    return None


def _check_license(folder: Path, license: str, config: Dict[str, Any]) -> None:
    """The licence travels in three places (weights' metadata, config.json, the card's front matter): they must
    agree. Weights of an owner's own training (metadata ``other``) leave the card's licence for the owner to state."""
    if license == OWNERS_LICENSE:
        return
    places = {"config.json pretrained_cfg.license": (config.get("pretrained_cfg") or {}).get("license"),
              "README.md license:": _card_license((folder / "README.md").read_text(encoding="utf-8", errors="replace"))}
    differ = [f"{where} is {value!r}" for where, value in places.items() if value != license]
    if differ:
        raise VerificationError(
            f"{folder}: the weights' metadata says license {license!r} (that of the source weights), but "
            f"{' and '.join(differ)}; the weights keep their source's licence: convert them again, or put "
            f"{license!r} back.")


def _card_line(card: str, label: str) -> Optional[str]:
    """The value of the card's ``- **LABEL:** value`` line (None without one)."""
    found = re.search(rf"^- \*\*{re.escape(label)}:\*\* *(.*?) *$", card, re.MULTILINE)
    return found.group(1) if found else None


def _card_title(card: str) -> Optional[str]:
    """The card's ``# title`` (the weight's ``model.tag``), after the front matter (None without one)."""
    found = re.search(r"^# +(\S.*?) *$", card, re.MULTILINE)
    return found.group(1) if found else None


def _code(value: Optional[str]) -> Optional[str]:
    """The first ``code`` span of a card value (``- **Architecture:** `shvit_s1` (...)`` -> ``shvit_s1``)."""
    found = re.search(r"`([^`]*)`", value) if value is not None else None
    return found.group(1) if found else None


def _code_span(text: str) -> str:
    """``text`` as a Markdown code span: fenced by one backtick more than its longest run of them, and padded with a
    space each side when it starts or ends with one (found by a review: a file named ``a`b.pth`` gave a card whose
    source line its own check read back as ``a``, so converting it failed)."""
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    # CommonMark strips one space from each side of a span that starts and ends with one: pad such text too
    pad = " " if text.startswith("`") or text.endswith("`") or text[:1] == text[-1:] == " " else ""
    return f"{fence}{pad}{text}{pad}{fence}"


#: the converted file's name on a card's source line, as :func:`_code_span` writes it
_CONVERTED_FILE = re.compile(r"\(converted file: (`+)(.*?)\1\)")


def _converted_file(line: str) -> Optional[str]:
    """The converted file's name on a card's source line (:func:`_describe_source`), None if it names none."""
    named = _CONVERTED_FILE.search(line)
    if named is None:
        return None
    text = named.group(2)
    return text[1:-1] if len(text) > 1 and text[0] == text[-1] == " " and text.strip() else text


def _card_source_differs(line: str, source: str, release: Optional[WeightEntry]) -> bool:
    """Whether the card's source line names another source than ``source`` (the metadata's: a URL, or a local
    file's name). The line names the release's URL (``release``: the manifest entry of the weights' model.tag)
    with the converted file's name when that is not the URL's, or the converted file / URL itself."""
    url = line.split(" ", 1)[0]
    named = _converted_file(line)
    if url == source:
        return named is not None
    if release is None or url != release.source_url:
        return True
    return (named if named is not None else url.rsplit("/", 1)[-1]) != source


def _check_card(folder: Path, metadata: Dict[str, str], manifest: Optional[Manifest] = None) -> None:
    """What both the model card and the weights' metadata record must agree: the weight (title ``model.tag``),
    architecture, source (URL or file), source sha256 and NViT dims (the licence: :func:`_check_license`). A card
    edited to show another source would publish false provenance."""
    card = (folder / "README.md").read_text(encoding="utf-8", errors="replace")
    model, tag = metadata["model"], metadata.get("tag")
    if tag:
        manifest = manifest or load_manifest()
        release = manifest.find(model, tag)
    else:
        release = None
    source_line = _card_line(card, "Source weights")
    shown_source = source_line.split(" - not verified", 1)[0] if source_line is not None else None
    # (the card's field, its value there, the metadata's key, its value there, whether they differ)
    checks = [
        ("title", _card_title(card), "model.tag", f"{model}.{tag}", _card_title(card) != f"{model}.{tag}"),
        ("Architecture", _code(_card_line(card, "Architecture")), "model", model,
         _code(_card_line(card, "Architecture")) != model),
        ("Source weights", shown_source, "source", metadata["source"],
         source_line is None or _card_source_differs(source_line, metadata["source"], release)),
        ("sha256 of the source file", _code(_card_line(card, "sha256 of the source file")), "source_sha256",
         metadata["source_sha256"],
         (_code(_card_line(card, "sha256 of the source file")) or "").lower() != metadata["source_sha256"].lower()),
    ]
    if not tag:
        checks = checks[1:]
    if "nvit_dims" in metadata:
        dims = _code(_card_line(card, "Per-block dims (NViT)"))
        try:
            differ = dims is None or json.loads(dims) != json.loads(metadata["nvit_dims"])
        except json.JSONDecodeError:
            differ = True
        checks.append(("Per-block dims (NViT)", dims, "nvit_dims", metadata["nvit_dims"], differ))
    for field, shown, key, recorded, differ in checks:
        if not differ:
            continue
        if key == "source" and release is not None and shown is not None:
            recorded_text = f"{recorded!r} (the release {release.name} is {release.source_url})"
        else:
            recorded_text = repr(recorded)
        said = "has no such line" if shown is None else f"says {shown!r}"
        raise VerificationError(
            f"{folder}/README.md: the card's {field!r} {said}, but the weights' metadata records {key} "
            f"{recorded_text}; the card must describe the weights it is published with: convert them again, or "
            "put the converted card's line back.")


# what config.json must hold (timm's format as `save_config_for_hf` writes it) and how to describe the types
_CONFIG_KEYS = (("architecture", str, "a model name (string)"), ("num_classes", int, "a whole number >= 0"),
                ("pretrained_cfg", dict, "an object"))
_AGAIN = "or convert the checkpoint again with `vitzoo convert`"


def _json_kind(value: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _classifier_keys(pretrained_cfg: Dict[str, Any]) -> Tuple[str, ...]:
    """The weight names of the classifier(s) a pretrained_cfg names (``head.l`` -> ``head.l.weight``)."""
    names = pretrained_cfg.get("classifier")
    names = [names] if isinstance(names, str) else names if isinstance(names, (list, tuple)) else []
    return tuple(f"{n}.weight" for n in names if isinstance(n, str))


def _check_config(folder: Path, config: Any, tensors: Dict[str, Any]) -> None:
    """Check config.json's structure before timm reads it (timm fails with tracebacks on a malformed one).

    ``tensors`` is the safetensors header (name -> dtype, shape, offsets), used to say what ``num_classes`` the
    weights need.
    """
    where = f"{folder}/config.json"
    if not isinstance(config, dict):
        raise VerificationError(
            f"{where} holds {_json_kind(config)}, not an object with 'architecture', 'num_classes', 'model_args' and "
            f"'pretrained_cfg'; convert the checkpoint again with `vitzoo convert`."
        )
    for key, kind, described in _CONFIG_KEYS:
        value = config.get(key)
        if key not in config:
            hint = ""
            if key == "num_classes":
                pretrained_cfg = config.get("pretrained_cfg")
                keys = _classifier_keys(pretrained_cfg) if isinstance(pretrained_cfg, dict) else ()
                shape = tensors.get(keys[0], {}).get("shape") if keys else None
                if shape:
                    hint = f" (the weights' head ({keys[0][:-len('.weight')]}) has {shape[0]} outputs)"
            raise VerificationError(f"{where} lacks {key!r}, {described}{hint}; add it, {_AGAIN}.")
        if not isinstance(value, kind) or isinstance(value, bool) or (key == "num_classes" and value < 0):
            raise VerificationError(
                f"{where}: {key!r} is {json.dumps(value)}, not {described}; correct it, {_AGAIN}.")
    num_classes = config["num_classes"]
    for key in _classifier_keys(config["pretrained_cfg"]):
        shape = tensors.get(key, {}).get("shape")
        if shape and shape[0] != num_classes:
            raise VerificationError(_head_mismatch(where, num_classes, key, shape[0]))
    model_args = config.get("model_args", {})
    if not isinstance(model_args, dict):
        raise VerificationError(
            f"{where}: 'model_args' is {_json_kind(model_args)}, not an object of keyword arguments for "
            f"{config['architecture']}; correct it, {_AGAIN}.")
    if "num_classes" in model_args and model_args["num_classes"] != config["num_classes"]:
        raise VerificationError(
            f"{where}: 'num_classes' is {config['num_classes']} but 'model_args' has num_classes="
            f"{json.dumps(model_args['num_classes'])}; make them agree (the weights' head size), {_AGAIN}.")
    input_size = config["pretrained_cfg"].get("input_size")
    if input_size is not None and not (
            isinstance(input_size, list) and len(input_size) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size)):
        raise VerificationError(
            f"{where}: pretrained_cfg.input_size is {json.dumps(input_size)}, not [channels, height, width] "
            f"(e.g. [3, 224, 224]); correct it, {_AGAIN}.")


def _head_mismatch(where: str, num_classes: int, key: str, outputs: int) -> str:
    return (f"{where} says num_classes={num_classes} but the weights' head ({key[:-len('.weight')]}) has {outputs} "
            f"outputs; set num_classes (and model_args.num_classes) to {outputs}, {_AGAIN}.")


def _build_from_config(folder: Path, config: Dict[str, Any]) -> torch.nn.Module:
    """The architecture built (random weights) from config.json's ``num_classes`` and ``model_args``."""
    import inspect

    import timm

    where, arch = f"{folder}/config.json", config["architecture"]
    kwargs = {k: v for k, v in config.get("model_args", {}).items() if k != "num_classes"}
    factory_args = [n for n, p in inspect.signature(timm.create_model).parameters.items()
                    if p.kind is not inspect.Parameter.VAR_KEYWORD]
    reserved = [k for k in kwargs if k in factory_args]
    if reserved:
        raise VerificationError(
            f"{where}: model_args has {reserved[0]!r}, an argument of timm.create_model, not of {arch}; remove it "
            f"from model_args, {_AGAIN}.")
    try:
        return timm.create_model(arch, num_classes=config["num_classes"], **kwargs)
    except TypeError as e:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if unknown and unknown.group(1) in kwargs:
            raise VerificationError(
                f"{where}: model_args has {unknown.group(1)!r}, which {arch} does not accept; remove it from "
                f"model_args, {_AGAIN}.") from e
        raise VerificationError(_cannot_build(where, arch, kwargs, e)) from e
    except (ValueError, AssertionError, KeyError, RuntimeError) as e:  # a bad value, or an unknown architecture
        raise VerificationError(_cannot_build(where, arch, kwargs, e)) from e


def _cannot_build(where: str, arch: str, kwargs: Dict[str, Any], error: BaseException) -> str:
    args = json.dumps(kwargs, separators=(",", ":"))
    args = args if len(args) <= 200 else args[:197] + "..."
    return (f"{where}: {arch} cannot be built with model_args {args} ({type(error).__name__}: "
            f"{_reason(error)}); correct model_args, {_AGAIN}.")


def _reason(error: BaseException) -> str:
    """``error``'s message on one line, with the advice on its later lines (the type's name when it is empty)."""
    return error_message(error) or type(error).__name__


def _first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, for torch's load_state_dict errors (the key lists follow it)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_fit(folder: Path, config: Dict[str, Any], model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """One line saying how ``state`` (the file's tensors) does not fit ``model`` (built from config.json)."""
    expected = model.state_dict()
    num_classes = config["num_classes"]
    for key in _classifier_keys(getattr(model, "pretrained_cfg", None) or config["pretrained_cfg"]):
        head = key[:-len(".weight")]
        if key in state and state[key].dim() >= 1 and state[key].shape[0] != num_classes:
            raise VerificationError(_head_mismatch(f"{folder}/config.json", num_classes, key, state[key].shape[0]))
        if key not in state and key in expected:
            raise VerificationError(
                f"{folder}/config.json says num_classes={num_classes} but the weights have no classifier head "
                f"({head}); set num_classes (and model_args.num_classes) to 0, {_AGAIN}.")
    reshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if reshaped:
        k = reshaped[0]
        problems.append(f"{len(reshaped)} tensor(s) of another shape (e.g. {k}: {list(state[k].shape)} in the file, "
                        f"{list(expected[k].shape)} in the model)")
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) the model does not have (e.g. {unexpected[0]})")
    if problems:
        raise VerificationError(
            f"{folder}/model.safetensors does not fit the {config['architecture']} its config.json describes: "
            f"{'; '.join(problems)}. Convert the checkpoint again with `vitzoo convert`.")


def verify_folder(folder: PathLike, reference: Optional[torch.nn.Module] = None, atol: float = 1e-6,
                  manifest: Optional[Manifest] = None) -> VerifyReport:
    """Check a converted folder: files, metadata, config, and that timm loads it and reproduces the weights.

    ``config.json`` is checked first: a JSON object with ``architecture``, ``num_classes`` (a whole number) and
    ``pretrained_cfg`` (an object), ``model_args`` (if present) an object of arguments the architecture accepts,
    with the same ``num_classes``. The architecture is built from it and must take the raw safetensors tensors
    (strict; a classifier of another size is named as such). The folder is then loaded with
    ``timm.create_model('local-dir:FOLDER', pretrained=True)``, and its outputs on a random input are compared
    with ``reference`` (the source model) when given, otherwise with the model built from ``config.json``.
    The model card (``README.md``) must show what the weights' metadata records: licence, weight (``model.tag``),
    architecture, source, source sha256 and NViT dims.

    Args:
        folder: the converted folder.
        reference: the source model to compare against.
        atol: largest accepted absolute output difference.
        manifest: weights record the card's release URL is checked against (default: the packaged one).

    Raises:
        VerificationError: with the reason.
    """
    import safetensors.torch

    folder = Path(folder)
    metadata, config = _read_folder(folder, manifest)
    # the architecture config.json describes, with the raw tensors, before timm reads the folder: a config that
    # does not build, or does not fit the weights, is one line here (timm's own errors are tracebacks or lists)
    from_config = _build_from_config(folder, config)
    try:
        state = safetensors.torch.load_file(folder / "model.safetensors")
    except Exception as e:  # noqa: BLE001  safetensors' own error type (header checked, tensors not)
        raise VerificationError(f"{folder}/model.safetensors cannot be read: {_reason(e)}") from e
    _check_fit(folder, config, from_config, state)
    try:
        from_config.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise VerificationError(f"{folder}/model.safetensors does not fit its config.json: {_first_line(e)}") from e
    try:
        loaded = load_pretrained_model(f"local-dir:{folder}")
    except WeightsError as e:
        raise VerificationError(f"{folder} does not load through timm: {e}") from e
    except (RuntimeError, TypeError, ValueError, KeyError, AssertionError) as e:
        raise VerificationError(f"{folder} does not load through timm: {_reason(e)}") from e
    # after timm's load, whose refusals (NaN / infinite weights) say more than a mismatch would
    if tensors_sha256(state) != metadata["tensors_sha256"].lower():
        raise VerificationError(f"{folder}/model.safetensors holds other tensors than the ones converted (their sha256 "
                                "differs from the tensors_sha256 its metadata records); convert the source again.")
    if reference is None:
        reference = from_config
    ref_state, got_state = reference.state_dict(), loaded.state_dict()
    if ref_state.keys() != got_state.keys() or any(not torch.equal(ref_state[k], got_state[k]) for k in ref_state):
        raise VerificationError(f"{folder}: the loaded weights differ from the source model's.")
    input_size = tuple(loaded.pretrained_cfg.get("input_size", (3, 224, 224)))
    expected, got = _outputs(reference, input_size), _outputs(loaded, input_size)
    diff = (expected - got).abs().max().item() if expected.shape == got.shape else float("inf")
    if not diff <= atol:
        raise VerificationError(f"{folder}: outputs differ from the source model (max abs diff {diff:.3g} > {atol}).")
    return VerifyReport(model=metadata["model"], metadata=metadata, max_abs_diff=diff)


# ---------------------------------------------------------------------------------------------------------------------
# conversion


def _entry_for(manifest: Manifest, model: str, tag: Optional[str], source: str,
               num_classes: Optional[int] = None) -> WeightEntry:
    """The manifest entry of the weight, or a stand-in for weights the manifest does not list (also for a
    checkpoint with another classifier than the released ImageNet-1k one: not the release, whatever its name)."""
    entry = manifest.find(model, tag) if tag else manifest.release(model)
    if entry is not None and num_classes in (None, 1000):
        return entry
    family = manifest.families[family_of(model)]
    # an architecture without any released weights (ReViT): the weights are someone's own training, and the
    # family's licence (that of NVIDIA's released NViT weights) is not theirs to claim
    license = family["license"] if manifest.release(model) is not None else OWNERS_LICENSE
    return WeightEntry(
        model=model, tag=tag or "converted", family=family_of(model), source_url=source, source_sha256=None,
        hub_repo=None, license=license,
        metrics={"top1": None, "top5": None, "params": None, "flops": None, "img_size": None,
                 "source": "not in the weights manifest"},
        notes="",
    )


def _params_match(entry: WeightEntry, params: int, tolerance: float = 0.1) -> bool:
    """Whether ``params`` is within ``tolerance`` of the entry's reported count (True when none is reported)."""
    reported = entry.metrics.get("params")
    return not reported or abs(params - reported) <= tolerance * reported


def _describe_source(entry: WeightEntry, source_name: str, verified: bool, given_sha: bool = False) -> str:
    """The card's source line: the manifest URL, plus the converted file's name when that is not the URL's, and
    whether the file was checked against the release's sha256 recorded in the manifest (a matching name alone
    proves nothing; nor does a ``--sha256``, which may be the file's own)."""
    same_name = entry.source_url == source_name or entry.source_url.endswith("/" + source_name)
    if entry.source_sha256 is None and entry.source_url == source_name:  # a stand-in entry: the file itself
        return source_name
    line = entry.source_url if same_name else f"{entry.source_url} (converted file: {_code_span(source_name)})"
    if not verified:
        why = ("the manifest records no sha256 of the release; the file matches the sha256 given with --sha256, "
               "which shows it is the file meant, not that it is the release" if given_sha
               else "no sha256 was given or recorded for it")
        line += (f" - not verified to be that release: {why}, so the file's own sha256 below is the only record of "
                 "what was converted")
    return line


#: A pretrained_cfg note stating an accuracy (``ImageNet-1k top-1 72.780 / top-5 91.024 ...``): the release's.
_ACCURACY_NOTE = re.compile(r"\btop-[15]\b|\baccuracy\b", re.IGNORECASE)


def _caveat_release_notes(notes: Any, entry: WeightEntry) -> Any:
    """``notes`` (a pretrained_cfg's) with each note stating an accuracy marked as the release's, for a file not
    verified to be that release (the model card says so on its source line); other notes (the architecture's size
    and FLOPs) are facts of the architecture and stay as they are."""
    if not notes:
        return notes
    single = isinstance(notes, str)
    caveat = (f" - reported for the release {entry.name}; this file was not verified to be that release (the "
              "manifest records no sha256 of the release, or this file's differs from it); see the model card")
    marked = [f"{note}{caveat}" if isinstance(note, str) and _ACCURACY_NOTE.search(note) else note
              for note in ([notes] if single else notes)]
    return marked[0] if single else tuple(marked)


def _count_flops(model: torch.nn.Module) -> Optional[int]:
    try:
        from vitzoo.flops import count_flops
    except ImportError:
        return None
    return int(count_flops(model).total)


def _fetch_source(src: str, workdir: Path) -> Path:
    if src.startswith(("http://", "https://")):
        dst = _download_path(src, workdir)
        try:
            torch.hub.download_url_to_file(src, str(dst), progress=True)
        except OSError as e:  # URLError / HTTPError / timeouts: say which URL, and the offline alternative
            raise MissingWeightsError(
                f"Could not download {src}: {type(e).__name__}: {e}. If this machine is offline, download the file "
                "elsewhere and convert the local copy (vitzoo convert PATH ...).") from e
        return dst
    path = Path(src)
    if path.is_dir():
        raise MissingWeightsError(f"Source checkpoint {src} is a folder; give the checkpoint file in it.")
    if not path.is_file():
        raise MissingWeightsError(f"Source checkpoint {src} does not exist.")
    return path


@contextlib.contextmanager
def _naming_the_url(src: str, workdir: Path) -> Iterator[None]:
    """Errors that name the downloaded copy of a URL source (in ``workdir``, deleted before the user reads them)
    name the URL instead (found by a review: a cut or wrong file at a URL was named by a path that no longer
    existed)."""
    try:
        yield
    except Exception as e:
        if src.startswith(("http://", "https://")):
            copy = str(_download_path(src, workdir))
            if e.args and isinstance(e.args[0], str):
                e.args = (e.args[0].replace(copy, src), *e.args[1:])
            if isinstance(e, OSError):  # "[Errno 28] No space left on device: '<copy>'" is printed from filename
                if e.filename is not None and str(e.filename) == copy:
                    e.filename = src
                if e.filename2 is not None and str(e.filename2) == copy:
                    e.filename2 = src
        raise


def _download_path(url: str, workdir: Path) -> Path:
    """Where :func:`_fetch_source` downloads ``url`` to."""
    return workdir / Path(url.split("?")[0]).name


def _parse_dims(dims: Any) -> Any:
    """``dims`` as given to :func:`convert_checkpoint` (``--dims``), as an ``NViTDims`` (``nvit.dims.resolve_dims``):
    an ``NViTDims`` passes through, a dict is the dims record; a string is a path to a .json file holding the dims
    record, or the JSON itself (our keys or the official EMB/head/QK/V/MLP)."""
    from nvit.dims import resolve_dims

    if isinstance(dims, (str, os.PathLike)):
        text = os.fspath(dims)
        if os.path.isfile(text):
            where = f"file {text}"
            try:
                text = Path(text).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise UsageError(f"--dims: cannot read {where}: {e}; give a readable .json file.") from e
        elif text.lstrip().startswith("{"):
            where = "the JSON given"
        else:
            raise UsageError(
                f"--dims {text!r} is neither an existing file nor a JSON object; give the NViT dims record as JSON "
                "(--dims '{\"EMB\": ..., \"head\": [...], \"QK\": [...], \"V\": [...], \"MLP\": [...]}') or "
                "the path of a .json file holding it.")
        try:
            dims = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--dims: {where} is not valid JSON ({e}); give the NViT dims record as a JSON "
                             "object with keys EMB/head/QK/V/MLP (or embed_dim/heads/qk_dim/v_dim/mlp_dim).") from e
    try:
        return resolve_dims(dims)
    except (TypeError, ValueError, KeyError) as e:
        raise UsageError(f"--dims: not a valid NViT dims record: {_reason(e)}") from e


def _peek_shapes(path: Path) -> Optional[Dict[str, Tuple[int, ...]]]:
    """The shape of every tensor in a checkpoint's weights (unwrapped from ``model`` / ``state_dict`` and the
    ``module.`` / ``_orig_mod.`` prefixes), read without loading the tensors: safetensors' header, or a memory-mapped
    ``torch.load`` (only a legacy, non-zip ``torch.save`` file is read whole). None when the file cannot be read
    here; the model's loader then says why (and torch's warnings about such a file are the loader's to show: found
    by a review, a plain pickle printed torch's pickle-protocol warning before the error naming the file)."""
    from shvit.checkpoint import _unwrap

    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return _unwrap({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the official NViT files pickle their args (argparse.Namespace)
            try:
                checkpoint = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy format
    except Exception:  # noqa: BLE001  unreadable or unsafe: the loader reports it with its own message
        return None
    if not isinstance(checkpoint, Mapping):
        return None
    return {k: tuple(v.shape) for k, v in _unwrap(checkpoint).items() if isinstance(k, str) and torch.is_tensor(v)}


def _own_shapes(shapes: Optional[Dict[str, Tuple[int, ...]]], model: str) -> Optional[Dict[str, Tuple[int, ...]]]:
    """The shapes of the model's own tensors (``shapes``: :func:`_peek_shapes`) when the checkpoint holds it under a
    prefix beside other parts (a Lightning module's ``model.``, a detector's ``backbone.``), taken as the model's
    loader takes them (found by an audit: the probes missed such a model's resolution and patch size, so it was
    resampled to 224 / 16 px and "verified" against the resampled source)."""
    if shapes is None:
        return None
    if model.startswith("shvit_"):
        from shvit.checkpoint import _take_nested_model as take
    else:
        from nvit.checkpoint import take_nested_model as take
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the loader warns about the left-out tensors itself
        try:
            return take(shapes)
        except (ValueError, RuntimeError):  # two candidate models (either family's error): the loader says so
            return shapes


def _nvit_geometry(path: Path, shapes: Optional[Dict[str, Tuple[int, ...]]],
                   in_chans: int) -> Tuple[Optional[int], Optional[int]]:
    """``(image size, patch size)`` an NViT checkpoint (``shapes``: :func:`_peek_shapes`) was trained at (the square
    image is patch grid side x patch size), or ``(None, None)`` when it cannot be told here (the model's loader then
    says why)."""
    if shapes is None or "pos_embed" not in shapes or "patch_embed.proj.weight" not in shapes or (
            "head_dist.weight" in shapes and "dist_token" not in shapes):  # damaged: the loader says so
        return None, None
    patches = shapes["pos_embed"][1] - (2 if "dist_token" in shapes else 1)
    side = int(round(max(patches, 0) ** 0.5))
    if side * side != patches:
        raise ValueError(
            f"{path.name}: its position embedding has {patches} patch tokens, not a square grid, so the image size "
            "it was trained at cannot be told; vitzoo convert keeps a checkpoint's own resolution and converts "
            "square grids only. Save it from a model of square img_size.")
    weight = shapes["patch_embed.proj.weight"]  # (E, C, p, p), or the official (E, C*p*p, 1, 1)
    if len(weight) == 4 and weight[-1] != weight[-2]:
        raise ValueError(f"{path.name}: its patch embedding has {weight[-2]}x{weight[-1]} patches; vitzoo convert "
                         "keeps a checkpoint's own patch size and converts square patches only.")
    patch = int(round((weight[1] // in_chans) ** 0.5)) if weight[-1] == 1 else weight[-1]
    return side * patch, patch


def _has_distill_head(shapes: Optional[Dict[str, Tuple[int, ...]]]) -> bool:
    """Whether a (SHViT) checkpoint (``shapes``: :func:`_peek_shapes`) holds a distillation head (``head_dist.*``)."""
    return shapes is not None and any(k.startswith("head_dist.") for k in shapes)


def convert_checkpoint(
    src: PathLike,
    model_name: str,
    out_dir: PathLike,
    force: bool = False,
    *,
    tag: Optional[str] = None,
    num_classes: Optional[int] = None,
    sha256: Optional[str] = None,
    repo_id: Optional[str] = None,
    flops: bool = True,
    manifest: Optional[Manifest] = None,
    dims: Any = None,
    in_chans: Optional[int] = None,
    global_pool: Optional[str] = None,
    license: Optional[str] = None,
) -> Path:
    """Convert ``src`` (a checkpoint the model's loader accepts, or its URL) into a verified Hub-ready folder.

    Args:
        src: checkpoint file or http(s) URL (official release files included).
        model_name: architecture (``shvit_s1``, ``nvit_b`` ...), optionally ``arch.tag``.
        out_dir: output folder; must not exist unless ``force``.
        force: replace an existing ``out_dir``.
        tag: manifest tag of the weight (default: the tag in ``model_name``, else the model's original release).
        num_classes: classifier size of the checkpoint, if not the model's default.
        sha256: expected sha256 of ``src`` (default: the manifest's, when known).
        repo_id: Hub repo named in the model card's usage example.
        flops: count FLOPs for the card with ``vitzoo.flops`` (else the reported number is shown).
        manifest: weights record (default: the packaged one).
        dims: NViT dims record for a checkpoint that has none (``nvit_*`` models only): an ``NViTDims``, a dict
            (our keys or the official EMB/head/QK/V/MLP), a JSON string, or the path of a .json file holding it.
        in_chans: input channels of the checkpoint's first conv, if not 3 (recorded in ``model_args``).
        global_pool: the pooling an NViT / ReViT checkpoint was trained with, if not the released ``'token'``:
            ``'avg'``, ``'max'`` or ``'avgmax'`` (timm then applies the final norm after pooling, ``fc_norm``;
            recorded in ``model_args``).
        license: the licence of weights that are not a release the manifest records (your own tag, a ReViT), as
            the Hub writes licence ids (``apache-2.0``, ``cc-by-4.0``): it goes into the weights' metadata,
            ``config.json`` and the card. A release keeps its own licence, so it is refused there. Default: a
            release architecture's licence for a conversion or fine-tune of it, ``other`` (for the owner to state)
            for an architecture without a release.

    A SHViT checkpoint with a distillation head (``head_dist.*``) is converted with ``distilled=True`` (recorded in
    ``model_args``), so the head is kept and the outputs are the mean of both heads, as in the source.
    An NViT or ReViT checkpoint keeps its own resolution and patch size: the model is built at the image size its
    position embedding was trained for (e.g. 384 for a 24x24 grid), recorded as ``model_args.img_size`` and
    ``input_size``, and with its patch embedding's patch size, recorded as ``model_args.patch_size`` when not 16.

    Returns:
        ``out_dir``.

    Raises:
        UnknownModelError: ``model_name``'s architecture is not a timm model (a ``ValueError``).
        FileExistsError: ``out_dir`` cannot be replaced, even with ``force`` (a file, the current folder or one
            containing it, a folder holding ``src``, a mount point: that reason is given with or without ``force``),
            or it is a folder that exists and ``force`` is not set.
        OSError: ``out_dir`` cannot be written (a parent is a file, a folder is not writable, ...).
        MissingWeightsError, CorruptWeightsError, WeightsError: bad source (missing, hash mismatch, corrupt,
            weights of another model).
        VerificationError: the converted folder does not reproduce the source model.
    """
    import safetensors.torch
    from timm.models import get_pretrained_cfg
    from timm.models._hub import save_config_for_hf

    import vitzoo

    from vitzoo.models import resolve_name

    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 0):
        raise UsageError(f"num_classes (--num-classes) must be a whole number >= 0 (the checkpoint's classifier "
                         f"size), got {num_classes!r}.")
    if in_chans is not None and (isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1):
        raise UsageError(f"in_chans (--in-chans) must be a whole number >= 1 (the input channels of the checkpoint's "
                         f"first conv), got {in_chans!r}.")
    if sha256 is not None and not (isinstance(sha256, str) and _SHA256_RE.fullmatch(sha256.lower())):
        raise UsageError(f"sha256 (--sha256) must be 64 hex digits (the source file's sha256, e.g. from sha256sum), "
                         f"got {sha256!r}.")
    if repo_id is not None and not (isinstance(repo_id, str) and _REPO_RE.fullmatch(repo_id)):
        raise UsageError(f"repo_id (--repo) must be a Hub repo id ORG/NAME (letters, digits, '_', '-', '.'; neither "
                         f"part starting or ending with '-' or '.', no '--' or '..'), got {repo_id!r}.")
    model, _, name_tag = model_name.partition(".")
    resolve_name(model)  # an unknown architecture: UnknownModelError with the closest names, before any work
    try:
        family_of(model)
    except ValueError as e:  # a timm model, but not one of this zoo's (no manifest family, no licence record)
        raise UsageError(f"{e} vitzoo convert converts checkpoints of those architectures only; choose one "
                         "with --model.") from e
    for given in (tag, name_tag):
        if given and not _TAG_RE.fullmatch(given):
            raise UsageError(f"tag (--tag, or the name's .TAG) must be letters, digits, '_' or '-', got {given!r}.")
    if license is not None:
        if not (isinstance(license, str) and _LICENSE_RE.fullmatch(license)):
            raise UsageError(f"license (--license) must be a licence id as Hub model cards write it (lower case, e.g. "
                             f"apache-2.0, cc-by-4.0, mit), got {license!r}.")
        manifest = manifest or load_manifest()
        given_tag = tag or name_tag
        release = manifest.find(model, given_tag) if given_tag else manifest.release(model)
        if release is not None and num_classes in (None, 1000):
            raise UsageError(f"--license (license=) is for weights that are not a release: {release.name} is the "
                             f"release the weights manifest records, and it keeps its licence ({release.license}). "
                             f"For weights of your own, give them a tag of your own (--tag mine).")
    is_nvit = model.startswith("nvit_")
    if global_pool is not None:
        if global_pool not in GLOBAL_POOLS:
            raise UsageError(f"global_pool (--global-pool) must be one of {', '.join(GLOBAL_POOLS)}, got "
                             f"{global_pool!r}.")
        if not model.startswith(("nvit_", "revit_")):
            raise UsageError(f"--global-pool (global_pool=) is for nvit_* / revit_* models only; {model} has one "
                             "pooling. Remove --global-pool.")
    if dims is not None:
        if not is_nvit:
            raise UsageError(f"--dims (dims=) is for nvit_* models only; {model} takes no dims record. Remove --dims.")
        dims = _parse_dims(dims)
    check_output_dir(out_dir, force, keep=[src] if os.path.exists(str(src)) else [])
    tag = tag or name_tag or None
    manifest = manifest or load_manifest()
    out_dir = Path(out_dir)
    # a downloaded source goes beside the output (the system temp folder may be small); the user never named this
    # folder, so an OS error creating it names the output instead
    try:
        source_dir = tempfile.TemporaryDirectory(prefix=".vitzoo-src-",
                                                 dir=out_dir.parent if out_dir.parent.exists() else None)
    except OSError as e:
        raise _naming_target(e, out_dir, temp=None) from e
    # the bar is closed (and its line cleared) before any error propagates, so the error stays readable
    with tqdm(total=5, desc="convert", unit="step", leave=False) as steps, source_dir as workdir, \
            _naming_the_url(str(src), Path(workdir)):
        steps.set_postfix_str("source")
        path = _fetch_source(str(src), Path(workdir))
        source_sha = sha256_file(path)
        # a local path is recorded by file name only (absolute paths would leak into published files)
        source_name = str(src) if str(src).startswith(("http://", "https://")) else Path(src).name
        entry = _entry_for(manifest, model, tag, source_name, num_classes)
        if tag and manifest.find(model, tag) is None and tag != "converted":
            known = [e.tag for e in manifest.weights if e.model == model]
            tqdm.write(f"note: tag {tag!r} is not a release of {model} in the weights manifest (known: "
                       f"{', '.join(known) or 'none'}); it is converted as your own weights, without a release's "
                       "metrics.", file=sys.stderr)
        expected = sha256 or entry.source_sha256
        if expected is not None and expected.lower() != source_sha:
            raise CorruptWeightsError(
                f"sha256 mismatch for {src}: expected {expected} ({'given' if sha256 else 'manifest'}), got "
                f"{source_sha}. The file is corrupt or is not {entry.name}; download it again."
            )
        if entry.source_sha256 is not None and entry.source_sha256.lower() != source_sha:
            # --sha256 matched the file, but the manifest records another file as the release: not the release
            tqdm.write(f"note: {src} is not the file the weights manifest records for {entry.name} (sha256 "
                       f"{entry.source_sha256}); it is converted as {model}.converted, without the release's "
                       "metrics.", file=sys.stderr)
            entry = _entry_for(manifest, model, "converted", source_name)
        steps.update()
        steps.set_postfix_str("load")
        overlay: Dict[str, Any] = {"file": str(path)}
        kwargs: Dict[str, Any] = {}
        if num_classes is not None:
            overlay["num_classes"] = num_classes
            kwargs["num_classes"] = num_classes
        if dims is not None:
            kwargs["dims"] = dims
        if global_pool is not None:
            kwargs["global_pool"] = global_pool
        chans = in_chans or 3
        if in_chans is not None:  # the model takes them and the cfg declares them: nothing for timm to adapt
            kwargs["in_chans"] = in_chans
            overlay["input_size"] = (in_chans, *get_pretrained_cfg(model).input_size[1:])
        shapes = _own_shapes(_peek_shapes(path), model) if model.startswith(("shvit_", "nvit_", "revit_")) else None
        if model.startswith("shvit_") and _has_distill_head(shapes):
            kwargs["distilled"] = True  # keep the distillation head: the source's output is the mean of both heads
        image_size, patch_size = _nvit_geometry(path, shapes, chans) if model.startswith(("nvit_", "revit_")) \
            else (None, None)
        if image_size is not None and image_size != 224:  # keep the checkpoint's resolution, do not resample it
            kwargs["img_size"] = image_size
            overlay["input_size"] = (chans, image_size, image_size)
        if patch_size is not None and patch_size != 16:  # nor its patch embedding
            kwargs["patch_size"] = patch_size
        try:
            source_model = load_pretrained_model(model, pretrained_cfg_overlay=overlay, **kwargs).eval()
        except WeightsError:
            raise
        except RuntimeError as e:  # e.g. a truncated legacy torch.save file (only loading it can tell)
            reason = _reason(e)
            has_advice = "download it again" in reason or "To fix" in reason
            advice = "" if has_advice else " Check the file, or download it again."
            raise CorruptWeightsError(f"{reason}{advice}") from e
        steps.update()
        params = sum(p.numel() for p in source_model.parameters())
        # the release's own recorded hash verifies the file (a --sha256 may be the file's own)
        is_release = entry.source_sha256 is not None and entry.source_sha256.lower() == source_sha
        if not is_release and not _params_match(entry, params):
            # not verified by the release's recorded hash (a --sha256 may be the file's own), and not the size of
            # the release either (NViT-B's file converted as nvit_s): the card must not claim the release's source
            # and metrics
            tqdm.write(f"note: {src} has {params / 1e6:.2f}M parameters, not the {entry.metrics['params'] / 1e6:.3g}M "
                       f"reported for {entry.name}; it is converted as {model}.converted, without the release's "
                       "metrics.", file=sys.stderr)
            entry = _entry_for(manifest, model, "converted", source_name)

        if license is not None:  # the owner's licence for weights that are not a release (checked above)
            entry = dataclasses.replace(entry, license=license)
        metadata = {"format": "pt", "model": model, "tag": entry.tag, "source": source_name,
                    "source_sha256": source_sha, "license": entry.license,
                    "converted_by": f"vitzoo {vitzoo.__version__}"}
        model_args: Dict[str, Any] = {}
        model_dims = getattr(source_model, "dims", None)
        if model_dims is not None:
            model_args["dims"] = model_dims.to_dict()
            metadata["nvit_dims"] = json.dumps(model_args["dims"], separators=(",", ":"))
        for key in ("img_size", "patch_size", "distilled", "in_chans"):
            if key in kwargs:
                model_args[key] = kwargs[key]

        if entry.metrics.get("top1") is None:  # not the release: its reported accuracy and size do not apply
            source_model.pretrained_cfg = {k: v for k, v in source_model.pretrained_cfg.items() if k != "notes"}
        elif not is_release:  # credited to the release, unverified: its accuracy only with the card's caveat
            notes = _caveat_release_notes(source_model.pretrained_cfg.get("notes"), entry)
            source_model.pretrained_cfg = {**source_model.pretrained_cfg, "notes": notes}
        with staged_dir(out_dir, force=force) as tmp:
            steps.set_postfix_str("write")
            state = {k: v.detach().contiguous() for k, v in source_model.state_dict().items()}
            metadata["tensors_sha256"] = tensors_sha256(state)
            try:
                safetensors.torch.save_file(state, str(tmp / "model.safetensors"), metadata=metadata)
            except Exception as e:  # noqa: BLE001  safetensors' own SafetensorError is no OSError (a full disk)
                if isinstance(e, OSError):
                    raise
                raise OSError(f"cannot write {out_dir / 'model.safetensors'}: {e}") from e
            save_config_for_hf(source_model, str(tmp / "config.json"), model_args=model_args,
                               model_config={"pretrained_cfg": {"license": entry.license, "tag": entry.tag}})
            steps.update()
            steps.set_postfix_str("card")
            input_size = tuple(source_model.pretrained_cfg.get("input_size", (3, 224, 224)))
            source_line = _describe_source(entry, source_name, verified=is_release, given_sha=sha256 is not None)
            fields = card_fields(
                entry, manifest, source=source_line,
                source_sha256=source_sha,
                params=params,
                flops=_count_flops(source_model) if flops else None, input_size=input_size,
                repo_id=repo_id, dims_json=metadata.get("nvit_dims"), num_classes=source_model.num_classes,
            )
            (tmp / "README.md").write_text(render_card(fields), encoding="utf-8")
            steps.update()
            steps.set_postfix_str("verify")
            try:
                verify_folder(tmp, reference=source_model, manifest=manifest)
            except VerificationError as e:  # named as the output folder, not the staging one it will become
                raise VerificationError(str(e).replace(str(tmp), str(out_dir))) from e
            steps.update()
    return out_dir


# ---------------------------------------------------------------------------------------------------------------------
# command line


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``convert`` sub-command."""
    p = subparsers.add_parser(NAME, help="convert a checkpoint into a verified Hub-ready folder",
                              description=help_description(__doc__))
    p.add_argument("src", help="checkpoint file or http(s) URL (e.g. an official release file)")
    p.add_argument("--model", required=True, help="architecture, e.g. shvit_s1 or nvit_b")
    p.add_argument("--out", required=True, type=named_output("--out converted/shvit_s1"),
                   help="output folder (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--tag", default=None,
                   help="manifest tag of the weight (default: the model's original release, e.g. in1k_official)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size, if not the model default")
    p.add_argument("--sha256", default=None, help="expected sha256 of SRC (default: the manifest's, when known)")
    p.add_argument("--repo", default=None, help="Hub repo org/name for the model card's usage example")
    p.add_argument("--no-flops", action="store_true", help="do not count FLOPs (the card shows the reported number)")
    p.add_argument("--license", default=None, metavar="ID",
                   help="licence of weights that are not a release (your own --tag, a ReViT), as the Hub writes it, "
                        "e.g. apache-2.0")
    p.add_argument("--in-chans", type=int, default=None, metavar="N",
                   help="input channels of the checkpoint's first conv, if not 3 (e.g. 1 for grayscale)")
    p.add_argument("--global-pool", default=None, choices=GLOBAL_POOLS,
                   help="the pooling an NViT / ReViT checkpoint was trained with, if not token (avg, max, avgmax: "
                        "its final norm comes after pooling, fc_norm)")
    p.add_argument("--dims", default=None, metavar="JSON_OR_FILE",
                   help="NViT dims record for a checkpoint without one (nvit_* only): JSON, or a .json file; "
                        "our keys or the official EMB/head/QK/V/MLP")
    p.set_defaults(func=run)


def _chain_text(error: BaseException) -> str:
    """The messages of ``error`` and its causes, joined (the loader's own error is often a cause)."""
    texts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(texts)


_FOUND_VARIANT = re.compile(r"found (shvit_s\d)\b")
_EXTRA = re.compile(r"has (\d+) tensors? that .{1,80}? not have \(e\.g\. \[([^\]]*)\]")
_INCOMPLETE = re.compile(r"incomplete: (\d+) of the model's tensors are missing \(e\.g\. \[([^\]]*)\]")
_NVIT_MODELS = "--model nvit_b/h/s/t"
_WEIGHTS_UNDER = re.compile(r"holds its weights under (\[('[^']+')[^\]]*\])")
_CLASSIFIER_SIZE = re.compile(r"The checkpoint's classifier \(head(?:\.l)?\) has (\d+) outputs")
_IN_CHANS = re.compile(r"The checkpoint's (?:first conv|patch embedding) \([\w.]+\) takes (\d+) input channels?,")


def _cli_advice(src: str, model: str, text: str) -> Optional[str]:
    """One short line for a loader error that tells what the checkpoint is, with the option that converts it;
    None when the error does not tell (its own message is shown then)."""
    found = _FOUND_VARIANT.search(text)
    if found and found.group(1) != model:
        return f"{src} holds {found.group(1)} weights, not {model}; convert it with --model {found.group(1)}."
    fused = re.search(r"holds a fused (shvit_s\d|SHViT with embed_dim=\([^)]*\), depth=\([^)]*\))", text)
    if fused:  # a folder is for timm.create_model(pretrained=True), which builds the unfused model
        return (f"{src} holds fused {fused.group(1).strip()} weights (saved after fuse()), which cannot be unfused; "
                f"convert the unfused checkpoint they were made from.")
    if "not an SHViT checkpoint" in text:
        return f"{src} is not an SHViT checkpoint (--model {model}); for NViT use {_NVIT_MODELS}."
    if "is a SHViT checkpoint" in text and model.startswith(("nvit_", "revit_")):
        return f"{src} is an SHViT checkpoint, not {model}'s; convert it with --model shvit_s1/s2/s3/s4 (its variant)."
    if "dims record differs from" in text:
        if "own dims (the ReViT rule's)" in text:
            return (f"{src} is an NViT checkpoint with its own dims record, which {model}'s fixed dims do not match; "
                    f"convert it with {_NVIT_MODELS}.")
        return f"{src} has its own NViT dims record, unlike the --dims given; remove --dims."
    layout = _WEIGHTS_UNDER.search(text)
    if layout and "with the dims record" in text:
        return (f"{src} holds its weights under {layout.group(1)}, not under 'model' or 'state_dict'; save the ones "
                f"you want with its dims record (ck = torch.load(PATH); torch.save({{'model': ck[{layout.group(2)}], "
                "'dim': ck['dim']}, 'weights.pth')) and convert that.")
    if layout:
        return (f"{src} holds its weights under {layout.group(1)}, not under 'model' or 'state_dict'; save the ones "
                f"you want as a state dict (torch.save(torch.load(PATH)[{layout.group(2)}], 'weights.pth')) and "
                "convert that.")
    size = _CLASSIFIER_SIZE.search(text)
    if size:
        return f"{src}'s classifier has {size.group(1)} outputs; convert it with --num-classes {size.group(1)}."
    chans = _IN_CHANS.search(text)
    if chans:
        n = int(chans.group(1))
        return f"{src}'s first conv takes {n} input channel{'s' * (n != 1)}; convert it with --in-chans {n}."
    if "Create the model with the pooling it was trained with: global_pool='avg'" in text:
        return (f"{src} applies its final norm after pooling (fc_norm); convert it with --global-pool avg (or max, "
                "avgmax: the pooling it was trained with). A checkpoint of token pooling with fc_norm cannot be "
                "converted by vitzoo convert; load it in Python with fc_norm=True.")
    if "Create the model with fc_norm=False to load it" in text:
        return (f"{src} applies its final norm on the tokens before pooling (norm); convert it without --global-pool "
                "(token pooling, as the released NViTs).")
    if "The checkpoint has no classifier (head" in text:
        return f"{src} has no classifier head; convert it with --num-classes 0."
    incomplete = _INCOMPLETE.search(text)
    if incomplete:
        names = re.findall(r"'([^']+)'", incomplete.group(2))
        count = int(incomplete.group(1))
        if names and all(n.startswith("head.") for n in names) and count <= 6:
            return f"{src} has no classifier head (e.g. {names[0]} is missing); convert it with --num-classes 0."
        # the loader's advice (pretrained_strict=False) is for Python; convert never writes a partial load
        return (f"{src} is incomplete: {count} of {model}'s tensors are missing (e.g. {names[0] if names else '?'}); "
                f"it may be truncated or saved from a modified model. Convert a complete {model} checkpoint.")
    extra = _EXTRA.search(text)
    if extra:
        names = re.findall(r"'([^']+)'", extra.group(2))
        return (f"{src} has {extra.group(1)} tensor(s) that {model} does not have (e.g. {names[0] if names else '?'}): "
                "it was saved from a modified model; remove them from the file to convert it.")
    return None


def run(args: argparse.Namespace) -> int:
    """Run ``vitzoo convert``; returns the exit code (0 ok, 2 a bad option value or an unknown --model, 1 a failure;
    with a message on stderr)."""
    import sys

    from .models import UnknownModelError

    try:
        out = convert_checkpoint(args.src, args.model, args.out, force=args.force, tag=args.tag,
                                 num_classes=args.num_classes, sha256=args.sha256, repo_id=args.repo,
                                 flops=not args.no_flops, dims=args.dims, in_chans=args.in_chans,
                                 global_pool=args.global_pool, license=args.license)
    except (UsageError, UnknownModelError) as e:
        print(f"vitzoo convert: error: {cli_message(e)}", file=sys.stderr)
        return 2
    except (FileExistsError, WeightsError, VerificationError, ValueError) as e:
        message = _cli_advice(args.src, args.model.partition(".")[0], _chain_text(e)) or cli_message(e)
        print(f"vitzoo convert: error: {message.replace('; or use pretrained=False', '')}", file=sys.stderr)
        return 1
    print(f"converted {args.src} -> {out} (verified: outputs identical to the source model)")
    return 0
