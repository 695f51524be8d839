"""What one switch of ``deploy()``'s eager path buys on a whole SHViT model, in paired rounds (one process).

Effects of a few percent drown in the run-to-run noise of the isolated benchmarks (``bench_deploy_ablation.py``:
±3-5% per figure on the shared 2-vCPU hosts of ``docs/benchmarks.md``). Here both variants run in the same
process, alternating call by call in ``--rounds`` rounds (the order flips every round), and the result is the
median over rounds of the per-round time ratio, which cancels drifts of the host's speed. Switches:

* ``image kernel``: the first convolution reads the NCHW image itself (``vitzoo.image_conv``), against the
  channels-last copy of the input and oneDNN's convolution (the kernel hidden while deploying the other variant);
* ``direct AMX 1x1``: AMX 1x1 convolutions called straight on channels-last tensors
  (``vitzoo.amx_gemm.amx_pointwise``), against the views-and-``amx_linear`` path (the function hidden while the
  other variant runs; on a CPU without AMX both variants are the same);
* ``AMX rows shared out``: the AMX kernel's threads take the row blocks left in each other's shares once their own
  is done, against fixed shares (the kernel's ``vitzoo_amx_fixed_shares`` switch; only matters at 2+ threads,
  and only while one core is slower than the other, e.g. its AMX unit slowed by another tenant of the host);
* ``SHSA kernel``: SHViT's attention blocks between their two convolutions on ``vitzoo.shsa_kernel`` (two calls
  per block), against PyTorch's ops (the kernel hidden while deploying the other variant);
* ``stem pair``: the stem's first two convolutions in one call of the image kernel, band by band
  (``vitzoo.image_conv.image_conv_pair``; S1's 3 -> 16 -> 32, S4's 3 -> 28 has none), against the image kernel
  then oneDNN's convolution (the pairing step skipped while deploying the other variant).

    OMP_NUM_THREADS=2 python benchmarks/bench_paired_switches.py --threads 1 2 --rounds 25
"""
from __future__ import annotations

import ctypes
import os
import statistics
import sys
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timm  # noqa: E402
import torch  # noqa: E402

import vitzoo  # noqa: E402,F401
from _common import paired_rounds, positive_int, print_machine, print_table, randomize_norm_stats  # noqa: E402
from vitzoo import amx_gemm, image_conv, onednn_rewrite, shsa_kernel  # noqa: E402
from vitzoo.inference import deploy  # noqa: E402

CASES = {"shvit_s1": 224, "shvit_s4": 256}
SWITCHES = ("image kernel", "direct AMX 1x1", "AMX rows shared out", "SHSA kernel", "stem pair")
IEEE_TOO = ("image kernel", "SHSA kernel", "stem pair")  # the others switch AMX code
DEPLOY_TIME = {  # switched while deploying: what is replaced, by a function returning None (not available / not done)
    "image kernel": (image_conv, "load"), "SHSA kernel": (shsa_kernel, "load"),
    "stem pair": (onednn_rewrite, "_fuse_image_pair")}


@contextmanager
def _without(switch: str) -> Iterator[None]:
    if switch == "AMX rows shared out":
        lib = amx_gemm.load()
        fixed = ctypes.c_int.in_dll(lib, "vitzoo_amx_fixed_shares") if lib is not None else ctypes.c_int()
        fixed.value = 1
        try:
            yield
        finally:
            fixed.value = 0
        return
    where = DEPLOY_TIME.get(switch, (amx_gemm, "amx_pointwise"))
    with mock.patch.object(*where, lambda *args, **kwargs: None):
        yield


def variants(switch: str, model: torch.nn.Module, x: torch.Tensor, precision: str) -> Dict[str, Callable[[], object]]:
    """``{"on": run, "off": run}``: zero-argument callables running one batch with the switch on and off."""
    on = deploy(model, x, fp32_precision=precision)
    if switch in DEPLOY_TIME:
        with _without(switch):
            off = deploy(model, x, fp32_precision=precision)
        return {"on": lambda: on(x), "off": lambda: off(x)}

    def run_off():
        with _without(switch):
            return on(x)
    return {"on": lambda: on(x), "off": run_off}


def paired_ratios(runs: Dict[str, Callable[[], object]], rounds: int, calls: int, desc: str) -> List[float]:
    """time(off) / time(on) of every round, sorted: > 1 where the switch made the model faster."""
    times = paired_rounds({"on": runs["on"], "off": runs["off"]}, rounds, calls, desc)
    return sorted(off / on for on, off in zip(times["on"], times["off"]))


def paired_ratio(runs: Dict[str, Callable[[], object]], rounds: int, calls: int, desc: str) -> float:
    """Median over rounds of time(off) / time(on): > 1 where the switch makes the model faster."""
    return statistics.median(paired_ratios(runs, rounds, calls, desc))


def spread(ratios: List[float]) -> List[str]:
    """The quartiles of the sorted per-round ratios, and how many rounds the switch made >10% faster / slower (a
    switch that only matters in some states of a shared host shows there, not in the median)."""
    def at(q: float) -> float:
        return statistics.quantiles(ratios, n=4)[int(q * 4) - 1] if len(ratios) > 1 else ratios[0]
    faster, slower = sum(r > 1.1 for r in ratios), sum(r < 1 / 1.1 for r in ratios)
    return [f"{statistics.median(ratios):.3f}x", f"{at(0.25):.3f}x / {at(0.75):.3f}x",
            f"{faster} / {slower} of {len(ratios)}"]


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--switches", nargs="+", default=list(SWITCHES), choices=SWITCHES)
    parser.add_argument("--precisions", nargs="+", default=["bf16x3", "ieee"], choices=["bf16x3", "ieee"])
    parser.add_argument("--threads", nargs="+", type=positive_int, default=[1, 2])
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--rounds", type=positive_int, default=25)
    parser.add_argument("--calls", type=positive_int, default=4, help="calls per variant per round")
    args = parser.parse_args()
    print_machine(args.threads)
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = randomize_norm_stats(timm.create_model(name))
        x = torch.randn(args.batch, 3, CASES[name], CASES[name], generator=torch.Generator().manual_seed(1))
        for threads in args.threads:
            torch.set_num_threads(threads)
            for switch in args.switches:
                for precision in args.precisions:
                    if switch not in IEEE_TOO and precision == "ieee":
                        continue  # no AMX layers in IEEE fp32
                    desc = f"{name} {threads}t {switch} {precision}"
                    ratios = paired_ratios(variants(switch, model, x, precision), args.rounds, args.calls, desc)
                    rows.append([f"{name}@{CASES[name]}", threads, switch, precision, *spread(ratios)])
    print_table(["model", "threads", "switch", "precision", "speed-up (median of paired rounds)", "quartiles",
                 "rounds >10% faster / slower"], rows,
                title=f"one deploy() switch on vs off (batch {args.batch}, {args.rounds} paired rounds of "
                      f"{args.calls} calls, one process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
