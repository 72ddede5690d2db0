"""Process CPU per inference: the CPU of every thread, shared out to inferences by wall-time overlap.

The per-stage CPU clock counts the calling thread only; the threads of BLAS, torch's intra-op pool
or onnxruntime work for the inference too. Reading the process CPU clock on the hot path would cost
500-700 ns per call, so the drainer samples it once per drain instead (``sample()``), which cuts
time into intervals, each with the process CPU it used. Each inference record (``add_records()``)
adds its overlap with each interval; once an interval is ``horizon_seconds`` old, the inferences
that ran in it are known, and its CPU goes to them in proportion to their overlap. An interval in
which no inference ran keeps its CPU: that is the process's own, not an inference's.

An inference longer than the horizon reaches intervals already shared out; it is credited at their
rate (CPU per second of inference), or at the interval's whole CPU per second where nothing else
ran, so a long inference is never free.

inferscope's own threads are left out (``OWN_THREADS``): the drainer (windows, the canary, the
detector, the flight recorder), the span exporter, the stack sampler, the Prometheus endpoint and
the native drainer's thread. Their CPU is the observer's, not the model's: counted in, it would
make every inference look dearer while inferscope itself did more, such as when a regression
starts the stack sampler.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ._keys import KeyRegistry
from ._selflog import report_error

__all__ = ["OWN_THREADS", "NativeCpuSharer", "OwnThreads", "ProcessCpuSharer"]

#: Intervals kept after they are shared out, for inferences that end late (a 100 ms drain: ~7 min).
_MAX_INTERVALS = 4096


class OwnThreads:
    """inferscope's own threads, whose CPU the sharers leave out of the process CPU they share.

    A thread registers itself for as long as it runs (``with OWN_THREADS.running():``). The CPU of
    one that ended stays counted, so that the process CPU less it never steps up when a thread
    ends. ``on_change`` is called with ``clocks()`` whenever the set changes (the native drainer
    reads the clocks itself).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Held while the listener is told: two threads that change the set at once hand it over in
        # turn, each with the set as it is then, so that the last word is never a stale set.
        self._notify_lock = threading.Lock()
        self._clocks: dict[int, int] = {}  # thread ident -> its CPU clock id
        self._ended = 0.0  # CPU seconds of registered threads that ended
        self.on_change: Callable[[tuple[int, ...], float], None] | None = None

    @contextmanager
    def running(self) -> Iterator[None]:
        """Count the calling thread's CPU as inferscope's own while the block runs."""
        ident = threading.get_ident()
        try:
            clock = time.pthread_getcpuclockid(ident)
        except (AttributeError, OSError):  # not on this platform: counted as the process's
            yield
            return
        with self._lock:
            self._clocks[ident] = clock
        self._changed()
        try:
            yield
        finally:
            with self._lock:
                self._clocks.pop(ident, None)
                self._ended += time.thread_time()
            self._changed()

    def clocks(self) -> tuple[tuple[int, ...], float]:
        """The CPU clock ids of the threads running now, and the CPU seconds of those that ended."""
        with self._lock:
            return tuple(self._clocks.values()), self._ended

    def cpu_seconds(self) -> float:
        """CPU seconds inferscope's registered threads have used so far."""
        clocks, total = self.clocks()
        for clock in clocks:
            with contextlib.suppress(OSError):  # ending right now: counted in `ended` once it has
                total += time.clock_gettime(clock)
        return total

    def _changed(self) -> None:
        listener = self.on_change
        if listener is not None:
            try:
                with self._notify_lock:
                    listener(*self.clocks())
            except Exception:  # the sharer then counts that thread's CPU as the inferences'
                report_error("inferscope: handing inferscope's own threads to the native drainer failed")

    def after_fork_in_child(self) -> None:
        """The parent's threads do not exist in the child, and the child's clock starts at 0."""
        self._lock = threading.Lock()
        self._notify_lock = threading.Lock()
        self._clocks = {}
        self._ended = 0.0


OWN_THREADS = OwnThreads()


