"""Model-name resolution for the comparison tools, the default comparison set and the papers' numbers.

Any name ``timm.create_model`` knows works here, with or without a pretrained tag (``shvit_s4.in1k``); where
asked for (``allow_folders``), also a weights folder: ``local-dir:PATH`` (read offline from its ``config.json``)
and ``hf-hub:org/name`` (timm reads its config from the Hub).
Models are always built **without weights**: counts and speed do not depend on the values, and nothing is
downloaded. An unknown name raises :class:`UnknownModelError`, whose message lists the closest registered names.
"""
from __future__ import annotations

import difflib
import json
import numbers
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import timm
import torch.nn as nn

__all__ = [
    "ZOO_MODELS",
    "BASELINE_MODELS",
    "DEFAULT_MODELS",
    "PAPER_NUMBERS",
    "PaperNumbers",
    "UnknownModelError",
    "closest_models",
    "resolve_name",
    "create",
    "model_input_size",
    "model_in_chans",
    "first_meta_tensor",
]

# The zoo's own models: SHViT S1-S4 and the ReViT designs (NViT-B/H/S/T need per-block dims from a checkpoint).
ZOO_MODELS: Tuple[str, ...] = ("shvit_s1", "shvit_s2", "shvit_s3", "shvit_s4", "revit_t", "revit_s")

# What users would pick instead: the DeiTs ReViT/NViT are measured against, and SHViT's CPU-friendly rivals.
BASELINE_MODELS: Tuple[str, ...] = (
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
    "efficientvit_m2",
    "efficientvit_m4",
    "efficientvit_m5",
    "mobilenetv3_large_100",
    "fastvit_t8",
    "fastvit_t12",
)

DEFAULT_MODELS: Tuple[str, ...] = ZOO_MODELS + BASELINE_MODELS


@dataclass(frozen=True)
class PaperNumbers:
    """Numbers a paper reports for a model (FLOPs are MACs, as fvcore counts them).

    Attributes:
        flops: Reported FLOPs (multiply-adds), absolute.
        params: Reported parameter count, absolute.
        top1: Reported ImageNet-1k top-1 accuracy in percent.
        source: Where the numbers come from.
        img_size: Input resolution (square) at which ``flops`` and ``top1`` were reported.
    """

    flops: float
    params: float
    top1: float
    source: str
    img_size: int = 224


_M = 1e6
_G = 1e9
_SHVIT = "SHViT paper, Table 2"
_NVIT = "NViT paper, Table 1"
_REVIT = "NViT paper, Table 7"
_DEIT = "DeiT paper, Table 1"

PAPER_NUMBERS: Dict[str, PaperNumbers] = {
    "shvit_s1": PaperNumbers(241 * _M, 6.3 * _M, 72.8, _SHVIT),
    "shvit_s2": PaperNumbers(366 * _M, 11.4 * _M, 75.2, _SHVIT),
    "shvit_s3": PaperNumbers(601 * _M, 14.2 * _M, 77.4, _SHVIT),
    "shvit_s4": PaperNumbers(986 * _M, 16.5 * _M, 79.4, _SHVIT, img_size=256),
    "revit_t": PaperNumbers(1.3 * _G, 5.9 * _M, 74.20, _REVIT),
    "revit_s": PaperNumbers(4.7 * _G, 23 * _M, 81.22, _REVIT),
    "nvit_b": PaperNumbers(6.8 * _G, 34 * _M, 83.29, _NVIT),
    "nvit_h": PaperNumbers(6.2 * _G, 30 * _M, 82.95, _NVIT),
    "nvit_s": PaperNumbers(4.2 * _G, 21 * _M, 82.19, _NVIT),
    "nvit_t": PaperNumbers(1.3 * _G, 6.9 * _M, 76.21, _NVIT),
    "deit_tiny_patch16_224": PaperNumbers(1.3 * _G, 5 * _M, 72.2, _DEIT),
    "deit_small_patch16_224": PaperNumbers(4.6 * _G, 22 * _M, 79.8, _DEIT),
    "deit_base_patch16_224": PaperNumbers(17.6 * _G, 86 * _M, 81.8, _DEIT),
    "efficientvit_m2": PaperNumbers(201 * _M, 4.2 * _M, 70.8, _SHVIT),
    "efficientvit_m4": PaperNumbers(299 * _M, 8.8 * _M, 74.3, _SHVIT),
    "efficientvit_m5": PaperNumbers(522 * _M, 12.4 * _M, 77.1, _SHVIT),
    "mobilenetv3_large_100": PaperNumbers(217 * _M, 5.4 * _M, 75.2, _SHVIT),
    "fastvit_t8": PaperNumbers(700 * _M, 2.1 * _M, 75.6, _SHVIT, img_size=256),
    "fastvit_t12": PaperNumbers(1400 * _M, 6.8 * _M, 79.1, _SHVIT, img_size=256),
}


