"""Fraction of the machine's peak FP32 multiply-add rate reached by ``vitzoo.deploy`` (default eager backend).

achieved MAC/s = fvcore MACs of the fused model per image (``vitzoo.flops.count_flops``) x measured img/s.
peak MAC/s     = threads (one per physical core) x clock x FMA instructions per cycle x fp32 lanes per FMA.

Assumptions (override with --ghz/--fma-units/--lanes):
* clock: cpufreq's ``base_frequency`` where the kernel exposes it, else the "cpu MHz" of /proc/cpuinfo (a VM's
  nominal clock; on a host with frequency scaling that is the current clock, so pass --ghz there); turbo can be
  higher, hence the measured FMA peak below;
* AMD Zen 3/4 (family 25): AVX-512 is executed on 2 x 256-bit FMA pipes -> 2 units x 8 lanes;
* Intel with AVX-512: 2 x 512-bit FMA units (Xeon Gold/Platinum; some SKUs have 1) -> 2 x 16;
* AVX2 + FMA: 2 x 8.
Two empirical ceilings are also measured at the same thread count: MKL sgemm 2048^3, and the core's FMA peak
(``fma_peak.c``, 12 independent FMA chains on the widest vector registers, compiled here with ``cc -O3
-march=native`` and run once per thread concurrently; it includes turbo, which the nominal clock does not). The
measured FMA peak is the hard ceiling of IEEE fp32 on the vector units: no such implementation of a model can exceed
it. ``deploy()``'s default on CPUs with AMX ("bf16x3": convolutions in split bf16 on the AMX tile unit,
``vitzoo.amx_gemm``) computes the same MACs on another unit and can; each model is timed with the default and with
``deploy(fp32_precision="ieee")``.

Each model is deployed on the timed batch and timed in its own process (``_isolated.py``): in this process, after
the 2048^3 sgemm and the other model, glibc's heap state moved the eager path's speed by up to 15% (section 5 of
``docs/benchmarks.md``).

    python benchmarks/bench_peak_fraction.py --rounds 5 --batch 16 --threads 1 2
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timm  # noqa: E402
import torch  # noqa: E402

import vitzoo  # noqa: E402,F401
from _common import (  # noqa: E402
    base_parser, cpu_info, inference, positive_int, print_machine, print_table, randomize_norm_stats, timed,
)
from _isolated import measure_isolated  # noqa: E402
from vitzoo.inference import deploy  # noqa: E402
from vitzoo.flops import count_flops  # noqa: E402

CASES = {"shvit_s1": 224, "shvit_s4": 256, "deit_tiny_patch16_224": 224}


def fma_config() -> tuple:
    """(FMA units, fp32 lanes per unit, explanation) from the CPU vendor and flags."""
    info = cpu_info()
    text = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    amd = "AuthenticAMD" in text
    family = int((re.search(r"^cpu family\s*:\s*(\d+)", text, re.M) or re.search("(0)", "0")).group(1))
    if info["isa"] == "avx512f" and amd:
        return 2, 8, f"AMD family {family} AVX-512: 2 FMA pipes x 256 bit (8 fp32 lanes; 512-bit ops double-pumped)"
    if info["isa"] == "avx512f":
        return 2, 16, "Intel AVX-512: 2 FMA units x 16 fp32 lanes"
    if info["fma"]:
        return 2, 8, "AVX2+FMA: 2 FMA units x 8 fp32 lanes"
    return 1, 4, "SSE: no FMA, 4 lanes (rough)"


def sgemm_rate(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return n ** 3 * reps / (time.perf_counter() - start)


def measured_fma_peak(threads: int, iters: int = 200_000_000) -> Optional[float]:
    """Sum of ``threads`` concurrent runs of ``fma_peak.c``, in MAC/s; None without a C compiler (or x86 FMA)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fma_peak.c")
    if compiler is None:
        print("measured FMA peak: skipped (no C compiler found; set CC)")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        binary = os.path.join(tmp, "fma_peak")
        build = subprocess.run([compiler, "-O3", "-march=native", source, "-o", binary], capture_output=True, text=True)
        if build.returncode != 0:
            print(f"measured FMA peak: skipped ({compiler} failed: {build.stderr.strip()[:200]})")
            return None
        procs = [subprocess.Popen([binary, str(iters)], stdout=subprocess.PIPE, text=True) for _ in range(threads)]
        outputs = [(p.communicate()[0], p.returncode) for p in procs]
    rates = []
    for out, code in outputs:
        try:
            rates.append(float(out.split()[0]))
        except (IndexError, ValueError):
            print(f"measured FMA peak: skipped (fma_peak exited with code {code} and printed {out.strip()[:80]!r}; "
                  "an x86 CPU with FMA is needed)")
            return None
    return sum(rates) * 1e9


