"""Where our fastest PyTorch path (``deploy(backend="torchscript")``) loses time to ONNX Runtime, by layer kind.

Both runtimes time their own kernels: oneDNN's verbose log gives the time of every primitive that TorchScript's
oneDNN Graph partitions execute, ONNX Runtime's profiler the time of every node. Convolutions are grouped by
kind (the four dense 3x3 stem convolutions, the 1x1 and depthwise ones, which oneDNN Graph partly fuses into one
primitive), everything else is "other ops": whole call minus convolutions, where the whole call is timed by wall
clock without any logging. The input's NCHW -> channels-last copy, which the PyTorch path pays inside the call
(ONNX Runtime's first convolution reads NCHW directly), is timed separately.

TorchScript's "other ops" are then split in two: oneDNN Graph's own time around its primitives (partition execution
time in the same log, minus the primitives), and everything outside the partitions; ``torch.profiler`` lists the
ATen ops that run outside them and TorchScript's interpreter (``forward``), by self time.

All runs share this one process (a profile, not a ratio benchmark: ``bench_cpu_vs_onnxruntime.py`` is that).

    OMP_NUM_THREADS=1 python benchmarks/profile_torchscript_vs_onnxruntime.py --model shvit_s1 --threads 1
"""
from __future__ import annotations

import argparse
import collections
import copy
import ctypes
import os
import re
import sys
import tempfile
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timm  # noqa: E402
import torch  # noqa: E402
from timm.utils import reparameterize_model  # noqa: E402

import vitzoo  # noqa: E402
from _common import positive_int, print_machine, randomize_norm_stats, wall_ms  # noqa: E402
from profile_shvit_layers import RESOLUTION, ort_conv_times  # noqa: E402
from vitzoo.onnx_runtime import OnnxRuntimeModule, export_onnx  # noqa: E402

# oneDNN's convolution descriptor, e.g. "g128mb16_ic128oc128_ih14oh14kh3sh1dh0ph1_iw14ow14kw3sw1dw0pw1"
_CONV_DESC = re.compile(r"^(?:g(\d+))?mb(\d+)_ic(\d+)oc(\d+)_ih(\d+)oh\d+kh(\d+)\S*_iw(\d+)ow\d+kw(\d+)")
KINDS = ("stem 3x3 convs", "1x1 + depthwise convs", "other ops")


def conv_key(desc: str) -> str:
    """``"[N, C, H, W] w[O, C/g, kh, kw]"`` (the key of ``ort_conv_times``) of a oneDNN convolution descriptor."""
    m = _CONV_DESC.match(desc)
    if m is None:
        raise ValueError(f"not a oneDNN convolution descriptor: {desc!r}")
    groups, mb, ic, oc, ih, kh, iw, kw = (int(v) if v else 1 for v in m.groups())
    return f"{[mb, ic, ih, iw]} w{[oc, ic // groups, kh, kw]}"


def conv_kind(key: str) -> str:
    """Stem (dense 3x3) or 1x1/depthwise, from a ``conv_key``."""
    weight = [int(v) for v in re.findall(r"\d+", key.split("w", 1)[1])]
    return KINDS[0] if weight[2] == 3 and weight[1] > 1 else KINDS[1]