class ProcessCpuSharer:
    """Shares the process CPU of each drain interval among the inferences that overlapped it.

    ``sample()`` and ``take()`` run on the drainer thread; ``add_records()`` wherever the ring is
    drained (the drainer, or a reader's thread through ``snapshot()``). One lock guards the state.
    """

    def __init__(self, registry: KeyRegistry, horizon_seconds: float = 1.0) -> None:
        self._registry = registry
        self.horizon_ns = int(horizon_seconds * 1e9)
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        #: Interval boundaries (monotonic ns): interval i is [_bounds[i], _bounds[i+1]]; the last one
        #: is open until the next sample.
        self._bounds: deque[int] = deque()
        self._bounds_array: np.ndarray | None = None  # the same, as read by add_records()
        self._cpu: deque[float] = deque()  # CPU seconds of each closed interval
        self._overlap: deque[dict[int, int]] = deque()  # per inference key: ns of overlap
        self._rate: deque[float | None] = deque()  # CPU s per overlap ns, once shared out
        self._shared = 0  # intervals [0, _shared) are shared out
        self._last_cpu: float | None = None
        self._credits: dict[int, float] = {}
        self._is_inference = np.zeros(0, dtype=bool)
        #: Records that ended before the oldest interval kept: their CPU is unknown.
        self.missed = 0

    def sample(self, now_ns: int, process_cpu_seconds: float) -> None:
        """Close the open interval at ``now_ns`` with the process CPU clock's reading."""
        with self._lock:
            if self._last_cpu is None:
                self._bounds.append(now_ns)
                self._overlap.append({})
                self._last_cpu = process_cpu_seconds
                return
            if now_ns <= self._bounds[-1]:
                return
            self._bounds_array = None
            self._cpu.append(max(process_cpu_seconds - self._last_cpu, 0.0))
            self._rate.append(None)
            self._last_cpu = process_cpu_seconds
            self._bounds_array = None
            self._bounds.append(now_ns)
            self._overlap.append({})  # the new open interval
            self._share_until(now_ns - self.horizon_ns)
            while len(self._cpu) > _MAX_INTERVALS and self._shared > 0:
                self._bounds.popleft()
                self._cpu.popleft()
                self._overlap.popleft()
                self._rate.popleft()
                self._shared -= 1

    def _share_until(self, until_ns: int) -> None:
        # Caller holds the lock.
        while self._shared < len(self._cpu) and self._bounds[self._shared + 1] <= until_ns:
            i = self._shared
            overlaps = self._overlap[i]
            total = sum(overlaps.values())
            cpu = self._cpu[i]
            if total > 0:
                rate = cpu / total
                for key, ns in overlaps.items():
                    self._credits[key] = self._credits.get(key, 0.0) + ns * rate
            else:
                rate = cpu / max(self._bounds[i + 1] - self._bounds[i], 1)
            self._rate[i] = rate
            overlaps.clear()
            self._shared += 1

    def flush(self) -> None:
        """Share out every closed interval now (at shutdown: nothing more will arrive)."""
        with self._lock:
            self._share_until(1 << 62)

    def add_records(self, records: np.ndarray) -> None:
        """Add the wall time of the batch's inference records to the intervals they overlapped."""
        if records.size == 0:
            return
        keys = records["key"]
        with self._lock:
            if not self._bounds:
                return
            if int(keys.max()) >= self._is_inference.size:
                infos = self._registry.infos()
                self._is_inference = np.array(
                    [info.kind == "inference" and info.model is not None for info in infos], dtype=bool
                )
            inference = self._is_inference[np.minimum(keys, self._is_inference.size - 1)]
            if not inference.any():
                return
            keys = keys[inference].astype(np.int64)
            starts = records["start_ns"][inference]
            ends = starts + np.maximum(records["wall_ns"][inference], 0)
            bounds = self._bounds_array
            if bounds is None or bounds.size != len(self._bounds):
                bounds = np.fromiter(self._bounds, dtype=np.int64, count=len(self._bounds))
                self._bounds_array = bounds
            first = np.searchsorted(bounds, starts, side="right") - 1
            last = np.searchsorted(bounds, ends, side="right") - 1
            self.missed += int((last < 0).sum())
            single = (first == last) & (first >= 0)
            if single.any():
                # The common case, one interval per record: sum the walls per (interval, key), as
                # one integer per pair (bincount over a dense table, no sort).
                walls = (ends - starts)[single]
                pair = first[single] * (int(keys.max()) + 1) + keys[single]
                low = int(pair.min())
                sums = np.bincount(pair - low, weights=walls)
                width = int(keys.max()) + 1
                for offset in np.flatnonzero(sums).tolist():
                    index, key = divmod(offset + low, width)
                    self._add_overlap(index, key, int(sums[offset]))
            for r in np.flatnonzero(~single & (last >= 0)).tolist():
                start, end, key = int(starts[r]), int(ends[r]), int(keys[r])
                for index in range(max(int(first[r]), 0), int(last[r]) + 1):
                    low = max(start, self._bounds[index])
                    high = end if index + 1 >= len(self._bounds) else min(end, self._bounds[index + 1])
                    if high > low:
                        self._add_overlap(index, key, high - low)

    def _add_overlap(self, index: int, key: int, ns: int) -> None:
        # Caller holds the lock.
        if index >= self._shared:
            overlaps = self._overlap[index]
            overlaps[key] = overlaps.get(key, 0) + ns
            return
        rate = self._rate[index]
        if rate is not None:
            self._credits[key] = self._credits.get(key, 0.0) + ns * rate

    def take(self) -> dict[int, float]:
        """Process CPU seconds credited per inference key since the last ``take()``."""
        with self._lock:
            credits, self._credits = self._credits, {}
        return credits

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._reset()


class NativeCpuSharer:
    """The same sharing, done by the native drainer (``_native/share.h``) on the C backend.

    Its thread samples the process CPU clock once per interval and feeds every inference record
    it drains to the sharer, without the GIL; so ``sample()`` and ``add_records()`` have nothing to
    do here, and ``take()`` and ``flush()`` read the credits from it.
    """

    def __init__(self, collector: Any) -> None:
        self.collector = collector
        self._pending: dict[int, float] = {}  # flushed, not taken yet

    def sample(self, now_ns: int, process_cpu_seconds: float) -> None:
        """Nothing: the native drainer samples the clock itself."""

    def add_records(self, records: np.ndarray) -> None:
        """Nothing: the native drainer sees every inference record itself."""

    def flush(self) -> None:
        """Share out every closed interval now (at shutdown); ``take()`` returns the credits."""
        self._merge(self.collector.take_credits(True))

    def take(self) -> dict[int, float]:
        """Process CPU seconds credited per inference key since the last ``take()``."""
        self._merge(self.collector.take_credits())
        credits, self._pending = self._pending, {}
        return credits

    def _merge(self, credits: dict[int, float]) -> None:
        for key, seconds in credits.items():
            self._pending[key] = self._pending.get(key, 0.0) + seconds

    def after_fork_in_child(self) -> None:
        """The drainer starts the collector over; nothing flushed here belongs to the child."""
        self._pending = {}
