"""``vitzoo export``: write a verified ONNX file of a (fused) model with a dynamic batch dimension.

The file is written only after ONNX Runtime reproduces PyTorch's output (of the unfused model) at batch 1 and
batch 3 within ``--atol`` (default 1e-4) plus ``--rtol`` times PyTorch's largest output (default 0). It is written
atomically (temp file in the target directory, then ``os.replace``) and never overwrites an existing file unless
``--force`` is given.

    vitzoo export shvit_s1 --format onnx --out shvit_s1.onnx --img-size 224 --opset 17
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from vitzoo.atomic import atomic_open, check_new_file
from vitzoo.cli import image_size
from vitzoo.models import _as_size

__all__ = ["ExportError", "export_verified_onnx", "register", "run"]

VERIFY_BATCHES = (1, 3)
DEFAULT_ATOL = 1e-4


class ExportError(RuntimeError):
    """Export failed verification or could not be written."""


ERROR = "vitzoo export: error:"  # the start of every error line, as argparse starts its own


def _size_text(size: Tuple[int, int]) -> str:
    """``224`` for a square size, ``96x160`` (H x W) for another: the size part of the default output name."""
    return str(size[0]) if size[0] == size[1] else f"{size[0]}x{size[1]}"


def export_verified_onnx(
        model: torch.nn.Module,
        out: Path,
        img_size: Union[int, Tuple[int, int], None] = None,
        opset: int = 17,
        force: bool = False,
        atol: float = DEFAULT_ATOL,
        in_chans: Optional[int] = None,
        rtol: float = 0.0,
) -> float:
    """Fuse ``model``, export it to ONNX, verify it in ONNX Runtime and write it to ``out``.

    A float16 / bfloat16 / float64 model is exported in float32, as ``deploy(backend="onnxruntime")`` does (ONNX
    Runtime's CPU kernels run float32): a float32 copy is fused, exported and checked against (the caller's model
    keeps its dtype).

    Args:
        model: The model (not modified; a fused copy is exported).
        out: Destination ``.onnx`` path.
        img_size: Input size baked into the graph (batch stays dynamic): an int (square) or ``(H, W)``; default:
            the model's own, :func:`vitzoo.models.model_input_size` (its cfg's, or the size a ViT was built for).
        opset: ONNX opset (>= 17).
        force: Overwrite ``out`` if it exists.
        atol: Largest allowed max abs difference to PyTorch.
        in_chans: Input channels; default: the model's own (:func:`vitzoo.models.model_in_chans`).
        rtol: Added to ``atol`` in units of PyTorch's largest output magnitude (default 0: an absolute check); e.g.
            ``vitzoo.inference.ROUNDING_RTOL`` for a model with random weights, whose outputs can be huge.

    Returns:
        The max abs difference measured over the verification batches.

    Raises:
        FileExistsError: ``out`` exists and ``force`` is False (checked before any work, as are the other errors
            of :func:`vitzoo.atomic.check_new_file`: ``out`` is a folder, its folder does not exist (it is not
            created) or is not writable).
        ExportError: ONNX Runtime's output differs by more than ``atol + rtol * max|PyTorch's output|`` (with what
            the difference is: rounding at the outputs' scale, or a different result), or ONNX Runtime cannot load
            or run the graph at a verification batch size; nothing is written.
        OnnxExportError: torch's exporter cannot export the model (``vitzoo.onnx_runtime``).
        ValueError: ``img_size`` or ``in_chans`` is not a positive int (or pair), or ``in_chans`` is not the
            channel count the model records (its ``in_chans``), or ``img_size`` is not given and
            the model does not tell its input size, or the model is on the ``meta`` device (not materialised), or
            ``atol`` / ``rtol`` is not a finite number >= 0, or ``opset`` not an int the exporter writes.
        TypeError: ``model`` is not an ``nn.Module``, or is a deployed or ``torch.compile``-d model (pass the
            original).
    """
    from vitzoo.module_hooks import deepcopy_keeping_modes, reparameterize

    from vitzoo.inference import DeployedModel, check_arguments, check_materialised, outside_tolerance_hint
    from vitzoo.models import model_in_chans, model_input_size
    from vitzoo.onnx_runtime import (OnnxExportError, check_batch_dimension, export_onnx, modes_kept,
                                     session_diffs, session_for_export)
    from vitzoo.outputs import WRONG_RESULT_RTOL, OutputLayout
    from vitzoo.weight_standardisation import standardise_weights

    _check_exportable(model, DeployedModel)
    check_arguments(atol=atol, rtol=rtol, opset=opset, backend="onnxruntime")
    check_materialised(model, "export_verified_onnx()")
    if img_size is None:
        own = model_input_size(model)
        if own is None:
            raise ValueError(f"{type(model).__name__} has no pretrained_cfg input size and no fixed image size; "
                             f"pass img_size=N or img_size=(H, W).")
        img_size = own[1:]
    size = _as_size(img_size)
    if size is None:
        raise ValueError(f"img_size must be a positive int or a pair (H, W) of positive ints, got {img_size!r}.")
    height, width = size
    if in_chans is None:
        in_chans = model_in_chans(model)
    elif isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive int, got {in_chans!r}; leave it out to use the model's own.")
    elif isinstance(getattr(model, "in_chans", None), int) and in_chans != model.in_chans:  # as deploy() checks
        raise ValueError(f"in_chans={in_chans}, but the model takes {model.in_chans} input channels (its in_chans); "
                         f"leave in_chans out, or create the model for {in_chans}-channel images (timm: "
                         f"in_chans={in_chans}).")
    if not isinstance(out, (str, os.PathLike)):  # found by an audit: None was os.fspath's TypeError
        raise TypeError(f"out must be the path of the .onnx file to write, got {type(out).__name__}")
    out = Path(out)
    if out.suffix.lower() != ".onnx":  # as `vitzoo export --out`: force=True never replaces a weight file by a graph
        raise ValueError(f"out is an ONNX file, named *.onnx; got {str(out)!r}")
    # before the export: a folder, an existing file, a missing or unwritable folder
    check_new_file(out, force, example_name="model.onnx")
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    if dtypes - {torch.float32}:  # e.g. a bf16 model: the file takes and gives float32, as its check does
        model = deepcopy_keeping_modes(model).float()
    with modes_kept(model):  # the caller's model is given back in its own modes
        model.eval()
        # a fused deep copy; `model` stays the unfused reference
        fused, _ = standardise_weights(reparameterize(deepcopy_keeping_modes(model), keep_hooked=False))
        example = torch.randn(VERIFY_BATCHES[0], in_chans, height, width)
        data = export_onnx(fused, example, opset=opset)
        with torch.no_grad():
            layout = OutputLayout(fused(example))  # export_onnx has refused outputs it cannot re-nest
        inputs = [torch.randn(b, in_chans, height, width) for b in VERIFY_BATCHES]
        try:
            session = session_for_export(data, layout)
            measured = session_diffs(model, session, inputs, VERIFY_BATCHES[0])
            check_batch_dimension(measured, VERIFY_BATCHES[0], atol, rtol)
        except OnnxExportError as e:
            raise ExportError(f"{e}; nothing was written.") from e
        diffs = [d for _, d, _ in measured]
        diff = next((d for d in diffs if d != d), max(diffs))  # a NaN is the worst
        scale = max(largest for _, _, largest in measured)
        tolerance = atol + rtol * scale
        if atol <= DEFAULT_ATOL and rtol <= WRONG_RESULT_RTOL and diff <= tolerance and \
                not diff <= WRONG_RESULT_RTOL * scale:
            raise ExportError(
                f"ONNX Runtime output differs from PyTorch by max abs diff {diff:.3g}, within {tolerance:g} but "
                f"{diff / scale if scale else float('inf'):.2g} of PyTorch's largest output ({scale:.3g}): a "
                f"different result, not rounding; "
                f"nothing was written.")
        if not diff <= tolerance:
            hint = outside_tolerance_hint(diff, scale, {torch.float32}, fused, example, what="export",
                                          otherwise="Report this with the model name.")
            raise ExportError(
                f"ONNX Runtime output differs from PyTorch by max abs diff {diff:.3g} (> tolerance {tolerance:g}) at "
                f"batch sizes {VERIFY_BATCHES}; nothing was written. {hint}")
    with atomic_open(out, force=force) as f:
        f.write(data)
    return diff


def _check_exportable(model: object, deployed_type: type) -> None:
    """Refuse what is not a plain model before any work, saying what to pass instead (found by an audit: a deployed
    model's error pointed back to this function, a torch.compile-d one got torch's words, a state_dict an
    AttributeError)."""
    if isinstance(model, deployed_type):
        raise TypeError("export_verified_onnx() takes the original model, not one deployed by vitzoo.deploy (its "
                        "layers are already fused or packed): pass the model you deployed.")
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":  # without importing dynamo
        raise TypeError("export_verified_onnx() takes the original model, not a torch.compile-d one: pass "
                        "model._orig_mod (the model torch.compile wrapped).")
    if not isinstance(model, torch.nn.Module):
        hint = " (a state_dict: load it into its model first)" if isinstance(model, dict) else ""
        raise TypeError(f"export_verified_onnx() expects an nn.Module, got {type(model).__name__}{hint}.")


def _opset(value: str) -> int:
    """``--opset N``, checked as the arguments are parsed (the usage and exit code 2, before any model is built):
    an opset torch's TorchScript-based ONNX exporter writes."""
    from vitzoo.onnx_runtime import MAX_OPSET, MIN_OPSET

    try:
        opset = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {value!r}") from None
    if opset < MIN_OPSET:
        raise argparse.ArgumentTypeError(f"opset {opset} is too old: use --opset {MIN_OPSET} or newer")
    if opset > MAX_OPSET:
        raise argparse.ArgumentTypeError(f"opset {opset} is newer than this torch's ONNX exporter supports: use "
                                         f"--opset {MIN_OPSET} to {MAX_OPSET}")
    return opset


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="write a verified ONNX file (fused model, dynamic batch)",
        description="Export a timm/zoo model to ONNX: fused, dynamic batch, verified against PyTorch in ONNX "
                    "Runtime at batch 1 and 3 (max abs diff <= --atol, default 1e-4), written atomically.")
    parser.add_argument("model", help="timm model name, optionally with a pretrained tag (e.g. shvit_s1.in1k), or a "
                                      "weights folder (local-dir:PATH, hf-hub:org/name)")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="output format (only onnx)")
    parser.add_argument("--out", type=_onnx_file, default=None,
                        help="output file (default: MODEL_IMGSIZE.onnx, e.g. deit_224.onnx, or deit_96x160.onnx for "
                             "a model built for H x W 96x160)")
    parser.add_argument("--img-size", type=image_size, default=None, metavar="N|HxW",
                        help="input size: N for N x N, or HxW, e.g. 96x160 (default: the model's own H x W: its "
                             "cfg's, or the size a ViT was built for)")
    parser.add_argument("--opset", type=_opset, default=17,
                        help="ONNX opset version: 17 up to the newest torch's exporter writes (20 in torch 2.14)")
    parser.add_argument("--atol", type=_tolerance, default=DEFAULT_ATOL,
                        help="largest max abs difference to PyTorch the check allows (default 1e-4)")
    parser.add_argument("--rtol", type=_tolerance, default=0.0,
                        help="added to --atol in units of PyTorch's largest output (default 0); e.g. 1e-5 for a "
                             "model with random weights, whose outputs can be huge")
    parser.add_argument("--pretrained", action="store_true",
                        help="load the pretrained weights (downloads them); default: random weights")
    parser.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    parser.set_defaults(func=run)


