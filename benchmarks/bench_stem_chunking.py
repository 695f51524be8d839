"""What running the stem on batch slices buys ``deploy(backend="torchscript")`` (``vitzoo.stem_chunking``).

Two variants of the same deployed model, each timed in its own process (``_isolated.py``): the stem run on the whole
batch ("unsliced") and on slices of ``vitzoo.stem_chunking.stem_chunk_size`` images (what ``deploy()`` does).
SHViT, and the timm models whose stems :func:`vitzoo.stem_chunking.find_stem` also picks up (EfficientViT-M,
FastViT), so that the rule is checked on every model it applies to in ``vitzoo compare``'s default set.

    python benchmarks/bench_stem_chunking.py --rounds 7 --threads 1 2
    python benchmarks/bench_stem_chunking.py --rounds 7 --threads 1 --models shvit_s1 --budgets 0.5 2 4 8

With ``--budgets`` it compares slice budgets (MiB of the stem's largest activation per slice) instead: the same
deployed model with ``vitzoo.stem_chunking.CHUNK_BUDGET_BYTES`` replaced, one process per budget.
"""
from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from typing import Optional
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timm  # noqa: E402
import torch  # noqa: E402

import vitzoo  # noqa: E402,F401
from _common import base_parser, inference, print_machine, print_table, randomize_norm_stats  # noqa: E402
from _isolated import measure_isolated  # noqa: E402
from vitzoo import inference as vi  # noqa: E402

CASES = {"shvit_s1": 224, "shvit_s4": 256, "efficientvit_m5": 224, "fastvit_t8": 256}
VARIANTS = ("unsliced", "sliced")


def build_deployed(variant: str, model: torch.nn.Module, x: torch.Tensor) -> vi.DeployedModel:
    """``deploy(model, x, backend="torchscript")``, with the stem slicing switched off for ``"unsliced"``."""
    with ExitStack() as stack:
        if variant == "unsliced":
            stack.enter_context(mock.patch.object(vi, "chunk_stem", lambda model, example: None))
        return vi.deploy(model, x, backend="torchscript")


def build_runner(variant: str, name: str, batch: int, threads: int):
    """The runner of one variant (called in the isolated worker processes)."""
    torch.set_num_threads(threads)
    model = randomize_norm_stats(timm.create_model(name))
    x = torch.randn(batch, 3, CASES[name], CASES[name], generator=torch.Generator().manual_seed(1))
    return inference(build_deployed(variant, model, x), x)


def build_budget_runner(budget_mib: float, name: str, batch: int, threads: int):
    """The runner of ``deploy(backend="torchscript")`` with a stem-slice budget of ``budget_mib`` MiB."""
    from vitzoo import stem_chunking

    budget = int(budget_mib * 2 ** 20)
    with mock.patch.object(vi, "chunk_stem", lambda model, example: stem_chunking.chunk_stem(model, example, budget)):
        return build_runner("sliced", name, batch, threads)


def slice_size(name: str, budget: Optional[int] = None) -> int:
    """The slice ``deploy()`` picks for ``name`` with ``budget`` bytes (None: the default budget); 0: no slicing."""
    from timm.utils import reparameterize_model

    from vitzoo.stem_chunking import find_stem, stem_chunk_size

    model = reparameterize_model(timm.create_model(name).eval())
    found = find_stem(model)
    res = CASES[name]
    sample = torch.zeros(1, 3, res, res)
    return (stem_chunk_size(found[1], sample, *([] if budget is None else [budget])) or 0) if found else 0


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--budgets", nargs="+", type=float, default=None, metavar="MIB",
                        help="compare these slice budgets (MiB) instead of sliced vs unsliced")
    args = parser.parse_args()
    if args.budgets and min(args.budgets) <= 0:
        parser.error(f"--budgets must be positive MiB, got {min(args.budgets):g}")
    print_machine(args.threads)
    if args.budgets:
        return compare_budgets(args)
    rows = []
    for name in args.models:
        for threads in args.threads:
            t = measure_isolated({v: (build_runner, (v, name, args.batch, threads)) for v in VARIANTS}, args.batch,
                                 rounds=args.rounds, min_time=args.min_time, desc=f"{name} {threads}t")
            unsliced, sliced = t["unsliced"].throughput, t["sliced"].throughput
            rows.append([f"{name}@{CASES[name]}", threads, slice_size(name), f"{unsliced:.1f}", f"{sliced:.1f}",
                         f"**{sliced / unsliced:.2f}x**"])
    print_table(["model", "threads", "images per slice", "unsliced img/s", "sliced img/s", "sliced / unsliced"],
                rows, title=f"deploy(backend='torchscript'): stem on batch slices (batch {args.batch}, median of "
                            f"{args.rounds} rounds, one process per variant)")
    return 0


def compare_budgets(args) -> int:
    rows = []
    for name in args.models:
        for threads in args.threads:
            t = measure_isolated({b: (build_budget_runner, (b, name, args.batch, threads)) for b in args.budgets},
                                 args.batch, rounds=args.rounds, min_time=args.min_time, desc=f"{name} {threads}t")
            best = max(t.values(), key=lambda v: v.throughput).throughput
            for b, v in t.items():
                rows.append([f"{name}@{CASES[name]}", threads, f"{b:g}", slice_size(name, int(b * 2 ** 20)),
                             f"{v.throughput:.1f}", f"{v.throughput / best:.2f}x"])
    print_table(["model", "threads", "budget (MiB)", "images per slice", "img/s", "of the best"], rows,
                title=f"deploy(backend='torchscript'): stem slice budgets (batch {args.batch}, median of "
                      f"{args.rounds} rounds, one process per budget)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
