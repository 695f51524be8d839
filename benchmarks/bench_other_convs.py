"""deploy() on models whose convolutions are not plain nn.Conv2d: deployed vs the fused eager model (eager backend).

Weight-standardised convolutions (NFNet's ``ScaledStdConv2d``, BiT's ``StdConv2d``) are left alone by the oneDNN
rewrite, and ran slower in channels-last; since 2026-11-26 ``deploy()`` keeps their own memory format when they are
most of a model's convolutions (``vitzoo.inference.is_convolutional``). ResNet-18 (plain convolutions) for scale.
Both paths run in the same process, interleaved (``vitzoo.speed.measure``), at batch ``--batch``.

    python benchmarks/bench_other_convs.py --threads 1 --batch 2 --rounds 7
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timm  # noqa: E402
import torch  # noqa: E402
from timm.utils import reparameterize_model  # noqa: E402

import vitzoo  # noqa: E402,F401
from _common import base_parser, inference, print_machine, print_table, randomize_norm_stats, timed  # noqa: E402
from vitzoo.inference import deploy  # noqa: E402

MODELS = ("nf_resnet26", "resnetv2_50x1_bit", "nfnet_l0", "resnet18")


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0], batch=2, threads=(1,))
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--img-size", type=int, default=96)
    args = parser.parse_args()
    print_machine(args.threads)
    rows = []
    for name in args.models:
        for threads in args.threads:
            torch.set_num_threads(threads)
            model = randomize_norm_stats(timm.create_model(name))
            x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(1))
            deployed = deploy(model, x)
            runners = {"fused eager": inference(reparameterize_model(model), x), "deploy()": inference(deployed, x)}
            t = timed(runners, args.batch, args.rounds, args.min_time, desc=f"{name} {threads}t")
            layout = "channels_last" if "channels_last" in deployed.optimizations else "contiguous"
            rows.append([name, threads, layout, t["fused eager"].throughput, t["deploy()"].throughput,
                         f"{t['deploy()'].throughput / t['fused eager'].throughput:.2f}x"])
    print_table(["model", "threads", "deploy() layout", "fused eager img/s", "deploy() img/s", "deploy / eager"],
                rows, title=f"{args.img_size}x{args.img_size}, batch {args.batch}, median of {args.rounds} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
