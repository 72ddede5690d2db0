"""The types of ``inferscope.snapshot()``: :class:`Snapshot` and its :class:`StatsRow` rows.

:func:`build_snapshot` merges the series of an :class:`~inferscope.aggregator.AggregateView` (success
and every error) into one row per (model, version, stage); :meth:`Snapshot.table` prints the rows,
with the optional columns of :data:`TABLE_COLUMNS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._records import COUNTER_SLOTS, NO_ERROR
from .aggregator import AggregateView
from .counters import CounterMetric, counter_label, counter_value, counters_of
from .histogram import Histogram

__all__ = ["TABLE_COLUMNS", "Snapshot", "StatsRow", "build_snapshot"]


@dataclass(frozen=True)
class StatsRow:
    """Summary of one model (or one stage of it): every series of its key(s), success and errors."""

    model: str | None
    version: str | None
    stage: str | None  # None = the inference itself
    count: int
    errors: int
    abandoned: int
    p50: float  # seconds; nan when count == 0
    p90: float
    p95: float
    p99: float
    max: float
    mean: float
    #: Thread CPU summed over the calls whose CPU was read (``cpu_sampled_count`` of them: every
    #: inference, a sample of a busy stage's entries; docs/counters.md); None if not measured.
    cpu_seconds: float | None
    cpu_ratio: float | None  # cpu_seconds / wall seconds over the records where CPU was measured
    error_types: Mapping[str, int]
    #: The row of the overflow key: everything interned past the key cap (model and stage are None).
    overflow: bool = False
    #: Totals of the counters beyond the clocks (``counters="full"`` and friends), e.g.
    #: ``{"context_switches.voluntary": 12, "page_faults.minor": 3051, "memory.rss.change": 4096}``.
    counters: Mapping[str, int] = field(default_factory=dict)
    #: Device time of a stage marked ``device="cuda"`` (CUDA events): how many were measured, their
    #: p50 and p95 in seconds, and the total. 0, nan, nan and None when none was.
    gpu_count: int = 0
    gpu_p50: float = math.nan
    gpu_p95: float = math.nan
    gpu_seconds: float | None = None
    #: How many calls had their CPU read: ``count`` for inferences; for a stage every entry while
    #: the stage is entered less than about 100 times a second, and fewer above.
    cpu_sampled_count: int = 0

    @property
    def cpu_per_call(self) -> float | None:
        """Thread CPU seconds per call, over the calls whose CPU was read."""
        if self.cpu_seconds is None or self.cpu_sampled_count == 0:
            return None
        return self.cpu_seconds / self.cpu_sampled_count

    def to_dict(self) -> dict[str, object]:
        """The row as JSON-ready values (nan becomes None)."""

        def clean(value: float | None) -> float | None:
            return None if value is None or math.isnan(value) else value

        return {
            "model": self.model,
            "version": self.version,
            "stage": self.stage,
            "overflow": self.overflow,
            "count": self.count,
            "errors": self.errors,
            "abandoned": self.abandoned,
            "p50_seconds": clean(self.p50),
            "p90_seconds": clean(self.p90),
            "p95_seconds": clean(self.p95),
            "p99_seconds": clean(self.p99),
            "max_seconds": clean(self.max),
            "mean_seconds": clean(self.mean),
            "cpu_seconds": clean(self.cpu_seconds),
            "cpu_ratio": clean(self.cpu_ratio),
            "cpu_sampled_count": self.cpu_sampled_count,
            "cpu_per_call_seconds": clean(self.cpu_per_call),
            "error_types": dict(self.error_types),
            "counters": dict(self.counters),
            "gpu_count": self.gpu_count,
            "gpu_p50_seconds": clean(self.gpu_p50),
            "gpu_p95_seconds": clean(self.gpu_p95),
            "gpu_seconds": clean(self.gpu_seconds),
        }


_ANY_VERSION: Any = object()


def _row_label(row: StatsRow) -> tuple[str, str]:
    if row.overflow:
        return "(overflow: keys past the cap)", "-"
    model = "(no model)" if row.model is None else row.model
    if row.version is not None:
        model = f"{model} v{row.version}"
    return model, "-" if row.stage is None else row.stage


def _millis(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:.3f}"


def _per_call(row: StatsRow, names: Sequence[str], scale: float = 1.0, digits: int = 1) -> str:
    present = [row.counters[n] for n in names if n in row.counters]
    if not present or not row.count:
        return "-"
    return f"{sum(present) / row.count * scale:.{digits}f}"


def _off_cpu_millis(row: StatsRow) -> str:
    # Wall time not spent on the calling thread's CPU: waiting for a core, a lock, I/O or helpers.
    if row.cpu_ratio is None or math.isnan(row.mean):
        return "-"
    return _millis(max(0.0, row.mean * (1.0 - row.cpu_ratio)))


#: Optional columns of :meth:`Snapshot.table`: name -> (header, cell of a row).
TABLE_COLUMNS: dict[str, tuple[str, Callable[[StatsRow], str]]] = {
    "off_cpu": ("off-cpu ms", _off_cpu_millis),
    "switches": (
        "switches",
        lambda r: _per_call(r, ("context_switches.voluntary", "context_switches.involuntary")),
    ),
    "faults": ("faults", lambda r: _per_call(r, ("page_faults.minor", "page_faults.major"))),
    "rss": ("rss KiB", lambda r: _per_call(r, ("memory.rss.change",), 1 / 1024)),
    "heap": ("heap KiB", lambda r: _per_call(r, ("memory.python_heap.change",), 1 / 1024)),
    "gpu": ("gpu p50 ms", lambda r: _millis(r.gpu_p50)),
}


@dataclass(frozen=True)
class Snapshot:
    """Per-model and per-stage statistics at one moment, as returned by ``inferscope.snapshot()``.

    >>> snap = inferscope.snapshot()  # doctest: +SKIP
    >>> snap.row("fraud", "preprocess").p95  # doctest: +SKIP
    0.0021
    """

    rows: tuple[StatsRow, ...]  # by model (None last), the inference row before its stages, stages by path
    dropped: Mapping[str, int]
    keys_overflowed: int
    backend: str  # "c" or "python"

    def row(
        self, model: str | None, stage: str | None = None, *, version: str | None = _ANY_VERSION
    ) -> StatsRow:
        """The row of ``model`` (and ``stage``, None for the inference itself).

        ``version`` is needed only when the model was tracked under several versions. ``row(None)``
        finds the overflow row when no other row has neither model nor stage.
        """
        matches = [r for r in self.rows if r.model == model and r.stage == stage]
        if version is not _ANY_VERSION:
            matches = [r for r in matches if r.version == version]
        if len(matches) > 1:
            regular = [r for r in matches if not r.overflow]
            if len(regular) == 1:
                return regular[0]
            versions = sorted(str(r.version) for r in matches)
            raise KeyError(
                f"{len(matches)} rows match model={model!r}, stage={stage!r} (versions {versions}); "
                "pass version="
            )
        if matches:
            return matches[0]
        available = sorted({f"({r.model!r}, {r.stage!r})" for r in self.rows})
        hint = ", ".join(available) if available else "none: nothing has been recorded yet"
        wanted = f"model={model!r}, stage={stage!r}"
        if version is not _ANY_VERSION:
            wanted += f", version={version!r}"
        raise KeyError(f"no snapshot row for {wanted}; rows present (model, stage): {hint}")

    def table(self, columns: Sequence[str] = ()) -> str:
        """An aligned text table: model, stage, count, p50/p95/p99 in ms, cpu/wall, errors, and the
        p50 of the device time when a stage marked ``device="cuda"`` measured one.

        ``columns`` adds figures per call from :data:`TABLE_COLUMNS`, for a terminal that shows
        more than latency: ``off_cpu`` (ms of wall time not on the CPU: waiting), ``switches``,
        ``faults``, ``rss`` (KiB of RSS change), ``heap`` (KiB of Python heap change) and ``gpu``.
        A figure that was not measured shows as ``-``.

        >>> print(inferscope.snapshot().table(columns=["off_cpu", "switches"]))  # doctest: +SKIP
        """
        unknown = [c for c in columns if c not in TABLE_COLUMNS]
        if unknown:
            raise ValueError(
                f"table(columns=...): unknown column {unknown[0]!r}; accepted: {', '.join(TABLE_COLUMNS)}"
            )
        extra = list(dict.fromkeys(columns))
        if any(r.gpu_count for r in self.rows) and "gpu" not in extra:
            extra.append("gpu")
        header: tuple[str, ...] = (
            "model",
            "stage",
            "count",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "cpu/wall",
            "errors",
            *(TABLE_COLUMNS[c][0] for c in extra),
        )
        lines: list[tuple[str, ...]] = [header]
        for r in self.rows:
            model, stage = _row_label(r)
            if r.stage is not None and not r.overflow:
                stage = "  " * r.stage.count("/") + stage
            ratio = "-" if r.cpu_ratio is None else f"{r.cpu_ratio:.2f}"
            lines.append(
                (
                    model,
                    stage,
                    str(r.count),
                    _millis(r.p50),
                    _millis(r.p95),
                    _millis(r.p99),
                    ratio,
                    str(r.errors),
                    *(TABLE_COLUMNS[c][1](r) for c in extra),
                )
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = []
        for line in lines:
            cells = [
                cell.ljust(w) if i < 2 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            ]
            text.append("  ".join(cells).rstrip())
        dropped = sum(self.dropped.values())
        if dropped:
            reasons = ", ".join(f"{reason}={n}" for reason, n in sorted(self.dropped.items()) if n)
            text.append(f"dropped records: {dropped} ({reasons})")
        if self.keys_overflowed:
            text.append(f"keys past the cap (folded into the overflow row): {self.keys_overflowed}")
        text.append(f"backend: {self.backend}")
        return "\n".join(text)

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form: ``json.dumps(snapshot.to_dict())`` works (nan becomes null)."""
        return {
            "backend": self.backend,
            "dropped": dict(self.dropped),
            "keys_overflowed": self.keys_overflowed,
            "rows": [r.to_dict() for r in self.rows],
        }


