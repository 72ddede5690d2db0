"""The machine canary: a fixed unit of work, timed, so that a slower machine shows apart from slower code.

The unit is one SHA-256 over a fixed 64 KiB buffer: single-threaded, cache-resident, no allocation
and no I/O, and hashlib releases the GIL for it, so it measures the core it runs on and not the
interpreter's other threads. The drainer runs it every ``interval_seconds`` (twice a second by
default; one run takes ~40 us on a 2020s x86 core, so under 0.01% of a core) and each window keeps
the median wall and CPU time of its runs.

When the same work takes longer on the wall clock while its CPU time stays flat, the thread waited
for a core (contention, CFS throttling, steal); when its CPU time rises too, the core itself got
slower (another CPU model, frequency, a noisy neighbour sharing caches).

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
    """One window's canary: median wall and CPU seconds of a run, and how many runs; None when none ran."""

    wall_seconds: float | None
    cpu_seconds: float | None
    runs: int


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

    def run(self) -> tuple[float, float]:
        """One run: (wall seconds, CPU seconds of this thread)."""
        cpu_start = time.thread_time_ns()
        wall_start = time.perf_counter_ns()
        hashlib.sha256(self._buffer).digest()
        wall = time.perf_counter_ns() - wall_start
        cpu = time.thread_time_ns() - cpu_start
        return wall / 1e9, cpu / 1e9

    def maybe_run(self, now_monotonic: float | None = None) -> bool:
        """Run once if ``interval_seconds`` passed since the last run; True when it ran."""
        now = time.monotonic() if now_monotonic is None else now_monotonic
        if now < self._next_due:
            return False
        self._next_due = now + self.interval_seconds
        wall, cpu = self.run()
        with self._lock:
            if len(self._walls) < _MAX_RUNS_PER_WINDOW:
                self._walls.append(wall)
                self._cpus.append(cpu)
        return True

    def take(self) -> CanaryResult:
        """The window's medians and run count, and start the next window."""
        with self._lock:
            walls, cpus = self._walls, self._cpus
            self._walls, self._cpus = [], []
        if not walls:
            return CanaryResult(None, None, 0)
        return CanaryResult(statistics.median(walls), statistics.median(cpus), len(walls))

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._walls, self._cpus = [], []
        self._next_due = 0.0
