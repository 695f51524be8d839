"""How much a runtime's spinning thread pool slows the runner timed right after it, with and without settling.

After a call returns, ONNX Runtime's (and, briefly, PyTorch's OpenMP) worker threads keep spinning, waiting for
more work. The interleaved benchmarks time runners back to back, so without a pause the next runner shares the
cores with that spin. This script shows both halves of the effect:

1. CPU time each runtime burns in the 0.5 s after a call returns (``getrusage`` while the calling thread sleeps);
2. the same runner (``vitzoo.deploy`` eager) timed three times per round in the order ``A, ONNX Runtime, B, C``:
   B runs right after ONNX Runtime, A and C right after another eager runner. ``B / mean(A, C)`` below 1 is the
   slowdown caused by the spin.
   Measured with the old protocol (``settle=False``) and with the current one (each worker reports its time
   only once its process is idle, ``vitzoo.speed.wait_until_idle``).

    OMP_NUM_THREADS=2 python benchmarks/bench_spin_interference.py --rounds 7 --threads 1 2
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timm  # noqa: E402
import torch  # noqa: E402

import vitzoo  # noqa: E402,F401
from _common import base_parser, inference, print_machine, print_table, randomize_norm_stats  # noqa: E402
from _isolated import measure_isolated  # noqa: E402
from vitzoo.inference import deploy  # noqa: E402
from vitzoo.speed import process_cpu_seconds  # noqa: E402

MODEL, RES = "shvit_s1", 224
ORDER = ("A", "ONNX Runtime", "B (after ORT)", "C (after B)")


def build_runner(key: str, batch: int, threads: int):
    """The ONNX Runtime runner for ``"ONNX Runtime"``, else ``deploy()`` eager (called in the worker)."""
    torch.set_num_threads(threads)
    model = randomize_norm_stats(timm.create_model(MODEL))
    x = torch.randn(batch, 3, RES, RES, generator=torch.Generator().manual_seed(1))
    if key == "ONNX Runtime":
        return inference(deploy(model, x[:1], backend="onnxruntime"), x)
    return inference(deploy(model, x), x)


def cpu_after_call(run, seconds: float = 0.5) -> float:
    """Milliseconds of this process's CPU time used in the ``seconds`` after ``run()`` returns, while idle."""
    run()
    before = process_cpu_seconds()
    time.sleep(seconds)
    return 1e3 * (process_cpu_seconds() - before)


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    print_machine(args.threads)
    spin_rows, rows = [], []
    for threads in args.threads:
        runners = {key: build_runner(key, args.batch, threads) for key in ("eager", "ONNX Runtime")}
        for key, run in runners.items():
            for _ in range(3):
                run()
            spin_rows.append([key, threads, f"{cpu_after_call(run):.1f}"])
        del runners
        for settle in (False, True):
            t = measure_isolated({key: (build_runner, (key, args.batch, threads)) for key in ORDER}, args.batch,
                                 rounds=args.rounds, min_time=args.min_time, settle=settle,
                                 desc=f"{threads}t settle={settle}")
            a, b, c = (t[key].throughput for key in (ORDER[0], ORDER[2], ORDER[3]))
            rows.append([threads, "idle before each report" if settle else "back to back (old)",
                         a, t[ORDER[1]].throughput, b, c, f"{2 * b / (a + c):.3f}"])
    print_table(["runtime", "threads", "CPU ms in the 0.5 s after a call"], spin_rows,
                title="CPU used by a runtime's threads after a call returns")
    print_table(["threads", "protocol", "A img/s", "ORT img/s", "B (after ORT) img/s", "C (after B) img/s",
                 "B / mean(A, C)"], rows,
                title=f"{MODEL}@{RES} deploy() eager timed 3x per round (batch {args.batch}, median of {args.rounds} "
                      "rounds, one process per runner)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