# the library's advice "pass atol=0.001" as "pass --atol 0.001": a word after a space or "(" and before a number (a
# path holding "atol=1" is left alone, found by a review)
_AS_OPTION = re.compile(r"(?<=[\s(])([ar]tol)=(?=\d)")
_OPTION = r"--\1 "


def _tolerance(value: str) -> float:
    """``--atol`` / ``--rtol``: a finite number >= 0, checked as the arguments are parsed."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value!r}")
    return number


def _onnx_file(value: str) -> Path:
    """``--out FILE``, checked as the arguments are parsed (the usage and exit code 2, before any model is built): a
    name ending in .onnx. So ``--force`` never replaces a weight file, the input of a ``local-dir:`` export, by an
    ONNX graph (found by an audit), and an empty value is not the current folder."""
    if not value.strip():
        raise argparse.ArgumentTypeError("needs a file name, e.g. --out shvit_s1.onnx")
    if Path(value).suffix.lower() != ".onnx" and not Path(value).is_dir():  # a folder: named as such later
        raise argparse.ArgumentTypeError(f"the output is an ONNX file, named *.onnx; got {value!r}")
    return Path(value)


def _create(name: str, img_size: Union[None, int, Tuple[int, int]], pretrained: bool) -> torch.nn.Module:
    import timm

    from vitzoo.hub import load_pretrained_model
    from vitzoo.models import create, resolve_name

    if not pretrained:
        return create(name, img_size=img_size)
    arch, _ = resolve_name(name, allow_folders=True)
    kwargs = {}
    cfg = None if arch.startswith("hf-hub:") else timm.get_pretrained_cfg(arch)
    if img_size is not None and cfg is not None and getattr(cfg, "fixed_input_size", False):
        kwargs["img_size"] = img_size
    return load_pretrained_model(name, **kwargs).eval()  # checked files, and errors that say what to do


def _file_stem(name: str) -> str:
    """A file name for model ``name``: ``local-dir:/a/b`` -> ``b``, ``hf-hub:org/name`` -> ``org_name``."""
    if name.startswith("local-dir:"):
        return Path(name[len("local-dir:"):].rstrip("/")).name or "model"
    return name.removeprefix("hf-hub:").replace("/", "_")


def _default_img_size(name: str) -> Optional[Tuple[int, int]]:
    """The ``(H, W)`` the default output name (``MODEL_IMGSIZE.onnx``) will use, known before building the model:
    the registered pretrained cfg's, or a ``local-dir:`` folder's config.json's (its ``model_args.img_size``, the
    size a ViT is built for, else its cfg's ``input_size``). None where only building tells (``hf-hub:`` names, a
    folder's config without a usable size). The size the model is built for is checked again after building."""
    import json

    import timm

    from vitzoo.models import resolve_name

    arch, tag = resolve_name(name, allow_folders=True)
    if name.startswith("hf-hub:"):
        return None
    if name.startswith("local-dir:"):
        try:
            config = json.loads((Path(name[len("local-dir:"):]).expanduser() / "config.json").read_text("utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(config, dict):
            return None
        args = config.get("model_args")
        if isinstance(args, dict) and args.get("img_size") is not None:
            return _as_size(args["img_size"])
        cfg = config.get("pretrained_cfg", config)  # timm's older single-dict config is the cfg itself
        size = cfg.get("input_size") if isinstance(cfg, dict) else None
        return _as_size(size[-2:]) if isinstance(size, list) and len(size) == 3 else None
    cfg = timm.get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
    return _as_size(tuple(cfg.input_size[-2:])) if cfg is not None and cfg.input_size else None


def _advice(message: str, name: str) -> str:
    """A load error's advice for Python callers in this command's terms (:func:`command_line_advice`)."""
    from vitzoo.messages import command_line_advice

    arch = name.partition(".")[0]
    convert = f"`vitzoo convert FILE --model {arch} --out DIR` and export local-dir:DIR"
    return command_line_advice(
        message, local_file=f"convert a local weight file into a folder with {convert}",
        no_weights="leave out --pretrained (random weights)", variant="export the variant the checkpoint holds",
        dims=f"export it with --pretrained (its checkpoint holds them), or convert a local checkpoint with {convert}")


def _config_hint(name: str) -> str:
    """For a weights folder, where to look when its model cannot be built: the folder's config.json."""
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):]).expanduser()
        return (f"; check {folder / 'config.json'}: num_classes must be an int, and model_args (keyword arguments "
                f"of the architecture) is read only beside a pretrained_cfg")
    if name.startswith("hf-hub:"):
        return "; check the repository's config.json"
    return ""


