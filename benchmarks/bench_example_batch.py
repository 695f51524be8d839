"""Does the batch of ``deploy()``'s example input matter for later batched calls? (eager backend, SHViT)

``deploy(model)`` defaults to a batch-1 example; ``PackedConv2d`` then packs its weights again for the first
batch-16 call. Both variants below run batch 16, each in its own process (``_isolated.py``). With glibc's default
malloc settings the lazily packed weights end up between activation buffers, and freed activation buffers are
then handed back to the OS and faulted in again on every call: run the script once as is and once with
``MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=100000000000`` (inherited by the worker processes) to
separate that allocator effect from the packing itself.

    python benchmarks/bench_example_batch.py --rounds 9 --threads 1 2
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timm  # noqa: E402
import torch  # noqa: E402

import vitzoo  # noqa: E402,F401
from _common import base_parser, inference, print_machine, print_table, randomize_norm_stats  # noqa: E402
from _isolated import measure_isolated  # noqa: E402
from vitzoo.inference import deploy  # noqa: E402

CASES = {"shvit_s1": 224, "shvit_s4": 256}
VARIANTS = ("example batch = call batch", "example batch 1 (default)")


def build_runner(variant: str, name: str, batch: int, threads: int):
    torch.set_num_threads(threads)
    model = randomize_norm_stats(timm.create_model(name))
    x = torch.randn(batch, 3, CASES[name], CASES[name], generator=torch.Generator().manual_seed(1))
    return inference(deploy(model, x if variant == VARIANTS[0] else x[:1]), x)


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0], rounds=9)
    parser.add_argument("--models", nargs="+", default=["shvit_s1"], choices=list(CASES))
    args = parser.parse_args()
    print_machine(args.threads)
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"glibc malloc settings from the environment: {malloc or 'none (defaults)'}")
    rows = []
    for name in args.models:
        for threads in args.threads:
            t = measure_isolated({v: (build_runner, (v, name, args.batch, threads)) for v in VARIANTS}, args.batch,
                                 rounds=args.rounds, min_time=args.min_time, desc=f"{name} {threads}t")
            same, one = (t[v].throughput for v in VARIANTS)
            rows.append([f"{name}@{CASES[name]}", threads, same, one, f"{one / same:.2f}x"])
    print_table(["model", "threads", f"{VARIANTS[0]} img/s", f"{VARIANTS[1]} img/s", "batch-1 / same"], rows,
                title=f"deploy() example batch, eager backend, calls at batch {args.batch} "
                      f"(median of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
