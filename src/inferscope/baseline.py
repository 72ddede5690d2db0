"""Baselines: what a model cost when it was known to be good, per stage, as one versioned JSON format.

A baseline summarises a run of windows (windows.py) of one model, whatever its version: for the
inference and each stage, the quantiles of the duration, CPU per call, process CPU per call, the
counters and the input size per call, the arrival rate and, so that a change can be told from noise,
the window-to-window spread of the figures the detector compares (the MAD of the per-window
quantile). For the process it holds the canary, the host signals, where it ran, and the environment
fingerprint, with the environment itself when it is known, so that a dependency change can name the
packages that changed.

The detector keeps two for each model: the **anchor**, by default the first ``baseline_seconds`` of
the model in the flight recorder's history (kept across restarts and deploys, replaceable by a file
saved here or by a CI benchmark's output in the same format), and the **rolling** reference (the
same hour a day earlier, or the trailing week).

>>> from inferscope.histogram import Histogram
>>> from inferscope.windows import KeyWindow, ProcessWindow, Window
>>> def window(start):
...     key = KeyWindow("fraud", "3", None, 100, 0, Histogram.of([0.01] * 100), 1.0)
...     return Window("svc", start, start + 1, ProcessWindow(), (key,))
>>> base = Baseline.from_windows("fraud", [window(t) for t in range(5)])
>>> round(base.stage(None).quantiles["p95"], 3), base.stage(None).count
(0.01, 500)
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .histogram import Histogram
from .windows import CPU_READ_CALLS, SCHEMA_VERSION, KeyWindow, ProcessWindow, Window

__all__ = [
    "BASELINE_FORMAT",
    "MIN_WINDOW_CALLS",
    "Baseline",
    "BaselineFormatError",
    "KeyFigures",
    "ProcessBaseline",
    "ProcessFigures",
    "StageBaseline",
    "load_baselines",
    "mad_noise",
    "save_baselines",
]

#: The ``format`` field of a baseline file.
BASELINE_FORMAT = "inferscope.baseline"
#: A window with fewer calls than this gives no per-window quantile: its p95 would be its maximum.
MIN_WINDOW_CALLS = 10
#: 1.4826 * MAD estimates the standard deviation of normal data, and ignores outliers.
_MAD_TO_SIGMA = 1.4826
#: Where a baseline comes from.
SOURCES = ("anchor", "rolling", "file", "ci")


class BaselineFormatError(ValueError):
    """A baseline file that this version of inferscope cannot read, with the reason and the fix."""


def mad_noise(values: Sequence[float]) -> float:
    """The window-to-window noise of ``values``: 1.4826 times their median absolute deviation (0.0
    for fewer than 3 values).

    >>> mad_noise([1.0, 1.1, 0.9, 1.0, 5.0])
    0.14826
    """
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) < 3:
        return 0.0
    center = statistics.median(finite)
    return round(_MAD_TO_SIGMA * statistics.median(abs(v - center) for v in finite), 12)


def _noise(values: Iterable[float | None]) -> float:
    """``mad_noise`` of the values that were read (None and non-finite ones skipped)."""
    return mad_noise([v for v in values if v is not None and math.isfinite(v)])


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _at_most_wall(per_call: float | None, wall_per_call: float | None) -> float | None:
    """A mean over the calls read, no larger than the mean wall time of all calls.

    A call's thread CPU time and its time off the CPU are each at most its wall time, so their means
    over all calls are at most the mean wall time, which every call gives exactly. A random sample
    of a few dozen calls that caught one long pause (a garbage collection, a long wait for the GIL)
    can have a mean several times that: it is then surely too high, and the bound is nearer the
    truth. Below the bound, the mean over the calls read stands."""
    if per_call is None or wall_per_call is None:
        return per_call
    return min(per_call, wall_per_call)


@dataclass(frozen=True)
class KeyFigures:
    """The figures of one key (an inference or a stage) pooled over some windows."""

    count: int
    errors: int
    seconds: float
    duration: Histogram
    wall_seconds: float
    cpu_seconds: float | None
    cpu_wall_seconds: float
    process_cpu_seconds: float | None
    counters: Mapping[str, float]
    size_sum: float
    size_count: int
    #: The calls of the windows that were given process CPU (see ``process_cpu_per_call``).
    process_cpu_calls: int = 0

    @classmethod
    def pool(cls, windows: Iterable[tuple[KeyWindow, float]]) -> KeyFigures:
        """Pool (key window, window length in seconds) pairs of one key."""
        hist = Histogram.empty()
        count = errors = size_count = process_cpu_calls = 0
        seconds = wall = cpu_wall = size_sum = 0.0
        cpu: float | None = None
        process_cpu: float | None = None
        counters: dict[str, float] = {}
        unread_count = False
        for kw, length in windows:
            count += kw.count
            errors += kw.errors
            seconds += length
            hist.merge(kw.duration)
            wall += kw.wall_seconds
            if kw.cpu_seconds is not None:
                cpu = (cpu or 0.0) + kw.cpu_seconds
                cpu_wall += kw.cpu_wall_seconds
            if kw.process_cpu_seconds:  # 0.0: its intervals were not shared out yet (see below)
                process_cpu = (process_cpu or 0.0) + kw.process_cpu_seconds
                process_cpu_calls += kw.count
            for name, value in kw.counters.items():
                counters[name] = counters.get(name, 0.0) + float(value)
            if kw.cpu_seconds is not None and CPU_READ_CALLS not in kw.counters:
                unread_count = True
            size_sum += kw.size_sum
            size_count += kw.size_count
        if unread_count:
            counters.pop(CPU_READ_CALLS, None)  # a window without the count: no mean over reads
        return cls(
            count,
            errors,
            seconds,
            hist,
            wall,
            cpu,
            cpu_wall,
            process_cpu,
            counters,
            size_sum,
            size_count,
            process_cpu_calls,
        )

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile of the duration in seconds, None without enough calls to say."""
        return self.duration.quantile(q) if self.count >= MIN_WINDOW_CALLS else None

    @property
    def mean_seconds(self) -> float | None:
        """Wall seconds per call."""
        return _ratio(self.wall_seconds, self.count)

    @property
    def cpu_ratio(self) -> float | None:
        """Calling-thread CPU over wall time, over the calls whose CPU was measured."""
        return _ratio(self.cpu_seconds, self.cpu_wall_seconds)

    @property
    def cpu_per_call(self) -> float | None:
        """Calling-thread CPU seconds per call: the mean over the calls whose CPU was read (all of
        an inference's, a random sample of a busy stage's: docs/counters.md), so that the calls
        left out neither dilute it nor move it.

        Windows recorded without the count of calls read fall back to CPU/wall over those calls
        times the mean wall time of all calls. That estimate rises with any wait of the calls left
        out of the sample (a preemption the sample missed reads as more work), which is why the
        count is kept."""
        reads = self.counters.get(CPU_READ_CALLS)
        if reads is not None and self.cpu_seconds is not None:
            return _at_most_wall(_ratio(self.cpu_seconds, reads), self.mean_seconds)
        ratio, mean = self.cpu_ratio, self.mean_seconds
        return None if ratio is None or mean is None else ratio * mean

    @property
    def off_cpu_per_call(self) -> float | None:
        """Wall seconds per call that the calling thread spent off the CPU (waiting or preempted):
        the mean over the calls whose CPU was read, as ``cpu_per_call``. Both come from the same
        calls, so a stage that never waits reads 0 and a little waiting reads as a little (the
        mean wall time of all calls less the sample's CPU would be 0 or less as often as not)."""
        reads = self.counters.get(CPU_READ_CALLS)
        if reads is not None and self.cpu_seconds is not None:
            off = _ratio(self.cpu_wall_seconds - self.cpu_seconds, reads)
            return None if off is None else _at_most_wall(max(0.0, off), self.mean_seconds)
        ratio, mean = self.cpu_ratio, self.mean_seconds
        return None if ratio is None or mean is None else max(0.0, 1.0 - ratio) * mean

    @property
    def process_cpu_per_call(self) -> float | None:
        """Process CPU seconds per inference, helper threads included: over the windows that were
        given process CPU. An interval's CPU is shared out to the inferences a second after it ends
        (docs/regressions.md), so the first window after a start is given none while its
        inferences ran: counted as 0, it made every baseline that holds it too low."""
        return _ratio(self.process_cpu_seconds, self.process_cpu_calls)

    def counter_per_call(self, name: str) -> float | None:
        """A counter's sum per call, None when it was not read."""
        value = self.counters.get(name)
        return None if value is None else _ratio(value, self.count)

    @property
    def size_per_call(self) -> float | None:
        """Input size per call, over the calls that reported one."""
        return _ratio(self.size_sum, self.size_count)

    @property
    def calls_per_second(self) -> float | None:
        """The arrival rate."""
        return _ratio(float(self.count), self.seconds)

    @property
    def gpu_per_call(self) -> float | None:
        """Device seconds per call of a stage timed on a GPU."""
        return self.counter_per_call("gpu_seconds")


