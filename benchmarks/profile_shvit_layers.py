"""Per-convolution time of SHViT in our ``deploy()`` eager path and in ONNX Runtime, side by side.

Shows where the time goes (docs/benchmarks.md, section 1) and the effect of the batch size the oneDNN weights
were packed for (``--pack-batch``; ``deploy()`` re-packs per input shape, so this only shows the first-call
layout). Our convolutions are timed by wall clock around each ``PackedConv2d`` call, ONNX Runtime's with its own
profiler (per-node kernel time), averaged over ``--iters`` calls after warm-up.

    OMP_NUM_THREADS=2 python benchmarks/profile_shvit_layers.py --model shvit_s1 --threads 2
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import sys
import tempfile
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timm  # noqa: E402
import torch  # noqa: E402
from timm.utils import reparameterize_model  # noqa: E402

import vitzoo  # noqa: E402
from _common import positive_int, print_machine, randomize_norm_stats  # noqa: E402
from vitzoo.onednn_rewrite import PackedConv2d  # noqa: E402
from vitzoo.onnx_runtime import export_onnx  # noqa: E402

RESOLUTION = {"shvit_s1": 224, "shvit_s2": 224, "shvit_s3": 224, "shvit_s4": 256}


def torch_conv_times(deployed: torch.nn.Module, x: torch.Tensor, iters: int) -> tuple:
    """(per-shape conv ms per call, total conv ms, total ms) of the deployed model, by wall clock.

    Every ``PackedConv2d`` call is timed with ``time.perf_counter`` from forward pre-hook to forward hook (oneDNN
    runs synchronously on CPU). ``torch.profiler`` is not used here: it attributed ~5 ms too much to the first
    convolution of each call (the stem's 3-channel conv: 7.3-7.6 ms under the profiler against 2.6 ms by wall
    clock, 1 thread), which an earlier version of this script reported as a 3x gap to ONNX Runtime.
    """
    per_shape: Dict[str, List[float]] = collections.defaultdict(lambda: [0.0, 0])
    starts: Dict[int, float] = {}
    recording = [False]

    def before(module, args):
        starts[id(module)] = time.perf_counter()

    def after(module, args, output):
        if recording[0]:
            key = f"{list(args[0].shape)} w{list(module.weight.shape)}"
            per_shape[key][0] += time.perf_counter() - starts[id(module)]
            per_shape[key][1] += 1

    handles = []
    for m in deployed.modules():
        if isinstance(m, PackedConv2d):
            handles += [m.register_forward_pre_hook(before), m.register_forward_hook(after)]
    try:
        for _ in range(3):
            deployed(x)
        recording[0] = True
        start = time.perf_counter()
        for _ in range(iters):
            deployed(x)
        total = (time.perf_counter() - start) / iters * 1e3
    finally:
        for h in handles:
            h.remove()
    per_shape = {k: [seconds / iters * 1e3, calls // iters] for k, (seconds, calls) in per_shape.items()}
    return per_shape, sum(ms for ms, _ in per_shape.values()), total


def ort_conv_times(model: torch.nn.Module, x: torch.Tensor, threads: int, iters: int) -> tuple:
    """(per-node Conv ms per call, total Conv ms, total kernel ms) in ONNX Runtime."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = os.path.join(tmp, "ort")
        session = ort.InferenceSession(export_onnx(model, x[:1], opset=17), options,
                                       providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}
        for _ in range(3):
            session.run(None, feed)
        for _ in range(iters):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    start = runs[3]["ts"]  # skip the warm-up calls
    per_node, total = collections.defaultdict(float), 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            total += e["dur"]
            if e["args"].get("op_name") == "Conv":
                shapes = [s.get("float") for s in e["args"].get("input_type_shape", [])[:2]]
                per_node[f"{shapes[0]} w{shapes[1]}"] += e["dur"] / iters / 1e3
    return dict(per_node), sum(per_node.values()), total / iters / 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shvit_s1", choices=sorted(RESOLUTION))
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--iters", type=positive_int, default=5)
    parser.add_argument("--pack-batch", type=positive_int, default=None,
                        help="batch the oneDNN weights are first packed for (default: --batch)")
    parser.add_argument("--top", type=positive_int, default=12, help="rows to print")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_machine([args.threads])
    res = RESOLUTION[args.model]
    model = randomize_norm_stats(timm.create_model(args.model)).eval()
    x = torch.randn(args.batch, 3, res, res)
    deployed = vitzoo.deploy(model, x[: args.pack_batch or args.batch])
    if args.pack_batch:  # keep only the first-call layout, to show what the per-shape re-packing buys
        for m in deployed.modules():
            if isinstance(m, PackedConv2d):
                packed = next(iter(m._packed.values()))
                m._packed = {tuple(x.shape[:1]) + s[1:]: packed for s in m._packed}
    ours, ours_conv, ours_total = torch_conv_times(deployed, x, args.iters)
    theirs, ort_conv, ort_total = ort_conv_times(
        reparameterize_model(copy.deepcopy(model)), x, args.threads, args.iters)
    print(f"\n{args.model}@{res}, batch {args.batch}, {args.threads} threads, weights packed for batch "
          f"{args.pack_batch or args.batch}")
    print(f"ours: convs {ours_conv:.1f} ms of {ours_total:.1f} ms per call | ONNX Runtime: convs {ort_conv:.1f} ms "
          f"of {ort_total:.1f} ms per call\n")
    print("| input, weight | calls | ours ms | ORT ms |\n|---|---|---|---|")
    for key, (ms, calls) in sorted(ours.items(), key=lambda kv: -kv[1][0])[: args.top]:
        ort_ms = theirs.get(key)
        print(f"| {key} | {calls} | {ms:.2f} | {'-' if ort_ms is None else f'{ort_ms:.2f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
