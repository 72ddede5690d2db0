"""Windows: what the service did in each ``window_seconds``, per key and for the process.

A window is the difference of the aggregates at two window boundaries, so the flight recorder, the
detector, the report and the exports agree by construction. The drainer closes one window every
``window_seconds``; the recorder stores it and the detector reads it.

Keys are named (service, model, version, stage path), never by the process's interned integers, so
that windows from other processes and earlier runs compare with these.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import threading
import time
import tracemalloc
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from ._backend import monotonic_ns
from ._keys import KeyRegistry
from ._process_cpu import OWN_THREADS, NativeCpuSharer, ProcessCpuSharer
from ._records import (
    COUNTER_SLOTS,
    SLOT_CUDA_ALLOCATED_DELTA,
    SLOT_CUDA_PEAK,
    SLOT_INVOLUNTARY_SWITCHES,
    SLOT_MAJOR_FAULTS,
    SLOT_MINOR_FAULTS,
    SLOT_PY_HEAP_DELTA,
    SLOT_RSS_DELTA,
    SLOT_VOLUNTARY_SWITCHES,
)
from ._runtime import REGISTRY, RUNTIME
from ._selflog import report_error
from .aggregator import AggregateView, Series
from .config import RECORDER_OFF
from .counters import CounterMetric, counter_label, counter_metrics, counter_value, counters_of
from .histogram import Histogram
from .system.canary import Canary, read_schedstat
from .system.cgroup import CgroupInfo, read_cgroup
from .system.fingerprint import cached_environment
from .system.host import read_process, read_psi, read_steal
from .system.threads import usable_cpus

#: The schema version of windows, baselines and regressions written to disk (the recorder's tables
#: and the baseline JSON). Raise it on an incompatible change.
SCHEMA_VERSION = 1
#: The layout of the flight recorder's file. 2: histograms as binary blobs (1 held them as JSON;
#: rows of a version 1 file stay readable). A file of a higher version is never written to.
RECORDER_SCHEMA_VERSION = 2
#: The counter that holds how many calls had their CPU read (``cpu_seconds`` is their sum): every
#: call of an inference, a sample of a busy stage's (docs/counters.md). Windows recorded before it
#: existed lack it.
CPU_READ_CALLS = "cpu_read_calls"


@dataclass(frozen=True)
class KeyWindow:
    """One key (an inference, or one stage of it) over one window.

    ``stage`` is the stage path (``"infer/encoder"``), or None for the whole inference. Sums are
    over the window's calls; a figure that was not measured is None.
    """

    model: str
    version: str | None
    stage: str | None
    count: int
    errors: int
    #: Wall seconds of the window's successful calls, as bucket deltas of the exponential histogram
    #: (``duration.count == count - errors``): a failure's duration says little about the cost.
    duration: Histogram
    #: Wall seconds of all the window's calls, failures included, as every other sum here.
    wall_seconds: float
    #: Calling-thread CPU seconds of the calls whose CPU was read (counters ``default`` and above):
    #: all of an inference's, a sample of a busy stage's. None when not measured, and for a busy
    #: stage whose sample held none of the window's calls.
    cpu_seconds: float | None = None
    #: Wall seconds of the calls whose CPU was measured: the denominator of CPU/wall.
    cpu_wall_seconds: float = 0.0
    #: Process CPU seconds shared out to the inferences by wall-time overlap, so that library thread
    #: pools (BLAS, torch intra-op) count; inferences only, None for stages.
    process_cpu_seconds: float | None = None
    #: Counter sums by metric-free name: ``voluntary_switches``, ``involuntary_switches``,
    #: ``minor_faults``, ``major_faults``, ``rss_change_bytes``, ``py_heap_change_bytes``,
    #: ``gpu_seconds``, ``cpu_read_calls`` (``CPU_READ_CALLS``)... Only the counters that were read.
    counters: Mapping[str, float] = field(default_factory=dict)
    #: Input size (items, tokens, bytes) summed over the calls that reported one, and their count.
    size_sum: float = 0.0
    size_count: int = 0

    @property
    def key(self) -> tuple[str, str | None, str | None]:
        """(model, version, stage): the name of this series."""
        return (self.model, self.version, self.stage)


@dataclass(frozen=True)
class ProcessWindow:
    """The process and its host over one window. A figure that could not be read is None."""

    #: The process's resident set at the window's end, and the Python heap (tracemalloc) if traced.
    rss_bytes: float | None = None
    py_heap_bytes: float | None = None
    #: The process's CPU seconds (all threads) during the window.
    process_cpu_seconds: float | None = None
    #: The machine canary: median wall and CPU seconds of one run of its fixed unit of work, and
    #: how many runs the window holds.
    canary_wall_seconds: float | None = None
    canary_cpu_seconds: float | None = None
    canary_runs: int = 0
    #: Host and container signals over the window: CPU steal (fraction of the host's time), CFS
    #: throttled seconds of this cgroup, CPU pressure (PSI "some", fraction of the window).
    steal_fraction: float | None = None
    throttled_seconds: float | None = None
    cpu_pressure: float | None = None
    #: Where the process runs: CPU model, cores it may use, the cgroup's CPU quota in cores.
    cpu_model: str | None = None
    cpu_count: float | None = None
    cpu_quota_cores: float | None = None
    #: The environment fingerprint (system/fingerprint.py) in force during the window.
    fingerprint: str | None = None
    #: Records dropped during the window (ring full, stack depth...): the window is short of them.
    records_dropped: int = 0
    #: Process CPU seconds that went to inferences (``KeyWindow.process_cpu_seconds`` summed): the
    #: rest of ``process_cpu_seconds`` ran outside every inference.
    inference_cpu_seconds: float | None = None
    #: Seconds the process's threads spent runnable but waiting for a core during the window (the
    #: run-queue delay of /proc/self/task/*/schedstat): what CPU contention and throttling cost.
    run_queue_seconds: float | None = None
    #: The canary thread's mean wait for a core per wake-up (seconds): contention seen by a thread
    #: that does almost nothing, so it does not depend on the service's own load.
    canary_wait_seconds: float | None = None


@dataclass(frozen=True)
class Window:
    """Everything one window holds: the process's figures and every key that had calls."""

    service: str
    start_unix: float
    end_unix: float
    process: ProcessWindow
    keys: tuple[KeyWindow, ...]

    @property
    def seconds(self) -> float:
        """The window's length."""
        return self.end_unix - self.start_unix