@dataclass(frozen=True)
class ProcessFigures:
    """The process and host figures pooled over some windows (medians and means of what was read)."""

    windows: int
    seconds: float
    rss_bytes: float | None
    py_heap_bytes: float | None
    process_cpu_per_second: float | None
    canary_wall_seconds: float | None
    canary_cpu_seconds: float | None
    steal_fraction: float | None
    throttled_fraction: float | None
    cpu_pressure: float | None
    cpu_model: str | None
    cpu_count: float | None
    cpu_quota_cores: float | None
    fingerprints: tuple[str, ...]
    #: Seconds the process's threads waited on a run queue per CPU second they ran (schedstat).
    run_queue_per_cpu: float | None = None
    #: The canary thread's median wait for a core per wake-up (schedstat).
    canary_wait_seconds: float | None = None

    @classmethod
    def pool(cls, processes: Sequence[tuple[ProcessWindow, float]]) -> ProcessFigures:
        """Pool (process window, window length) pairs."""

        def median(values: Iterable[float | None]) -> float | None:
            present = [v for v in values if v is not None and math.isfinite(v)]
            return statistics.median(present) if present else None

        def last(values: Iterable[Any]) -> Any:
            found = None
            for value in values:
                if value is not None:
                    found = value
            return found

        seconds = sum(length for _, length in processes)
        cpu = [(p.process_cpu_seconds, n) for p, n in processes if p.process_cpu_seconds is not None]
        throttled = [(p.throttled_seconds, n) for p, n in processes if p.throttled_seconds is not None]
        queued = [
            (p.run_queue_seconds, p.process_cpu_seconds)
            for p, _ in processes
            if p.run_queue_seconds is not None and p.process_cpu_seconds
        ]
        fingerprints: list[str] = []
        for p, _ in processes:
            if p.fingerprint and p.fingerprint not in fingerprints:
                fingerprints.append(p.fingerprint)
        return cls(
            windows=len(processes),
            seconds=seconds,
            rss_bytes=median(p.rss_bytes for p, _ in processes),
            py_heap_bytes=median(p.py_heap_bytes for p, _ in processes),
            process_cpu_per_second=_ratio(sum(c for c, _ in cpu), sum(n for _, n in cpu)) if cpu else None,
            canary_wall_seconds=median(p.canary_wall_seconds for p, _ in processes if p.canary_runs),
            canary_cpu_seconds=median(p.canary_cpu_seconds for p, _ in processes if p.canary_runs),
            steal_fraction=median(p.steal_fraction for p, _ in processes),
            throttled_fraction=(
                _ratio(sum(t for t, _ in throttled), sum(n for _, n in throttled)) if throttled else None
            ),
            cpu_pressure=median(p.cpu_pressure for p, _ in processes),
            cpu_model=last(p.cpu_model for p, _ in processes),
            cpu_count=last(p.cpu_count for p, _ in processes),
            cpu_quota_cores=last(p.cpu_quota_cores for p, _ in processes),
            fingerprints=tuple(fingerprints),
            run_queue_per_cpu=_ratio(sum(q for q, _ in queued), sum(c for _, c in queued))
            if queued
            else None,
            canary_wait_seconds=median(p.canary_wait_seconds for p, _ in processes),
        )


