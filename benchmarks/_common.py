"""Shared helpers of the benchmark scripts: arguments, machine info, models with realistic BN statistics, tables.

Timing itself is ``vitzoo.speed.measure`` (warm-up, interleaved rounds, median over rounds).
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import shutil
import subprocess
import time
from typing import Callable, Dict, Hashable, List, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from vitzoo.speed import Timing, measure

__all__ = ["base_parser", "positive_int", "cpu_info", "print_machine", "randomize_norm_stats", "inference", "timed",
           "print_table", "wall_ms", "build_c"]


def positive_int(value: str) -> int:
    """An argparse type: an int >= 1 (``--threads 0`` was torch's traceback, found by an audit)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects an int >= 1, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expects an int >= 1, got {value!r}")
    return number


def _positive_seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects seconds > 0, got {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"expects seconds > 0, got {value!r}")
    return number


def base_parser(description: str, batch: int = 16, rounds: int = 7,
                threads: Sequence[int] = (1, 2)) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=positive_int, default=rounds,
                        help="interleaved timed rounds (median reported)")
    parser.add_argument("--batch", type=positive_int, default=batch, help="images per call")
    parser.add_argument("--threads", type=positive_int, nargs="+", default=list(threads),
                        help="torch/ORT thread counts")
    parser.add_argument("--min-time", type=_positive_seconds, default=0.3, help="minimum seconds per timing")
    return parser


def cpu_info(text: Optional[str] = None) -> Dict[str, object]:
    """CPU model, cores, SIMD ISA and clock from /proc/cpuinfo (or ``text`` in its format) and sysfs (Linux; fields
    missing elsewhere are None)."""
    info: Dict[str, object] = {"model": platform.processor() or None, "logical_cpus": os.cpu_count(),
                               "cores": usable_cores(), "isa": None, "fma": False, "mhz": None, "max_mhz": None}
    try:
        text = open("/proc/cpuinfo").read() if text is None else text
    except OSError:
        return info
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = set((re.search(r"^flags\s*:\s*(.+)$", text, re.M) or re.search("()", "")).group(1).split())
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)$", text, re.M)
    info["model"] = model.group(1).strip() if model else info["model"]
    info["isa"] = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "sse/other"
    info["fma"] = "fma" in flags
    info["mhz"] = float(mhz.group(1)) if mhz else None
    try:
        info["max_mhz"] = int(open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read()) / 1000
    except (OSError, ValueError):
        pass
    return info


def usable_cores() -> Optional[int]:
    """Physical cores among the CPUs this process may run on (SMT siblings share a core's FMA units), from sysfs'
    topology; None where that cannot be read (not Linux)."""
    try:
        cpus = os.sched_getaffinity(0)
        cores = set()
        for cpu in cpus:
            topology = f"/sys/devices/system/cpu/cpu{cpu}/topology"
            with open(f"{topology}/physical_package_id") as package, open(f"{topology}/core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
    except (AttributeError, OSError):
        return None
    return len(cores) or None


def print_machine(threads: Sequence[int]) -> Dict[str, object]:
    info = cpu_info()
    print(f"CPU: {info['model']} | logical CPUs: {info['logical_cpus']} | physical cores usable: "
          f"{info['cores'] or 'n/a'} | vector ISA: {info['isa']} "
          f"| clock: {info['mhz']} MHz (max {info['max_mhz'] or 'n/a'}) | torch {torch.__version__} "
          f"| threads: {list(threads)} | load avg: {os.getloadavg() if hasattr(os, 'getloadavg') else 'n/a'}")
    return info


@torch.no_grad()
def randomize_norm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine (random init has gamma=0 branches that fusion hides)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
    return model.eval()


def inference(model, x: torch.Tensor):
    """A zero-argument runner calling ``model(x)`` under ``torch.inference_mode``."""
    def run():
        with torch.inference_mode():
            return model(x)
    return run


def timed(runners: Dict[Hashable, object], batch: int, rounds: int, min_time: float,
          desc: str) -> Dict[Hashable, Timing]:
    return measure(runners, batch, rounds=rounds, warmup=2, min_time=min_time, desc=desc)


def _cell(value: object) -> str:
    """A table cell: small floats (ratios below 1) with 3 significant digits, other floats with one decimal."""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"
    return str(value)


def paired_rounds(runs: Dict[str, Callable[[], object]], rounds: int, calls: int, desc: str) -> Dict[str, List[float]]:
    """Seconds of ``calls`` calls of each zero-argument runner in each of ``rounds`` rounds, the runners taking
    turns in one process, their order reversed every other round (one untimed call of each first; all under
    ``torch.inference_mode``). Per-round ratios of two runners cancel the shared host's slow drifts."""
    times: Dict[str, List[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():
            run()
        for r in tqdm(range(rounds), desc=desc, leave=False):
            for name in (list(runs) if r % 2 else list(reversed(runs))):
                start = time.perf_counter()
                for _ in range(calls):
                    runs[name]()
                times[name].append(time.perf_counter() - start)
    return times


def print_table(header: List[str], rows: List[List[object]], title: Optional[str] = None) -> None:
    """Print a markdown table (pasteable into docs/benchmarks.md)."""
    if title:
        print(f"\n### {title}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(_cell(c) for c in row) + " |")


def wall_ms(fn: Callable[[], object], iters: int, rounds: int = 5, warmup: int = 3) -> float:
    """Best-of-``rounds`` mean wall time of ``fn`` in ms over ``iters`` calls each (after ``warmup`` calls): for
    profiles and single-kernel probes, not for ratios (those use :func:`timed`)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - start) / iters)
    return best * 1e3


def build_c(source: str, flags: Sequence[str], binary: str, what: str) -> Optional[str]:
    """Compile the benchmark program ``source`` into ``binary`` with ``$CC`` (a command line such as ``ccache gcc``)
    or else the first of ``cc`` / ``gcc`` / ``clang`` found; returns ``binary``, or ``None`` after printing
    ``"<what>: skipped (<why>)"`` where there is no compiler, ``$CC`` is not a valid command line or names no
    program, or the build fails (e.g. a compiler that does not know ``flags``)."""
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    try:
        compiler = shlex.split(os.environ.get("CC", "")) or ([found] if found else [])
    except ValueError as e:  # CC="gcc -DX='1" : unbalanced quotes
        print(f"{what}: skipped ($CC={os.environ['CC']!r} is not a valid command line: {e})")
        return None
    if not compiler:
        print(f"{what}: skipped (no C compiler found; set CC)")
        return None
    try:
        build = subprocess.run([*compiler, *flags, source, "-o", binary], capture_output=True, text=True)
    except OSError as e:  # $CC names no program
        print(f"{what}: skipped (cannot run {shlex.join(compiler)}: {e.strerror or e})")
        return None
    if build.returncode != 0:
        print(f"{what}: skipped ({shlex.join(compiler)} failed: {build.stderr.strip()[:200]})")
        return None
    return binary