# The recorder stores the types above, so it is imported once they exist. Imported here and not
# on first use: a lazy import holds the module's import lock, and a fork() at that moment would
# leave the lock held forever in the child.
from .recorder import FlightRecorder  # noqa: E402

# --- building windows ------------------------------------------------------------------------------

#: Windows kept in memory for ``recent_windows()``; the flight recorder keeps the history.
RECENT_WINDOWS = 120
#: Closed windows kept while the flight recorder cannot take them (a file locked by another
#: process past the wait, a full disk), oldest first; they are written with the next window that
#: can be. Past this, the oldest is let go and counted in ``WindowBuilder.unrecorded``.
UNRECORDED_WINDOWS = 60
#: How long the drainer waits for another process's write to the flight recorder before it keeps
#: the window for the next try: short, since draining waits meanwhile.
WRITE_WAIT_SECONDS = 1.0

#: Counter slots by the names windows give them; other counters (perf events) take their label.
_COUNTER_NAMES = {
    SLOT_VOLUNTARY_SWITCHES: "voluntary_switches",
    SLOT_INVOLUNTARY_SWITCHES: "involuntary_switches",
    SLOT_MINOR_FAULTS: "minor_faults",
    SLOT_MAJOR_FAULTS: "major_faults",
    SLOT_RSS_DELTA: "rss_change_bytes",
    SLOT_PY_HEAP_DELTA: "py_heap_change_bytes",
    SLOT_CUDA_ALLOCATED_DELTA: "cuda_change_bytes",
    SLOT_CUDA_PEAK: "cuda_peak_bytes",
}

