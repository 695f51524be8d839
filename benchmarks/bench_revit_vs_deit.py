"""ReViT-T/S vs the DeiT of similar accuracy (DeiT-T, DeiT-S): measured speedup next to the FLOP ratio.

Both sides run ``vitzoo.deploy`` with the same backend (``--backends``, default the eager one) and its default
precision (the eager backend's split bf16 "bf16x3" on CPUs with AMX, IEEE fp32 elsewhere and on the other backends;
the "precision" column says which), deployed on the timed batch, random weights (speed does not depend on values).
NViT-B/H/S/T are left out: their per-block dimensions come from a checkpoint, so they cannot be built without one.
Each model is timed in its own process (``_isolated.py``; ``--no-isolate`` times both in this process).

    python benchmarks/bench_revit_vs_deit.py --rounds 5 --batch 8 --threads 1 2
    python benchmarks/bench_revit_vs_deit.py --rounds 5 --batch 8 --threads 1 2 --backends eager onnxruntime
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timm  # noqa: E402
import torch  # noqa: E402

import vitzoo  # noqa: E402,F401
from _common import base_parser, inference, print_machine, print_table, timed  # noqa: E402
from _isolated import measure_isolated  # noqa: E402
from vitzoo.inference import BACKENDS, deploy  # noqa: E402
from vitzoo.flops import count_flops  # noqa: E402

PAIRS = (("revit_t", "deit_tiny_patch16_224"), ("revit_s", "deit_small_patch16_224"))


def build_runner(name: str, batch: int, threads: int, backend: str = "eager"):
    """:func:`deployed` as a runner (also called in the workers)."""
    return inference(*deployed(name, batch, threads, backend))


def deployed(name: str, batch: int, threads: int, backend: str = "eager"):
    """``deploy(model, x, backend=...)`` at ``threads`` threads on the timed batch ``x`` (the serving batch, as
    docs/deploy.md advises); (deployed model, x)."""
    torch.set_num_threads(threads)
    model = timm.create_model(name).eval()
    x = torch.randn(batch, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(1))
    return deploy(model, x, backend=backend), x


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0], batch=8, rounds=5)
    parser.add_argument("--pairs", nargs="+", default=[p[0] for p in PAIRS], choices=[p[0] for p in PAIRS])
    parser.add_argument("--backends", nargs="+", default=["eager"], choices=list(BACKENDS),
                        help="deploy() backends; both models of a pair run on the same one")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="time both models in this process instead of one process each")
    args = parser.parse_args()
    print_machine(args.threads)
    rows = []
    for ours_name, deit_name in PAIRS:
        if ours_name not in args.pairs:
            continue
        if not timm.is_model(ours_name):
            print(f"skipping {ours_name}: not registered (nvit package missing)")
            continue
        flops = {n: count_flops(n).total for n in (ours_name, deit_name)}
        for backend in args.backends:
            for threads in args.threads:
                desc = f"{ours_name} vs {deit_name} {backend} {threads}t"
                names = (ours_name, deit_name)
                if args.isolate:
                    t = measure_isolated({n: (build_runner, (n, args.batch, threads, backend)) for n in names},
                                         args.batch, rounds=args.rounds, min_time=args.min_time, desc=desc)
                else:
                    t = timed({n: build_runner(n, args.batch, threads, backend) for n in names},
                              args.batch, args.rounds, args.min_time, desc)
                speedup = t[ours_name].throughput / t[deit_name].throughput
                previous = torch.get_num_threads()
                try:
                    precision = " / ".join(deployed(n, args.batch, threads, backend)[0].fp32_precision for n in names)
                finally:
                    torch.set_num_threads(previous)
                rows.append([ours_name, deit_name, backend, precision, threads, f"{flops[ours_name] / 1e9:.2f}",
                             f"{flops[deit_name] / 1e9:.2f}", f"{flops[deit_name] / flops[ours_name]:.2f}x",
                             t[ours_name].throughput, t[deit_name].throughput, f"{speedup:.2f}x"])
    print_table(["ours", "DeiT", "backend", "precision (ours / DeiT)", "threads", "ours GMACs", "DeiT GMACs",
                 "FLOP ratio (DeiT/ours)", "ours img/s", "DeiT img/s", "measured speedup"], rows,
                title=f"ReViT vs DeiT (batch {args.batch}, median of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
