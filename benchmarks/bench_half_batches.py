"""One batch on N OpenMP threads vs N slices of it, each on its own Python thread with one OpenMP thread.

At batch 1 ``deploy()``'s SHViT-S1 takes a third of its batch-16 time: a fixed part of every call is Python,
dispatch, OpenMP start-up and weight reads, during which the other threads of the team wait. Running slices of
the batch on separate Python threads (torch ops and the ctypes kernels release the GIL) could overlap one slice's
fixed part with another's compute. Both variants run in this process in paired rounds (the order flips every
round); the ratio is the median over rounds of time(one batch) / time(slices): > 1 where the slices are faster.
The slices' deployed model is built for the slice at one thread; the outputs of both are checked to agree.

    OMP_NUM_THREADS=2 python benchmarks/bench_half_batches.py --threads 2 --rounds 8
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timm  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import vitzoo  # noqa: E402,F401
from _common import positive_int, print_machine, print_table, randomize_norm_stats  # noqa: E402
from vitzoo.inference import deploy  # noqa: E402

CASES = {"shvit_s1": 224, "shvit_s4": 256}


def variants(model: torch.nn.Module, x: torch.Tensor, threads: int,
             pool: ThreadPoolExecutor) -> Dict[str, Callable[[], torch.Tensor]]:
    """``{"one batch": run, "slices": run}``, each running all of ``x`` once and returning the output."""
    if x.shape[0] % threads:
        raise ValueError(f"batch {x.shape[0]} does not split into {threads} equal slices")
    torch.set_num_threads(threads)
    whole = deploy(model, x)
    slices = list(x.chunk(threads))
    torch.set_num_threads(1)
    part = deploy(model, slices[0])

    def one_batch() -> torch.Tensor:
        torch.set_num_threads(threads)
        return whole(x)

    def sliced() -> torch.Tensor:
        torch.set_num_threads(1)  # the Python threads take torch's setting at their first op
        return torch.cat(list(pool.map(part, slices)))
    return {"one batch": one_batch, "slices": sliced}


def paired(runs: Dict[str, Callable[[], torch.Tensor]], rounds: int, calls: int, desc: str) -> Dict[str, float]:
    """Median seconds per call of each variant, and the median of the per-round ratios."""
    times: Dict[str, List[float]] = {key: [] for key in runs}
    with torch.inference_mode():
        outputs = [run() for run in runs.values()]
        torch.testing.assert_close(outputs[1], outputs[0], atol=1e-4, rtol=0)
        for r in tqdm(range(rounds), desc=desc, leave=False):
            for key in (list(runs) if r % 2 else list(runs)[::-1]):
                start = time.perf_counter()
                for _ in range(calls):
                    runs[key]()
                times[key].append((time.perf_counter() - start) / calls)
    ratio = statistics.median(a / b for a, b in zip(times["one batch"], times["slices"]))
    return {"one batch": statistics.median(times["one batch"]), "slices": statistics.median(times["slices"]),
            "ratio": ratio}


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", nargs="+", type=positive_int, default=[2])
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--rounds", type=positive_int, default=8)
    parser.add_argument("--calls", type=positive_int, default=10, help="calls per variant per round")
    args = parser.parse_args()
    print_machine(args.threads)
    caller_threads = torch.get_num_threads()
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = randomize_norm_stats(timm.create_model(name))
        x = torch.randn(args.batch, 3, CASES[name], CASES[name], generator=torch.Generator().manual_seed(1))
        for threads in args.threads:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                result = paired(variants(model, x, threads, pool), args.rounds, args.calls, f"{name} {threads}t")
            rows.append([f"{name}@{CASES[name]}", threads, f"{result['one batch'] * 1e3:.2f}",
                         f"{result['slices'] * 1e3:.2f}", f"{result['ratio']:.3f}x"])
    torch.set_num_threads(caller_threads)
    print_table(["model", "threads", "one batch ms", f"{'/'.join(map(str, args.threads))} slices ms",
                 "slices speed-up (median of paired rounds)"], rows,
                title=f"deploy(): batch {args.batch} on N OpenMP threads vs N slices on N Python threads "
                      f"({args.rounds} paired rounds of {args.calls} calls, one process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
