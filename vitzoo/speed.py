"""Throughput and latency measurement: warm-up, then interleaved rounds, median over rounds.

Every runner (a model on one inference path) is timed once per round, round-robin, so that slow drifts of a
shared machine (other jobs, clock scaling, thermal limits) hit every runner alike; the median over rounds then
discards the outliers. The number of calls per round is calibrated from the warm-up so that each timing lasts at
least ``min_time`` seconds.

Runtimes keep their worker threads spinning for a while after a call returns (measured on a 2-vCPU machine:
ONNX Runtime ~40 ms of CPU after a 2-thread run, PyTorch's OpenMP pool ~8 ms). Timed back to back, that spin
would eat into the *next* runner's time. So every timed window starts only once this process is idle again
(:func:`wait_until_idle`); ``benchmarks/bench_spin_interference.py`` measures the effect.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, List, Optional

import torch
from tqdm.auto import tqdm

try:
    import resource
except ImportError:  # not on Windows
    resource = None

__all__ = ["Timing", "measure", "process_cpu_seconds", "synchronize", "wait_until_idle"]

IDLE_INTERVAL = 0.01   # seconds between two looks at the process's CPU time
IDLE_FRACTION = 0.1    # idle: less than this share of one core used during an interval
IDLE_MAX_WAIT = 1.0    # give up waiting after this many seconds


@dataclass
class Timing:
    """Timings of one runner.

    Attributes:
        batch_size: Images per call.
        calls: Calls per round.
        seconds_per_call: One entry per round (mean over that round's calls).
    """

    batch_size: int
    calls: int
    seconds_per_call: List[float] = field(default_factory=list)

    @property
    def latency_ms(self) -> float:
        """Median time of one call (one batch), in milliseconds."""
        return 1e3 * statistics.median(self.seconds_per_call)

    @property
    def throughput(self) -> float:
        """Images per second at the median call time: ``batch_size / latency``, so the two always agree (with an
        even number of rounds, a median of per-round img/s would average other rounds than the median time)."""
        return self.batch_size / statistics.median(self.seconds_per_call)

    @property
    def best_throughput(self) -> float:
        """Images per second of the fastest round."""
        return self.batch_size / min(self.seconds_per_call)


def synchronize(device: Optional[torch.device]) -> None:
    """Wait for queued kernels on ``device`` (a no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def process_cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by all threads of this process (Unix ``getrusage``)."""
    if resource is None:
        raise RuntimeError("process_cpu_seconds needs the Unix 'resource' module (not available on Windows).")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def wait_until_idle(max_wait: float = IDLE_MAX_WAIT, interval: float = IDLE_INTERVAL,
                    fraction: float = IDLE_FRACTION) -> float:
    """Sleep until no thread of this process is using the CPU (e.g. a runtime's pool spinning after a call).

    Looks at the process's CPU time (``getrusage``) every ``interval`` seconds while this thread sleeps, and
    returns once an interval used less than ``fraction`` of one core, or after ``max_wait`` seconds. Where
    ``getrusage`` does not exist (Windows) it sleeps ``10 * interval`` instead.

    Returns:
        The seconds waited.
    """
    start = time.perf_counter()
    if resource is None:
        time.sleep(10 * interval)
        return time.perf_counter() - start
    before = process_cpu_seconds()
    while time.perf_counter() - start < max_wait:
        time.sleep(interval)
        now = process_cpu_seconds()
        if now - before < fraction * interval:
            break
        before = now
    return time.perf_counter() - start


def _label(key: Hashable) -> str:
    return "/".join(map(str, key)) if isinstance(key, tuple) else str(key)


def _time_calls(fn: Callable[[], object], calls: int, device: Optional[torch.device]) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def measure(
    runners: Dict[Hashable, Callable[[], object]],
    batch_size: int,
    *,
    rounds: int = 5,
    warmup: int = 2,
    min_time: float = 0.25,
    max_calls: int = 50,
    device: Optional[torch.device] = None,
    progress: bool = True,
    desc: str = "measuring",
    settle: bool = True,
) -> Dict[Hashable, Timing]:
    """Time each runner over interleaved rounds; each timed window starts once the process is idle.

    Args:
        runners: Key -> zero-argument callable that runs one batch (inputs bound already).
        batch_size: Images per call, for the img/s figures.
        rounds: Timed rounds; each runner is timed once per round, in turn.
        warmup: Calls per runner before the first round; the last one, timed (once the process is idle when
            ``settle``), calibrates ``calls``.
        min_time: Minimum seconds per timing; fast runners get several calls per round.
        max_calls: Upper bound on calls per round.
        device: Synchronised around each timing when it is a CUDA device.
        progress: Show a progress bar (on stderr).
        desc: Progress-bar label.
        settle: Start each timed window only once the process is idle (:func:`wait_until_idle`).

    Returns:
        Key -> :class:`Timing`, in the order of ``runners``.

    Raises:
        ValueError: ``rounds``, ``batch_size`` or ``warmup`` out of range.
    """
    if rounds < 1 or batch_size < 1 or warmup < 1:
        raise ValueError(f"rounds, batch_size and warmup must be >= 1, got {rounds}, {batch_size}, {warmup}")
    timings: Dict[Hashable, Timing] = {}
    total = len(runners) * (1 + rounds)
    with tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False) as bar, torch.no_grad():
        for key, fn in runners.items():
            bar.set_postfix_str(f"warm-up {_label(key)}")
            for _ in range(warmup - 1):
                fn()
            if settle:  # the calibrating call is timed too: not in the spin of the call before (found by an audit)
                wait_until_idle()
            once = _time_calls(fn, 1, device)
            calls = max(1, min(max_calls, math.ceil(min_time / max(once, 1e-9))))
            timings[key] = Timing(batch_size=batch_size, calls=calls)
            bar.update(1)
        for r in range(rounds):
            for key, fn in runners.items():
                bar.set_postfix_str(f"round {r + 1}/{rounds} {_label(key)}")
                if settle:
                    wait_until_idle()
                timings[key].seconds_per_call.append(_time_calls(fn, timings[key].calls, device))
                bar.update(1)
    return timings
