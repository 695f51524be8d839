"""Interleaved timing with every runner in its own process (the default of the ratio benchmarks; ``--no-isolate``,
where a script offers it, times them all in one process).

Timing several runtimes in one process lets them disturb each other: PyTorch's and ONNX Runtime's thread pools, the
allocator's state, and whichever model ran last all change the next runner's speed (on the 2-vCPU machine of
``docs/benchmarks.md``, timm's SHViT-S4 at 2 threads measured 44-58 img/s in-process and 69-78 img/s isolated).
Here each runner is built in a fresh ``spawn``-ed worker process, and the parent runs the same protocol as
``vitzoo.speed.measure``:
warm-up and calibration, then ``rounds`` round-robin rounds, median over rounds. Only one worker runs at a time;
the others wait blocked on their pipe. A worker reports its time only once its own process is idle again
(``vitzoo.speed.wait_until_idle``), so the next worker never starts while the previous one's thread pool is still
spinning (ONNX Runtime spins ~40 ms after a 2-thread call; ``bench_spin_interference.py``).

A runner is described by a *builder*: a module-level function (picklable by reference) called in the worker as
``builder(*args)``; it must set the thread count itself and return a zero-argument callable that runs one batch.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import time
from typing import Callable, Dict, Hashable, Tuple

from tqdm.auto import tqdm

from vitzoo.speed import Timing, wait_until_idle

__all__ = ["measure_isolated"]

Builder = Tuple[Callable[..., Callable[[], object]], tuple]


def _worker(conn, builder: Callable[..., Callable[[], object]], args: tuple, warmup: int, settle: bool) -> None:
    try:
        run = builder(*args)
        for _ in range(warmup):
            run()
        if settle:
            wait_until_idle()
        conn.send(("ready", None))
        while True:
            calls = conn.recv()
            if calls is None:
                return
            start = time.perf_counter()
            for _ in range(calls):
                run()
            seconds = (time.perf_counter() - start) / calls
            if settle:  # answer only once this process's threads have stopped spinning
                wait_until_idle()
            conn.send(("time", seconds))
    except BaseException as e:  # report to the parent instead of dying silently
        conn.send(("error", f"{type(e).__name__}: {e}"))


def _receive(conn, key: Hashable, kind: str, process):
    try:
        status, value = conn.recv()
    except EOFError:  # the worker's end closed without a report: it crashed (segfault, OOM killer, os._exit)
        process.join(timeout=5)
        raise RuntimeError(f"benchmark worker {key!r} died without reporting (exit code {process.exitcode}; "
                           "a crash in a native library or the out-of-memory killer)") from None
    if status == "error":
        raise RuntimeError(f"benchmark worker {key!r} failed: {value}")
    assert status == kind, (status, kind)
    return value


def measure_isolated(builders: Dict[Hashable, Builder], batch_size: int, *, rounds: int = 5, warmup: int = 2,
                     min_time: float = 0.25, max_calls: int = 50, desc: str = "measuring",
                     settle: bool = True) -> Dict[Hashable, Timing]:
    """Time each runner in its own process over interleaved rounds (same protocol as ``vitzoo.speed.measure``).

    Args:
        builders: Key -> ``(builder, args)``; the worker calls ``builder(*args)`` to get its runner.
        batch_size: Images per call, for the img/s figures.
        rounds: Timed rounds; each runner is timed once per round, in turn.
        warmup: Calls per runner before the first round, the last of which calibrates how many calls a round
            makes (as in ``vitzoo.speed.measure``): ``warmup=2`` is one untimed call, then the calibration call.
        min_time: Minimum seconds per timing; fast runners get several calls per round.
        max_calls: Upper bound on calls per round.
        desc: Progress-bar label.
        settle: Workers wait until their process is idle before reporting a time (``False``: the old protocol,
            for ``bench_spin_interference.py`` only).

    Returns:
        Key -> :class:`vitzoo.speed.Timing`, in the order of ``builders``.
    """
    if rounds < 1 or batch_size < 1 or warmup < 1:
        raise ValueError(f"rounds, batch_size and warmup must be >= 1, got {rounds}, {batch_size}, {warmup}")
    ctx = mp.get_context("spawn")
    workers = {}
    timings: Dict[Hashable, Timing] = {}
    try:
        with tqdm(total=len(builders) * (1 + rounds), desc=desc, unit="step", leave=False) as bar:
            for key, (builder, args) in builders.items():  # built one after another: no overlap while warming up
                bar.set_postfix_str(f"build + warm-up {key}")
                parent, child = ctx.Pipe()
                process = ctx.Process(target=_worker, args=(child, builder, args, warmup - 1, settle), daemon=True)
                process.start()
                child.close()  # only the worker holds its end now, so a worker that dies is an EOF here, not a hang
                workers[key] = (parent, process)
                _receive(parent, key, "ready", process)
                parent.send(1)
                once = _receive(parent, key, "time", process)
                calls = max(1, min(max_calls, math.ceil(min_time / max(once, 1e-9))))
                timings[key] = Timing(batch_size=batch_size, calls=calls)
                bar.update(1)
            for r in range(rounds):
                for key, (parent, process) in workers.items():
                    bar.set_postfix_str(f"round {r + 1}/{rounds} {key}")
                    parent.send(timings[key].calls)
                    timings[key].seconds_per_call.append(_receive(parent, key, "time", process))
                    bar.update(1)
    finally:
        for parent, process in workers.values():
            try:
                parent.send(None)
            except (BrokenPipeError, OSError):
                pass
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return timings
