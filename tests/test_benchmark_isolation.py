"""Timing protocol: benchmarks/_isolated.py (one process per runner) and the settling of vitzoo.speed."""
import functools
import os
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from _isolated import measure_isolated  # noqa: E402
from vitzoo.speed import measure, wait_until_idle  # noqa: E402


def test_times_each_runner_in_its_own_process():
    # builder(*args) = functools.partial(time.sleep, s): a runner whose true latency is known independently
    builders = {"short": (functools.partial, (time.sleep, 0.01)), "long": (functools.partial, (time.sleep, 0.03))}
    timings = measure_isolated(builders, batch_size=4, rounds=3, min_time=0.05)
    assert list(timings) == ["short", "long"]
    for key, seconds in (("short", 0.01), ("long", 0.03)):
        t = timings[key]
        assert len(t.seconds_per_call) == 3
        assert seconds <= min(t.seconds_per_call) < seconds + 0.02
        assert t.calls == pytest.approx(0.05 / seconds, abs=2)  # calibrated to min_time
        assert t.throughput == pytest.approx(4 / seconds, rel=0.5)
    # calls = ceil(min_time / once): the fewest calls that reach min_time, so one call fewer stays below it
    # (long: once ~0.0301 s -> 2 calls; one more would be 0.06 s for the first two)
    long = timings["long"]
    assert (long.calls - 1) * min(long.seconds_per_call) < 0.05


def test_builder_failure_is_reported_with_the_runner_name():
    with pytest.raises(RuntimeError, match=r"worker 'bad' failed: ValueError"):
        measure_isolated({"bad": (int, ("not a number",))}, batch_size=1, rounds=1)


def crashing_runner(calls_before_crash: int):
    """Builder of a runner that kills its process without a Python exception on call ``calls_before_crash + 1``
    (as a segfault in a native library or the out-of-memory killer would)."""
    made = []

    def run():
        if len(made) == calls_before_crash:
            os._exit(3)
        made.append(1)
    return run


@pytest.mark.timeout(120)
@pytest.mark.parametrize("calls_before_crash", [0, 2])  # while warming up, and in a timed round
def test_a_worker_that_dies_is_an_error_not_a_hang(calls_before_crash):
    """The parent kept its own copy of the worker's pipe end open, so a worker that died without reporting left
    it waiting for ever."""
    builders = {"fine": (functools.partial, (time.sleep, 0.001)), "crash": (crashing_runner, (calls_before_crash,))}
    with pytest.raises(RuntimeError, match=r"worker 'crash' died without reporting \(exit code 3"):
        measure_isolated(builders, batch_size=1, rounds=3, warmup=2, min_time=0.0, max_calls=1)


def counting_runner(log: str):
    def run():
        with open(log, "a") as f:
            f.write("call\n")
    return run


def test_warmup_counts_the_calibration_call(tmp_path):
    """As documented (and as vitzoo.speed.measure does): warmup=2 is one untimed call plus the calibration call."""
    log = tmp_path / "calls.log"
    measure_isolated({"r": (counting_runner, (str(log),))}, batch_size=1, rounds=1, warmup=2, min_time=0.0,
                     max_calls=1)
    assert log.read_text().count("call") == 2 + 1  # warm-up incl. calibration, then one round of one call


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"rounds, batch_size and warmup must be >= 1, got 0, 1, "):
        measure_isolated({}, batch_size=1, rounds=0)


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def spinning_runner(spin: float, log: str = ""):
    """Builder of a runner that returns at once but leaves a thread burning CPU for ``spin`` s (like ORT's pool).

    With ``log``, every call appends its wall-clock start time to that file.
    """
    def run():
        if log:
            with open(log, "a") as f:
                f.write(f"{time.time()}\n")
        threading.Thread(target=_spin, args=(spin,), daemon=True).start()
    return run


def test_wait_until_idle_waits_for_a_spinning_thread():
    start = time.perf_counter()
    waited = wait_until_idle()
    assert waited < 0.2 and time.perf_counter() - start < 0.3  # nothing spinning: back at once
    threading.Thread(target=_spin, args=(0.3,), daemon=True).start()
    waited = wait_until_idle()
    assert 0.25 <= waited < 0.6  # returns once the 0.3 s spin is over, not before


def test_wait_until_idle_gives_up_after_max_wait():
    threading.Thread(target=_spin, args=(0.5,), daemon=True).start()
    assert 0.15 <= wait_until_idle(max_wait=0.2) < 0.35
    wait_until_idle()  # leave no spinning thread to the next test


@pytest.mark.parametrize("settle", [True, False])
def test_workers_report_only_once_their_threads_are_idle(tmp_path, settle):
    # every call leaves 0.6 s of spinning behind; settled, the worker answers only after it, so the parent's next
    # request (and call) comes at least 0.6 s after the previous one; back to back, after a pipe round trip
    log = tmp_path / "calls.txt"
    measure_isolated({"spinner": (spinning_runner, (0.6, str(log)))}, batch_size=1, rounds=3, warmup=1,
                     min_time=0.0, max_calls=1, settle=settle)
    starts = [float(line) for line in log.read_text().split()]
    assert len(starts) == 4  # calibration (warmup=1 is that call), 3 rounds
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    if settle:
        assert min(gaps) >= 0.6
    else:
        assert max(gaps) < 0.45  # did not wait for the spin (margin for a loaded machine)


@pytest.mark.parametrize("settle", [True, False])
def test_in_process_measure_starts_each_window_once_idle(tmp_path, settle):
    # each timed window (3 rounds) follows a call that left 0.6 s of spinning behind
    log = tmp_path / "calls.txt"
    timings = measure({"spinner": spinning_runner(0.6, str(log))}, batch_size=1, rounds=3, warmup=1, min_time=0.0,
                      max_calls=1, progress=False, settle=settle)
    starts = [float(line) for line in log.read_text().split()]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert len(starts) == 4
    if settle:
        assert min(gaps) >= 0.6
        assert max(timings["spinner"].seconds_per_call) < 0.2  # the waiting is outside the timed windows
    else:
        assert max(gaps) < 0.45
    wait_until_idle()  # leave no spinning thread to the next test


def test_measure_protocol_on_a_fake_clock(monkeypatch):
    """warmup calls per runner (the last one calibrates), calls = ceil(min_time / once) clamped to [1, max_calls],
    then rounds interleaved a, b, c, a, b, c; on a clock that only the runners advance, every time is exact."""
    import types
    import vitzoo.speed
    clock, log = [0.0], []

    def runner(name, cost):
        def run():
            log.append(name)
            clock[0] += cost
        return run
    monkeypatch.setattr(vitzoo.speed, "time", types.SimpleNamespace(perf_counter=lambda: clock[0], sleep=None))
    costs = {"a": 2.0 ** -5, "b": 0.25, "c": 2.0 ** -10}  # binary fractions: exact sums
    timings = measure({k: runner(k, v) for k, v in costs.items()}, batch_size=2, rounds=2, warmup=3,
                      min_time=0.1, max_calls=50, progress=False, settle=False)
    calls = {"a": 4, "b": 1, "c": 50}  # ceil(0.1 * 32) = 4; 0.4 -> at least 1; ceil(102.4) = 103 -> max_calls
    assert {k: t.calls for k, t in timings.items()} == calls
    assert log == ["a"] * 3 + ["b"] * 3 + ["c"] * 3 + (["a"] * 4 + ["b"] + ["c"] * 50) * 2
    assert {k: t.seconds_per_call for k, t in timings.items()} == {k: [v, v] for k, v in costs.items()}
    assert timings["b"].throughput == timings["b"].best_throughput == 8.0
