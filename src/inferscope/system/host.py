"""Process, host and container signals as OTel observable instruments.

Nothing here runs on the hot path: the SDK calls the callbacks when it collects (every export
interval, or on a Prometheus scrape), and each callback reads a few small files under /proc and
/sys/fs/cgroup. Which instruments exist is decided once, by probing their sources, so a machine
without PSI or without a cgroup CPU controller simply has fewer instruments.

The readers (``read_psi``, ``read_steal``, ``read_cgroup`` in ``cgroup.py``) are pure functions of
the paths they are given, so tests feed them recorded files.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from opentelemetry.metrics import CallbackOptions, Instrument, Meter, Observation

from .._selflog import ERRORS, RateLimitedLog
from ..export import spec as _spec

try:
    import resource
except ImportError:  # not on Windows: CPU time then comes from os.times()
    resource = None  # type: ignore[assignment]

from . import cgroup as _cgroup
from . import gpu as _gpu
from . import threads as _threads

__all__ = [
    "CallbackGuard",
    "SignalSources",
    "callback_errors",
    "read_loadavg",
    "read_process",
    "read_psi",
    "read_steal",
    "register_system_metrics",
    "system_signals",
]

_logger = logging.getLogger("inferscope.system")

PSI_RESOURCES = ("cpu", "memory", "io")
PSI_KINDS = ("some", "full")

#: Callbacks read each source at most once per this many seconds, so that the instruments fed by one
#: file (cpu.stat's periods, throttled periods and throttled time) report one consistent sample.
_SAMPLE_REUSE_SECONDS = 0.25

Observe = Callable[[], Sequence[Observation]]
T = TypeVar("T")
ObservableCallback = Callable[[CallbackOptions], Iterable[Observation]]


# --- pure readers ---------------------------------------------------------------------------------


def read_psi(root: Path = Path("/proc/pressure")) -> dict[tuple[str, str], int]:
    """Total stall time in microseconds per (resource, kind) from PSI files (``/proc/pressure/*`` or a
    v2 cgroup's ``*.pressure``).

    Resources are ``cpu``, ``memory`` and ``io``; kinds are ``some`` (at least one task stalled) and
    ``full`` (all non-idle tasks stalled at once). Missing files, and kernels where PSI is compiled in
    but disabled (reads fail with EOPNOTSUPP), give no entries. Before Linux 5.13, ``cpu`` has no
    ``full`` line.

    Example::

        read_psi()[("cpu", "some")]  # 133219615: 133 s of CPU stall since boot
    """
    totals: dict[tuple[str, str], int] = {}
    for name in PSI_RESOURCES:
        path = root / name
        if not path.is_file():
            path = root / f"{name}.pressure"  # the cgroup v2 spelling
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            kind, _, rest = line.partition(" ")
            if kind not in PSI_KINDS:
                continue
            for item in rest.split():
                key, _, value = item.partition("=")
                if key == "total" and value.isdigit():
                    totals[(name, kind)] = int(value)
    return totals


def read_steal(path: Path = Path("/proc/stat")) -> float | None:
    """Seconds of CPU time the hypervisor gave to other guests while this host wanted to run (all CPUs,
    since boot), from the ``cpu`` line of ``/proc/stat``; None where the field is missing.

    Inside a container this is still the host's figure: steal belongs to the VM, not the cgroup.
    """
    try:
        with path.open() as stat:
            first = stat.readline()
    except OSError:
        return None
    fields = first.split()
    # cpu user nice system idle iowait irq softirq steal ...
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    try:
        ticks = int(fields[8])
    except ValueError:
        return None
    return ticks / _clock_ticks_per_second()


def _clock_ticks_per_second() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return 100


def read_loadavg() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages, or None where the OS has none."""
    try:
        return os.getloadavg()
    except (OSError, AttributeError):
        return None


@dataclass(frozen=True)
class ProcessSample:
    """One reading of this process's resource use."""

    cpu_user_seconds: float
    cpu_system_seconds: float
    rss_bytes: int | None
    virtual_bytes: int | None
    threads: int | None  #: OS threads, native ones (BLAS, OpenMP) included


def read_process(proc_self: Path = Path("/proc/self")) -> ProcessSample:
    """CPU time (getrusage, all threads), RSS and virtual size (statm), OS thread count (status)."""
    if resource is not None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        user, system = usage.ru_utime, usage.ru_stime
    else:
        times = os.times()
        user, system = times.user, times.system
    rss = virtual = threads = None
    try:
        statm = (proc_self / "statm").read_text().split()
        page = os.sysconf("SC_PAGE_SIZE")
        virtual, rss = int(statm[0]) * page, int(statm[1]) * page
    except (OSError, ValueError, IndexError):
        pass
    try:
        for line in (proc_self / "status").read_text().splitlines():
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
                break
    except (OSError, ValueError, IndexError):
        pass
    return ProcessSample(user, system, rss, virtual, threads)


# --- never raise into the SDK (or the user) --------------------------------------------------------


class CallbackGuard:
    """Wraps observation functions so that a failure is counted and logged, at most once a minute per
    instrument, and yields no points instead of raising.

    The OTel SDK also catches callback exceptions, but it logs every one of them with a traceback; on
    a machine where a file vanished that would be one traceback per collection forever.
    """

    def __init__(
        self,
        logger: logging.Logger = _logger,
        log_interval_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = RateLimitedLog(logger, log_interval_seconds, clock)
        self._lock = threading.Lock()
        self.errors: dict[str, int] = {}

    def record_error(self, name: str, error: BaseException) -> None:
        """Count a failure of ``name`` and log it unless it was logged less than a minute ago."""
        ERRORS.add()  # inferscope.sdk.errors counts every internal failure
        with self._lock:
            self.errors[name] = self.errors.get(name, 0) + 1
            count = self.errors[name]
        self._log.warning(
            "inferscope: sampling %s failed (%s: %s); %d failure(s) so far, logged at most once a minute",
            name,
            type(error).__name__,
            error,
            count,
            key=name,
        )

    def guarded(self, name: str, observe: Observe) -> Observe:
        """``observe`` made safe: its points, or none (counted and logged) when it raises."""

        def call() -> list[Observation]:
            try:
                return list(observe())
            except Exception as error:
                self.record_error(name, error)
                return []

        call.__name__ = f"observe_{name.replace('.', '_')}"
        return call

    def wrap(self, name: str, observe: Observe) -> ObservableCallback:
        """An SDK callback that returns ``observe()``'s points, or none when it raises."""
        call = self.guarded(name, observe)

        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return call()

        callback.__name__ = call.__name__
        return callback

    def total(self) -> int:
        with self._lock:
            return sum(self.errors.values())

    def after_fork_in_child(self) -> None:
        # The collecting thread may have held the lock at fork(); it does not exist in the child.
        self._lock = threading.Lock()


#: The guard used by ``register_system_metrics``.
GUARD = CallbackGuard()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=GUARD.after_fork_in_child)


def callback_errors() -> int:
    """How many times a system-signal callback has failed in this process (each failure yielded no point)."""
    return GUARD.total()


class _Reused(Generic[T]):
    """Reads a source at most once per ``_SAMPLE_REUSE_SECONDS``, so that several instruments fed by one
    file see the same sample within one collection."""

    def __init__(self, read: Callable[[], T]) -> None:
        self._read = read
        self._lock = threading.Lock()
        self._at = -1e18
        self._value: T | None = None

    def get(self) -> T | None:
        now = time.monotonic()
        with self._lock:
            if now - self._at > _SAMPLE_REUSE_SECONDS:
                self._value = self._read()
                self._at = now
            return self._value


# --- registration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignalSources:
    """Where the signals are read from. The defaults are the real files; tests point them at fixtures."""

    proc_self: Path = Path("/proc/self")
    proc_stat: Path = Path("/proc/stat")
    pressure_root: Path = Path("/proc/pressure")
    cgroup_root: Path = _cgroup.DEFAULT_ROOT
    proc_self_cgroup: Path = _cgroup.DEFAULT_PROC_SELF_CGROUP
    loadavg: Callable[[], tuple[float, float, float] | None] = field(default=read_loadavg)


def register_system_metrics(
    meter: Meter,
    *,
    sources: SignalSources | None = None,
    gpu: bool = True,
    oversubscription: bool = True,
    guard: CallbackGuard | None = None,
) -> list[Instrument]:
    """Create an observable instrument for every process, host, container and GPU signal this machine
    has, and return them. Sources are probed once here; signals without a source are skipped silently.
    Names, kinds, units and descriptions come from the metric specification (``export/spec.py``).

    The callbacks run when the SDK collects, never on the hot path, and never raise.

    Example::

        meter = meter_provider.get_meter("inferscope")
        instruments = register_system_metrics(meter)
    """
    guard = guard or GUARD
    created: list[Instrument] = []

    def add(name: str, observe: Observe) -> None:
        created.append(_spec.create_observable(meter, _spec.get(name), [guard.wrap(name, observe)]))

    def register_gpu(add: AddInstrument, src: SignalSources) -> None:
        created.extend(_gpu.register_gpu_metrics(meter, guard))

    _register_groups(add, register_gpu, sources or SignalSources(), oversubscription, gpu, guard)
    return created


def system_signals(
    *,
    sources: SignalSources | None = None,
    gpu: bool = True,
    oversubscription: bool = True,
    guard: CallbackGuard | None = None,
) -> list[_spec.Signal]:
    """The same signals as :func:`register_system_metrics`, as (specification entry, safe observe
    function) pairs, for a reader that is not an OTel meter: the Prometheus endpoint samples them
    on each scrape.

    Example::

        for signal in system_signals():
            print(signal.spec.name, signal.observe())
    """
    guard = guard or GUARD
    signals: list[_spec.Signal] = []

    def add(name: str, observe: Observe) -> None:
        signals.append(_spec.Signal(_spec.get(name), guard.guarded(name, observe)))

    def register_gpu(add: AddInstrument, src: SignalSources) -> None:
        signals.extend(_gpu.gpu_signals(guard))

    _register_groups(add, register_gpu, sources or SignalSources(), oversubscription, gpu, guard)
    return signals


def _register_oversubscription(add: AddInstrument, src: SignalSources) -> None:
    add(_threads.OVERSUBSCRIPTION_METRIC, _threads.oversubscription_observations)


def _register_groups(
    add: AddInstrument,
    register_gpu: Callable[[AddInstrument, SignalSources], None],
    src: SignalSources,
    oversubscription: bool,
    gpu: bool,
    guard: CallbackGuard,
) -> None:
    groups: list[Callable[[AddInstrument, SignalSources], None]] = [
        _register_process,
        _register_host,
        _register_cgroup,
    ]
    groups += [_register_oversubscription] if oversubscription else []
    groups += [register_gpu] if gpu else []
    for register in groups:
        # A probe that fails in an unforeseen way costs its own group of signals, never the caller.
        try:
            register(add, src)
        except Exception as error:
            name = register.__name__.lstrip("_")
            guard.record_error(f"registration ({name})", error)


AddInstrument = Callable[[str, Observe], None]


def _register_process(add: AddInstrument, src: SignalSources) -> None:
    first = read_process(src.proc_self)
    sample = _Reused(lambda: read_process(src.proc_self))

    def cpu_time() -> list[Observation]:
        now = sample.get()
        if now is None:
            return []
        return [
            Observation(now.cpu_user_seconds, {"cpu.mode": "user"}),
            Observation(now.cpu_system_seconds, {"cpu.mode": "system"}),
        ]

    def field_of(name: str) -> Observe:
        def observe() -> list[Observation]:
            value = getattr(sample.get(), name)
            return [] if value is None else [Observation(value)]

        return observe

    add("process.cpu.time", cpu_time)
    if first.rss_bytes is not None:
        add("process.memory.usage", field_of("rss_bytes"))
        add(
            "process.memory.virtual",
            field_of("virtual_bytes"),
        )
    if first.threads is not None:
        add("process.thread.count", field_of("threads"))


def _register_host(add: AddInstrument, src: SignalSources) -> None:
    if read_steal(src.proc_stat) is not None:

        def steal() -> list[Observation]:
            value = read_steal(src.proc_stat)
            return [] if value is None else [Observation(value)]

        add("inferscope.host.cpu.steal.time", steal)

    if src.loadavg() is not None:
        load = _Reused(src.loadavg)
        for index, window in enumerate(("1m", "5m", "15m")):

            def observe(index: int = index) -> list[Observation]:
                values = load.get()
                return [] if values is None else [Observation(values[index])]

            add(f"system.linux.cpu.load_{window}", observe)

    # In a v2 cgroup with its own pressure files, the container's pressure is the one that matters
    # (at the root cgroup it equals the host's); otherwise the host-wide /proc/pressure.
    paths = _cgroup.resolve_cgroup(src.cgroup_root, src.proc_self_cgroup)
    pressure_root = paths.pressure_dir or src.pressure_root
    if read_psi(pressure_root):

        def pressure() -> list[Observation]:
            return [
                Observation(total_us / 1e6, {"resource": resource_name, "kind": kind})
                for (resource_name, kind), total_us in read_psi(pressure_root).items()
            ]

        add("inferscope.host.pressure.stall.time", pressure)


def _register_cgroup(add: AddInstrument, src: SignalSources) -> None:
    paths = _cgroup.resolve_cgroup(src.cgroup_root, src.proc_self_cgroup)
    if _cgroup.read_throttling(paths) is not None:
        throttling = _Reused(lambda: _cgroup.read_throttling(paths))

        def counter_of(name: str, scale: float = 1.0) -> Observe:
            def observe() -> list[Observation]:
                value = throttling.get()
                if value is None:
                    return []
                return [Observation(getattr(value, name) * scale)]

            return observe

        add(
            "inferscope.container.cpu.periods",
            counter_of("nr_periods"),
        )
        add(
            "inferscope.container.cpu.throttled.periods",
            counter_of("nr_throttled"),
        )
        add(
            "inferscope.container.cpu.throttled.time",
            counter_of("throttled_time_ns", 1e-9),
        )

    if _cgroup.cpu_limit_source_exists(paths):

        def cpu_limit() -> list[Observation]:
            quota = _cgroup.read_cpu_limit(paths)
            return [] if quota is None else [Observation(quota[0] / quota[1])]

        add("inferscope.container.cpu.limit", cpu_limit)

    if _cgroup.memory_limit_source_exists(paths):

        def memory_limit() -> list[Observation]:
            limit = _cgroup.read_memory_limit(paths)
            return [] if limit is None else [Observation(limit)]

        add("inferscope.container.memory.limit", memory_limit)
