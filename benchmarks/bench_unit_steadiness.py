"""How steady the core's FMA and AMX rates are over time: alternating short runs of ``fma_peak.c`` and ``amx_peak.c``.

On a shared host the AMX tile unit can be slowed by something outside the VM while the FMA units are not (docs/
benchmarks.md, run R): ``deploy()``'s default bf16x3 path then loses speed that ONNX Runtime and the IEEE fp32 paths
keep, and its ratio to them moves between runs. This prints each sample and, per unit, the median, the range and
how many samples fell below 75% of the median, so a benchmark run can be read against the host's state.

    python benchmarks/bench_unit_steadiness.py --samples 30 --pause 1
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


def rate(binary: str, *args: str) -> Optional[float]:
    """GMAC/s printed by one run of a peak program: fma_peak prints it first, amx_peak after "product,"."""
    done = subprocess.run([binary, *args], capture_output=True, text=True)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=positive_int, default=30)
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--fma-iters", type=positive_int, default=100_000_000)
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
        rows, fma_rates, amx_rates = [], [], []
        start = time.monotonic()
        for i in range(args.samples):
            f = rate(fma, str(args.fma_iters)) if fma else None
            a = rate(amx) if amx else None
            fma_rates += [f] if f is not None else []
            amx_rates += [a] if a is not None else []
            rows.append([i + 1, f"{time.monotonic() - start:.1f}", "-" if f is None else f"{f:.1f}",
                         "-" if a is None else f"{a:.1f}"])
            if i + 1 < args.samples:
                time.sleep(args.pause)
    print_table(["sample", "at s", "FMA GMAC/s (fp32)", "AMX GMAC/s (bf16)"], rows, title="samples")
    table = [summary(name, values) for name, values in (("FMA", fma_rates), ("AMX", amx_rates)) if values]
    print_table(["unit", "samples", "median", "min", "max", f"below {SLOW:.0%} of median"], table, title="summary")


if __name__ == "__main__":
    main()
