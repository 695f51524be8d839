"""``vitzoo compare``: FLOPs, params and measured speed of any timm models, side by side.

For every model: parameters (as built and fused), FLOPs (MACs of the fused model, fvcore convention, see
:mod:`vitzoo.flops`), the input size, and measured throughput/latency on two inference paths:

* **default**: the model as ``timm.create_model`` returns it, in eval mode under ``torch.no_grad``;
* **fastest**: :func:`vitzoo.deploy` with each backend that makes sense on the device
  (CPU: ``eager``, ``torchscript`` and ``onnxruntime`` when installed; GPU: ``eager``; ``--backends`` to choose,
  e.g. ``compile``);
  the fastest backend is reported.

Without model names it compares the zoo against the models users would pick instead
(:data:`vitzoo.models.DEFAULT_MODELS`). Models are built without weights (speed does not depend on the values).

Python API: :func:`compare` returns the rows as a list of dicts (the ``--format json`` objects).
"""
from __future__ import annotations

import argparse
import copy
import csv
import gc
import io
import json
import numbers
import os
import platform
import sys
import traceback
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, TextIO, Tuple, Union

import torch
from tqdm.auto import tqdm

from vitzoo.cli import image_size
from vitzoo.flops import count_flops
from vitzoo.messages import cli_message, command_line_advice, error_message, first_line, help_description
from vitzoo.models import (DEFAULT_MODELS, PAPER_NUMBERS, UnknownModelError, canonical_prefix, create,
                           resolve_name)
from vitzoo.speed import measure

__all__ = ["compare", "machine_info", "format_rows", "register", "run"]

DEFAULT_PATH = "default"
FORMATS = ("table", "md", "csv", "json")
DEFAULT_BATCH = {"cpu": 16, "cuda": 256}  # the SHViT paper's CPU and (about) GPU batch sizes
PAPER_CLASSES = 1000  # the papers' numbers (PAPER_NUMBERS) are of ImageNet-1k classifiers