_logger = logging.getLogger("inferscope")

Listener = Callable[[Window], object]
_Name = tuple[str, "str | None", "str | None"]


def _counter_name(metric: CounterMetric) -> str:
    return _COUNTER_NAMES.get(metric.slot) or counter_label(metric).replace(".", "_")


class InputSizes:
    """Input size sums per inference key, written only by calls that report a size.

    The record that the hot path writes has no room left for a size, and most services never set
    one; a side table keeps the hot path as it is for them. A lock makes the sums exact when several
    threads report at once.
    """

    def __init__(self, registry: KeyRegistry, current_key: Callable[[], int]) -> None:
        self._registry = registry
        self._current_key = current_key
        self._lock = threading.Lock()
        self._sums: dict[int, list[float]] = {}
        self._roots: dict[int, int | None] = {}

    def add(self, key: int, size: float) -> None:
        """Add one call's size to inference ``key``."""
        with self._lock:
            entry = self._sums.get(key)
            if entry is None:
                self._sums[key] = [size, 1]
            else:
                entry[0] += size
                entry[1] += 1

    def add_to_current(self, size: float) -> bool:
        """Add ``size`` to the inference open in this context; False when none is."""
        key = self._current_key()
        root = self._roots.get(key, -1)
        if root == -1:
            root = self._inference_of(key)
            self._roots[key] = root
        if root is None:
            return False
        self.add(root, size)
        return True

    def _inference_of(self, key: int) -> int | None:
        info = self._registry.info(key)
        while info.kind != "inference" and info.parent is not None:
            info = self._registry.info(info.parent)
        return info.key if info.kind == "inference" and info.model is not None else None

    def take(self) -> dict[int, tuple[float, int]]:
        """(size sum, calls) per inference key since the last ``take()``."""
        with self._lock:
            sums, self._sums = self._sums, {}
        return {key: (entry[0], int(entry[1])) for key, entry in sums.items()}

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._sums = {}


def check_size(size: object) -> float:
    """``size`` as a float: a finite number of at least 0 (items, tokens, bytes)."""
    if type(size) in (int, float):  # the common case, without the cost of the ABC checks below
        value = float(cast(float, size))
        if 0.0 <= value < math.inf:
            return value
    if isinstance(size, bool) or not isinstance(size, numbers.Real):
        raise TypeError(f"an input size must be a number (items, tokens, bytes), got {size!r}")
    value = float(size)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"an input size must be a finite number of at least 0, got {size!r}")
    return value


@dataclass
class _Accumulator:
    """One named key's sums while a window is built."""

    count: int = 0
    errors: int = 0
    duration: Histogram = field(default_factory=Histogram.empty)
    wall_seconds: float = 0.0
    cpu_seconds: float | None = None
    cpu_wall_seconds: float = 0.0
    cpu_read_calls: int = 0
    counters: np.ndarray = field(default_factory=lambda: np.zeros(COUNTER_SLOTS, np.int64))
    gpu_seconds: float | None = None
    kind: str = "inference"


def _delta(series: Series, earlier: Series | None) -> tuple[Histogram, Series | None]:
    """The series' duration delta, and ``earlier`` unless the aggregates were reset since."""
    if earlier is not None and series.duration.count >= earlier.duration.count:
        try:
            return series.duration.minus(earlier.duration), earlier
        except ValueError:
            pass
    return series.duration.copy(), None


@dataclass
class _HostReading:
    """Cumulative process and host counters at a window boundary."""

    process_cpu_seconds: float
    steal_seconds: float | None
    throttled_ns: int | None
    cpu_stall_us: int | None
    dropped: int
    run_queue_ns: int | None