@dataclass(frozen=True)
class StageBaseline:
    """The reference figures of one key: the inference (``stage`` None) or one stage path."""

    stage: str | None
    windows: int
    count: int
    errors: int
    #: p50, p90, p95, p99 and the regression quantile (``q``) of the pooled duration, in seconds.
    quantiles: Mapping[str, float]
    mean_seconds: float | None
    #: Median and noise (1.4826 x MAD) of the per-window regression quantile.
    window_quantile: float | None
    window_quantile_noise: float
    cpu_per_call: float | None
    cpu_per_call_noise: float
    cpu_ratio: float | None
    off_cpu_per_call: float | None
    process_cpu_per_call: float | None
    process_cpu_per_call_noise: float
    counters_per_call: Mapping[str, float]
    size_per_call: float | None
    calls_per_second: float | None
    gpu_per_call: float | None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        data = asdict(self)
        data["quantiles"] = dict(self.quantiles)
        data["counters_per_call"] = dict(self.counters_per_call)
        return data


@dataclass(frozen=True)
class ProcessBaseline:
    """The reference figures of the process and its host."""

    rss_bytes: float | None = None
    py_heap_bytes: float | None = None
    process_cpu_per_second: float | None = None
    canary_wall_seconds: float | None = None
    canary_wall_noise: float = 0.0
    canary_cpu_seconds: float | None = None
    steal_fraction: float | None = None
    throttled_fraction: float | None = None
    cpu_pressure: float | None = None
    cpu_model: str | None = None
    cpu_count: float | None = None
    cpu_quota_cores: float | None = None
    run_queue_per_cpu: float | None = None
    canary_wait_seconds: float | None = None
    #: The window-to-window noise (1.4826 x MAD) of the contention signals: a rise within a few
    #: times its own noise is the machine's usual weather, not contention.
    cpu_pressure_noise: float = 0.0
    steal_fraction_noise: float = 0.0
    throttled_fraction_noise: float = 0.0
    run_queue_per_cpu_noise: float = 0.0
    canary_wait_noise: float = 0.0