def machine_info() -> Dict[str, Any]:
    """CPU model, thread count, torch/timm versions and the GPU (if any), for the report header."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    import timm

    info = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _default_backends(device: str) -> Tuple[str, ...]:
    if device != "cpu":
        return ("eager",)
    from vitzoo.inference import available_backends

    return tuple(b for b in ("eager", "torchscript", "onnxruntime") if b in available_backends())


def _split_backends(values: Optional[Sequence[str]]) -> Optional[List[str]]:
    """``--backends`` values, each of which may itself be comma-separated, as one list (None: not given)."""
    if values is None:
        return None
    return [b.strip() for value in values for b in value.split(",") if b.strip()]


def _as_list(names: Union[str, Iterable[str], None]) -> Optional[List[str]]:
    """One name given as a str (``compare("shvit_s1")``, ``backends="eager"``) as a one-name list, not its letters;
    any other iterable (a generator too) as a list."""
    return None if names is None else [names] if isinstance(names, str) else list(names)


def _is_model_name(name: str) -> bool:
    try:
        resolve_name(name)
    except UnknownModelError:
        return False
    return True


class UsageError(ValueError):
    """An argument out of its range (the command line's exit code 2)."""


#: The largest size or batch taken (found by an audit: 10**20 ended the command in torch's overflow traceback; a
#: tensor this large cannot be allocated anyway, which is a note on the row)
MAX_COUNT = 2 ** 31 - 1


def usable_cpus() -> Optional[int]:
    """The logical CPUs this process may run on: its affinity mask (taskset, a cgroup cpuset), else the machine's
    count; None when neither is known (found in review: the machine's count let a process limited to one CPU ask
    for two threads)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on every platform
        return os.cpu_count()


def _check_count(what: str, flag: str, value: object, most: int = MAX_COUNT, why: str = "") -> None:
    """A size or count argument must be an int from 1 to ``most`` (as the command line's ``type=int`` options): a
    float, a bool or a str raises ``TypeError``, a value out of range :class:`UsageError`, each naming the argument
    and the value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} ({flag}) must be an int >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise UsageError(f"{what} ({flag}) must be >= 1, got {value}")
    if value > most:
        raise UsageError(f"{what} ({flag}) must be at most {most}{why}, got {value}")


def _device_key(device: str) -> str:
    """What ``device`` measures on: ``"cuda"`` is the current GPU, ``"cuda:0"`` where that is GPU 0 (as it is until
    CUDA starts: asking would start it, which ``--no-speed`` never does)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_initialized() else 0)
    return str(dev)


def _check_img_size(img_size: object) -> Union[int, Tuple[int, int]]:
    """``img_size`` as :func:`_check_count` checks a count, for an int (N x N) or a pair ``(H, W)`` of them; a
    pair is returned as a tuple."""
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2:
        for side in img_size:
            _check_count("img_size", "--img-size", side)
        return int(img_size[0]), int(img_size[1])  # numpy ints too
    if isinstance(img_size, (tuple, list)):
        raise TypeError(f"img_size (--img-size) must be an int or a pair (H, W), got {len(img_size)} values: "
                        f"{img_size!r}")
    _check_count("img_size", "--img-size", img_size)
    return int(img_size)  # a numpy int was taken, then every model skipped ("'numpy.int64' is not iterable")


def _device_type(device: object) -> str:
    """torch's type of ``device`` (``"cuda"`` for ``"cuda:1"``); a name torch does not know (``"gpu"``) raises
    :class:`UsageError` before anything is built, not a note on every row."""
    try:
        if isinstance(device, str):
            return torch.device(device).type
    except RuntimeError:
        pass
    raise UsageError(f"unknown device {device!r}; valid devices: cpu, cuda")


def _check_backends(backends: Sequence[str], speed: bool) -> List[str]:
    """``backends`` without repeats; a name that is not a backend, or (when timing) one not usable here, raises."""
    from vitzoo.inference import BACKENDS, available_backends, missing_backend_hint

    if not backends:
        raise UsageError(f"--backends names no backend; valid backends: {', '.join(BACKENDS)}")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        message = f"unknown backend {', '.join(map(repr, unknown))}; valid backends: {', '.join(BACKENDS)}"
        models = [b for b in unknown if _is_model_name(b)]
        if models:  # `compare --backends eager shvit_s1`: the model went into --backends
            message += f" ({', '.join(map(repr, models))} is a model: put model names before --backends)"
        raise UsageError(message)
    missing = [b for b in backends if b not in available_backends()] if speed else []
    if missing:
        hints = "; ".join(f"{b}: {missing_backend_hint(b)}" for b in missing)
        raise ValueError(f"backend {', '.join(map(repr, missing))} not available in this environment ({hints}); "
                         f"available here: {', '.join(available_backends())}")
    return list(dict.fromkeys(backends))


def _build_advice(message: str, name: str) -> str:
    """A build error's advice for Python callers in this command's terms: an NViT without its dims record is
    compared from a folder converted from its checkpoint; other Python-only advice as
    :func:`vitzoo.messages.command_line_advice` puts it."""
    arch = canonical_prefix(name).partition(".")[0]
    convert = f"`vitzoo convert CHECKPOINT --model {arch} --out DIR`, then compare local-dir:DIR"
    return command_line_advice(message, local_file=f"convert a local weight file: {convert}",
                               no_weights="leave out the weights", variant="compare the variant the checkpoint holds",
                               dims=f"compare a folder converted from its checkpoint: {convert}")


def _build(
    names: Sequence[str], explicit: bool, img_size: Union[None, int, Tuple[int, int]], progress: bool
) -> Tuple[list, Dict[str, str]]:
    """Build and count each model; returns ``[(name, model, report)]`` and ``{name: reason}`` for skipped ones."""
    built, skipped = [], {}
    for name in tqdm(names, desc="counting FLOPs", unit="model", disable=not progress, leave=False):
        try:
            resolve_name(name, allow_folders=True)
        except UnknownModelError as e:
            if explicit:
                raise
            skipped[name] = f"not registered ({e})"
            continue
        try:
            model = create(name, img_size=img_size)  # an hf-hub: name's config.json checked as vitzoo.hub does
        except Exception as e:  # noqa: BLE001  a model that cannot be built (nvit_* without dims) is reported
            skipped[name] = f"cannot be built: {type(e).__name__}: {_build_advice(error_message(e), name)}"
            continue
        try:
            report = count_flops(model, img_size)
        except Exception as e:  # noqa: BLE001  e.g. an input size the model rejects, or too large for memory
            skipped[name] = f"cannot run at this input size: {type(e).__name__}: {error_message(e) or _where(e)}"
            continue
        built.append((name, model, report))
    return built, skipped


def _where(error: BaseException) -> str:
    """For an error without a message (a bare ``assert``): where it was raised, e.g. "raised without a message at
    timm/models/byobnet.py:1234: assert H % 8 == 0"."""
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(torch_dir)]
    if not frames:  # torch._assert and the like: the model's own line is the last frame outside torch
        return "raised without a message"
    last = frames[-1]
    path = last.filename.split("site-packages" + os.sep, 1)[-1]
    return f"raised without a message at {path}:{last.lineno}" + (f": {last.line}" if last.line else "")


