"""benchmarks/_isolated.py: per-process interleaved timing used by the speed benchmarks."""
import functools
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from _isolated import measure_isolated  # noqa: E402


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


def test_builder_failure_is_reported_with_the_runner_name():
    with pytest.raises(RuntimeError, match=r"worker 'bad' failed: ValueError"):
        measure_isolated({"bad": (int, ("not a number",))}, batch_size=1, rounds=1)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rounds"):
        measure_isolated({}, batch_size=1, rounds=0)
