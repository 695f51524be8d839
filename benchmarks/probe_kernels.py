"""Single-kernel probes behind the remarks in docs/benchmarks.md (sections 1-2): one layer shape at a time, one
thread, hot caches, best of several timed loops. Not a ratio benchmark of models: it says what one kernel does on
this CPU, in isolation.

* ``linear``: SHViT-S1's 1x1 convolutions as matrix products (rows = batch x H x W): oneDNN's pre-packed linear
  (what ``deploy()``'s eager path runs), MKL's ``addmm`` and MKL's packed sgemm; GMAC/s of each.
* ``precision``: the 784 x 448 @ 448 x 224 product in fp32, with oneDNN's bf16 math mode
  (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``, AMX where the CPU has it), and as a three-pass bf16
  split (hi x hi + hi x lo + lo x hi, fp32 accumulation); time and max error against float64.
* ``amx``: the same 1x1 products and SHViT-S1's dense stem convolutions (after the first) with oneDNN's fp32 kernels
  and with vitzoo's bf16x3 AMX kernel (``vitzoo.amx_gemm``, what ``deploy()`` runs by default on CPUs with AMX):
  time, speed-up and max error against float64 of each.
* ``depthwise``: SHViT's depthwise 3x3 convolutions (channels-last, pre-packed) with and without the residual add
  fused into the kernel, and with the add run separately.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_kernels.py
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _common import positive_int, print_machine, wall_ms  # noqa: E402

# (rows, in, out) of SHViT-S1's 1x1 convolutions at batch 16
LINEAR_SHAPES = [(16 * 49, 448, 224), (16 * 49, 224, 448), (16 * 16, 640, 320), (16 * 16, 320, 640),
                 (16 * 196, 256, 128), (16 * 196, 128, 256), (16 * 196, 128, 512), (16 * 49, 224, 224),
                 (16 * 16, 320, 320)]
# (batch, channels, side) of SHViT-S1's depthwise convolutions
DEPTHWISE_SHAPES = [(16, 224, 7), (16, 320, 4), (16, 128, 14), (16, 512, 14), (16, 896, 7)]


def best_ms(fn: Callable[[], object], calls: int = 100) -> float:
    return wall_ms(fn, calls, rounds=5, warmup=10)


def probe_linear() -> List[str]:
    lines = ["| rows x in x out | oneDNN packed linear ms (GMAC/s) | MKL addmm ms (GMAC/s) "
             "| MKL packed sgemm ms (GMAC/s) |", "|---|---|---|---|"]
    for rows, k, n in LINEAR_SHAPES:
        x, w, b = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
        cells = [best_ms(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")),
                 best_ms(lambda: torch.addmm(b, x, w.t()))]
        try:
            mkl = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
            cells.append(best_ms(lambda: torch.ops.mkl._mkl_linear(x, mkl, w, b, rows)))
        except (RuntimeError, AttributeError):  # torch built without MKL's packed sgemm
            cells.append(float("nan"))
        macs = rows * k * n
        row = " | ".join(f"{ms:.3f} ({macs / ms / 1e6:.0f})" for ms in cells)
        lines.append(f"| {rows} x {k} x {n} | {row} |")
    return lines


def probe_precision() -> List[str]:
    rows, k, n = 16 * 49, 448, 224
    x, w, b = torch.randn(rows, k), torch.randn(n, k) / k ** 0.5, torch.randn(n)
    exact = x.double() @ w.double().t() + b.double()
    packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
    w_hi = w.bfloat16().float()
    w_lo = w - w_hi

    def split() -> torch.Tensor:
        x_hi = x.bfloat16().float()
        return torch.addmm(torch.addmm(torch.addmm(b, x_hi, w_hi.t()), x_hi, w_lo.t()), x - x_hi, w_hi.t())

    lines = ["| 784 x 448 @ 448 x 224 | ms | max abs error vs float64 |", "|---|---|---|"]
    previous = torch.backends.mkldnn.matmul.fp32_precision
    try:
        for mode in ("none", "bf16"):
            torch.backends.mkldnn.matmul.fp32_precision = mode
            run = (lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""))
            error = (run().double() - exact).abs().max().item()
            lines.append(f"| oneDNN linear, fp32_precision={mode!r} | {best_ms(run):.3f} | {error:.1e} |")
        error = (split().double() - exact).abs().max().item()
        lines.append(f"| three-pass bf16 split (fp32_precision='bf16') | {best_ms(split):.3f} | {error:.1e} |")
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = previous
    return lines


# (batch, in, side, out) of SHViT-S1's 3x3 stride-2 stem convolutions that the AMX kernel takes (16+ channels)
STEM_SHAPES = [(16, 16, 112, 32), (16, 32, 56, 64), (16, 64, 28, 128)]


def probe_amx() -> List[str]:
    import torch.nn.functional as F

    from vitzoo import amx_gemm

    if amx_gemm.load() is None:
        return [f"(skipped: {amx_gemm.unavailable_reason()})"]
    lines = ["| layer | oneDNN fp32 ms (GMAC/s) | AMX bf16x3 ms (GMAC/s) | speed-up | max error fp32 / bf16x3 |",
             "|---|---|---|---|---|"]

    def row(name: str, macs: float, exact: torch.Tensor, fp32: Callable[[], torch.Tensor],
            amx: Callable[[], torch.Tensor]) -> str:
        errors = [(f().double() - exact).abs().max().item() for f in (fp32, amx)]
        t32, t3 = best_ms(fp32, calls=50), best_ms(amx, calls=50)
        return (f"| {name} | {t32:.3f} ({macs / t32 / 1e6:.0f}) | {t3:.3f} ({macs / t3 / 1e6:.0f}) | "
                f"{t32 / t3:.2f}x | {errors[0]:.1e} / {errors[1]:.1e} |")

    for rows, k, n in LINEAR_SHAPES:
        x, w, b = torch.randn(rows, k), torch.randn(n, k) / k ** 0.5, torch.randn(n)
        exact = x.double() @ w.double().t() + b.double()
        packed, split = torch.ops.mkldnn._reorder_linear_weight(w, rows), amx_gemm.pack_weight(w)
        lines.append(row(f"1x1: {rows} x {k} x {n}", rows * k * n, exact,
                         lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""),
                         lambda: amx_gemm.amx_linear(x, split, n, b)))
    for batch, cin, side, cout in STEM_SHAPES:
        x = torch.randn(batch, cin, side, side).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(cout, cin, 3, 3) / (9 * cin) ** 0.5, torch.randn(cout)
        exact = F.conv2d(x.double(), w.double(), b.double(), 2, 1)
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), [1, 1], [2, 2], [1, 1], 1, list(x.shape))
        split = amx_gemm.pack_conv_weight(w)
        macs = exact.numel() * cin * 9
        lines.append(row(f"3x3/2 conv: {batch}x{cin}x{side}x{side} -> {cout}", macs, exact,
                         lambda: torch.ops.mkldnn._convolution_pointwise(x, packed, b, [1, 1], [2, 2], [1, 1], 1,
                                                                         "none", [], ""),
                         lambda: amx_gemm.amx_conv2d(x, split, cout, (3, 3), (2, 2), (1, 1), (1, 1), b)))
    return lines


def probe_depthwise() -> List[str]:
    lines = ["| input (channels-last) | conv us | conv + fused add us | conv, then add_ us |", "|---|---|---|---|"]
    for batch, channels, side in DEPTHWISE_SHAPES:
        x = torch.randn(batch, channels, side, side).contiguous(memory_format=torch.channels_last)
        weight, bias = torch.randn(channels, 1, 3, 3), torch.randn(channels)
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.to_mkldnn(), [1, 1], [1, 1], [1, 1], channels, list(x.shape))
        args = ([1, 1], [1, 1], [1, 1], channels)

        def conv() -> torch.Tensor:
            return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, *args, "none", [], "")

        def fused() -> torch.Tensor:
            return torch.ops.mkldnn._convolution_pointwise.binary(x, x, packed, bias, *args, "add", None, None,
                                                                  [], None)

        times = [best_ms(f, calls=300) * 1e3 for f in (conv, fused, lambda: conv().add_(x))]
        lines.append(f"| {batch}x{channels}x{side}x{side} | " + " | ".join(f"{t:.0f}" for t in times) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--probes", nargs="+", default=["linear", "precision", "amx", "depthwise"],
                        choices=["linear", "precision", "amx", "depthwise"])
    parser.add_argument("--threads", type=positive_int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_machine([args.threads])
    probes = {"linear": probe_linear, "precision": probe_precision, "amx": probe_amx, "depthwise": probe_depthwise}
    with torch.inference_mode():
        for name in args.probes:
            print(f"\n### {name} ({args.threads} thread{'s' if args.threads > 1 else ''})")
            print("\n".join(probes[name]()))


if __name__ == "__main__":
    main()
