"""A stem's first convolutions alone: vitzoo's image kernel and stem pair against what they replace (batch 16).

Each case times two ways of computing the same thing, alternating call by call in ``--rounds`` rounds (the order
flipping every round), and prints the median time of each and the median over rounds of the per-round time ratio
(``bench_paired_switches.py`` measures the same switches on whole models):

* ``S1 first conv``: SHViT-S1's 3 -> 16 convolution (224x224, ReLU) on the image kernel, reading the NCHW batch,
  against a channels-last copy of the batch and oneDNN's pre-packed convolution (what ``deploy()`` does without
  the kernel);
* ``S1 stem pair``: S1's 3 -> 16 -> 32 convolutions in one call of ``image_conv_pair`` against the image kernel
  followed by oneDNN's convolution (the stem pair switched off);
* ``S4 first conv``: S4's 3 -> 28 convolution (256x256) on the image kernel (two 16-channel passes) against the
  copy and oneDNN; ``deploy()`` keeps such a convolution on oneDNN (docs/benchmarks.md section 13).

    OMP_NUM_THREADS=2 python benchmarks/bench_stem_kernels.py --threads 1 2 --rounds 21
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _common import paired_rounds, positive_int, print_machine, print_table  # noqa: E402
from bench_paired_switches import spread  # noqa: E402
from vitzoo import image_conv  # noqa: E402
from vitzoo.onednn_rewrite import PackedConv2d, PackedConvPair  # noqa: E402

#: name -> (input size, first convolution's output channels, second's or None)
CASES = {"S1 first conv": (224, 16, None), "S1 stem pair": (224, 16, 32), "S4 first conv": (256, 28, None)}


def _packed(conv: nn.Conv2d, shape: Tuple[int, ...]) -> PackedConv2d:
    packed = PackedConv2d(conv.eval(), shape)
    packed.unary = "relu"
    return packed


def variants(case: str, batch: int, size: int = 0) -> Dict[str, Callable[[], torch.Tensor]]:
    """``{"vitzoo": run, "replaced": run}``: zero-argument callables computing the case's output both ways (random
    weights; ``size`` overrides the case's input size)."""
    size = size or CASES[case][0]
    _, first_channels, second_channels = CASES[case]
    if image_conv.load() is None:
        raise RuntimeError(f"the image kernel is not available here: {image_conv.unavailable_reason()}")
    x = torch.randn(batch, 3, size, size)
    first = nn.Conv2d(3, first_channels, 3, 2, 1)
    image_weight = image_conv.pack_weight(first.weight, first.bias)
    on_onednn = _packed(first, (batch, 3, size, size))

    def first_on_kernel() -> torch.Tensor:
        return image_conv.image_conv3x3(x, image_weight, first_channels, (2, 2), (1, 1), relu=True)

    if second_channels is None:
        return {"vitzoo": first_on_kernel,
                "replaced": lambda: on_onednn(x.contiguous(memory_format=torch.channels_last))}
    second = nn.Conv2d(first_channels, second_channels, 3, 2, 1)
    half = -(-size // 2)
    then_onednn = _packed(second, (batch, first_channels, half, half))
    kernel = _packed(first, (batch, 3, size, size))
    kernel.use_image_kernel()
    pair = PackedConvPair(kernel, _packed(second, (batch, first_channels, half, half)))
    return {"vitzoo": lambda: pair(x), "replaced": lambda: then_onednn(first_on_kernel())}


def paired_times(runs: Dict[str, Callable[[], torch.Tensor]], rounds: int, calls: int,
                 desc: str) -> Tuple[float, float, List[float]]:
    """Median ms per call of each variant and the per-round ratios replaced / vitzoo, sorted (> 1: vitzoo faster)."""
    times = paired_rounds({"vitzoo": runs["vitzoo"], "replaced": runs["replaced"]}, rounds, calls, desc)
    per_call = {name: statistics.median(t) / calls * 1e3 for name, t in times.items()}
    ratios = sorted(replaced / ours for ours, replaced in zip(times["vitzoo"], times["replaced"]))
    return per_call["vitzoo"], per_call["replaced"], ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", nargs="+", type=positive_int, default=[1, 2])
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--rounds", type=positive_int, default=21)
    parser.add_argument("--calls", type=positive_int, default=3, help="calls per variant per round")
    args = parser.parse_args()
    if image_conv.load() is None:
        print(f"the image kernel is not available here: {image_conv.unavailable_reason()}", file=sys.stderr)
        return 1
    print_machine(args.threads)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for case in args.cases:
            torch.manual_seed(0)
            ours, replaced, ratios = paired_times(variants(case, args.batch), args.rounds, args.calls,
                                                  f"{case}, {threads} thread(s)")
            rows.append([case, threads, f"{ours:.2f}", f"{replaced:.2f}", *spread(ratios)])
    title = f"stem kernels alone (batch {args.batch}, {args.rounds} paired rounds of {args.calls} calls)"
    print_table(["case", "threads", "vitzoo ms", "replaced ms", "speed-up (median of paired rounds)", "quartiles",
                 "rounds >10% faster / slower"], rows, title=title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