class UnknownModelError(ValueError):
    """A model name (or its pretrained tag) that timm does not know."""


def closest_models(name: str, n: int = 5) -> List[str]:
    """Registered timm names closest to ``name``, best first: those ``name`` extends (``shvit_s1_distilled`` ->
    ``shvit_s1``; longest first), those that extend a ``name`` of 4 or more characters (``deit_t`` ->
    ``deit_tiny_patch16_224``; shortest first), then the most similar by difflib's ratio. Case and ``-`` for ``_``
    are not told apart."""
    by_lower = {m.lower(): m for m in timm.list_models()}  # case is not a reason to find nothing: SHVIT_S1 -> shvit_s1
    query = name.split(".", 1)[0].lower().replace("-", "_")
    extended = sorted((m for m in by_lower if query.startswith(m)), key=len, reverse=True)
    # a short start ("r", "vit") says too little: every name beginning so would come before the similar ones
    extending = sorted((m for m in by_lower if m.startswith(query) and m != query),
                       key=lambda m: (len(m), m)) if len(query) >= 4 else []
    similar = difflib.get_close_matches(query, list(by_lower), n=n, cutoff=0.5)
    return [by_lower[m] for m in list(dict.fromkeys(extended + extending + similar))[:n]]


# timm's deprecated spelling of a source prefix, which it still accepts (timm.models._factory)
_SOURCE_ALIASES = {"hf_hub": "hf-hub"}


def canonical_prefix(name: str) -> str:
    """``name`` with a weights-folder prefix in its canonical spelling (``LOCAL-DIR:x`` -> ``local-dir:x``,
    ``hf_hub:o/n`` -> ``hf-hub:o/n``), as timm reads it in any case; other names unchanged."""
    source, sep, rest = name.partition(":")
    canonical = _SOURCE_ALIASES.get(source.lower(), source.lower()) if sep else ""
    return f"{canonical}:{rest}" if canonical in ("local-dir", "hf-hub") else name


def resolve_name(name: str, allow_folders: bool = False) -> Tuple[str, Optional[str]]:
    """Split ``arch[.tag]`` and check both against timm's registry.

    Args:
        name: A timm model name, optionally with a pretrained tag.
        allow_folders: Also accept ``local-dir:PATH`` (a folder written by ``vitzoo convert`` or timm's
            ``save_for_hf``: its ``config.json`` names the architecture) and ``hf-hub:org/name`` (not checked
            here: timm fetches its config when the model is built). The prefix is read as timm reads it: in any
            case, and ``hf_hub:`` (timm's older spelling) for ``hf-hub:``.

    Returns:
        ``(architecture, tag)``; ``tag`` is None when the name has none. For ``hf-hub:`` names,
        ``("hf-hub:org/name", None)``, in that spelling.

    Raises:
        UnknownModelError: The architecture is not registered (the message lists the closest matches, and for a
            name with a ``/``, with ``allow_folders``, the ``hf-hub:`` and ``local-dir:`` spellings), or the
            tag is not one of the architecture's pretrained tags (the message lists the known tags), or a
            ``local-dir:`` folder has no readable ``config.json`` naming a registered architecture.
    """
    if not isinstance(name, str) or not name:
        raise UnknownModelError(f"model name must be a non-empty string, got {name!r}")
    source, sep, rest = name.partition(":")
    source = _SOURCE_ALIASES.get(source.lower(), source.lower()) if sep else ""
    if source in ("local-dir", "hf-hub"):
        if not allow_folders:
            raise UnknownModelError(f"{name!r}: a weights folder is not accepted here; give a timm model name")
        if not rest:
            raise UnknownModelError(f"{name!r}: nothing after '{source}:'; give {source}:"
                                    + ("org/name" if source == "hf-hub" else "PATH"))
        if source == "hf-hub":
            return f"hf-hub:{rest}", None
        return _folder_architecture(rest), None
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        matches = closest_models(arch.replace("\\", "/").rsplit("/", 1)[-1])
        hint = ", ".join(matches) if matches else "none (see `timm.list_models()`)"
        message = f"unknown model {name!r}; closest matches: {hint}"
        if allow_folders and any(c in name for c in "/\\"):  # a Hub repo id or a folder, without its prefix
            message += f"; for a Hugging Face Hub repo give 'hf-hub:{name}', for a folder 'local-dir:{name}'"
        raise UnknownModelError(message)
    if not tag:
        return arch, None
    known = sorted(timm.list_pretrained(f"{arch}.*"))
    if name not in known:
        tags = ", ".join(k.partition(".")[2] for k in known) or "none"
        raise UnknownModelError(f"unknown pretrained tag {tag!r} for model {arch!r}; known tags: {tags}")
    return arch, tag