def run(args: argparse.Namespace) -> int:
    from vitzoo.messages import cli_message
    from vitzoo.models import UnknownModelError, canonical_prefix, model_input_size

    args.model = canonical_prefix(args.model)  # the prefix in any case, as compare and timm read it

    # the name, and where the file goes, are checked before the model is built (or its weights downloaded)
    try:
        size = _default_img_size(args.model)
    except UnknownModelError as e:
        print(f"{ERROR} {e}", file=sys.stderr)
        return 2
    size = _as_size(args.img_size) if args.img_size else size
    stem = _file_stem(args.model)
    out = args.out or (Path(f"{stem}_{_size_text(size)}.onnx") if size else None)
    try:
        if out is not None:
            check_new_file(out, args.force, option="--out", example_name="model.onnx")
    except OSError as e:
        print(f"{ERROR} {cli_message(e)}", file=sys.stderr)
        return 1
    try:  # before the model is built and its weights downloaded (found by an audit: after)
        from vitzoo.onnx_runtime import require_onnxruntime
        require_onnxruntime()
    except RuntimeError as e:
        print(f"{ERROR} {e}", file=sys.stderr)
        return 1
    try:
        model = _create(args.model, args.img_size, args.pretrained)
    except UnknownModelError as e:
        print(f"{ERROR} {e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, OSError) as e:  # e.g. nvit_* without its dims record, a failed download
        print(f"{ERROR} cannot build {args.model}: {_advice(cli_message(e), args.model)}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001  e.g. a folder's config.json with "num_classes": "ten" (a TypeError)
        print(f"{ERROR} cannot build {args.model}: {type(e).__name__}: {_advice(cli_message(e), args.model)}"
              f"{_config_hint(args.model)}", file=sys.stderr)
        return 1
    own = model_input_size(model)
    if args.img_size:
        size = _as_size(args.img_size)
    elif own is not None:
        size = own[1:]
    else:
        print(f"{ERROR} cannot tell the input size of {args.model} (no pretrained_cfg input size, no fixed image "
              f"size); pass --img-size N (or HxW)", file=sys.stderr)
        return 1
    out = args.out or Path(f"{stem}_{_size_text(size)}.onnx")
    print(f"exporting {args.model} at {size[0]}x{size[1]} (opset {args.opset}) -> {out}", file=sys.stderr)
    try:
        # the default name, where only the model told its size
        check_new_file(out, args.force, option="--out", example_name="model.onnx")
        diff = export_verified_onnx(model, out, size, opset=args.opset, force=args.force, atol=args.atol,
                                    rtol=args.rtol)
    except (OSError, ValueError, ExportError, RuntimeError) as e:
        # the check's advice in this command's terms: "pass atol=0.001" -> "pass --atol 0.001"
        print(f"{ERROR} {_AS_OPTION.sub(_OPTION, cli_message(e))}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001  the model's own forward failing on the verification batches
        print(f"{ERROR} cannot export {args.model}: {type(e).__name__}: {cli_message(e)}", file=sys.stderr)
        return 1
    print(f"wrote {out} (verified in ONNX Runtime at batch {', '.join(map(str, VERIFY_BATCHES))}: "
          f"max abs diff {diff:.2g})")
    return 0
