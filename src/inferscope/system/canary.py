"""The machine canary: a fixed unit of work, timed, so that a slower machine shows apart from slower code.

The unit is one SHA-256 over a fixed 64 KiB buffer: single-threaded, cache-resident, no allocation
and no I/O, and hashlib releases the GIL for it, so it measures the core it runs on and not the
interpreter's other threads. The drainer runs it every ``interval_seconds`` (twice a second by
default; one run takes ~40 us on a 2020s x86 core, so under 0.01% of a core) and each window keeps
the median wall and CPU time of its runs.

When the same work takes more CPU time, the core itself got slower (another CPU model, a lower
frequency, a neighbour sharing its caches). One run is too short to be preempted: a thread that
wakes from a sleep gets a core first under Linux's CFS, and keeps it for milliseconds. So the
canary also reads how long its thread waited for a core after each wake-up (the run-queue delay
of ``/proc/thread-self/schedstat``): that wait is what CPU contention, CFS throttling and steal
add to every request, and it needs no work at all. benchmarks/canary.py measures both under real
CPU hogs.

>>> canary = Canary()
>>> wall, cpu = canary.run()
>>> wall > 0 and cpu >= 0
True
"""

from __future__ import annotations

import hashlib
import statistics
import threading
import time
from typing import NamedTuple

__all__ = ["CANARY_BYTES", "Canary", "CanaryResult"]

#: The size of the buffer hashed by one run.
CANARY_BYTES = 64 * 1024
#: Runs kept per window at most: the median needs no more, and memory stays fixed.
_MAX_RUNS_PER_WINDOW = 1024


class CanaryResult(NamedTuple):
    """One window's canary: median wall and CPU seconds of a run, how many runs, and the mean wait
    for a core per wake-up of the canary's thread; None when nothing was measured."""

    wall_seconds: float | None
    cpu_seconds: float | None
    runs: int
    wait_seconds: float | None = None


def read_schedstat(path: str) -> tuple[int, int] | None:
    """(ns spent waiting on a run queue, times it was scheduled) from a ``schedstat`` file of
    /proc; None where the kernel has no schedstats."""
    try:
        with open(path, "rb") as f:
            fields = f.read().split()
        return int(fields[1]), int(fields[2])
    except (OSError, ValueError, IndexError):
        return None


class Canary:
    """Runs the unit of work at most every ``interval_seconds`` and keeps the timings until taken.

    ``maybe_run()`` is called from the drainer thread; ``take()`` too, at each window's end. A lock
    makes ``take()`` safe from another thread as well (a final window at shutdown).
    """

    def __init__(self, interval_seconds: float = 0.5) -> None:
        self.interval_seconds = interval_seconds
        # Fixed content: the same bytes in every process and every version of inferscope.
        self._buffer = bytes(range(256)) * (CANARY_BYTES // 256)
        self._lock = threading.Lock()
        self._walls: list[float] = []
        self._cpus: list[float] = []
        self._next_due = 0.0
        self._thread_id: int | None = None
        self._schedstat: tuple[int, int] | None = None

    def run(self) -> tuple[float, float]:
        """One run: (wall seconds, CPU seconds of this thread)."""
        cpu_start = time.thread_time_ns()
        wall_start = time.perf_counter_ns()
        hashlib.sha256(self._buffer).digest()
        wall = time.perf_counter_ns() - wall_start
        cpu = time.thread_time_ns() - cpu_start
        return wall / 1e9, cpu / 1e9

    def seconds_until_due(self) -> float:
        """How long until ``maybe_run()`` runs again (0 when it is due)."""
        return max(self._next_due - time.monotonic(), 0.0)

    def maybe_run(self, now_monotonic: float | None = None) -> bool:
        """Run once if ``interval_seconds`` passed since the last run; True when it ran."""
        now = time.monotonic() if now_monotonic is None else now_monotonic
        if now < self._next_due:
            return False
        self._next_due = now + self.interval_seconds
        if self._thread_id is None:
            self._thread_id = threading.get_native_id()
            self._schedstat = read_schedstat(self._schedstat_path())
        wall, cpu = self.run()
        with self._lock:
            if len(self._walls) < _MAX_RUNS_PER_WINDOW:
                self._walls.append(wall)
                self._cpus.append(cpu)
        return True

    def _schedstat_path(self) -> str:
        return f"/proc/self/task/{self._thread_id}/schedstat"

    def take(self) -> CanaryResult:
        """The window's medians, run count and wait per wake-up, and start the next window."""
        with self._lock:
            walls, cpus = self._walls, self._cpus
            self._walls, self._cpus = [], []
        wait = None
        if self._thread_id is not None:
            before, now = self._schedstat, read_schedstat(self._schedstat_path())
            self._schedstat = now
            if before is not None and now is not None and now[1] > before[1]:
                wait = (now[0] - before[0]) / (now[1] - before[1]) / 1e9
        if not walls:
            return CanaryResult(None, None, 0, wait)
        return CanaryResult(statistics.median(walls), statistics.median(cpus), len(walls), wait)

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._walls, self._cpus = [], []
        self._next_due = 0.0
        self._thread_id = None
        self._schedstat = None