def _runners(
    model: torch.nn.Module, report, device: str, batch: int, backends: Sequence[str], notes: List[str],
    precisions: Dict[str, str],
) -> Dict[str, Callable[[], Any]]:
    """One zero-argument callable per path of one model on ``device``; failed backends go into ``notes``, and
    backends that run in another precision than IEEE fp32 (``deploy()``'s bf16x3) into ``precisions``."""
    from vitzoo.inference import ROUNDING_RTOL, deploy  # imported here so tests can substitute a stand-in

    x = torch.randn(batch, *report.input_size, device=device)
    default = model.to(device).eval()
    runners = {DEFAULT_PATH: _bind(default, x)}
    for backend in backends:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # ONNX export/verification at batch 1 (cheaper; the batch is dynamic). The PyTorch backends are
                # built on the timed batch: with a batch-1 example, the weights re-packed on the first batched
                # call interleave with activation buffers in glibc's heap, which cost the eager path up to 15%
                # (benchmarks/bench_example_batch.py)
                example = x[:1] if backend == "onnxruntime" else x
                # models are built with random weights, whose outputs can be huge (MobileOne: ~1e14): verify
                # relative to the output's scale so that float rounding there does not drop a path
                deployed = deploy(copy.deepcopy(default), example_input=example, backend=backend,
                                  rtol=ROUNDING_RTOL)
                with torch.no_grad():
                    deployed(x)
            runners[backend] = _bind(deployed, x)
            if getattr(deployed, "fp32_precision", "ieee") != "ieee":
                precisions[backend] = deployed.fp32_precision
        except Exception as e:  # noqa: BLE001  one failed backend must not stop the comparison
            # an error without a message (a bare `assert` in an exporter) is named by where it was raised: taking
            # the first of no lines ended the whole comparison in an IndexError (found by an audit)
            notes.append(f"{backend} failed on {device}: {type(e).__name__}: {first_line(e)[:120] or _where(e)}")
    return runners


def _bind(model: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Callable[[], Any]:
    return lambda: model(x)


def _row(name: str, report, device: Optional[str], batch: Optional[int],
         num_classes: Optional[int] = None) -> Dict[str, Any]:
    paper = PAPER_NUMBERS.get(name.partition(".")[0])
    note = ""
    if paper is not None and num_classes is not None and num_classes != PAPER_CLASSES:
        # e.g. mobilenetv3_large_100.miil_in21k (11,221 classes): another head, so other params and FLOPs
        note = (f"paper numbers are for the {PAPER_CLASSES}-class ImageNet-1k model; this one has {num_classes} "
                "classes, not shown")
        paper = None
    # the papers' FLOPs and top-1 hold at their resolution only; their params are shown at any size (a model rebuilt
    # for another size may have other params: a ViT's position embedding, LeViT's attention biases)
    same_size = paper is not None and tuple(report.input_size[-2:]) == (paper.img_size, paper.img_size)
    if paper is not None and not same_size:
        note = f"paper FLOPs and top-1 are at {paper.img_size}x{paper.img_size}, not shown"
    unknown = report.unknown_ops
    if unknown:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(unknown.items()))
        note = "; ".join(([note] if note else []) + [f"FLOPs leave out ops with no formula here: {ops}"])
    if report.unfolded_norms:  # the fused count still has their batch_norm work, and the fused model their params
        first, why = next(iter(report.unfolded_norms.items()))
        count = len(report.unfolded_norms)
        note = "; ".join(([note] if note else []) + [
            f"{count} BatchNorm layer{'s' if count > 1 else ''} not folded in the fused count (first: {first}, {why})"])
    return {
        "model": name,
        "input_size": list(report.input_size),
        "params": report.params,
        "params_fused": report.params_fused,
        "flops": report.total,
        "uncounted": dict(sorted(report.uncounted.items())),
        "unfolded_norms": dict(report.unfolded_norms),
        "device": device,
        "batch_size": batch,
        "throughput": None,
        "latency_ms": None,
        "throughput_fastest": None,
        "latency_ms_fastest": None,
        "fastest_backend": None,
        "throughput_by_path": {},
        "threads": None,
        "paper_flops": round(paper.flops) if same_size else None,  # ints, as "flops" is
        "paper_params": round(paper.params) if paper else None,
        "paper_top1": paper.top1 if same_size else None,
        "paper_source": paper.source if paper else None,
        "paper_img_size": paper.img_size if paper else None,
        "note": note,
    }