@dataclass
class _RowAccumulator:
    duration: Histogram = field(default_factory=Histogram.empty)
    cpu: Histogram | None = None
    cpu_wall_seconds: float = 0.0
    errors: int = 0
    abandoned: int = 0
    error_types: dict[str, int] = field(default_factory=dict)
    counters: np.ndarray = field(default_factory=lambda: np.zeros(COUNTER_SLOTS, np.int64))
    gpu: Histogram | None = None


def build_snapshot(view: AggregateView, backend: str, counters: Sequence[CounterMetric] = ()) -> Snapshot:
    """One row per (model, version, stage), merging success and every error series.

    Keys that differ only in their extra attributes share a row; the overflow key gets a row of its
    own (``overflow=True``, model and stage None).
    """
    groups: dict[tuple[bool, str | None, str | None, str | None], _RowAccumulator] = {}
    for series in view.series:
        info = series.info
        acc = groups.setdefault((info.overflow, info.model, info.version, info.stage), _RowAccumulator())
        acc.duration.merge(series.duration)
        if series.cpu is not None:
            if acc.cpu is None:
                acc.cpu = Histogram.empty(series.cpu.scale)
            acc.cpu.merge(series.cpu)
            acc.cpu_wall_seconds += series.cpu_wall_seconds
        if series.gpu is not None:
            if acc.gpu is None:
                acc.gpu = Histogram.empty(series.gpu.scale)
            acc.gpu.merge(series.gpu)
        acc.abandoned += series.abandoned
        acc.counters += series.counters
        if series.error_id != NO_ERROR:
            acc.errors += series.duration.count
            name = series.error_type or f"error#{series.error_id}"
            acc.error_types[name] = acc.error_types.get(name, 0) + series.duration.count

    rows = []
    for (overflow, model, version, stage), acc in groups.items():
        d = acc.duration
        empty = d.count == 0
        cpu_seconds = None if acc.cpu is None else acc.cpu.sum
        cpu_ratio = None
        if cpu_seconds is not None and acc.cpu_wall_seconds > 0:
            cpu_ratio = cpu_seconds / acc.cpu_wall_seconds
        rows.append(
            StatsRow(
                model=model,
                version=version,
                stage=stage,
                count=d.count,
                errors=acc.errors,
                abandoned=acc.abandoned,
                p50=d.quantile(0.5),
                p90=d.quantile(0.9),
                p95=d.quantile(0.95),
                p99=d.quantile(0.99),
                max=math.nan if empty else d.max,
                mean=math.nan if empty else d.sum / d.count,
                cpu_seconds=cpu_seconds,
                cpu_ratio=cpu_ratio,
                error_types=dict(sorted(acc.error_types.items())),
                overflow=overflow,
                counters={
                    counter_label(c): counter_value(c, acc.counters, d.count)
                    for c in counters_of(counters, "inference" if stage is None else "stage")
                },
                cpu_sampled_count=0 if acc.cpu is None else acc.cpu.count,
                gpu_count=0 if acc.gpu is None else acc.gpu.count,
                gpu_p50=math.nan if acc.gpu is None else acc.gpu.quantile(0.5),
                gpu_p95=math.nan if acc.gpu is None else acc.gpu.quantile(0.95),
                gpu_seconds=None if acc.gpu is None else acc.gpu.sum,
            )
        )

    def order(r: StatsRow) -> tuple[object, ...]:
        return (
            r.model is None,
            r.model or "",
            r.overflow,
            r.version is None,
            r.version or "",
            r.stage is not None,
            r.stage or "",
        )

    rows.sort(key=order)
    return Snapshot(tuple(rows), dict(view.dropped), view.keys_overflowed, backend)