@dataclass(frozen=True)
class Baseline:
    """The reference of one model (every version seen in its period), per stage.

    Build one with :meth:`from_windows`; save and load with :func:`save_baselines` and
    :func:`load_baselines` (or ``inferscope baseline save|load``).
    """

    model: str
    source: str
    start_unix: float
    end_unix: float
    #: The regression quantile of ``window_quantile`` (``regression_quantile`` when it was built).
    quantile: float
    window_seconds: float
    versions: tuple[str, ...]
    stages: Mapping[str | None, StageBaseline]
    process: ProcessBaseline
    #: The environment fingerprint during the period (the last one seen), and the environment
    #: itself (``inferscope.environment()``) where known.
    fingerprint: str | None = None
    environment: Mapping[str, Any] | None = None
    service: str | None = None
    created_unix: float = field(default_factory=time.time)

    def stage(self, path: str | None) -> StageBaseline | None:
        """The baseline of ``path`` (None for the whole inference), if it had calls."""
        return self.stages.get(path)

    @property
    def seconds(self) -> float:
        """The length of the period it covers."""
        return self.end_unix - self.start_unix

    @classmethod
    def from_windows(
        cls,
        model: str,
        windows: Sequence[Window],
        *,
        source: str = "anchor",
        quantile: float = 0.95,
        environment: Mapping[str, Any] | None = None,
    ) -> Baseline:
        """The baseline of ``model`` over ``windows`` (those without the model are skipped).

        Raises ValueError when no window has a call of the model.
        """
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        mine = [w for w in windows if any(k.model == model for k in w.keys)]
        if not mine:
            raise ValueError(f"no window holds a call of model {model!r}")
        per_key: dict[str | None, list[tuple[KeyWindow, float]]] = {}
        versions: list[str] = []
        for w in mine:
            for kw in w.keys:
                if kw.model != model:
                    continue
                per_key.setdefault(kw.stage, []).append((kw, w.seconds))
                if kw.version is not None and kw.version not in versions:
                    versions.append(kw.version)
        stages = {path: _stage_baseline(path, pairs, quantile) for path, pairs in per_key.items()}
        processes = [(w.process, w.seconds) for w in mine]
        pooled = ProcessFigures.pool(processes)
        canary_walls = [
            p.canary_wall_seconds for p, _ in processes if p.canary_runs and p.canary_wall_seconds
        ]
        process = ProcessBaseline(
            rss_bytes=pooled.rss_bytes,
            py_heap_bytes=pooled.py_heap_bytes,
            process_cpu_per_second=pooled.process_cpu_per_second,
            canary_wall_seconds=pooled.canary_wall_seconds,
            canary_wall_noise=mad_noise([c for c in canary_walls if c is not None]),
            canary_cpu_seconds=pooled.canary_cpu_seconds,
            steal_fraction=pooled.steal_fraction,
            throttled_fraction=pooled.throttled_fraction,
            cpu_pressure=pooled.cpu_pressure,
            cpu_model=pooled.cpu_model,
            cpu_count=pooled.cpu_count,
            cpu_quota_cores=pooled.cpu_quota_cores,
            run_queue_per_cpu=pooled.run_queue_per_cpu,
            canary_wait_seconds=pooled.canary_wait_seconds,
            cpu_pressure_noise=_noise(p.cpu_pressure for p, _ in processes),
            steal_fraction_noise=_noise(p.steal_fraction for p, _ in processes),
            throttled_fraction_noise=_noise(_ratio(p.throttled_seconds, seconds) for p, seconds in processes),
            run_queue_per_cpu_noise=_noise(
                _ratio(p.run_queue_seconds, p.process_cpu_seconds) for p, _ in processes
            ),
            canary_wait_noise=_noise(p.canary_wait_seconds for p, _ in processes),
        )
        fingerprint = pooled.fingerprints[-1] if pooled.fingerprints else None
        if (
            environment is not None
            and fingerprint is not None
            and environment.get("fingerprint") != fingerprint
        ):
            environment = None  # the environment of another fingerprint would name the wrong changes
        return cls(
            model=model,
            source=source,
            start_unix=min(w.start_unix for w in mine),
            end_unix=max(w.end_unix for w in mine),
            quantile=quantile,
            window_seconds=statistics.median(w.seconds for w in mine),
            versions=tuple(versions),
            stages=stages,
            process=process,
            fingerprint=fingerprint,
            environment=dict(environment) if environment is not None else None,
            service=mine[-1].service,
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (one entry of a baseline file's ``baselines``)."""
        return {
            "model": self.model,
            "service": self.service,
            "source": self.source,
            "created_unix": self.created_unix,
            "start_unix": self.start_unix,
            "end_unix": self.end_unix,
            "quantile": self.quantile,
            "window_seconds": self.window_seconds,
            "versions": list(self.versions),
            "fingerprint": self.fingerprint,
            "environment": self.environment,
            "process": asdict(self.process),
            "stages": [stage.to_json() for stage in self.stages.values()],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str | None = None) -> Baseline:
        """The baseline of a ``to_json()`` dict; ``source`` overrides the recorded one (a loaded file
        becomes ``"file"``). Raises BaselineFormatError naming what is missing or wrong."""
        try:
            stages: dict[str | None, StageBaseline] = {}
            for entry in data["stages"]:
                stage = StageBaseline(**entry)
                stages[stage.stage] = stage
            recorded = str(data["source"])
            return cls(
                model=str(data["model"]),
                source=source or (recorded if recorded in SOURCES else "file"),
                start_unix=float(data["start_unix"]),
                end_unix=float(data["end_unix"]),
                quantile=float(data["quantile"]),
                window_seconds=float(data["window_seconds"]),
                versions=tuple(str(v) for v in data["versions"]),
                stages=stages,
                process=ProcessBaseline(**data["process"]),
                fingerprint=data.get("fingerprint"),
                environment=data.get("environment"),
                service=data.get("service"),
                created_unix=float(data.get("created_unix") or time.time()),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise BaselineFormatError(
                f"a baseline entry is malformed ({type(error).__name__}: {error})"
            ) from None


def _stage_baseline(path: str | None, pairs: Sequence[tuple[KeyWindow, float]], q: float) -> StageBaseline:
    pooled = KeyFigures.pool(pairs)
    per_window = [KeyFigures.pool([pair]) for pair in pairs]
    voting = [f for f in per_window if f.count >= MIN_WINDOW_CALLS]
    window_q = [f.duration.quantile(q) for f in voting]
    window_cpu = [c for c in (f.cpu_per_call for f in voting) if c is not None]
    window_pcpu = [c for c in (f.process_cpu_per_call for f in voting) if c is not None]
    quantiles = {name: pooled.duration.quantile(value) for name, value in _QUANTILES.items()}
    quantiles["q"] = pooled.duration.quantile(q)
    counters = {
        name: value / pooled.count
        for name, value in pooled.counters.items()
        if pooled.count and name not in ("gpu_seconds", CPU_READ_CALLS)
    }
    return StageBaseline(
        stage=path,
        windows=len(pairs),
        count=pooled.count,
        errors=pooled.errors,
        quantiles={k: v for k, v in quantiles.items() if math.isfinite(v)},
        mean_seconds=pooled.mean_seconds,
        window_quantile=statistics.median(window_q) if window_q else None,
        window_quantile_noise=mad_noise(window_q),
        cpu_per_call=pooled.cpu_per_call,
        cpu_per_call_noise=mad_noise(window_cpu),
        cpu_ratio=pooled.cpu_ratio,
        off_cpu_per_call=pooled.off_cpu_per_call,
        process_cpu_per_call=pooled.process_cpu_per_call,
        process_cpu_per_call_noise=mad_noise(window_pcpu),
        counters_per_call=counters,
        size_per_call=pooled.size_per_call,
        calls_per_second=pooled.calls_per_second,
        gpu_per_call=pooled.gpu_per_call,
    )


_QUANTILES = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99}


def save_baselines(path: str | os.PathLike[str], baselines: Iterable[Baseline]) -> None:
    """Write ``baselines`` to ``path`` as one JSON file (atomically: a reader never sees half a file).

    Example::

        save_baselines("fraud-baseline.json", [Baseline.from_windows("fraud", windows)])
    """
    document = {
        "format": BASELINE_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "baselines": [b.to_json() for b in baselines],
    }
    target = Path(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(document, file, indent=2, allow_nan=False, default=_json_default)
            file.write("\n")
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _json_default(value: object) -> object:
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def parse_baselines(
    document: object, *, where: str = "the document", source: str | None = None
) -> list[Baseline]:
    """The baselines of a parsed baseline document; BaselineFormatError says what is wrong with it."""
    if not isinstance(document, Mapping) or document.get("format") != BASELINE_FORMAT:
        raise BaselineFormatError(
            f"{where} is not an inferscope baseline file (expected a JSON object with "
            f'"format": "{BASELINE_FORMAT}"; write one with `inferscope baseline save`)'
        )
    version = document.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BaselineFormatError(f"{where}: schema_version must be an integer, got {version!r}")
    if version != SCHEMA_VERSION:
        newer = version > SCHEMA_VERSION
        raise BaselineFormatError(
            f"{where} has schema_version {version}, and this inferscope reads {SCHEMA_VERSION}: "
            + ("upgrade inferscope to read it" if newer else "save the baseline again with this inferscope")
        )
    entries = document.get("baselines")
    if not isinstance(entries, list):
        raise BaselineFormatError(f'{where}: "baselines" must be a list')
    baselines = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise BaselineFormatError(f"{where}: baselines[{index}] is not an object")
        try:
            baselines.append(Baseline.from_json(entry, source=source))
        except BaselineFormatError as error:
            raise BaselineFormatError(f"{where}: baselines[{index}]: {error}") from None
    return baselines


def load_baselines(path: str | os.PathLike[str], *, source: str | None = "file") -> list[Baseline]:
    """The baselines saved in ``path`` by :func:`save_baselines`.

    Raises BaselineFormatError for a file of another format or schema version, OSError when it
    cannot be read.
    """
    try:
        with open(path, encoding="utf-8") as file:
            document = json.load(file)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BaselineFormatError(f"{os.fspath(path)} is not JSON ({error})") from None
    return parse_baselines(document, where=os.fspath(path), source=source)
