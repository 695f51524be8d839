"""Our best CPU path (``vitzoo.deploy``: eager, torchscript; optionally compile) vs ONNX Runtime fp32 of the same model.

The ONNX Runtime side is ``deploy(model, backend="onnxruntime")``: the fused model exported at opset 17 and run in a
CPU session with ``intra_op_num_threads`` = torch threads and all graph optimisations on. Each runner is timed in
its own process (``_isolated.py``; ``--no-isolate`` times them all in this process).

"eager" is ``deploy()``'s default, which on CPUs with AMX runs convolutions in split bf16 ("bf16x3",
``vitzoo.amx_gemm``, ~1e-5 relative error per product); "eager ieee" is ``deploy(fp32_precision="ieee")``. Both
the best path and the best IEEE fp32 path are compared with ONNX Runtime.

    python benchmarks/bench_cpu_vs_onnxruntime.py --rounds 7 --batch 16 --threads 1 2
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timm  # noqa: E402
import torch  # noqa: E402

import vitzoo  # noqa: E402,F401
from _common import base_parser, inference, print_machine, print_table, randomize_norm_stats, timed  # noqa: E402
from _isolated import measure_isolated  # noqa: E402
from vitzoo.inference import deploy  # noqa: E402

CASES = {"shvit_s1": 224, "shvit_s4": 256, "deit_tiny_patch16_224": 224}


IEEE_EAGER = "eager ieee"


def build_runner(backend: str, name: str, batch: int, threads: int):
    """``deploy(model, backend=backend)`` on a batch (also called in the isolated worker processes);
    ``IEEE_EAGER`` is the eager backend with ``fp32_precision="ieee"``."""
    torch.set_num_threads(threads)
    res = CASES[name]
    model = randomize_norm_stats(timm.create_model(name))
    x = torch.randn(batch, 3, res, res, generator=torch.Generator().manual_seed(1))
    # the PyTorch backends are deployed on the timed batch (see bench_example_batch.py for why that matters);
    # ONNX Runtime is exported at batch 1 (dynamic batch)
    if backend == IEEE_EAGER:
        return inference(deploy(model, x, fp32_precision="ieee"), x)
    return inference(deploy(model, x[:1] if backend == "onnxruntime" else x, backend=backend), x)


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["shvit_s1", "shvit_s4"], choices=list(CASES))
    parser.add_argument("--compile", action="store_true", help="also time backend='compile' (slow to build)")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="time all runners in this process instead of one process each")
    args = parser.parse_args()
    print_machine(args.threads)
    rows, ratios = [], []
    backends = ["eager", IEEE_EAGER, "torchscript", "onnxruntime"] + (["compile"] if args.compile else [])
    for name in args.models:
        res = CASES[name]
        for threads in args.threads:
            desc = f"{name}@{res} {threads}t"
            if args.isolate:
                t = measure_isolated({b: (build_runner, (b, name, args.batch, threads)) for b in backends},
                                     args.batch, rounds=args.rounds, min_time=args.min_time, desc=desc)
            else:
                t = timed({b: build_runner(b, name, args.batch, threads) for b in backends},
                          args.batch, args.rounds, args.min_time, desc)
            ort = t["onnxruntime"].throughput
            best = max((k for k in backends if k != "onnxruntime"), key=lambda k: t[k].throughput)
            best_ieee = max((k for k in backends if k not in ("onnxruntime", "eager")), key=lambda k: t[k].throughput)
            ratio = t[best].throughput / ort
            ratios.append(ratio)
            rows.append([f"{name}@{res}", threads, t["eager"].throughput, t[IEEE_EAGER].throughput,
                         t["torchscript"].throughput, t["compile"].throughput if "compile" in t else "not run",
                         ort, best, f"{ratio:.2f}x", best_ieee, f"{t[best_ieee].throughput / ort:.2f}x"])
    print_table(["model", "threads", "eager img/s", "eager ieee img/s", "torchscript img/s", "compile img/s",
                 "ORT img/s", "best torch path", "best / ORT", "best IEEE path", "best IEEE / ORT"], rows,
                title=f"best PyTorch CPU path vs ONNX Runtime fp32 (batch {args.batch}, median of {args.rounds} "
                      f"rounds, {'one process per runner' if args.isolate else 'one process'})")
    print(f"\nratios: {', '.join(f'{r:.2f}x' for r in ratios)} (goal >= 1.0x: "
          f"{'met' if ratios and min(ratios) >= 1.0 else 'NOT met'} for all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
