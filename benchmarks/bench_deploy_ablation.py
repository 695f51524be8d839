"""What each step of ``deploy()``'s eager path buys: the steps switched on one after another (SHViT, batch 16).

Cumulative variants, each timed in its own process (``_isolated.py``), all fused with the same weights:

1. ``fused``: ``deploy()`` with channels-last and the oneDNN rewrite switched off (what timm's fused model does,
   plus ``inference_mode``);
2. ``+ channels-last``;
3. ``+ oneDNN packed convs``: the ``PackedConv2d`` rewrite with fused ReLU / residual add, every conv on oneDNN's
   convolution kernel;
4. ``+ 1x1 as linear``: pointwise convs on oneDNN's linear kernel over the channels-last (B*H*W, C) view;
5. ``+ token-view attention``: SHSA's ``nhwc`` path;
6. ``+ image kernel``: the first convolution reads the NCHW image itself (``vitzoo.image_conv``; no channels-last
   copy of the input; without AVX-512 the same as step 5);
7. ``+ stem pair``: the second convolution runs in the same kernel call, band by band
   (``vitzoo.image_conv.image_conv_pair``; S1's 3 -> 16 -> 32 stem; S4's has no pair, nor without AVX-512);
8. ``+ SHSA kernel``: SHSA between its convolutions on ``vitzoo.shsa_kernel`` (without AVX-512 the same as step 7);
   this is ``deploy(fp32_precision="ieee")``;
9. ``+ bf16x3 on AMX``: convolutions in split bf16 on the AMX tile unit (``vitzoo.amx_gemm``); this is ``deploy()``
   as shipped (on a CPU without AMX it is the same as step 8).

Steps are switched off by patching ``vitzoo.inference`` and the kernel modules inside the worker process that
builds that variant only.

    python benchmarks/bench_deploy_ablation.py --rounds 7 --threads 1 2
"""
from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timm  # noqa: E402
import torch  # noqa: E402

import vitzoo  # noqa: E402,F401
from _common import base_parser, inference, print_machine, print_table, randomize_norm_stats  # noqa: E402
from _isolated import measure_isolated  # noqa: E402
from vitzoo import image_conv, onednn_rewrite, shsa_kernel  # noqa: E402
from vitzoo import inference as vi  # noqa: E402

CASES = {"shvit_s1": 224, "shvit_s4": 256}
STEPS = ("fused", "+ channels-last", "+ oneDNN packed convs", "+ 1x1 as linear", "+ token-view attention",
         "+ image kernel", "+ stem pair", "+ SHSA kernel", "+ bf16x3 on AMX")


def build_deployed(step: str, model: torch.nn.Module, x: torch.Tensor, verify: bool = False) -> vi.DeployedModel:
    """``deploy(model, x)`` with the steps after ``step`` switched off."""
    level = STEPS.index(step)
    with ExitStack() as stack:
        if level < 1:
            stack.enter_context(mock.patch.object(vi, "is_convolutional", lambda model: False))
        if level < 2:
            stack.enter_context(mock.patch.object(vi, "onednn_rewrite", lambda model, example, *rest: (model, [])))
        if level < 4:
            stack.enter_context(mock.patch.object(vi, "use_nhwc_attention", lambda model: 0))
        if level < 5:
            stack.enter_context(mock.patch.object(image_conv, "load", lambda: None))
        if level < 6:
            stack.enter_context(mock.patch.object(onednn_rewrite, "_fuse_image_pair", lambda gm, packed: False))
        if level < 7:
            stack.enter_context(mock.patch.object(shsa_kernel, "load", lambda: None))
        # verify=False by default: running the unfused model first (deploy's check) left glibc's heap in a state
        # that slowed the plain NCHW 'fused' variant (docs/benchmarks.md, section 6; ``--verify`` shows it);
        # tests/test_benchmarks.py checks every variant's output instead
        deployed = vi.deploy(model, x, verify=verify, fp32_precision="bf16x3" if level >= 8 else "ieee")
    if level < 3:
        for m in deployed.modules():
            if isinstance(m, vi.PackedConv2d) and m.pointwise:
                m.pointwise = False
                m._packed.clear()  # re-packed for the convolution kernel on the next call
    return deployed


def build_runner(step: str, name: str, batch: int, threads: int, verify: bool = False):
    """The runner of one variant (called in the isolated worker processes)."""
    torch.set_num_threads(threads)
    model = randomize_norm_stats(timm.create_model(name))
    x = torch.randn(batch, 3, CASES[name], CASES[name], generator=torch.Generator().manual_seed(1))
    return inference(build_deployed(step, model, x, verify), x)


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["shvit_s1", "shvit_s4"], choices=list(CASES))
    parser.add_argument("--verify", action="store_true",
                        help="check each variant against the unfused model at deploy time (runs it once first)")
    args = parser.parse_args()
    print_machine(args.threads)
    rows = []
    for name in args.models:
        for threads in args.threads:
            t = measure_isolated({s: (build_runner, (s, name, args.batch, threads, args.verify)) for s in STEPS},
                                 args.batch,
                                 rounds=args.rounds, min_time=args.min_time, desc=f"{name} {threads}t")
            base = t[STEPS[0]].throughput
            rows.append([f"{name}@{CASES[name]}", threads]
                        + [f"{t[s].throughput:.1f} ({t[s].throughput / base:.2f}x)" for s in STEPS])
    print_table(["model", "threads"] + [f"{s} img/s" for s in STEPS], rows,
                title=f"deploy() eager path, steps added one by one (batch {args.batch}, median of {args.rounds} "
                      f"rounds, one process per variant; ratio to 'fused')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
