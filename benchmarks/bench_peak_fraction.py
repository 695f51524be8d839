"""Fraction of the machine's peak FP32 multiply-add rate reached by ``vitzoo.deploy`` (default eager backend).

achieved MAC/s = fvcore MACs of the fused model per image (``vitzoo.flops.count_flops``) x measured img/s.
peak MAC/s     = cores x clock x FMA instructions per cycle x fp32 lanes per FMA, where cores = the thread count,
                 at most the physical cores this process may run on (SMT siblings share a core's FMA units).

Assumptions (override with --ghz/--fma-units/--lanes):
* clock: cpufreq's ``base_frequency`` (intel_pstate) or ``amd_pstate_nominal_freq`` (amd-pstate) where the kernel
  exposes one, else the "cpu MHz" of /proc/cpuinfo (a VM's nominal clock; on a host with frequency scaling that is
  the current clock, so pass --ghz there); turbo can be higher, hence the measured FMA peak below;
* AMD Zen/Zen+ (family 23, models below 0x30): 2 x 128-bit FMA pipes -> 2 units x 4 lanes; Zen 2 (family 23) and
  Zen 3 (family 25, AVX2): 2 x 256-bit -> 2 x 8; Zen 4 (family 25, AVX-512 double-pumped on 256-bit pipes) -> 2 x 8;
  Zen 5 (family 26, AVX-512): 2 x 512-bit -> 2 x 16 (mobile Zen 5 parts have 256-bit pipes: pass --lanes 8);
* Intel with AVX-512: 2 x 512-bit FMA units (Xeon Gold/Platinum; some SKUs have 1) -> 2 x 16;
* other AVX2 + FMA: 2 x 8.
Two empirical ceilings are also measured at the same thread count: MKL sgemm 2048^3, and the core's FMA peak
(``fma_peak.c``, 12 independent FMA chains on the widest vector registers, compiled here with ``$CC`` or ``cc -O3
-march=native`` and run once per thread concurrently, best of three runs; it includes turbo, which the nominal
clock does not). The
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
    base_parser, build_c, cpu_info, inference, positive_int, print_machine, print_table, randomize_norm_stats,
    timed,
)
from _isolated import measure_isolated  # noqa: E402
from vitzoo.inference import deploy  # noqa: E402
from vitzoo.flops import count_flops  # noqa: E402

CASES = {"shvit_s1": 224, "shvit_s4": 256, "deit_tiny_patch16_224": 224}


def fma_config(text: Optional[str] = None) -> tuple:
    """(FMA units, fp32 lanes per unit, explanation) from the CPU vendor, family, model and flags in ``text``
    (default: this machine's /proc/cpuinfo)."""
    info = cpu_info(text)
    if text is None:
        text = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""

    def field(name: str) -> int:
        found = re.search(rf"^{name}\s*:\s*(\d+)", text, re.M)
        return int(found.group(1)) if found else 0

    family, model = field("cpu family"), field("model")
    if "AuthenticAMD" in text:
        if family == 23 and model < 0x30 and info["fma"]:
            return 2, 4, f"AMD Zen/Zen+ (family {family}, model {model:#x}): 2 FMA pipes x 128 bit (4 fp32 lanes)"
        if family >= 26 and info["isa"] == "avx512f":
            return 2, 16, (f"AMD Zen 5 (family {family}) AVX-512: 2 FMA pipes x 512 bit (16 fp32 lanes; mobile parts "
                           "have 256-bit pipes: pass --lanes 8)")
        if info["isa"] == "avx512f":
            return 2, 8, (f"AMD family {family} AVX-512: 2 FMA pipes x 256 bit (8 fp32 lanes; 512-bit ops "
                          "double-pumped)")
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


def measured_fma_peak(threads: int, iters: int = 200_000_000, runs: int = 3) -> Optional[float]:
    """The best of ``runs`` sums of ``threads`` concurrent runs of ``fma_peak.c``, in MAC/s (a ceiling: a run slowed
    by another process would lower it, and raise every fraction of it); None without a C compiler (``$CC``, which
    may be a command line such as ``ccache gcc``, else ``cc`` / ``gcc`` / ``clang``) or without x86 FMA."""
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fma_peak.c")
    best = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        binary = build_c(source, ["-O3", "-march=native"], os.path.join(tmp, "fma_peak"), "measured FMA peak")
        if binary is None:
            return None
        for _ in range(runs):
            procs = [subprocess.Popen([binary, str(iters)], stdout=subprocess.PIPE, text=True) for _ in range(threads)]
            outputs = [(p.communicate()[0], p.returncode) for p in procs]
            rates = []
            for out, code in outputs:
                try:
                    rates.append(float(out.split()[0]))
                except (IndexError, ValueError):
                    print(f"measured FMA peak: skipped (fma_peak exited with code {code} and printed "
                          f"{out.strip()[:80]!r}; an x86 CPU with FMA is needed)")
                    return None
            best = max(best, sum(rates) * 1e9)
    return best


def nominal_ghz(info: dict) -> Tuple[Optional[float], str]:
    """The nominal clock in GHz and where it was read: cpufreq's base (intel_pstate) or nominal (amd-pstate)
    frequency when the kernel exposes one (the "cpu MHz" of /proc/cpuinfo is then the current, scaled clock), else
    /proc/cpuinfo's "cpu MHz"."""
    for name in ("base_frequency", "amd_pstate_nominal_freq"):  # intel_pstate's, amd-pstate's (kHz)
        nominal = f"/sys/devices/system/cpu/cpu0/cpufreq/{name}"
        try:
            with open(nominal) as f:
                return int(f.read()) / 1e6, nominal
        except (OSError, ValueError):
            pass
    if info.get("max_mhz"):  # frequency scaling without a base frequency: "cpu MHz" is whatever the core runs now
        print("note: this host scales its clock and exposes no base frequency; /proc/cpuinfo's 'cpu MHz' is the "
              "current clock, pass --ghz with the nominal one")
    return ((info["mhz"] or 0) / 1000 or None), "/proc/cpuinfo cpu MHz"


PRECISIONS = ("bf16x3", "ieee")  # deploy()'s default first


def deployed(name: str, batch: int, threads: int, precision: str = "bf16x3"):
    """``deploy(model, fp32_precision=precision)`` at ``threads`` threads, on the timed batch; (model, batch)."""
    torch.set_num_threads(threads)
    res = CASES[name]
    model = randomize_norm_stats(timm.create_model(name))
    x = torch.randn(batch, 3, res, res, generator=torch.Generator().manual_seed(1))
    return deploy(model, x, fp32_precision=precision), x


def build_deployed(name: str, batch: int, threads: int, precision: str = "bf16x3"):
    """:func:`deployed` as a runner (also called in the isolated worker process)."""
    return inference(*deployed(name, batch, threads, precision))


def _label(name: str, batch: int, threads: int, precision: str) -> str:
    """The row's name; for the default, the precision the timed runner's deployment uses (the same model, batch
    and thread count: its bf16x3 fallback is decided when it is verified, and can depend on all three)."""
    res = CASES[name]
    if precision == "ieee":
        return f"{name}@{res} deploy(ieee)"
    previous = torch.get_num_threads()
    try:
        used = deployed(name, batch, threads, precision)[0].fp32_precision
    finally:
        torch.set_num_threads(previous)
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
        cores = min(threads, info["cores"] or threads)
        if cores < threads:
            print(f"note: {threads} threads share {cores} physical cores: the nominal peak counts {cores}")
        peak = cores * ghz * 1e9 * units * lanes
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
                rows.append([_label(name, args.batch, threads, precision), threads,
                             f"{times[precision].throughput:.1f}", f"{achieved / 1e9:.1f}", f"{achieved / peak:.0%}",
                             of_fma(achieved)])
    print_table(["workload", "threads", "img/s", "GMAC/s", "of nominal peak", "of measured FMA peak"], rows,
                title=f"fraction of peak FP32 MAC rate (batch {args.batch}, median of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