def _folder_architecture(folder: str) -> str:
    """The registered architecture named by ``folder``'s ``config.json``."""
    config = Path(folder).expanduser() / "config.json"
    try:
        with open(config, encoding="utf-8") as f:
            arch = json.load(f).get("architecture")
    except FileNotFoundError:
        raise UnknownModelError(f"local-dir:{folder}: no config.json there (a folder written by `vitzoo convert` or "
                                "timm's save_for_hf has one)") from None
    except (OSError, ValueError, AttributeError) as e:
        raise UnknownModelError(f"local-dir:{folder}: cannot read {config} ({e})") from None
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise UnknownModelError(f"local-dir:{folder}: {config} names architecture {arch!r}, which is not a "
                                "registered timm model (import the package that registers it)")
    return arch


def create(
    name: str, img_size: Union[None, int, Tuple[int, int]] = None, in_chans: Optional[int] = None
) -> nn.Module:
    """Build a timm model by name, without weights, in eval mode.

    Args:
        name: ``arch`` or ``arch.tag``; the tag selects the pretrained cfg (input size, normalisation) only.
            Also ``local-dir:PATH`` / ``hf-hub:org/name``: the folder's config (classes, input size) is used,
            its weights are not loaded.
        img_size: Build for this input size (an int: square; or ``(H, W)``). Only passed to models whose cfg has a
            fixed input size (ViTs); convolutional models take any size as they are.
        in_chans: Build for this many input channels (timm's ``in_chans``); only passed when it differs from the
            model's default (3 for most).

    Returns:
        The model, in eval mode, with ``pretrained_cfg`` set.

    Raises:
        UnknownModelError: See :func:`resolve_name`.
        ValueError: ``in_chans`` is not a positive int.
    """
    if in_chans is not None and (isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1):
        raise ValueError(f"in_chans must be a positive int (the input's channel count), got {in_chans!r}")
    resolve_name(name, allow_folders=True)
    canonical = canonical_prefix(name)  # hf_hub: and HF-HUB: too, as timm reads them (found by an audit)
    if canonical.startswith("hf-hub:"):  # its config.json, checked as for a pretrained load (found by an audit:
        from .hub import hub_config     # without weights, a raw 404 / KeyError: 'architecture' / TypeError)
        hub_config(canonical[len("hf-hub:"):], weights=False)
    model = timm.create_model(name, pretrained=False)
    cfg = model.pretrained_cfg
    if isinstance(img_size, numbers.Integral):  # numpy ints too (an audit: "'numpy.int64' object is not iterable")
        img_size = int(img_size)
    size = (img_size, img_size) if isinstance(img_size, int) else None if img_size is None else tuple(img_size)
    kwargs: Dict[str, object] = {}
    if size is not None and cfg.get("fixed_input_size") and tuple(cfg["input_size"][-2:]) != size:
        kwargs["img_size"] = img_size
    if in_chans is not None and in_chans != model_in_chans(model):
        kwargs["in_chans"] = in_chans
    if kwargs:
        model = timm.create_model(name, pretrained=False, **kwargs)
    return model.eval()