def _measure_on(
    device: str, built: list, batch: int, backends: Sequence[str], rounds: int, progress: bool
) -> List[Dict[str, Any]]:
    """Time every built model's default and deployed paths on ``device``; one row per model.

    One model at a time: its paths are deployed, timed in interleaved rounds among themselves (the default vs
    fastest ratio of a row is measured in one run), and released before the next model is deployed. Peak memory
    is then that of the largest model's paths (DeiT-B: 3.6 GB on CPU), not of every path of every model.
    """
    rows = []
    bar = tqdm(built, desc=f"deploying and measuring on {device} ({', '.join(backends)})", unit="model",
               disable=not progress, leave=False)
    for name, model, report in bar:
        bar.set_postfix_str(name)
        notes: List[str] = []
        precisions: Dict[str, str] = {}
        runners = None
        try:  # the input batch itself may not fit in memory (--batch 100000)
            runners = _runners(model, report, device, batch, backends, notes, precisions)
            # one untimed call, then one that calibrates the calls per timing: a path's first call (the default
            # path's is its first ever) is slow and chose too few (found by an audit: timings under 0.15 s)
            timings = measure(runners, batch, rounds=rounds, warmup=2, min_time=0.15, max_calls=500,
                              device=torch.device(device), progress=progress, desc=f"measuring {name}")
        except (RuntimeError, MemoryError, ValueError) as e:  # e.g. out of memory at this batch: keep the other rows
            timings = None
            failure = f"not measured at batch {batch}: {type(e).__name__}: {first_line(e) or _where(e)}"
        del runners  # the deployed copies, before the next model is deployed
        gc.collect()
        row = _row(name, report, device, batch, getattr(model, "num_classes", None))
        row["threads"] = torch.get_num_threads()  # what the timing ran with (compare(threads=N) restores it after)
        if timings is None:
            row["note"] = "; ".join(([row["note"]] if row["note"] else []) + notes + [failure])
            rows.append(row)
            model.to("cpu")
            continue
        row["throughput_by_path"] = {path: round(t.throughput, 2) for path, t in timings.items()}
        row["throughput"] = round(timings[DEFAULT_PATH].throughput, 2)
        row["latency_ms"] = round(timings[DEFAULT_PATH].latency_ms, 3)
        deployed = {path: t for path, t in timings.items() if path != DEFAULT_PATH}
        if deployed:
            best = max(deployed, key=lambda p: deployed[p].throughput)
            row["fastest_backend"] = best
            row["throughput_fastest"] = round(deployed[best].throughput, 2)
            row["latency_ms_fastest"] = round(deployed[best].latency_ms, 3)
            if best in precisions:
                notes.append(f"fastest path {best} runs convolutions and linear layers in split bf16 "
                             f"({precisions[best]} on AMX, ~1e-5 relative per product; "
                             "deploy(fp32_precision='ieee') for IEEE fp32)")
        row["note"] = "; ".join(([row["note"]] if row["note"] else []) + notes)
        rows.append(row)
        model.to("cpu")
    return rows