def nominal_ghz(info: dict) -> Tuple[Optional[float], str]:
    """The nominal clock in GHz and where it was read: cpufreq's base frequency when the kernel exposes it (the
    "cpu MHz" of /proc/cpuinfo is then the current, scaled clock), else /proc/cpuinfo's "cpu MHz"."""
    base = "/sys/devices/system/cpu/cpu0/cpufreq/base_frequency"
    try:
        with open(base) as f:
            return int(f.read()) / 1e6, base
    except (OSError, ValueError):
        pass
    if info.get("max_mhz"):  # frequency scaling without a base frequency: "cpu MHz" is whatever the core runs now
        print("note: this host scales its clock and exposes no base frequency; /proc/cpuinfo's 'cpu MHz' is the "
              "current clock, pass --ghz with the nominal one")
    return ((info["mhz"] or 0) / 1000 or None), "/proc/cpuinfo cpu MHz"


PRECISIONS = ("bf16x3", "ieee")  # deploy()'s default first


def build_deployed(name: str, batch: int, threads: int, precision: str = "bf16x3"):
    """``deploy(model, fp32_precision=precision)`` on the timed batch, as a runner (also called in the isolated
    worker process)."""
    torch.set_num_threads(threads)
    res = CASES[name]
    model = randomize_norm_stats(timm.create_model(name))
    x = torch.randn(batch, 3, res, res, generator=torch.Generator().manual_seed(1))
    return inference(deploy(model, x, fp32_precision=precision), x)


def _label(name: str, res: int, precision: str) -> str:
    if precision == "ieee":
        return f"{name}@{res} deploy(ieee)"
    used = deploy(timm.create_model(name), torch.randn(1, 3, res, res), verify=False).fp32_precision
    return f"{name}@{res} deploy() [{used}]"


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0], rounds=5)
    parser.add_argument("--models", nargs="+", default=["shvit_s1", "shvit_s4"], choices=list(CASES))
    parser.add_argument("--ghz", type=float, default=None,
                        help="nominal clock in GHz (default: cpufreq base_frequency, else /proc/cpuinfo cpu MHz)")
    parser.add_argument("--fma-units", type=positive_int, default=None)
    parser.add_argument("--lanes", type=positive_int, default=None)
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="time the models in this process instead of one process each")
    args = parser.parse_args()
    info = print_machine(args.threads)
    units, lanes, why = fma_config()
    units, lanes = args.fma_units or units, args.lanes or lanes
    ghz, source = (args.ghz, "--ghz") if args.ghz else nominal_ghz(info)
    if not ghz:
        parser.error("cannot read the clock from cpufreq or /proc/cpuinfo; pass --ghz")
    print(f"peak per core = {ghz:.3f} GHz ({source}) x {units} FMA units x {lanes} lanes = "
          f"{ghz * units * lanes:.1f} GMAC/s ({why})")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        peak = threads * ghz * 1e9 * units * lanes
        fma = measured_fma_peak(threads)

        def of_fma(rate: float) -> str:
            return "n/a" if fma is None else f"{rate / fma:.0%}"

        if fma is not None:
            rows.append(["FMA loop (fma_peak.c)", threads, "-", f"{fma / 1e9:.1f}", f"{fma / peak:.0%}", "100%"])
        gemm = sgemm_rate()
        rows.append(["MKL sgemm 2048^3", threads, "-", f"{gemm / 1e9:.1f}", f"{gemm / peak:.0%}", of_fma(gemm)])
        for name in args.models:
            res = CASES[name]
            macs = count_flops(name, res).total
            desc = f"{name} {threads}t"
            if args.isolate:
                times = measure_isolated({p: (build_deployed, (name, args.batch, threads, p)) for p in PRECISIONS},
                                         args.batch, rounds=args.rounds, min_time=args.min_time, desc=desc)
            else:
                times = timed({p: build_deployed(name, args.batch, threads, p) for p in PRECISIONS}, args.batch,
                              args.rounds, args.min_time, desc)
            for precision in PRECISIONS:
                achieved = macs * times[precision].throughput
                rows.append([_label(name, res, precision), threads, f"{times[precision].throughput:.1f}",
                             f"{achieved / 1e9:.1f}", f"{achieved / peak:.0%}", of_fma(achieved)])
    print_table(["workload", "threads", "img/s", "GMAC/s", "of nominal peak", "of measured FMA peak"], rows,
                title=f"fraction of peak FP32 MAC rate (batch {args.batch}, median of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