def onednn_verbose_lines(fn: Callable[[], object], iters: int) -> List[str]:
    """The oneDNN verbose lines printed while ``fn`` runs ``iters`` times (C-level stdout captured)."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+") as log:
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                for _ in range(iters):
                    fn()
            libc.fflush(None)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        return [line.strip() for line in log if line.startswith("onednn_verbose")]


def torchscript_conv_times(deployed: torch.nn.Module, x: torch.Tensor,
                           iters: int) -> Tuple[Dict[str, list], float, float, int]:
    """From oneDNN's log: per-shape ``[ms per call, calls per call, implementation]``, all-primitive ms per call,
    oneDNN Graph partition ms per call (each partition's own execution time, its primitives included) and the
    number of partitions run per call."""
    per_shape: Dict[str, list] = {}
    total = partitions_ms = 0.0
    partitions = 0
    for line in onednn_verbose_lines(lambda: deployed(x), iters):
        fields = line.split(",")
        if len(fields) < 8 or fields[3] != "exec":
            continue
        ms = float(fields[-1]) / iters
        if fields[2] == "graph":
            partitions_ms += ms
            partitions += 1
            continue
        if fields[2] != "primitive":
            continue
        total += ms
        if fields[5] == "convolution":
            key = conv_key(fields[-2])
            entry = per_shape.setdefault(key, [0.0, 0, fields[6]])
            entry[0] += ms
            entry[1] += 1
    for entry in per_shape.values():
        entry[1] //= iters
    return per_shape, total, partitions_ms, partitions // iters


def ops_outside_partitions(deployed: torch.nn.Module, x: torch.Tensor, iters: int) -> List[Tuple[str, float, int]]:
    """``(op, self ms per call, calls per call)`` from ``torch.profiler`` for everything that is not a oneDNN Graph
    partition (``LlgaPartition_*``), by decreasing self time."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            deployed(x)
    rows = [(e.key, e.self_cpu_time_total / 1e3 / iters, e.count // iters) for e in prof.key_averages()
            if not e.key.startswith("LlgaPartition")]
    return sorted(rows, key=lambda row: -row[1])


def by_kind(per_shape: Dict[str, float]) -> Dict[str, float]:
    totals: Dict[str, float] = collections.defaultdict(float)
    for key, ms in per_shape.items():
        totals[conv_kind(key)] += ms
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shvit_s1", choices=sorted(RESOLUTION))
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--iters", type=positive_int, default=10)
    parser.add_argument("--top", type=positive_int, default=10, help="per-layer rows to print")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_machine([args.threads])
    res = RESOLUTION[args.model]
    torch.manual_seed(0)
    model = randomize_norm_stats(timm.create_model(args.model)).eval()
    x = torch.randn(args.batch, 3, res, res)
    fused = reparameterize_model(copy.deepcopy(model))

    scripted = vitzoo.deploy(model, x, backend="torchscript")
    session = OnnxRuntimeModule(export_onnx(fused, x[:1]), num_threads=args.threads)
    ours_wall = wall_ms(lambda: scripted(x), args.iters)
    ort_wall = wall_ms(lambda: session(x), args.iters)
    to_nhwc = wall_ms(lambda: x.contiguous(memory_format=torch.channels_last), args.iters)
    ours, ours_prims, partitions_ms, partitions = torchscript_conv_times(scripted, x, args.iters)
    theirs, _, _ = ort_conv_times(fused, x, args.threads, args.iters)

    ours_kind = by_kind({k: v[0] for k, v in ours.items()})
    ort_kind = by_kind(theirs)
    ours_kind[KINDS[2]] = ours_wall - sum(ours_kind.values())
    ort_kind[KINDS[2]] = ort_wall - sum(ort_kind.values())
    print(f"\n{args.model}@{res}, batch {args.batch}, {args.threads} thread(s); ms per call")
    print(f"torchscript: {ours_wall:.1f} ms by wall clock ({args.batch / ours_wall * 1e3:.1f} img/s), oneDNN "
          f"primitives {ours_prims:.1f} ms | ONNX Runtime: {ort_wall:.1f} ms ({args.batch / ort_wall * 1e3:.1f} "
          f"img/s) | input NCHW -> channels-last copy: {to_nhwc:.2f} ms (in torchscript's 'other ops')\n")
    print(f"torchscript's 'other ops', part 1: oneDNN Graph's own time around its primitives "
          f"{partitions_ms - ours_prims:.2f} ms ({partitions} partitions, {partitions_ms:.1f} ms in all, from the "
          "same log); part 2, outside the partitions: the torch.profiler table below\n")
    print("| kind | torchscript ms | ONNX Runtime ms | difference |\n|---|---|---|---|")
    for kind in KINDS:
        print(f"| {kind} | {ours_kind[kind]:.2f} | {ort_kind[kind]:.2f} | {ours_kind[kind] - ort_kind[kind]:+.2f} |")
    print(f"| whole call | {ours_wall:.2f} | {ort_wall:.2f} | {ours_wall - ort_wall:+.2f} |")

    outside = ops_outside_partitions(scripted, x, args.iters)
    print(f"\nOutside oneDNN Graph's partitions (torch.profiler self time, {sum(r[1] for r in outside):.2f} ms per "
          "call in all; `forward` is TorchScript's interpreter, `aten::copy_` includes the input copy):\n")
    print("| op | ms per call | calls per call |\n|---|---|---|")
    for name, ms, calls in outside[: args.top]:
        print(f"| {name} | {ms:.3f} | {calls} |")
    print("\n| input, weight | calls | oneDNN implementation | torchscript ms | ONNX Runtime ms |")
    print("|---|---|---|---|---|")
    for key, (ms, calls, impl) in sorted(ours.items(), key=lambda kv: -kv[1][0])[: args.top]:
        ort_ms = theirs.get(key)
        print(f"| {key} | {calls} | {impl} | {ms:.2f} | {'-' if ort_ms is None else f'{ort_ms:.2f}'} |")
    print("\n(ref_fused_convolution rows are a 1x1 convolution with the following depthwise one fused into the same "
          "primitive; ONNX Runtime's column shows its 1x1 convolution alone.)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
