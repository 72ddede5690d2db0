"""Windows: what the service did in each ``window_seconds``, per key and for the process.

A window is the difference of the aggregates at two window boundaries, so the flight recorder, the
detector, the report and the exports agree by construction. The drainer closes one window every
``window_seconds``; the recorder stores it and the detector reads it.

Keys are named (service, model, version, stage path), never by the process's interned integers, so
that windows from other processes and earlier runs compare with these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .aggregate import Histogram

#: The schema version of windows, baselines and regressions written to disk (the recorder's tables
#: and the baseline JSON). Raise it on an incompatible change.
SCHEMA_VERSION = 1


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
    #: Wall seconds of the window's calls, as bucket deltas of the exponential histogram.
    duration: Histogram
    wall_seconds: float
    #: Calling-thread CPU seconds (counters ``default`` and above); None when not measured.
    cpu_seconds: float | None = None
    #: Wall seconds of the calls whose CPU was measured: the denominator of CPU/wall.
    cpu_wall_seconds: float = 0.0
    #: Process CPU seconds shared out to the inferences by wall-time overlap, so that library thread
    #: pools (BLAS, torch intra-op) count; inferences only, None for stages.
    process_cpu_seconds: float | None = None
    #: Counter sums by metric-free name: ``voluntary_switches``, ``involuntary_switches``,
    #: ``minor_faults``, ``major_faults``, ``rss_change_bytes``, ``py_heap_change_bytes``,
    #: ``gpu_seconds``... Only the counters that were read.
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
