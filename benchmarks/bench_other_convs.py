"""deploy() on models whose convolutions are not plain nn.Conv2d: deployed vs the fused eager model (eager backend).

Weight-standardised convolutions (NFNet's ``ScaledStdConv2d``, BiT's ``StdConv2d``) are left alone by the oneDNN
rewrite. They ran slower in channels-last, so since 2026-11-26 ``deploy()`` keeps a model's own memory format when
such convolutions are most of its convolutions (``vitzoo.inference.is_convolutional``); and since the same day it
first makes them plain convolutions with their weight standardised once (``vitzoo.weight_standardisation``), which
the rewrite packs. Models with timm's ``Conv2dSame`` (TensorFlow "SAME" padding: ``tf_efficientnet_*``, the
``dm_`` NFNets) or with modules timm marks untraceable (EfficientViT, MobileViT) could not be traced by torch.fx, so
the rewrite skipped them whole; since 2026-11-26 ``Conv2dSame`` is packed and those modules are kept whole in the
trace. "deploy() before" is deploy() with both changes switched off. ResNet-18 (plain convolutions) for scale. All
paths run in the same process, interleaved (``vitzoo.speed.measure``), at batch ``--batch``.

    python benchmarks/bench_other_convs.py --threads 1 --batch 2 --rounds 7
"""
from __future__ import annotations

import contextlib
import os
import sys
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timm  # noqa: E402
import torch  # noqa: E402
import torch.fx as fx  # noqa: E402
from timm.utils import reparameterize_model  # noqa: E402

import vitzoo.inference  # noqa: E402
import vitzoo.onednn_rewrite  # noqa: E402
from _common import (base_parser, inference, positive_int, print_machine, print_table,  # noqa: E402
                     randomize_norm_stats, timed)
from vitzoo.inference import deploy  # noqa: E402
from vitzoo.module_hooks import HookKeepingTracer  # noqa: E402

MODELS = ("nf_resnet26", "resnetv2_50x1_bit", "nfnet_l0", "tf_efficientnet_b0", "dm_nfnet_f0", "efficientvit_m0",
          "mobilevitv2_050", "resnet18")


def _trace_before(model, timm_leaves):
    """The rewrite's trace before 2026-11-26: torch.fx's own leaves (and hooked modules), no retry."""
    return fx.GraphModule(model, HookKeepingTracer().trace(model), type(model).__name__)


@contextlib.contextmanager
def _as_before():
    with mock.patch.object(vitzoo.inference, "standardise_weights", lambda m: (m, 0)), \
            mock.patch.object(vitzoo.onednn_rewrite, "_trace", _trace_before):
        yield


def _layout(deployed) -> str:
    return "channels_last" if "channels_last" in deployed.optimizations else "contiguous"


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0], batch=2, threads=(1,))
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--img-size", type=positive_int, default=96)
    args = parser.parse_args()
    print_machine(args.threads)
    rows = []
    for name in args.models:
        for threads in args.threads:
            torch.set_num_threads(threads)
            model = randomize_norm_stats(timm.create_model(name))
            x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(1))
            deployed = deploy(model, x)
            with _as_before():
                before = deploy(model, x)
            runners = {"fused eager": inference(reparameterize_model(model), x),
                       "deploy() before": inference(before, x),
                       "deploy()": inference(deployed, x)}
            t = timed(runners, args.batch, args.rounds, args.min_time, desc=f"{name} {threads}t")
            speed = {k: v.throughput for k, v in t.items()}
            rows.append([name, threads, _layout(before), _layout(deployed), speed["fused eager"],
                         speed["deploy() before"], speed["deploy()"],
                         f"{speed['deploy() before'] / speed['fused eager']:.2f}x",
                         f"{speed['deploy()'] / speed['fused eager']:.2f}x",
                         f"{speed['deploy()'] / speed['deploy() before']:.2f}x"])
    print_table(["model", "threads", "layout before", "layout", "fused eager img/s", "deploy() before img/s",
                 "deploy() img/s", "before / eager", "deploy / eager", "deploy / before"],
                rows, title=f"{args.img_size}x{args.img_size}, batch {args.batch}, median of {args.rounds} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
