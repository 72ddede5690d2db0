"""The machine canary: a fixed unit of work, timed at a low duty cycle, that slows when the machine does.

Its cost and its sensitivity to real CPU hogs are measured in benchmarks/canary.py, not here.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from inferscope.system.canary import CANARY_BYTES, Canary

from .conftest import run_python


def test_one_run_hashes_the_fixed_buffer() -> None:
    canary = Canary()
    assert len(canary._buffer) == CANARY_BYTES
    # The same bytes everywhere, so that every process and version times the same work.
    assert hashlib.sha256(canary._buffer).hexdigest() == hashlib.sha256(bytes(range(256)) * 256).hexdigest()
    wall, cpu = canary.run()
    assert wall > 0 and cpu >= 0  # no bound: a loaded machine may preempt the run for any time


def test_runs_at_most_once_per_interval_and_take_gives_medians() -> None:
    canary = Canary(interval_seconds=10.0)
    assert canary.maybe_run(100.0)
    assert not canary.maybe_run(105.0)
    assert canary.maybe_run(110.0)
    result = canary.take()
    assert result.runs == 2
    assert result.wall_seconds is not None and result.wall_seconds > 0
    assert result.cpu_seconds is not None
    assert canary.take()[:3] == (None, None, 0)  # the next window starts empty


def test_fork_forgets_the_parents_runs() -> None:
    canary = Canary(interval_seconds=0.0)
    canary.maybe_run()
    canary.after_fork_in_child()
    assert canary.take().runs == 0


def test_windows_carry_the_canary_on_both_backends(tmp_path) -> None:
    code = """
        import json, time, inferscope
        inferscope.configure(window_seconds=0.6)
        time.sleep(2.0)
        windows = inferscope.recent_windows()
        print(json.dumps([[w.process.canary_runs, w.process.canary_wall_seconds] for w in windows]))
    """
    for no_extension in ("", "1"):  # hashlib releases the GIL on both backends
        env = {"INFERSCOPE_RECORDER": str(tmp_path / "r.sqlite"), "INFERSCOPE_NO_EXTENSION": no_extension}
        result = run_python(code, env=env)
        assert result.returncode == 0, result.stderr
        windows = json.loads(result.stdout)
        assert len(windows) >= 2
        assert all(runs >= 1 and wall > 0 for runs, wall in windows[1:])


def test_the_canary_can_be_turned_off(tmp_path) -> None:
    code = """
        import json, time, inferscope
        inferscope.configure(window_seconds=0.3, canary=False)
        time.sleep(1.0)
        print(json.dumps([w.process.canary_runs for w in inferscope.recent_windows()]))
    """
    result = run_python(code, env={"INFERSCOPE_RECORDER": "off"})
    assert result.returncode == 0, result.stderr
    runs = json.loads(result.stdout)
    assert runs and all(r == 0 for r in runs)


def test_the_canary_reads_its_threads_wait_for_a_core() -> None:
    canary = Canary(interval_seconds=0.0)
    for _ in range(5):
        canary.maybe_run()
        time.sleep(0.002)  # each sleep ends in a wake-up, whose wait schedstat counts
    result = canary.take()
    if not os.path.exists("/proc/thread-self/schedstat"):
        assert result.wait_seconds is None
    else:
        assert result.wait_seconds is not None and result.wait_seconds >= 0
