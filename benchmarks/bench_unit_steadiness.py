"""How steady the core's FMA and AMX rates are over time: alternating short runs of ``fma_peak.c`` and ``amx_peak.c``.

On a shared host the AMX tile unit can be slowed by something outside the VM while the FMA units are not (docs/
benchmarks.md, run R): ``deploy()``'s default bf16x3 path then loses speed that ONNX Runtime and the IEEE fp32 paths
keep, and its ratio to them moves between runs. This prints each sample and, per unit, the median, the range and
how many samples fell below 75% of the median, so a benchmark run can be read against the host's state.

With ``--per-core`` every sample runs the AMX program on each CPU this process may use in turn (pinned), and the
summary counts the samples in which one core's AMX rate was below 75% of another's: the slowing is per core, so
work split into fixed halves at 2 threads waits for the slow half (docs/benchmarks.md, section 11).

    python benchmarks/bench_unit_steadiness.py --samples 30 --pause 1
    python benchmarks/bench_unit_steadiness.py --samples 30 --pause 1 --per-core
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import build_c, print_machine, positive_int, print_table  # noqa: E402
from vitzoo.native_build import cpu_flags  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SLOW = 0.75  # a sample below this fraction of its unit's median counts as slowed


def rate(binary: str, *args: str, cpu: Optional[int] = None) -> Optional[float]:
    """GMAC/s printed by one run of a peak program: fma_peak prints it first, amx_peak after "product,". ``cpu``:
    pin the program to that CPU."""
    pin = None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu}))
    done = subprocess.run([binary, *args], capture_output=True, text=True, preexec_fn=pin)
    words = done.stdout.split()
    try:
        return float(words[words.index("product,") + 1] if "product," in words else words[0])
    except (IndexError, ValueError):
        print(f"{os.path.basename(binary)} exited with code {done.returncode} and printed "
              f"{(done.stdout + done.stderr).strip()[:120]!r}")
        return None


def summary(name: str, values: List[float]) -> List[object]:
    median = statistics.median(values)
    slowed = sum(v < SLOW * median for v in values)
    return [name, len(values), f"{median:.1f}", f"{min(values):.1f}", f"{max(values):.1f}",
            f"{slowed} ({slowed / len(values):.0%})"]


def uneven(per_core: List[List[Optional[float]]]) -> int:
    """How many samples (one rate per core each) had a core below ``SLOW`` of the fastest core's rate."""
    return sum(1 for rates in per_core if None not in rates and min(rates) < SLOW * max(rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=positive_int, default=30)
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--fma-iters", type=positive_int, default=100_000_000)
    parser.add_argument("--per-core", action="store_true",
                        help="run the AMX program on each usable CPU in turn in every sample")
    args = parser.parse_args()
    if args.pause < 0:
        parser.error(f"--pause must be >= 0 seconds, got {args.pause}")
    print_machine([1])
    with tempfile.TemporaryDirectory() as tmp:
        fma = build_c(os.path.join(HERE, "fma_peak.c"), ["-O3", "-march=native"], os.path.join(tmp, "fma_peak"),
                      "FMA samples")
        amx = None
        if {"amx_tile", "amx_bf16"} <= cpu_flags():
            amx = build_c(os.path.join(HERE, "amx_peak.c"), ["-O2", "-mamx-tile", "-mamx-bf16", f"-I{HERE}"],
                          os.path.join(tmp, "amx_peak"), "AMX samples")
        else:
            print("AMX samples: skipped (this CPU has no amx_tile / amx_bf16)")
        if fma is None and amx is None:
            sys.exit("nothing to sample: neither program could be built")
        cores = sorted(os.sched_getaffinity(0)) if args.per_core else [None]
        rows, fma_rates, per_core = [], [], []
        start = time.monotonic()
        for i in range(args.samples):
            f = rate(fma, str(args.fma_iters)) if fma else None
            a = [rate(amx, cpu=core) for core in cores] if amx else []
            fma_rates += [f] if f is not None else []
            per_core.append(a)
            rows.append([i + 1, f"{time.monotonic() - start:.1f}", "-" if f is None else f"{f:.1f}",
                         *("-" if v is None else f"{v:.1f}" for v in a)])
            if i + 1 < args.samples:
                time.sleep(args.pause)
    amx_names = [("AMX" if core is None else f"AMX cpu {core}") for core in cores] if amx else []
    print_table(["sample", "at s", "FMA GMAC/s (fp32)", *(f"{name} GMAC/s (bf16)" for name in amx_names)], rows,
                title="samples")
    columns = [("FMA", fma_rates)] + [(name, [r[j] for r in per_core if r[j] is not None])
                                      for j, name in enumerate(amx_names)]
    table = [summary(name, values) for name, values in columns if values]
    print_table(["unit", "samples", "median", "min", "max", f"below {SLOW:.0%} of median"], table, title="summary")
    if amx and len(cores) > 1:
        print(f"samples with one core's AMX rate below {SLOW:.0%} of another's: {uneven(per_core)} of "
              f"{len(per_core)}")


if __name__ == "__main__":
    main()