class WindowBuilder:
    """Closes a window every ``window_seconds`` from the drainer thread, stores it and hands it on.

    ``tick()`` runs after every drain; ``add_records()`` sees every drained batch (for process CPU
    per inference); ``close()`` closes the current window now (at shutdown). Nothing here raises
    into the drainer: a failure is counted in ``errors`` (and ``inferscope.sdk.errors``) and logged
    at most once a minute.
    """

    def __init__(self, registry: KeyRegistry, current_key: Callable[[], int]) -> None:
        self._registry = registry
        self.sharer: ProcessCpuSharer | NativeCpuSharer = ProcessCpuSharer(registry)
        self.canary = Canary()
        self.sizes = InputSizes(registry, current_key)
        self._close_lock = threading.Lock()
        self._recent: deque[Window] = deque(maxlen=RECENT_WINDOWS)
        self._listeners: list[Listener] = []
        self.errors = 0
        self.listener_errors = 0
        self.size_errors = 0
        #: Closed windows never written to the flight recorder (more than UNRECORDED_WINDOWS waited).
        self.unrecorded = 0
        self._unrecorded: deque[Window] = deque()
        self._settings: Any = None
        self._recorder: FlightRecorder | None = None
        self._recorder_path: str | None = None
        self._reset()

    def _reset(self) -> None:
        self._previous: dict[tuple[int, int], Series] = {}
        self._aggregates_start: int | None = None
        self._start_unix: float | None = None
        self._next_close_unix = math.inf
        self._host: _HostReading | None = None
        self._carried_cpu: dict[_Name, float] = {}
        self._environment: Mapping[str, Any] | None = None
        self._fingerprints_recorded: set[str] = set()

    # --- called by the drainer ---------------------------------------------------------------

    def add_records(self, records: np.ndarray) -> None:
        """See a drained batch: the wall time of its inferences, for sharing out process CPU."""
        try:
            self.sharer.add_records(records)
        except Exception:
            self._failed("inferscope: sharing process CPU out to inferences failed")

    def seconds_until_due(self) -> float:
        """How long until ``tick()`` has work: the canary's next run or the window's close (0 before
        the first tick)."""
        settings = self._settings
        if settings is None:
            return 0.0
        due = self._next_close_unix - time.time()
        if settings.canary:
            due = min(due, self.canary.seconds_until_due())
        return max(due, 0.0)

    def tick(self, settings: Any = None) -> None:
        """Sample the process CPU, run the canary when due, close the window when due."""
        try:
            if settings is None:
                settings = _current_settings()
            if settings is None or not settings.enabled:
                return
            if settings is not self._settings:
                self._apply(settings)
            # inferscope's own threads' CPU (this one's included) is not the inferences'.
            self.sharer.sample(monotonic_ns(), time.process_time() - OWN_THREADS.cpu_seconds())
            if settings.canary:
                self.canary.maybe_run()
            if time.time() >= self._next_close_unix:
                self.close()
        except Exception:
            self._failed("inferscope: closing a window failed")

    def _apply(self, settings: Any) -> None:
        self._settings = settings
        now = time.time()
        if self._start_unix is None:
            self._start_unix = now
            self._host = self._read_host(0, read_cgroup())
        # Boundaries fall on multiples of window_seconds in Unix time, so that the windows of
        # several processes (pre-fork workers, replicas) line up.
        self._next_close_unix = (math.floor(now / settings.window_seconds) + 1) * settings.window_seconds
        if settings.recorder != self._recorder_path:
            self._close_recorder()
            self._recorder_path = settings.recorder

    def close(self, *, final: bool = False) -> Window | None:
        """Close the current window now; None when there is nothing to close."""
        from ._pipeline import collect_view

        if final:
            self.sharer.flush()
        with self._close_lock:
            settings = self._settings
            if settings is None or self._start_unix is None:
                return None
            now = time.time()
            view = collect_view()  # drains the ring first: the window holds every call up to now
            window = self._build(view, settings, self._start_unix, now)
            self._start_unix = now
            self._next_close_unix = (math.floor(now / settings.window_seconds) + 1) * settings.window_seconds
            self._recent.append(window)
        self._record(window)
        for listener in list(self._listeners):
            try:
                listener(window)
            except Exception:
                self.listener_errors += 1
                self._failed("inferscope: a window listener raised")
        return window

    # --- building ------------------------------------------------------------------------------

    def _build(self, view: AggregateView, settings: Any, start: float, end: float) -> Window:
        groups: dict[_Name, _Accumulator] = {}
        previous: dict[tuple[int, int], Series] = {}
        if view.start_time_unix_nano != self._aggregates_start:
            # The aggregates started over (a reset): everything they hold is new.
            self._previous = {}
            self._aggregates_start = view.start_time_unix_nano
        for series in view.series:
            info = series.info
            ident = (info.key, series.error_id)
            previous[ident] = series
            if info.model is None:
                continue  # stages outside any inference, and keys past the cap: no model to compare
            duration, earlier = _delta(series, self._previous.get(ident))
            if duration.count == 0:
                continue
            acc = groups.setdefault((info.model, info.version, info.stage), _Accumulator(kind=info.kind))
            acc.count += duration.count
            acc.wall_seconds += duration.sum
            if series.error_id:
                acc.errors += duration.count
            else:
                acc.duration.merge(duration)
            if series.cpu is not None:
                earlier_cpu = earlier.cpu if earlier is not None else None
                cpu = series.cpu.sum - (earlier_cpu.sum if earlier_cpu is not None else 0.0)
                acc.cpu_seconds = (acc.cpu_seconds or 0.0) + max(cpu, 0.0)
                acc.cpu_wall_seconds += series.cpu_wall_seconds - (
                    earlier.cpu_wall_seconds if earlier is not None else 0.0
                )
                acc.cpu_read_calls += max(
                    series.cpu.count - (earlier_cpu.count if earlier_cpu is not None else 0), 0
                )
            acc.counters += series.counters - (earlier.counters if earlier is not None else 0)
            if series.gpu is not None:
                earlier_gpu = earlier.gpu if earlier is not None else None
                gpu = series.gpu.sum - (earlier_gpu.sum if earlier_gpu is not None else 0.0)
                acc.gpu_seconds = (acc.gpu_seconds or 0.0) + max(gpu, 0.0)
        self._previous = previous

        process_cpu = self._carried_cpu
        self._carried_cpu = {}
        for key, seconds in self.sharer.take().items():
            info = self._registry.info(key)
            name: _Name = (info.model or "", info.version, None)
            process_cpu[name] = process_cpu.get(name, 0.0) + seconds
        sizes: dict[_Name, list[float]] = {}
        for key, (total, calls) in self.sizes.take().items():
            info = self._registry.info(key)
            entry = sizes.setdefault((info.model or "", info.version, None), [0.0, 0])
            entry[0] += total
            entry[1] += calls

        metrics = counter_metrics(settings.counter_mask)
        keys: list[KeyWindow] = []
        for name in sorted(groups, key=lambda n: (n[0], n[1] or "", n[2] or "")):
            acc = groups[name]
            counters = {
                _counter_name(metric): float(counter_value(metric, acc.counters, acc.count))
                for metric in counters_of(metrics, acc.kind)
            }
            if acc.gpu_seconds is not None:
                counters["gpu_seconds"] = acc.gpu_seconds
            # A busy stage's CPU is read on a sample of its calls: a window may hold none of them,
            # and its CPU is then not known (None), not zero.
            cpu_seconds = acc.cpu_seconds if acc.cpu_read_calls else None
            if cpu_seconds is not None:
                counters[CPU_READ_CALLS] = float(acc.cpu_read_calls)
            size_sum, size_count = sizes.pop(name, (0.0, 0))
            keys.append(
                KeyWindow(
                    model=name[0],
                    version=name[1],
                    stage=name[2],
                    count=acc.count,
                    errors=acc.errors,
                    duration=acc.duration,
                    wall_seconds=acc.wall_seconds,
                    cpu_seconds=cpu_seconds,
                    cpu_wall_seconds=acc.cpu_wall_seconds,  # 0.0 when no call was read
                    process_cpu_seconds=process_cpu.pop(name, 0.0) if acc.kind == "inference" else None,
                    counters=counters,
                    size_sum=size_sum,
                    size_count=int(size_count),
                )
            )
        # CPU of inferences whose calls land in a later window (shared out late): it goes there.
        self._carried_cpu = {name: cpu for name, cpu in process_cpu.items() if cpu > 0}
        inference_cpu = sum(k.process_cpu_seconds or 0.0 for k in keys)
        return Window(
            service=self._service_name(settings),
            start_unix=start,
            end_unix=end,
            process=self._process_window(view, end - start, inference_cpu),
            keys=tuple(keys),
        )

    def _read_host(self, dropped: int, info: CgroupInfo) -> _HostReading:
        psi_root = info.pressure_dir if info.pressure_dir is not None else Path("/proc/pressure")
        throttling = info.throttling
        return _HostReading(
            process_cpu_seconds=time.process_time(),
            steal_seconds=read_steal(),
            throttled_ns=throttling.throttled_time_ns if throttling is not None else None,
            cpu_stall_us=read_psi(psi_root).get(("cpu", "some")),
            dropped=dropped,
            run_queue_ns=_run_queue_ns(),
        )

    def _process_window(self, view: AggregateView, seconds: float, inference_cpu: float) -> ProcessWindow:
        before = self._host
        cgroup = read_cgroup()  # once per window: it is a dozen small files
        now = self._read_host(sum(view.dropped.values()), cgroup)
        self._host = now
        seconds = max(seconds, 1e-9)

        def change(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else max(b - a, 0.0)

        steal = change(before.steal_seconds, now.steal_seconds) if before else None
        throttled = change(before.throttled_ns, now.throttled_ns) if before else None
        stall = change(before.cpu_stall_us, now.cpu_stall_us) if before else None
        run_queue = change(before.run_queue_ns, now.run_queue_ns) if before else None
        env = self._current_environment(cgroup)
        canary = self.canary.take()
        sample = read_process()
        return ProcessWindow(
            rss_bytes=sample.rss_bytes,
            py_heap_bytes=float(tracemalloc.get_traced_memory()[0]) if tracemalloc.is_tracing() else None,
            process_cpu_seconds=change(before.process_cpu_seconds, now.process_cpu_seconds)
            if before
            else None,
            canary_wall_seconds=canary.wall_seconds,
            canary_cpu_seconds=canary.cpu_seconds,
            canary_runs=canary.runs,
            steal_fraction=None if steal is None else steal / (seconds * (os.cpu_count() or 1)),
            throttled_seconds=None if throttled is None else throttled / 1e9,
            cpu_pressure=None if stall is None else min(stall / 1e6 / seconds, 1.0),
            cpu_model=(env.get("cpu") or {}).get("model"),
            cpu_count=float(usable_cpus(cgroup)[0]),
            cpu_quota_cores=cgroup.cpu_limit,
            fingerprint=env.get("fingerprint"),
            records_dropped=max(now.dropped - before.dropped, 0) if before else 0,
            inference_cpu_seconds=inference_cpu,
            run_queue_seconds=None if run_queue is None else run_queue / 1e9,
            canary_wait_seconds=canary.wait_seconds,
        )

    def _current_environment(self, cgroup: CgroupInfo) -> Mapping[str, Any]:
        # Read again only when it can have changed (an ML library imported, other cgroup limits):
        # reading it costs hundreds of milliseconds of the drainer's time with torch installed.
        self._environment = cached_environment(cgroup)
        return self._environment

    def _service_name(self, settings: Any) -> str:
        from . import _pipeline

        exports = _pipeline._exports
        if exports is not None:
            name = exports.resource.attributes.get("service.name")
            if isinstance(name, str) and name:
                return name
        return settings.service_name or os.environ.get("OTEL_SERVICE_NAME") or "unknown_service"

    # --- the flight recorder and listeners -----------------------------------------------------

    def recorder(self) -> FlightRecorder | None:
        """The flight recorder in force, opened on first use; None when ``recorder="off"``."""
        settings = self._settings if self._settings is not None else _current_settings()
        if settings is None or settings.recorder == RECORDER_OFF:
            return None
        if self._recorder is None or self._recorder.path != settings.recorder:
            self._close_recorder()
            self._recorder = FlightRecorder(
                settings.recorder,
                max_bytes=settings.recorder_max_bytes,
                window_retention_seconds=settings.recorder_window_retention_days * 86400,
                rollup_retention_seconds=settings.recorder_rollup_retention_days * 86400,
                busy_timeout_seconds=WRITE_WAIT_SECONDS,
            )
            self._recorder_path = settings.recorder
        return self._recorder

    def _record(self, window: Window) -> None:
        """Store the window, after those that earlier tries could not store (oldest first)."""
        recorder = self.recorder()
        waiting = self._unrecorded
        if recorder is None:
            waiting.clear()  # recorder="off": the windows are kept in memory only
            return
        waiting.append(window)
        env = self._environment
        while waiting:
            oldest = waiting[0]
            fingerprint = oldest.process.fingerprint
            if env is not None and fingerprint and fingerprint not in self._fingerprints_recorded:  # noqa: SIM102
                if recorder.save_fingerprint(fingerprint, env, seen_unix=oldest.end_unix):
                    self._fingerprints_recorded.add(fingerprint)
            if not recorder.save_window(oldest):
                break  # kept for the next window's try (the recorder counts the failure)
            waiting.popleft()
            if recorder.fork_waiting:
                break  # fork() waits for the recorder: the rest goes with the next window
        if len(waiting) > UNRECORDED_WINDOWS:
            while len(waiting) > UNRECORDED_WINDOWS:
                waiting.popleft()
                self.unrecorded += 1
            self._failed(
                "inferscope: the flight recorder could not take windows for a while; the oldest are let go"
            )

    def _close_recorder(self) -> None:
        recorder, self._recorder = self._recorder, None
        if recorder is not None:
            recorder.close()
        self._fingerprints_recorded = set()

    def add_listener(self, listener: Listener) -> None:
        if not callable(listener):
            raise TypeError(f"a window listener must be callable, got {listener!r}")
        if listener not in self._listeners:
            self._listeners = [*self._listeners, listener]

    def remove_listener(self, listener: Listener) -> None:
        self._listeners = [fn for fn in self._listeners if fn != listener]

    def recent(self, last: int | None = None) -> tuple[Window, ...]:
        with self._close_lock:
            windows = tuple(self._recent)
        return windows if last is None else windows[max(len(windows) - last, 0) :]

    def size_failed(self) -> None:
        """A ``size=`` function raised or returned no size (call from its ``except`` block)."""
        self.size_errors += 1
        self._failed("inferscope: the size function of a tracked model failed; the call's size is left out")

    def _failed(self, message: str) -> None:
        self.errors += 1
        report_error(message)  # counted in inferscope.sdk.errors, logged at most once a minute

    def shutdown(self) -> None:
        """Close the current window (stored and handed on like any other) and the recorder."""
        try:
            if self._settings is not None and self._settings.enabled:
                self.close(final=True)
        except Exception:
            self._failed("inferscope: closing the last window failed")
        if self._unrecorded:
            self.unrecorded += len(self._unrecorded)
            self._unrecorded.clear()
            self._failed("inferscope: the flight recorder could not take the last windows before shutdown")
        self._close_recorder()
        self._settings = None
        self._start_unix = None

    def before_fork(self) -> None:
        """No window is closing and no SQLite call of the recorder is running while fork() copies
        the process (both may hold locks that the child could never get back)."""
        self._held_for_fork = self._close_lock.acquire(timeout=5.0)
        recorder = self._recorder
        if recorder is not None:
            recorder.before_fork()

    def after_fork_in_parent(self) -> None:
        recorder = self._recorder
        if recorder is not None:
            recorder.after_fork_in_parent()
        if getattr(self, "_held_for_fork", False):
            self._held_for_fork = False
            self._close_lock.release()

    def after_fork_in_child(self) -> None:
        """The child starts with fresh windows; its recorder connection is opened anew on use (a
        SQLite connection must not cross fork()). Listeners stay."""
        self._held_for_fork = False
        self._close_lock = threading.Lock()
        self._recent = deque(maxlen=RECENT_WINDOWS)
        self._unrecorded = deque()  # the parent's, which the parent writes
        recorder, self._recorder = self._recorder, None
        if recorder is not None:
            recorder.after_fork_in_child()
        self.sharer.after_fork_in_child()
        self.canary.after_fork_in_child()
        self.sizes.after_fork_in_child()
        settings = self._settings
        self._reset()
        self._settings = None
        if settings is not None:
            self._apply(settings)


def _run_queue_ns() -> int | None:
    """Nanoseconds this process's live threads have waited on a run queue (None without
    schedstats). A thread that ended takes its share with it: a window's figure may fall short."""
    total, found = 0, False
    try:
        threads = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in threads:
        stat = read_schedstat(f"/proc/self/task/{tid}/schedstat")
        if stat is not None:
            total += stat[0]
            found = True
    return total if found else None


def _current_settings() -> Any:
    from ._pipeline import current_settings

    return current_settings()


WINDOWS = WindowBuilder(REGISTRY, RUNTIME.current_key)
os.register_at_fork(
    before=WINDOWS.before_fork,
    after_in_parent=WINDOWS.after_fork_in_parent,
    after_in_child=WINDOWS.after_fork_in_child,
)


def recent_windows(last: int | None = None) -> tuple[Window, ...]:
    """The most recent closed windows, oldest first (at most the last ``RECENT_WINDOWS``; the
    flight recorder keeps the history).

    >>> import inferscope
    >>> all(w.seconds > 0 for w in inferscope.recent_windows(last=5))
    True
    """
    return WINDOWS.recent(last)


def add_window_listener(listener: Listener) -> None:
    """Call ``listener(window)`` from the drainer thread with each window as it closes.

    A listener must return quickly (the drainer waits for it); one that raises is counted in
    ``inferscope.sdk.errors`` and logged at most once a minute, and is called again next window.
    """
    WINDOWS.add_listener(listener)


def remove_window_listener(listener: Listener) -> None:
    """Stop calling ``listener``; nothing happens when it was not added."""
    WINDOWS.remove_listener(listener)


def add_batch_size(tracked: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """For the instrumentors: add the batch's first dimension (rows of an array, a tensor, a
    DataFrame or a sparse matrix, items of a list) as the input size of the inference that
    ``tracked`` (a tracked call) opens. The batch is the first positional argument, else the
    first keyword argument that has a shape (an xgboost ``DMatrix`` counts its rows). Nothing is
    added when there is no such batch; never raises."""
    try:
        batch = args[0] if args else next((v for v in kwargs.values() if hasattr(v, "shape")), None)
        shape = getattr(batch, "shape", None)
        if shape is None and callable(getattr(batch, "num_row", None)):
            shape = (batch.num_row(),)  # type: ignore[union-attr]
        if shape is not None:
            if not len(shape):
                return
            rows = shape[0]
        elif isinstance(batch, (list, tuple)):
            rows = len(batch)
        else:
            return
        if isinstance(rows, numbers.Integral) and int(rows) >= 0:
            WINDOWS.sizes.add(tracked.inferscope_key, float(int(rows)))
    except Exception:
        WINDOWS.size_failed()


def set_input_size(size: float) -> bool:
    """Report the size of the current inference's input (items in the batch, tokens, bytes).

    Call it inside a tracked call; the sizes of a window are summed per model
    (``KeyWindow.size_sum`` over ``size_count`` calls). Returns False when no inference is open
    here. Raises TypeError or ValueError for a size that is not a finite number of at least 0.

    >>> import inferscope
    >>> @inferscope.track_inference(model="doc-sized")
    ... def predict(batch):
    ...     inferscope.set_input_size(len(batch))
    ...     return batch
    >>> predict([1, 2, 3])
    [1, 2, 3]
    """
    return WINDOWS.sizes.add_to_current(check_size(size))