def model_input_size(model: nn.Module) -> Optional[Tuple[int, int, int]]:
    """``(C, H, W)`` the model takes: its ``pretrained_cfg['input_size']``, with ``C`` its own ``in_chans`` and
    ``H, W`` the size its patch embedding was built for when that size is fixed.

    timm leaves the cfg as registered when a model is created with ``in_chans=1`` or ``img_size=(48, 80)``; the
    model's attributes are right (a ViT built for 48x80 refuses 224x224). None when the model has no cfg input size
    and no fixed size.
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size")
    fixed = _fixed_img_size(model)
    if not size and fixed is None:
        return None
    chans = getattr(model, "in_chans", None)
    if not (isinstance(chans, int) and chans > 0):
        chans = int(size[0]) if size else _first_conv_in_chans(model)
    height, width = fixed if fixed is not None else (int(size[1]), int(size[2]))
    return chans, height, width


def _first_conv_in_chans(model: nn.Module) -> int:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else 3


def _fixed_img_size(model: nn.Module) -> Optional[Tuple[int, int]]:
    """``(H, W)`` a fixed-size model was built for, when that can differ from its cfg's; else None.

    In order: a timm-style patch embedding that accepts only the size it was built for (``patch_embed.img_size``
    with ``strict_img_size`` on); then, for a model whose cfg says its input size is fixed
    (``fixed_input_size``: ViTs, LeViT, PiT, CoAtNet, MViTv2, XCiT, Twins, EfficientFormerV2...), the ``img_size``
    it was created with (timm records ``timm.create_model``'s arguments in ``_model_args``; its pretrained cfg
    stays at the registered size), else the size it records itself (``img_size`` of the model, of its
    ``patch_embed`` or of its first ``patch_embeds``). Never for a model built with ``dynamic_img_size``, nor for
    one whose cfg does not fix its size (SHViT, ResNets, EfficientViT-B...), which takes any size.
    """
    if getattr(model, "dynamic_img_size", False):
        return None
    embed = getattr(model, "patch_embed", None)
    if isinstance(embed, nn.Module) and getattr(embed, "strict_img_size", False):
        size = _as_size(getattr(embed, "img_size", None))
        if size is not None:
            return size
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if not cfg.get("fixed_input_size"):
        return None
    args = getattr(model, "_model_args", None)
    if isinstance(args, dict):
        if args.get("dynamic_img_size"):
            return None
        size = _as_size(args.get("img_size"))
        if size is not None:
            return size
    embeds = getattr(model, "patch_embeds", None)
    first = embeds[0] if isinstance(embeds, (nn.ModuleList, nn.Sequential)) and len(embeds) else None
    for owner in (model, embed, first):
        size = _as_size(getattr(owner, "img_size", None)) if isinstance(owner, nn.Module) else None
        if size is not None:
            return size
    return None


def _as_dim(value: object) -> Optional[int]:
    """``value`` as a positive int (numpy and 0-d torch integers included), or None for anything else (a float, a
    bool, a string, zero or less)."""
    if isinstance(value, bool):
        return None
    try:
        dim = operator.index(value)  # type: ignore[call-overload]
    except TypeError:
        return None
    return dim if dim > 0 else None


def _as_size(size: object) -> Optional[Tuple[int, int]]:
    """``(H, W)`` of a positive int or a pair of them; else None."""
    side = _as_dim(size)
    if side is not None:
        return side, side
    if not (isinstance(size, (tuple, list)) and len(size) == 2):
        return None
    height, width = _as_dim(size[0]), _as_dim(size[1])
    return None if height is None or width is None else (height, width)


def model_in_chans(model: nn.Module) -> int:
    """The model's input channels: ``in_chans``, else the cfg's, else the first Conv2d's, else 3."""
    size = model_input_size(model)
    if size is not None:
        return size[0]
    chans = getattr(model, "in_chans", None)
    if isinstance(chans, int) and chans > 0:
        return chans
    return _first_conv_in_chans(model)


def first_meta_tensor(model: nn.Module) -> Optional[str]:
    """The first parameter or buffer of ``model`` on the ``meta`` device (not materialised: no values), as
    ``"parameter 'name'"``; None when every tensor has values."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            if tensor.is_meta:
                return f"{kind} {name!r}"
    return None