def _compare(
    models: Optional[Sequence[str]],
    img_size: Union[None, int, Tuple[int, int]],
    batch_size: Optional[int],
    threads: Optional[int],
    speed: bool,
    devices: Optional[Sequence[str]],
    backends: Optional[Sequence[str]],
    rounds: int,
    progress: bool,
) -> Tuple[List[Dict[str, Any]], Dict[str, str]]:
    if img_size is not None:
        img_size = _check_img_size(img_size)
    if batch_size is not None:  # None: the default
        _check_count("batch_size", "--batch", batch_size)
        batch_size = int(batch_size)
    if threads is not None:  # more threads than CPUs only slow the timing down (10**5 of them exhausted memory)
        cpus = usable_cpus()
        _check_count("threads", "--threads", threads, most=cpus or MAX_COUNT,
                     why=f" (this process may use {cpus} logical CPUs)")
        threads = int(threads)
    _check_count("rounds", "--rounds", rounds)
    if devices:  # one row per device: "cuda" and "cuda:0" are the same GPU (where it is the current one)
        unique: Dict[str, str] = {}
        for device in devices:
            _device_type(device)  # an unknown name first
            unique.setdefault(_device_key(device), device)
        devices = list(unique.values())
    else:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cuda = [d for d in devices if _device_type(d) == "cuda"]
    if cuda and not torch.cuda.is_available():
        raise UsageError(f"--device {cuda[0]} was asked for but torch.cuda.is_available() is False; "
                         f"drop --device {cuda[0]}")
    gpus = [torch.device(_device_key(d)).index for d in cuda]
    beyond = [d for d, index in zip(cuda, gpus) if index >= torch.cuda.device_count()] if cuda else []
    if beyond:
        raise UsageError(f"device {beyond[0]!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    if backends is not None:
        backends = _check_backends(backends, speed)

    if models:
        for name in models:  # compare([None]) failed in the name comparison with an AttributeError
            if not isinstance(name, str):
                raise TypeError(f"model names must be strings, got {name!r} ({type(name).__name__})")
    names = _distinct(models) if models else list(DEFAULT_MODELS)  # a model given twice: one row
    if models:
        for name in names:  # every name before any model is built: a typo at the end of a long list fails at once
            resolve_name(name, allow_folders=True)
    # the models' random weights and inputs come from torch's generators: the caller's seeded stream is left as it
    # was (as count_flops leaves it; found by an audit)
    with torch.random.fork_rng(devices=gpus if speed else []):  # counts only: CUDA is never started
        return _build_and_measure(names, models, img_size, batch_size, threads, speed, devices, backends, rounds,
                                  progress)


def _build_and_measure(names, models, img_size, batch_size, threads, speed, devices, backends, rounds, progress):
    """:func:`_compare` once its arguments are checked."""
    built, skipped = _build(names, explicit=bool(models), img_size=img_size, progress=progress)
    if not speed:
        return [_row(name, report, None, None, getattr(model, "num_classes", None))
                for name, model, report in built], skipped
    rows = []
    saved_threads = torch.get_num_threads()
    if threads is not None:  # for the measurement only: the caller's setting is restored afterwards
        torch.set_num_threads(threads)
    try:
        for device in devices:
            batch = batch_size or DEFAULT_BATCH.get(_device_type(device), 16)
            rows += _measure_on(device, built, batch, backends or _default_backends(device), rounds, progress)
    finally:
        torch.set_num_threads(saved_threads)
    return rows, skipped


def compare(
    models: Union[str, Iterable[str], None] = None,
    *,
    img_size: Union[None, int, Tuple[int, int]] = None,
    batch_size: Optional[int] = None,
    threads: Optional[int] = None,
    speed: bool = True,
    devices: Union[str, torch.device, Iterable[Union[str, torch.device]], None] = None,
    backends: Union[str, Iterable[str], None] = None,
    rounds: int = 3,
    progress: bool = False,
) -> List[Dict[str, Any]]:
    """Compare models by params, FLOPs and measured speed.

    Args:
        models: timm names (``arch`` or ``arch.tag``), ``local-dir:PATH`` / ``hf-hub:org/name`` weights folders, or
            one name as a str; default :data:`vitzoo.models.DEFAULT_MODELS`. A model that cannot be built (``nvit_*``
            without its dims record) or counted at this size is skipped with a warning saying why; in the default
            set, so is a name that is not registered.
        img_size: Input size: an int for N x N, or ``(H, W)``; default: each model's pretrained cfg input size.
        batch_size: Images per batch; default 16 on CPU, 256 on GPU.
        threads: ``torch.set_num_threads`` while measuring (restored afterwards; torch's setting when None).
        speed: Measure throughput/latency; False gives counts only (fast).
        devices: ``"cpu"`` and/or ``"cuda"`` (a list, or one as a str; ``torch.device`` too); default CPU, plus
            CUDA when available.
            One row per model and device. A name torch does not know (``"gpu"``), or CUDA where it is not
            available, raises ``ValueError``.
        backends: :func:`vitzoo.deploy` backends tried for the fastest path (a list, or one as a str); default per
            device. A name that is not a backend raises ``ValueError``, as does (with ``speed``) one not usable in
            this environment.
        rounds: Interleaved timing rounds (median reported).
        progress: Show a progress bar on stderr.

    Returns:
        One dict per model (and device), with keys ``model``, ``input_size``, ``params``, ``params_fused``,
        ``flops`` (int, MACs of the fused model), ``uncounted`` (ops fvcore ran but did not count, op -> calls:
        elementwise ops, which the papers do not count either), ``unfolded_norms`` (BatchNorm layers the fused
        count keeps because they cannot fold, name -> why), ``throughput`` (img/s, None without speed),
        ``latency_ms``, ``throughput_fastest``, ``latency_ms_fastest``, ``fastest_backend``, ``throughput_by_path``,
        ``device``, ``batch_size``, ``threads`` (the thread count measured with; None without speed),
        ``paper_flops``, ``paper_params``, ``paper_top1``, ``paper_source``, ``paper_img_size``, ``note``.
        ``paper_flops`` and ``paper_top1`` are None when the input size is not the paper's.

    Raises:
        UnknownModelError: A name in ``models`` is not a timm model (the message lists the closest ones).
        TypeError: A size, batch, thread or round count that is not an int (``224.0``, ``True``, ``"224"``).
        ValueError: A size, batch, thread or round count below 1, an empty ``models`` list, or a device or backend
            as described above.
    """
    if isinstance(devices, torch.device):  # one device as torch names it (found by a review: "not iterable")
        devices = str(devices)
    models, backends = _as_list(models), _as_list(backends)
    devices = None if devices is None else [str(d) if isinstance(d, torch.device) else d for d in _as_list(devices)]
    if models is not None and len(models) == 0:  # e.g. a filter that matched nothing: not the 15 default models
        raise ValueError("compare() got an empty list of models; pass models=None (or leave it out) for the default "
                         "comparison")
    rows, skipped = _compare(models, img_size, batch_size, threads, speed, devices, backends, rounds, progress)
    for name, reason in skipped.items():
        warnings.warn(f"skipped {name}: {reason}", stacklevel=2)
    return rows


# ----------------------------------------------------------------------------------------------- formatting

def _fmt(value: Optional[float], scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value / scale:,.{digits}f}"


_COLUMNS = (  # header, cell
    ("model", lambda r: r["model"]),
    ("device", lambda r: r["device"] or "-"),
    ("input", lambda r: "x".join(str(v) for v in r["input_size"][1:])),
    ("params (M)", lambda r: _fmt(r["params"], 1e6, 2)),
    ("fused (M)", lambda r: _fmt(r["params_fused"], 1e6, 2)),
    ("FLOPs (M)", lambda r: _fmt(r["flops"], 1e6, 2)),
    ("img/s", lambda r: _fmt(r["throughput"])),
    ("ms/batch", lambda r: _fmt(r["latency_ms"])),
    ("img/s fastest", lambda r: _fmt(r["throughput_fastest"])),
    ("ms/batch fastest", lambda r: _fmt(r["latency_ms_fastest"])),
    ("backend", lambda r: r["fastest_backend"] or "-"),
    ("paper FLOPs (M)", lambda r: _fmt(r["paper_flops"], 1e6, 0)),
    ("paper params (M)", lambda r: _fmt(r["paper_params"], 1e6, 1)),
    ("paper top-1", lambda r: _fmt(r["paper_top1"], 1.0, 2)),
)


def _table_rows(rows: Iterable[Dict[str, Any]], speed: bool) -> Tuple[List[str], List[List[str]]]:
    speed_cols = {"device", "img/s", "ms/batch", "img/s fastest", "ms/batch fastest", "backend"}
    cols = [c for c in _COLUMNS if speed or c[0] not in speed_cols]
    return [h for h, _ in cols], [[cell(r) for _, cell in cols] for r in rows]


def format_rows(rows: List[Dict[str, Any]], fmt: str, ascii_only: bool = False) -> str:
    """Render rows as ``json`` (the dicts), ``csv`` (raw numbers), ``md`` or ``table`` (human units); the
    ``table``'s box in ASCII characters with ``ascii_only`` (for an output that cannot encode box drawing)."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        nested = ("throughput_by_path", "uncounted", "unfolded_norms")  # dicts: JSON only
        fields = [k for k in rows[0] if k not in nested] if rows else ["model"]
        writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "input_size": "x".join(str(v) for v in r["input_size"])})
        return out.getvalue().rstrip("\n")
    speed = any(r["device"] is not None for r in rows)  # measured, if only to fail (out of memory): say where
    header, body = _table_rows(rows, speed)
    if fmt == "md":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |" for cells in body]
        return "\n".join(lines)
    if fmt == "table":
        from rich import box
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        table = Table(title="FLOPs are MACs of the fused model (fvcore convention)",
                      box=box.ASCII if ascii_only else box.HEAVY_HEAD)
        for h in header:
            table.add_column(h, justify="left" if h in ("model", "device", "input", "backend") else "right")
        for cells in body:
            table.add_row(*(escape(cell) for cell in cells))  # a folder name may contain "[...]"
        buf = io.StringIO()
        # the table's own width, however wide: names are never cut ("hf-hub:timm/vit_base_patch16_224.augreg2…"
        # at 220 columns, found by an audit); a narrower terminal wraps the lines, --format md / csv stay greppable
        Console(file=buf, width=100_000, force_terminal=False).print(table)
        return buf.getvalue().rstrip("\n")
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


# ----------------------------------------------------------------------------------------------- CLI

def _encodable(rows: List[Dict[str, Any]], fmt: str, stream: TextIO) -> str:
    """The rows as ``fmt``, in characters ``stream`` can encode (found by a review: a Latin-1 or ASCII stdout,
    e.g. Windows' cp1252 redirected to a file, ended the table in a ``UnicodeEncodeError`` traceback): the table's
    box in ASCII, and any other character it cannot take (in a model's folder name) as ``?``."""
    encoding = getattr(stream, "encoding", None) or "utf-8"
    text = format_rows(rows, fmt)
    try:
        text.encode(encoding)
        return text
    except (UnicodeEncodeError, LookupError):
        pass
    if fmt == "table":
        text = format_rows(rows, fmt, ascii_only=True)
    try:
        return text.encode(encoding, errors="replace").decode(encoding)
    except LookupError:
        return text.encode("ascii", errors="replace").decode("ascii")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``compare`` sub-command."""
    p = subparsers.add_parser("compare", help="compare models by FLOPs, params and measured speed",
                              description=help_description(__doc__))
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="timm model names, optionally with a pretrained tag, or weights folders (local-dir:PATH, "
                        "hf-hub:org/name); default: the zoo and its rivals")
    p.add_argument("--img-size", type=image_size, default=None, metavar="N|HxW",
                   help="input size: N for N x N, or HxW, e.g. 96x160 (default: the model's cfg)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 16 on CPU, 256 on GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    p.add_argument("--plot", type=_plot_file, default=None, metavar="FILE",
                   help="write a FLOPs vs throughput Pareto plot: PNG, PDF or SVG by the suffix")
    p.add_argument("--force", action="store_true", help="overwrite an existing --plot file")
    p.add_argument("--no-speed", action="store_true", help="counts only, no measurement (fast)")
    p.add_argument("--device", action="append", choices=("cpu", "cuda"), default=None,
                   help="measure on this device (repeatable; default: cpu, plus cuda when available)")
    p.add_argument("--backends", nargs="+", default=None, metavar="BACKEND",
                   help="deploy backends for the fastest path, space- or comma-separated, e.g. eager onnxruntime "
                        "compile (default: eager torchscript onnxruntime on CPU, those installed; eager on GPU); "
                        "put model names before it")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved timing rounds, median reported (default: 3; the full default compare then "
                        "fits in ~10 minutes on 2 CPU cores)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars on stderr (e.g. in a log file)")
    p.set_defaults(func=run)


def _distinct(names: List[str]) -> List[str]:
    """``names`` without repeats, in their first spelling: a name given twice, a ``local-dir:`` folder spelled two
    ways (``local-dir:out/s1``, ``LOCAL-DIR:out/s1/``, an absolute path), a model with and without its default tag
    (``shvit_s1``, ``shvit_s1.in1k``)."""
    seen: Dict[str, str] = {}
    for name in names:
        seen.setdefault(_identity(name), name)
    return list(seen.values())


def _identity(name: str) -> str:
    """What ``name`` compares: a ``local-dir:`` folder's real path, an ``hf-hub:`` repo, or ``arch.tag`` with the
    architecture's default tag filled in."""
    import timm

    canonical = canonical_prefix(name)
    if canonical.startswith("local-dir:"):
        return "local-dir:" + os.path.realpath(os.path.expanduser(canonical[len("local-dir:"):]))
    if canonical.startswith("hf-hub:"):
        return canonical
    try:
        arch, tag = resolve_name(canonical)
    except UnknownModelError:  # reported with its hints when the names are checked, next
        return canonical
    if tag is None:  # the default tag: the first whose cfg is the architecture's default one
        default = timm.models.get_pretrained_cfg(arch)
        full = next((n for n, cfg in timm.models.get_arch_pretrained_cfgs(arch).items() if cfg == default), arch)
        return full
    return f"{arch}.{tag}"


def _plot_file(value: str) -> str:
    """``--plot FILE``, checked as the arguments are parsed (exit code 2 and the usage, before any model is built):
    a file name whose suffix is one the plot is written as."""
    from vitzoo.plot import plot_format

    if not value.strip():
        raise argparse.ArgumentTypeError("needs a file name, e.g. --plot pareto.png")
    if value.endswith(("/", os.sep)):  # a folder, which Path would take as a file without suffix (found by an audit)
        raise argparse.ArgumentTypeError(f"{value} names a folder; give a file name, e.g. --plot {value}pareto.png")
    try:
        plot_format(value)
    except ValueError as e:  # its message starts "--plot FILE:", and argparse's with "argument --plot:"
        raise argparse.ArgumentTypeError(str(e).removeprefix("--plot ")) from None
    return value


def _header(info: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    batches = sorted({f"batch {r['batch_size']} on {r['device']}" for r in rows if r["batch_size"]})
    size = f"; {', '.join(batches)}" if batches else ""
    measured = sorted({r["threads"] for r in rows if r.get("threads")})  # the timing's, not the process's now
    count = measured[0] if len(measured) == 1 else info["threads"]
    threads = f"{count} thread{'' if count == 1 else 's'}"
    return f"machine: {info['cpu']}, {threads}{gpu}; torch {info['torch']}, timm {info['timm']}{size}"


def run(args: argparse.Namespace) -> int:
    """Run ``vitzoo compare``; returns the exit code (2: unknown model or an argument out of range, 1: nothing to
    report or bad output)."""
    from vitzoo.plot import check_matplotlib, check_writable, write_pareto_plot

    err = sys.stderr
    if args.plot and args.no_speed:
        print("vitzoo compare: error: --plot needs measured throughput; drop --no-speed", file=err)
        return 2
    try:
        if args.plot:  # before anything is measured
            check_matplotlib()
            check_writable(args.plot, args.force)
        backends = _split_backends(args.backends)
        rows, skipped = _compare(args.models, args.img_size, args.batch, args.threads, not args.no_speed,
                                 args.device, backends, args.rounds, progress=args.progress)
    except (UnknownModelError, UsageError) as e:
        print(f"vitzoo compare: error: {cli_message(e)}", file=err)
        return 2
    except (OSError, ImportError, ValueError, RuntimeError) as e:
        print(f"vitzoo compare: error: {cli_message(e)}", file=err)
        return 1

    info = machine_info()
    header_out = err if args.format in ("json", "csv") else sys.stdout
    print(_header(info, rows), file=header_out)
    for name, reason in skipped.items():
        print(f"note: skipped {name}: {reason}", file=err)
    for r in rows:
        if r["note"]:
            where = f" ({r['device']})" if r["device"] else ""
            print(f"note: {r['model']}{where}: {r['note']}", file=err)
    if not rows:
        print("vitzoo compare: error: no model could be compared", file=err)
        return 1
    print(_encodable(rows, args.format, sys.stdout))
    if args.plot:
        measured = [r for r in rows if r["throughput"] is not None]
        # a model whose deployed paths all failed is plotted at its default path's speed, and says so
        points = [(r["model"] + ("" if r["device"] in (None, "cpu") else f" ({r['device']})")
                   + ("" if r["throughput_fastest"] else " (default path)"), r["flops"],
                   r["throughput_fastest"] or r["throughput"]) for r in measured]
        devices = [r["device"] for r in measured]
        try:  # a front per device: a CPU row is not "dominated" by the same model on the GPU
            path = write_pareto_plot(points, args.plot, force=args.force, title=_header(info, rows),
                                     ylabel="throughput, fastest path (img/s)",
                                     groups=devices if len(set(devices)) > 1 else None)
        except (OSError, ValueError) as e:
            print(f"vitzoo compare: error: {cli_message(e)}", file=err)
            return 1
        print(f"wrote {path}", file=err)
    return 0
